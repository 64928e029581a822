//! Client configurations. Every client of the project starts from one of these functions, so the
//! settings that carry the delivery guarantees (manual offset store, idempotent producer, acks from
//! all replicas) are chosen in one place. The `kafka.librdkafka` passthrough from the pipeline config
//! is applied last, so an operator can set security, timeouts or buffer sizes without code changes.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// Base client configuration for `brokers` with the user's passthrough options applied.
pub fn client_config(brokers: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    with_passthrough(base(brokers), passthrough)
}

fn base(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("client.id", "payslip-stream");
    c
}

/// A consumer that reads partitions it assigns itself: no group commits, no offset store. Used by
/// every reader that keeps its own positions (monitor, replay, inspect, decisions follower).
pub fn reader_config(brokers: &str, group: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = base(brokers);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    with_passthrough(c, passthrough)
}

/// How long a consumer whose prefetch queue is full waits before it looks again (librdkafka's
/// `fetch.queue.backoff.ms`, default 1,000 ms). Set for every consumer: a reader that drains its
/// queue faster than that would otherwise wait out the rest of the second with nothing to do.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Configuration for a consumer that stores offsets only when told to (at-least-once).
pub fn consumer_config(brokers: &str, group: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = base(brokers);
    c.set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        // records of aborted transactions are never seen (the infer stage's own, an upstream's)
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "100")
        // documents fetched ahead of the stage: at most 16 MB (librdkafka's default is 64 MB), so
        // memory does not grow with the documents' size
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "16777216")
        // once that queue is full, librdkafka waits this long before fetching again (default
        // 1,000 ms): a stage draining a backlog emptied its 16 MB in ~0.35 s and then sat idle for
        // ~0.65 s, twice per 3,000 documents, half the drain time (BENCHMARKS.md, "Fetch stalls")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("max.poll.interval.ms", "300000")
        .set("partition.assignment.strategy", "cooperative-sticky");
    with_passthrough(c, passthrough)
}

/// Configuration for a producer of results: idempotent, acks from all in-sync replicas, one
/// request in flight per broker ([`MAX_IN_FLIGHT`]; a transactional producer sets
/// [`transactional_in_flight`]). A record is retried for `outage_tolerance_ms` before its delivery
/// counts as failed.
pub fn producer_config(brokers: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    producer_config_with(brokers, passthrough, DEFAULT_OUTAGE_TOLERANCE_MS)
}

/// The default of `kafka.outage_tolerance_ms`.
pub const DEFAULT_OUTAGE_TOLERANCE_MS: u64 = 600_000;

/// [`producer_config`] with an explicit outage tolerance.
pub fn producer_config_with(brokers: &str, passthrough: &BTreeMap<String, String>, outage_tolerance_ms: u64) -> ClientConfig {
    let mut c = base(brokers);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("max.in.flight.requests.per.connection", MAX_IN_FLIGHT.to_string())
        .set("message.timeout.ms", outage_tolerance_ms.to_string());
    with_passthrough(c, passthrough)
}

/// Produce requests in flight per broker connection for a producer without transactions
/// (transactional ones: [`transactional_in_flight`]). librdkafka's idempotent producer allows 5,
/// and with more than one it can report a record delivered that the broker never wrote: when a
/// producer id's first batch to a partition fails with a retriable error (NOT_LEADER_OR_FOLLOWER
/// during a leader move, or on a partition its leader does not serve yet) while the next batch,
/// already sent, succeeds, the broker (which knows no sequence of that producer id there) accepts
/// the later sequence, and librdkafka counts the failed batch as "implicitly acked" by it
/// (confluent-kafka-go issue 921; reproduced here with librdkafka's `debug=msg`: "1 message(s)
/// implicitly acked by subsequent batch success", on partitions a new topic's leader did not serve
/// yet, which `admin::wait_until_led` now also waits out). With one request in flight the failed batch is retried before any
/// later one is sent. It cost nothing measurable here: `payslip-stream produce --count 30000
/// --pool 300`, release build, 5,344 docs/s with 5 in flight and 5,394 with 1 (BENCHMARKS.md has
/// the infer stage's figures). The configuration refuses another value in `kafka.librdkafka`, as it
/// refuses every setting that weakens delivery.
pub const MAX_IN_FLIGHT: u32 = 1;

/// Produce requests in flight per broker for a transactional producer: librdkafka's default of 5,
/// unless `kafka.librdkafka` says 1. The loss [`MAX_IN_FLIGHT`] closes needs a producer id the
/// partition keeps no state of; a transactional id keeps its producer id, the broker keeps its
/// state, and a new epoch must begin at sequence 0, so a skipped batch is refused as out of order
/// and retried. One in flight, on the other hand, leaves records queued in the client when a
/// transaction aborts; the abort purges them, and their purge reports failed the next transaction
/// too (the fault-injection test `crash::aborted_transactions_are_processed_again...` saw 8-9
/// aborts for 6 injected).
pub fn transactional_in_flight(c: &mut ClientConfig, passthrough: &BTreeMap<String, String>) {
    if !passthrough.contains_key("max.in.flight.requests.per.connection") && !passthrough.contains_key("max.in.flight") {
        c.set("max.in.flight.requests.per.connection", "5");
    }
}

/// The passthrough goes last: it may set anything the config validation lets through.
fn with_passthrough(mut c: ClientConfig, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    for (k, v) in passthrough {
        c.set(k, v);
    }
    c
}
