//! Exactly-once hand-off (`kafka.processing_guarantee: exactly_once`): one Kafka transaction holds
//! the results, dead letters and the group's next input offsets of one batch, or of every batch
//! published within `kafka.commit_interval_ms` while the stage stays busy, the way Kafka Streams'
//! `exactly_once_v2` commits a task each `commit.interval.ms`. Either all of it becomes visible to
//! `read_committed` readers and the group moves past those batches, or none of it does.
//!
//! The transactional id is `<infer group>.<instance id>`: a restarted process (same instance id)
//! aborts whatever its predecessor left open as it initialises, and the group generation sent with
//! the offsets fences a process that lost its partitions in a rebalance (KIP-447).
//!
//! Order: begin (with the first batch), queue every record of each batch, then at the commit add
//! the offsets, wait for every record's delivery report (a refused record makes the transaction
//! abortable), commit. Waiting for the reports before the commit is what keeps a transaction
//! short: rust-rdkafka's commit flushes first and, with records still in flight, waits in 100 ms
//! rounds (BENCHMARKS.md, "Transactions").
//!
//! An idle stage's batch begins its transaction when it starts ([`begin_early`]) and sends the
//! batch's input offsets on a blocking thread while its models run: at low load the offsets'
//! round trips to the coordinators no longer follow the models. Inside a transaction the order of
//! records and offsets does not matter; both become visible at the commit or not at all. The
//! commit waits for that call; when more batches joined the transaction meanwhile, it sends the
//! offsets of all of them (later offsets replace earlier ones). An abort waits for it too, since
//! librdkafka refuses a second transactional call while one is running.
//!
//! A transaction that must be aborted (a rebalance took a partition, the broker was away longer
//! than `kafka.transaction_timeout_ms`) is aborted and the consumer rewinds to the first offsets of
//! every batch in it, so they are processed again by whoever owns its partitions; a fatal error
//! (fenced by a newer process with the same instance id) stops the stage.
//!
//! `kafka.transaction_timeout_ms` (default: the outage tolerance, 10 minutes) bounds how long
//! `read_committed` readers wait behind the open transaction of a process that died and does not
//! come back (one that comes back with its instance id aborts it at once). A batch's transaction
//! lasts only its sends and the commit. The abort-and-rewind path is tested with an injected abort
//! (`fault-txn-abort`) and with a process killed for good under a 10 s timeout
//! (tests/it/crash.rs). The default stays long because a 10 s default (Kafka Streams') lost 2 of 800
//! documents once in an earlier CI run; that was not reproduced since, and a deployment that must
//! not let readers wait behind a dead process sets 10-60 s.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    consumer::Consumer,
    error::KafkaError as RdKafkaError,
    producer::Producer,
    topic_partition_list::{Offset, TopicPartitionList},
};

use super::{send, Processed};
use crate::{
    config::PipelineConfig,
    kafka::KafkaError,
    telemetry::{InferCounters, LoopPhase},
};

/// How long one transactional call may block before it is looked at again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a batch's transaction did not commit.
pub(super) enum TxnFailure {
    /// Aborted: nothing of the batch is visible and the consumer was rewound to it.
    Aborted(KafkaError),
    /// The producer cannot go on (fenced, or a fatal client error): stop the stage.
    Fatal(KafkaError),
}

fn wrap(what: &str, e: RdKafkaError) -> KafkaError {
    KafkaError::Broker { what: what.to_string(), source: e }
}

fn is_fatal(e: &RdKafkaError) -> bool {
    match e {
        RdKafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}

fn is_retriable(e: &RdKafkaError) -> bool {
    match e {
        RdKafkaError::Transaction(t) => t.is_retriable(),
        _ => false,
    }
}

/// Initialises the transactional producer (fencing a predecessor with the same transactional id),
/// retrying while the broker asks to.
pub(super) fn init(producer: &super::InferProducer, tolerance: Duration) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + tolerance;
    loop {
        match producer.init_transactions(CALL_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(e) if (is_retriable(&e) || e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut)) && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "initialising transactions; retrying");
            }
            Err(e) => return Err(wrap("initialising the infer stage's transactions", e)),
        }
    }
}

/// The transaction the stage is filling: begun with its first batch, committed when the stage
/// goes idle, when `kafka.commit_interval_ms` has passed since it began (0: after every batch), or
/// when the stage stops.
pub(super) struct OpenTxn {
    /// First and next offset per input partition, over every batch in it.
    span: BTreeMap<(String, i32), (i64, i64)>,
    /// Each record's delivery report, with its topic and whether it is a result (with an error).
    deliveries: Vec<(rdkafka::producer::DeliveryFuture, String, bool, bool, Option<&'static str>)>,
    began: std::time::Instant,
    batches: usize,
    /// A batch in it holds a `fault-txn-abort` message not aborted before.
    inject_abort: bool,
    /// Offsets sent when it began ([`begin_early`]).
    early: Option<EarlyOffsets>,
}

/// The next input offset per partition.
type NextOffsets = BTreeMap<(String, i32), i64>;

/// Offsets sent as a transaction began: what they moved the group to, and the call, running on a
/// blocking thread.
struct EarlyOffsets {
    next: NextOffsets,
    call: tokio::task::JoinHandle<Result<(), RdKafkaError>>,
}

impl OpenTxn {
    fn new() -> Self {
        OpenTxn { span: BTreeMap::new(), deliveries: Vec::new(), began: std::time::Instant::now(), batches: 0, inject_abort: false, early: None }
    }

    /// Waits for the offsets sent when it began, if they were: what they moved the group to, and
    /// whether the call succeeded.
    async fn early_offsets(&mut self) -> Option<(NextOffsets, Result<(), TxnFailure>)> {
        let EarlyOffsets { next: sent, call } = self.early.take()?;
        let outcome = match call.await {
            Ok(r) => r.map_err(|e| classify("sending the transaction's input offsets", e)),
            Err(e) => Err(TxnFailure::Aborted(KafkaError::Timeout { what: format!("sending the transaction's input offsets (its thread failed: {e})"), seconds: 0 })),
        };
        Some((sent, outcome))
    }

    /// How long ago it began.
    pub(super) fn age(&self) -> Duration {
        self.began.elapsed()
    }
}

/// An idle stage's batch starts: begins its transaction and sends the batch's input offsets
/// (`next`: the offset after the last one it read, per partition) on a blocking thread while its
/// models run. Best effort: when the transaction cannot begin now, nothing is open and the batch
/// begins one when it is published, as any other.
pub(super) fn begin_early(producer: &super::InferProducer, consumer: &super::InferConsumer, open: &mut Option<OpenTxn>, next: NextOffsets) {
    if open.is_some() || next.is_empty() {
        return;
    }
    let Some(group) = consumer.group_metadata() else { return };
    let Ok(offsets) = offset_list(&next) else { return };
    if let Err(e) = tokio::task::block_in_place(|| producer.begin_transaction()) {
        tracing::debug!(error = %e, "cannot begin a transaction before the batch's models run; it begins when the batch is published");
        return;
    }
    let p = producer.clone();
    let call = tokio::task::spawn_blocking(move || p.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT));
    let mut txn = OpenTxn::new();
    txn.early = Some(EarlyOffsets { next, call });
    *open = Some(txn);
}

/// `next` as the list the transactional calls take.
fn offset_list(next: &NextOffsets) -> Result<TopicPartitionList, RdKafkaError> {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), n) in next {
        offsets.add_partition_offset(topic, *partition, Offset::Offset(*n))?;
    }
    Ok(offsets)
}

/// Sends a batch's records in the open transaction, beginning one when none is open. On failure
/// the transaction (with every batch in it) is aborted and the consumer rewound to its start.
pub(super) async fn add_batch(
    producer: &super::InferProducer,
    consumer: &super::InferConsumer,
    cfg: &PipelineConfig,
    open: &mut Option<OpenTxn>,
    processed: Vec<Processed>,
    inject_abort: bool,
) -> Result<(), TxnFailure> {
    let fresh = open.is_none();
    let txn = open.get_or_insert_with(OpenTxn::new);
    for p in &processed {
        let e = txn.span.entry((p.topic.clone(), p.partition)).or_insert((p.offset, p.offset + 1));
        e.0 = e.0.min(p.offset);
        e.1 = e.1.max(p.offset + 1);
    }
    txn.batches += 1;
    txn.inject_abort |= inject_abort;
    if fresh {
        if let Err(e) = tokio::task::block_in_place(|| producer.begin_transaction()) {
            // e.g. the abort of an earlier batch did not complete while the broker was away
            let txn = open.take().expect("just opened");
            return Err(abandon(producer, consumer, txn, classify("beginning a transaction", e)));
        }
    }
    for p in processed {
        match send(producer, cfg, p).await {
            Ok((fut, topic, p)) => txn.deliveries.push((fut, topic, p.out.is_result, p.out.has_error, p.out.dead_class)),
            Err(e) => {
                let txn = open.take().expect("open");
                return Err(abandon(producer, consumer, txn, TxnFailure::Aborted(e)));
            }
        }
    }
    Ok(())
}

/// Moves the group past the open transaction's offsets and commits it. Returns the number of
/// results, results with an error, and the classes of the dead letters committed. On failure it
/// is aborted and the consumer rewound to its start.
pub(super) async fn commit(producer: &super::InferProducer, consumer: &super::InferConsumer, cfg: &PipelineConfig, mut txn: OpenTxn, counters: &InferCounters) -> Result<(u64, u64, Vec<&'static str>), TxnFailure> {
    match finish(producer, consumer, cfg, &mut txn, counters).await {
        Ok(counts) => Ok(counts),
        Err(e) => Err(abandon(producer, consumer, txn, e)),
    }
}

/// Aborts an open transaction (the stage stops before it could commit) and rewinds the consumer.
pub(super) fn abort(producer: &super::InferProducer, consumer: &super::InferConsumer, txn: OpenTxn, why: &str) -> TxnFailure {
    abandon(producer, consumer, txn, TxnFailure::Aborted(KafkaError::Timeout { what: why.to_string(), seconds: 0 }))
}

/// Aborts `txn` and rewinds the consumer to its start (an aborted failure), or passes a fatal one on.
fn abandon(producer: &super::InferProducer, consumer: &super::InferConsumer, mut txn: OpenTxn, failure: TxnFailure) -> TxnFailure {
    // librdkafka refuses an abort while the early offsets' call still runs
    if let Some(EarlyOffsets { call, .. }) = txn.early.take() {
        let _ = tokio::task::block_in_place(|| futures::executor::block_on(call));
    }
    let TxnFailure::Aborted(e) = failure else { return failure };
    tracing::warn!(error = %e, batches = txn.batches, "aborting the transaction; its documents are read again");
    if let Err(a) = tokio::task::block_in_place(|| producer.abort_transaction(CALL_TIMEOUT)) {
        if is_fatal(&a) {
            return TxnFailure::Fatal(wrap("aborting a transaction", a));
        }
        tracing::warn!(error = %a, "abort did not complete; the broker aborts the transaction when it times out");
    }
    rewind(consumer, &txn.span);
    TxnFailure::Aborted(e)
}

fn classify(what: &str, e: RdKafkaError) -> TxnFailure {
    if is_fatal(&e) {
        TxnFailure::Fatal(wrap(what, e))
    } else {
        TxnFailure::Aborted(wrap(what, e))
    }
}

async fn finish(producer: &super::InferProducer, consumer: &super::InferConsumer, cfg: &PipelineConfig, txn: &mut OpenTxn, counters: &InferCounters) -> Result<(u64, u64, Vec<&'static str>), TxnFailure> {
    let t = std::time::Instant::now();
    // offsets sent when the transaction began: waited for, and sent again only when more batches
    // joined it since
    let sent = match txn.early_offsets().await {
        Some((sent, outcome)) => {
            outcome?;
            Some(sent)
        }
        None => None,
    };
    let next: NextOffsets = txn.span.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
    if sent.as_ref() != Some(&next) {
        let offsets = offset_list(&next).map_err(|e| TxnFailure::Aborted(wrap("offsets", e)))?;
        let group = consumer.group_metadata().ok_or_else(|| TxnFailure::Aborted(KafkaError::Timeout { what: "the infer consumer's group membership (no group metadata yet)".into(), seconds: 0 }))?;
        tokio::task::block_in_place(|| producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)).map_err(|e| classify("sending the transaction's input offsets", e))?;
    }
    let t = counters.phase(LoopPhase::CommitOffsets, t);
    if txn.inject_abort {
        // everything is sent, only the commit is missing: the latest point an abort can come
        return Err(TxnFailure::Aborted(KafkaError::Timeout { what: "the batch (fault-txn-abort injected an abort)".into(), seconds: 0 }));
    }
    // Every record's delivery report before the commit: rust-rdkafka's commit_transaction flushes
    // first, and with records still in flight its flush polls an event queue the producer's own
    // thread serves, waiting 100 ms per round (most of every batch before this ordering: measured
    // with benches/throughput.rs). A record the broker refused makes the transaction abortable.
    let (mut results, mut with_error, mut dead) = (0, 0, Vec::new());
    for (fut, topic, is_result, has_error, dead_class) in txn.deliveries.drain(..) {
        crate::kafka::delivered(fut, &topic).await.map_err(TxnFailure::Aborted)?;
        if is_result {
            results += 1;
            with_error += has_error as u64;
        }
        dead.extend(dead_class);
    }
    // the producer's thread finishes serving the last report a moment after its future resolved;
    // until then librdkafka still counts it in flight and the flush would take its 100 ms round
    if !crate::kafka::released(|| producer.in_flight_count()) {
        let settle = std::time::Instant::now();
        while producer.in_flight_count() > 0 && settle.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let t = counters.phase(LoopPhase::CommitDeliveries, t);
    // a commit that times out (the broker is away) is retried as long as the outage tolerance allows
    let deadline = std::time::Instant::now() + Duration::from_millis(cfg.kafka.outage_tolerance_ms);
    loop {
        match tokio::task::block_in_place(|| producer.commit_transaction(CALL_TIMEOUT)) {
            Ok(()) => break,
            Err(e) if is_retriable(&e) && std::time::Instant::now() < deadline => tracing::warn!(error = %e, "committing the transaction; retrying"),
            Err(e) => return Err(classify("committing the transaction", e)),
        }
    }
    counters.phase(LoopPhase::CommitEnd, t);
    Ok((results, with_error, dead))
}

/// Puts the consumer back at the first offset of each partition of the aborted batch it still
/// owns (a revoked one is read by its new owner from the committed offset).
fn rewind(consumer: &super::InferConsumer, span: &BTreeMap<(String, i32), (i64, i64)>) {
    rewind_to(consumer, &span.iter().map(|(k, (first, _))| (k.clone(), *first)).collect());
}

/// Puts the consumer back at `first` in each partition it still owns.
pub(super) fn rewind_to(consumer: &super::InferConsumer, starts: &BTreeMap<(String, i32), i64>) {
    let owned = consumer.assignment().unwrap_or_default();
    for ((topic, partition), first) in starts {
        if owned.find_partition(topic, *partition).is_none() {
            continue;
        }
        if let Err(e) = consumer.seek(topic, *partition, Offset::Offset(*first), Duration::from_secs(10)) {
            tracing::warn!(%topic, partition, offset = first, error = %e, "cannot rewind after an abort; the partition is read again from its committed offset after the next rebalance");
        }
    }
}
