//! Kafka plumbing: client configuration, topic creation, headers, and the embedded broker.
//!
//! Every client gets the `kafka.librdkafka` passthrough options from the pipeline config last, so a
//! user can override anything (security settings, timeouts) without code changes.

pub mod admin;
pub mod embedded;
pub mod headers;
pub mod range;

use std::collections::BTreeMap;

use rdkafka::{
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
    ClientConfig,
};

/// Enqueues a record, waiting while librdkafka's local queue is full (backpressure); the returned
/// future resolves with the delivery report.
pub async fn enqueue<'a>(producer: &FutureProducer, mut record: FutureRecord<'a, [u8], [u8]>) -> DeliveryFuture {
    loop {
        match producer.send_result(record) {
            Ok(f) => return f,
            Err((e, r)) => {
                tracing::debug!(error = %e, "producer queue full");
                record = r;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
}

/// Base client configuration for `brokers` with the user's passthrough options applied.
pub fn client_config(brokers: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c.set("client.id", "payslip-stream");
    for (k, v) in passthrough {
        c.set(k, v);
    }
    c
}

/// Configuration for a consumer that stores offsets only when told to (at-least-once).
pub fn consumer_config(brokers: &str, group: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "payslip-stream")
        .set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "100")
        .set("max.poll.interval.ms", "300000")
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (k, v) in passthrough {
        c.set(k, v);
    }
    c
}

/// Configuration for a producer of results: idempotent, acks from all in-sync replicas.
pub fn producer_config(brokers: &str, passthrough: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "payslip-stream")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "60000");
    for (k, v) in passthrough {
        c.set(k, v);
    }
    c
}

/// Partition ids of `topic`, waiting up to `wait` for it to appear in the cluster metadata (a topic
/// created a moment ago may not be known to every broker yet).
pub fn partitions_of(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, wait: std::time::Duration) -> Result<Vec<i32>, String> {
    use rdkafka::consumer::Consumer;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let parts: Result<Vec<i32>, String> = consumer
            .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
            .map(|md| md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default())
            .map_err(|e| format!("cannot read metadata of {topic}: {e}"));
        match parts {
            Ok(p) if !p.is_empty() => return Ok(p),
            Ok(_) if std::time::Instant::now() >= deadline => return Err(format!("topic {topic} does not exist (create the topics with `payslip-stream topics`)")),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Low and high watermark of a partition, retried for up to `wait` (a partition created a moment ago
/// may have no leader yet).
pub fn watermarks_of(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, partition: i32, wait: std::time::Duration) -> Result<(i64, i64), String> {
    use rdkafka::consumer::Consumer;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match consumer.fetch_watermarks(topic, partition, std::time::Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(%topic, partition, error = %e, "watermarks not available yet; retrying");
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => return Err(format!("offsets of {topic}/{partition}: {e}")),
        }
    }
}

/// First offset of `topic`/`partition` with a timestamp at or after `ts_ms` (the end when none).
pub fn offset_at(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, partition: i32, ts_ms: i64) -> Result<i64, String> {
    use rdkafka::{consumer::Consumer, Offset, TopicPartitionList};
    let mut q = TopicPartitionList::new();
    q.add_partition_offset(topic, partition, Offset::Offset(ts_ms)).map_err(|e| e.to_string())?;
    let found = consumer.offsets_for_times(q, std::time::Duration::from_secs(30)).map_err(|e| format!("offsets-for-times on {topic}: {e}"))?;
    match found.elements().first().map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Ok(o),
        _ => Ok(watermarks_of(consumer, topic, partition, std::time::Duration::from_secs(30))?.1),
    }
}
