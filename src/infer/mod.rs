//! The infer stage: `payslip.documents.v1` → decode, validate → batched ONNX Runtime inference →
//! one `InferenceResult` per document on `payslip.inference.v1`; bad input → dead-letter topic.
//!
//! ```text
//! consumer ──► batcher (max_batch / max_wait_ms) ──► blocking thread: decode, validate, infer, encode
//!                                                          │
//!     offsets stored ◄── ack task (delivery reports, FIFO) ◄── producer (results + dead letters)
//! ```
//!
//! Batching: an idle stage runs a batch at once with what librdkafka already fetched; while a batch
//! runs, the next one collects documents until it is full, the running one finishes, or
//! `max_wait_ms` passed. Every batch first takes what is already fetched, so a batch that finished
//! meanwhile never ends the collection empty while documents wait (that committed the transaction
//! as if the stage were idle). Two batches are in flight at most (one running its models while the next
//! is decoded and preprocessed on another thread), and they are published strictly in order, so
//! offsets, transactions and the ack task see batches in consumption order as before. When a
//! batch's transaction aborts, the batch after it is dropped unpublished and the consumer goes back
//! to the first offset either of them read.
//!
//! Delivery semantics: exactly once by default (`kafka.processing_guarantee`): each batch's records
//! and input offsets are committed in one Kafka transaction ([`txn`]); the ack task below is then
//! idle. The consumer joins as a static member (`kafka.instance_id`), so a restarted process gets
//! its partitions back without a rebalance. It takes only partitions of the documents topic: a
//! static member restarted on another topic is handed its old assignment unchanged (KAFKA-12759),
//! and the lag watch then makes it join again ([`crate::kafka::rebalance::KnownProtocol::expecting`]).
//!
//! With `at_least_once`: a message's offset is stored only after everything it caused
//! (its result or its dead letter) has a successful delivery report; the ack task handles batches in
//! consumption order, so stored offsets only move forward. If a delivery fails after librdkafka's own
//! retries, the stage stops with an error without storing that offset, and the document is consumed
//! again after restart. Redelivered documents produce results with the same `result_id`
//! (derived from the document id), so duplicates are recognisable downstream.
//!
//! Shutdown (SIGTERM/SIGINT or the shutdown channel): stop consuming, finish the batch in hand, wait
//! for every delivery report, store and synchronously commit offsets, then return.
//!
//! A dead letter too large for the producer is replaced by a shortened one (see [`send`]), so one
//! oversized message never stops the stage; any other refused record stops it with an error before
//! its offset is stored. A fatal consumer error (authentication, authorisation) stops it too, and so
//! does a batch ONNX Runtime failed on every try (see `inference`): that batch is neither answered
//! nor acknowledged.
//!
//! Files: [`batch`] (decode, validate, route, run the models, build the answers), [`messages`]
//! (result and dead-letter records), [`ack`] (delivery reports → stored offsets).

mod ack;
mod batch;
mod messages;
mod txn;

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::OwnedMessage,
    producer::{DeliveryFuture, FutureRecord, Producer},
    util::Timeout,
};
use tokio::sync::{mpsc, watch};

use crate::{
    config::{Guarantee, PipelineConfig},
    inference::ModelRegistry,
    kafka::{self, KafkaError},
    rollout::routing::Follower,
    telemetry::{InferCounters, InferSummary, LoopPhase},
};
use ack::{ack_loop, Delivery, Pending};
pub(crate) use batch::process_batch;
pub(crate) use messages::{Outgoing, Processed};

/// The infer stage's consumer (its rebalance callback cannot hang in close: [`crate::kafka::rebalance`]).
pub(crate) type InferConsumer = StreamConsumer<crate::kafka::rebalance::KnownProtocol>;
/// The infer stage's producer: librdkafka's statistics kept for `/metrics`.
pub(crate) type InferProducer = crate::kafka::stats::StatsProducer;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Cannot reach or use Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A result or dead letter could not be delivered; offsets after it were not stored, so a
    /// restart reprocesses from the last durable point.
    #[error("delivery failed, stopping without storing the offset: {0}")]
    Delivery(KafkaError),
    /// A served model version is not loaded and the model may not serve degraded: nothing is
    /// consumed until it is fixed.
    #[error("{0}")]
    ModelsUnavailable(String),
    /// The configuration cannot work with the cluster as it is (the message says what to change).
    #[error("{0}")]
    Config(String),
    /// ONNX Runtime failed a batch's model run on every try: the batch was not answered and its
    /// offsets not stored, so a restart processes it again.
    #[error("{0}; stopping without answering the batch or storing its offsets")]
    Inference(#[from] crate::inference::RunFailure),
    /// A bug (e.g. a panic on a blocking thread).
    #[error("internal: {0}")]
    Internal(String),
}

impl StageError {
    /// Whether restarting the stage may succeed (the broker comes back); nothing was acknowledged
    /// that was not delivered, so a restart loses nothing.
    pub fn retryable(&self) -> bool {
        match self {
            StageError::Kafka(e) | StageError::Delivery(e) => e.retryable(),
            StageError::Inference(e) => e.retryable(),
            StageError::ModelsUnavailable(_) | StageError::Config(_) | StageError::Internal(_) => false,
        }
    }
}

/// A configured infer stage.
pub struct InferStage {
    cfg: PipelineConfig,
    brokers: String,
    registry: Arc<ModelRegistry>,
    counters: Arc<InferCounters>,
}

impl InferStage {
    pub fn new(cfg: PipelineConfig, brokers: String, registry: Arc<ModelRegistry>) -> Self {
        Self { cfg, brokers, registry, counters: Arc::new(InferCounters::default()) }
    }

    pub fn counters(&self) -> Arc<InferCounters> {
        self.counters.clone()
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), then drains and returns what it did.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<InferSummary, StageError> {
        let cfg = &self.cfg;
        let started = Instant::now();
        // a stage never consumes what it cannot process: refuse before joining the group
        check_served_models(cfg, &self.registry)?;
        let exactly_once = cfg.kafka.processing_guarantee == Guarantee::ExactlyOnce && !cfg.kafka.embedded;
        let instance = cfg.kafka.instance_id();
        // a dead letter of any document within limits.max_payload_bytes fits the producer's limit
        let max_record = kafka::admin::dead_letter_max_bytes(cfg).max(1_000_000);
        // a message may not outlive its transaction: with transactions a broker outage is waited out
        // by aborting and processing the batch again, not by keeping its records queued
        let message_timeout = if exactly_once { cfg.kafka.transaction_timeout_ms() } else { cfg.kafka.outage_tolerance_ms };
        let mut pc = kafka::producer_config_with(&self.brokers, &cfg.kafka.librdkafka, message_timeout);
        pc.set("message.max.bytes", max_record.to_string());
        if exactly_once {
            pc.set("transactional.id", format!("{}.{instance}", cfg.kafka.infer_group)).set("transaction.timeout.ms", cfg.kafka.transaction_timeout_ms().to_string());
            kafka::config::transactional_in_flight(&mut pc, &cfg.kafka.librdkafka);
            // A batch's first record to a partition adds the partition to the transaction; while the
            // broker still writes the previous transaction's markers it answers
            // CONCURRENT_TRANSACTIONS and librdkafka retries after `retry.backoff.ms` (default 100 ms):
            // that wait was most of every batch (about 120 ms of a 125 ms batch cycle, measured with
            // benches/throughput.rs). Retries start at 5 ms and still back off exponentially to
            // `retry.backoff.max.ms` (1 s), so an unavailable broker is not hammered.
            if !cfg.kafka.librdkafka.contains_key("retry.backoff.ms") {
                pc.set("retry.backoff.ms", "5");
            }
            // A batch's records are all enqueued at once and its commit waits for their delivery
            // reports: lingering (5 ms for other producers) only delayed every batch.
            if !cfg.kafka.librdkafka.contains_key("linger.ms") {
                pc.set("linger.ms", "0");
            }
        }
        let producer = kafka::stats::producer_with_stats(pc, self.counters.producer_stats.clone(), "the infer producer")?;

        // Start-up steps run side by side (a restart is answered sooner): the dead-letter topic's
        // size check, the decisions topic read to its end (the canary split before the first
        // document), exactly once `init_transactions` (which aborts what a predecessor with this
        // instance id left open), and a warm-up inference per served model.
        let step = |t: Instant| t.elapsed().as_millis() as u64;
        let dlq_check = async {
            let t = Instant::now();
            check_dead_letter_size(cfg, &self.brokers).await.map(|()| step(t))
        };
        let follower_start = {
            let (cfg, brokers, registry) = (cfg.clone(), self.brokers.clone(), self.registry.clone());
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let f = Follower::start(&cfg, &brokers, registry);
                (f, step(t))
            })
        };
        let init = {
            let (producer, tolerance) = (producer.clone(), Duration::from_millis(cfg.kafka.outage_tolerance_ms));
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                if exactly_once { txn::init(&producer, tolerance).map(|()| step(t)) } else { Ok(0) }
            })
        };
        // one inference per served model on a synthetic payslip, so the first batch does not pay
        // for ONNX Runtime's first-run allocations and a model that cannot run is found now
        let warm_up = {
            let registry = self.registry.clone();
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let doc = crate::synth::Generator::new(crate::synth::GeneratorConfig { seed: 1, ..Default::default() }).document(0).document;
                registry.warm_up(&doc).map(|()| step(t))
            })
        };
        let (dlq_ms, follower, init_ms, warm_ms) = tokio::join!(dlq_check, follower_start, init, warm_up);
        let warm_ms = warm_ms.map_err(|e| StageError::Internal(format!("warm-up panicked: {e}")))??;
        let (follower, follower_ms) = follower.map_err(|e| StageError::Internal(format!("decisions follower panicked: {e}")))?;
        let dlq_ms = dlq_ms?;
        let init_ms = init_ms.map_err(|e| StageError::Internal(format!("init_transactions panicked: {e}")))??;
        let routing = follower.routing();

        let mut cc = kafka::consumer_config(&self.brokers, &cfg.kafka.infer_group, &cfg.kafka.librdkafka);
        if !cfg.kafka.embedded && cfg.kafka.static_membership {
            // static membership: a restarted process with the same id gets its partitions back at once
            cc.set("group.instance.id", &instance);
        }
        if exactly_once {
            // offsets move only inside the batches' transactions
            cc.set("enable.auto.commit", "false");
        }
        let protocol = crate::kafka::rebalance::KnownProtocol::of(&cc).expecting(&[&cfg.topics.documents]);
        let consumer: InferConsumer = cc.create_with_context(protocol).map_err(KafkaError::client("the infer consumer"))?;
        consumer.subscribe(&[&cfg.topics.documents]).map_err(KafkaError::broker(format!("subscribe to {}", cfg.topics.documents)))?;
        let consumer = Arc::new(consumer);
        let lag_watch = LagWatch::start(consumer.clone(), cfg.topics.documents.clone(), self.counters.clone());
        self.counters.ready.store(true, Ordering::Relaxed);
        tracing::info!(dead_letter_check_ms = dlq_ms, decisions_read_ms = follower_ms, init_transactions_ms = init_ms, warm_up_ms = warm_ms, total_ms = step(started), "start-up steps done; joining the group");

        tracing::info!(
            topic = %cfg.topics.documents, group = %cfg.kafka.infer_group, instance = %instance, exactly_once, provider = %self.registry.provider(),
            max_batch = cfg.batching.max_batch, max_wait_ms = cfg.batching.max_wait_ms, "infer stage started"
        );

        let (ack_tx, ack_rx) = mpsc::channel::<Pending>(8);
        let acker = tokio::spawn(ack_loop(ack_rx, consumer.clone(), self.counters.clone()));
        let max_wait = Duration::from_millis(cfg.batching.max_wait_ms);
        let mut last_log = Instant::now();
        let mut stopping = false;
        let mut failure: Option<StageError> = None;
        let mut aborted_once: std::collections::HashSet<(String, i32, i64)> = Default::default();
        // exactly once: the transaction being filled, and the first offset of each partition in it
        let mut open: Option<txn::OpenTxn> = None;
        let mut open_starts: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let commit_interval = Duration::from_millis(cfg.kafka.commit_interval_ms);

        // Batches in flight, oldest first: at most PIPELINE_DEPTH, published strictly in order.
        let mut inflight: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
        // the oldest batch's outcome, when it finished while the next batch was being collected
        let mut front_done: Option<BatchOutcome> = None;
        let bytes = |b: &[OwnedMessage]| b.iter().map(|m| <OwnedMessage as rdkafka::message::Message>::payload(m).map_or(0, <[u8]>::len)).sum::<usize>();
        let fatal = |e: rdkafka::error::KafkaError| StageError::Kafka(KafkaError::Broker { what: format!("consuming {}", cfg.topics.documents), source: e });

        loop {
            if stopping && inflight.is_empty() {
                break;
            }
            // 1. Collect the next batch. Idle (nothing in flight): wait for a document, take what is
            //    already fetched, and run at once. Busy: keep collecting until the batch is full, the
            //    running batch finishes, or `max_wait_ms` passed since its first document.
            //    Documents in flight stay within `max_batch_bytes` in all (plus one document), so a
            //    burst of large documents is processed one batch at a time as before.
            let mut batch: Vec<OwnedMessage> = Vec::new();
            let held: usize = inflight.iter().map(|f| f.bytes).sum();
            let budget = cfg.batching.max_batch_bytes.saturating_sub(held);
            let collecting = Instant::now();
            if !stopping && inflight.len() < PIPELINE_DEPTH && front_done.is_none() && budget > 0 {
                let mut deadline: Option<tokio::time::Instant> = None;
                loop {
                    if batch.len() >= cfg.batching.max_batch || bytes(&batch) >= budget {
                        break;
                    }
                    // what librdkafka already holds, without waiting: also before the first
                    // document, so a batch that finished meanwhile (the select below prefers it)
                    // does not end the collection with documents waiting, which published it with
                    // nothing behind it and committed as if idle, the models idle meanwhile
                    match futures::FutureExt::now_or_never(consumer.recv()) {
                        Some(Ok(m)) => {
                            batch.push(m.detach());
                            deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                            continue;
                        }
                        Some(Err(e)) if kafka::error::is_fatal_consumer_error(&e) => {
                            failure = Some(fatal(e));
                            stopping = true;
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consumer error");
                            continue;
                        }
                        None if inflight.is_empty() && !batch.is_empty() => break,
                        None => {}
                    }
                    let busy = !inflight.is_empty();
                    let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)));
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => { stopping = true; break; }
                        r = async { (&mut inflight.front_mut().expect("busy").handle).await }, if busy => { front_done = Some(r); break; }
                        _ = sleep, if deadline.is_some() => break,
                        m = consumer.recv() => match m {
                            Ok(m) => {
                                batch.push(m.detach());
                                deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                            }
                            Err(e) if kafka::error::is_fatal_consumer_error(&e) => {
                                failure = Some(fatal(e));
                                stopping = true;
                                break;
                            }
                            Err(e) => tracing::warn!(error = %e, "consumer error"),
                        },
                    }
                }
                if *shutdown.borrow() {
                    stopping = true;
                }
                self.counters.phase(LoopPhase::Collect, collecting);
            }
            if failure.is_some() {
                break;
            }
            // 2. Start it: decoding and preprocessing of this batch overlap the model runs of the
            //    one before (each model's session runs one batch at a time).
            if !batch.is_empty() {
                self.counters.consumed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                // the first offset the batch read in each partition, and the one after its last
                let mut starts: BTreeMap<(String, i32), i64> = BTreeMap::new();
                let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
                for m in &batch {
                    use rdkafka::message::Message;
                    let e = starts.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
                    *e = (*e).min(m.offset());
                    let e = next.entry((m.topic().to_string(), m.partition())).or_insert(m.offset() + 1);
                    *e = (*e).max(m.offset() + 1);
                }
                // exactly once, an idle stage: the batch's transaction begins now and its input
                // offsets are sent while the models run (txn::begin_early)
                if exactly_once && inflight.is_empty() && open.is_none() {
                    txn::begin_early(&producer, &consumer, &mut open, next);
                }
                let (registry, cfg2, counters, routing2) = (self.registry.clone(), self.cfg.clone(), self.counters.clone(), routing.clone());
                let bytes = bytes(&batch);
                let handle = tokio::task::spawn_blocking(move || process_batch(&cfg2, &registry, &routing2, &counters, batch, true));
                inflight.push_back(InFlight { handle, starts, bytes });
            }
            // 3. Publish the oldest batch once it is done, when the pipeline is full (in batches or in
            //    bytes), or when stopping.
            let held: usize = inflight.iter().map(|f| f.bytes).sum();
            let full = inflight.len() >= PIPELINE_DEPTH || held >= cfg.batching.max_batch_bytes;
            let publish_now = front_done.is_some() || full || (stopping && !inflight.is_empty());
            if !publish_now {
                continue;
            }
            let Some(oldest) = inflight.pop_front() else { continue };
            let outcome = match front_done.take() {
                Some(r) => r,
                None => {
                    let waiting = Instant::now();
                    let r = oldest.handle.await;
                    self.counters.phase(LoopPhase::Models, waiting);
                    r
                }
            };
            let processed = match outcome {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    failure = Some(StageError::Inference(e));
                    break;
                }
                Err(e) => {
                    failure = Some(StageError::Internal(format!("batch processing panicked: {e}")));
                    break;
                }
            };
            self.counters.producer_queue.store(producer.in_flight_count().max(0) as u64, Ordering::Relaxed);
            self.counters.ack_queue.store((8 - ack_tx.capacity()) as u64, Ordering::Relaxed);
            if exactly_once {
                // fault injection: a batch holding a `fault-txn-abort` message not aborted before
                let mut inject_abort = false;
                for p in processed.iter().filter(|p| p.abort_once) {
                    inject_abort |= aborted_once.insert((p.topic.clone(), p.partition, p.offset));
                }
                let sending = Instant::now();
                let added = txn::add_batch(&producer, &consumer, cfg, &mut open, processed, inject_abort).await;
                self.counters.phase(LoopPhase::Send, sending);
                for (k, first) in &oldest.starts {
                    let e = open_starts.entry(k.clone()).or_insert(*first);
                    *e = (*e).min(*first);
                }
                // Commit when no batch would join the transaction soon (nothing in flight: the
                // stage is idle, results are not held back), when the commit interval has passed
                // since it began (0: after every batch), or when stopping.
                let outcome = match added {
                    Err(f) => Err(f),
                    Ok(()) if inflight.is_empty() || stopping || open.as_ref().is_some_and(|t| t.age() >= commit_interval) => {
                        let txn = open.take().expect("a batch was just added");
                        txn::commit(&producer, &consumer, cfg, txn, &self.counters).await.map(Some)
                    }
                    Ok(()) => Ok(None),
                };
                match outcome {
                    Ok(None) => {}
                    Ok(Some((results, with_error, dead))) => {
                        for class in dead {
                            self.counters.dead_letter(class);
                        }
                        open_starts.clear();
                        if self.counters.offsets_stored.load(Ordering::Relaxed) == 0 {
                            tracing::info!(since_start_ms = step(started), "first batch committed");
                        }
                        self.counters.results.fetch_add(results, Ordering::Relaxed);
                        self.counters.results_with_error.fetch_add(with_error, Ordering::Relaxed);
                        self.counters.offsets_stored.fetch_add(1, Ordering::Relaxed);
                        self.counters.transactions_committed.fetch_add(1, Ordering::Relaxed);
                    }
                    // nothing of the transaction is visible and the consumer is back at its start;
                    // the batches read after it are dropped unpublished and read again too
                    Err(txn::TxnFailure::Aborted(_)) => {
                        self.counters.transactions_aborted.fetch_add(1, Ordering::Relaxed);
                        let mut later: BTreeMap<(String, i32), i64> = BTreeMap::new();
                        for f in inflight.drain(..) {
                            let _ = f.handle.await;
                            for (k, first) in f.starts {
                                let e = later.entry(k).or_insert(first);
                                *e = (*e).min(first);
                            }
                        }
                        // partitions the aborted transaction had were rewound to its start already
                        later.retain(|k, _| !open_starts.contains_key(k));
                        open_starts.clear();
                        txn::rewind_to(&consumer, &later);
                    }
                    Err(txn::TxnFailure::Fatal(e)) => {
                        failure = Some(StageError::Kafka(e));
                        break;
                    }
                }
                self.log_progress(&mut last_log);
                continue;
            }
            let sending = Instant::now();
            let mut pending = Pending { deliveries: Vec::with_capacity(processed.len()), positions: Vec::with_capacity(processed.len()) };
            for p in processed {
                match send(&producer, cfg, p).await {
                    Ok((fut, topic, p)) => {
                        pending.deliveries.push(Delivery { future: fut, topic, is_result: p.out.is_result, has_error: p.out.has_error, dead_class: p.out.dead_class });
                        pending.positions.push((p.topic, p.partition, p.offset));
                    }
                    Err(e) => {
                        failure = Some(StageError::Delivery(e));
                        break;
                    }
                }
            }
            if failure.is_some() {
                // what was queued before the failure is still acknowledged by the ack task
                let _ = ack_tx.send(pending).await;
                break;
            }
            self.counters.phase(LoopPhase::Send, sending);
            if ack_tx.capacity() == 0 {
                tracing::debug!("every ack slot is taken: waiting for delivery reports before consuming more");
            }
            if ack_tx.send(pending).await.is_err() {
                break; // the ack task ended: it reports why below
            }
            self.log_progress(&mut last_log);
        }
        // batches still in flight after a failure are neither published nor acknowledged, and a
        // transaction still open is aborted: their documents are read again (after a restart, or
        // by the partitions' next owner)
        for f in inflight.drain(..) {
            let _ = f.handle.await;
        }
        if let Some(txn) = open.take() {
            if let txn::TxnFailure::Fatal(e) = txn::abort(&producer, &consumer, txn, "the stage stopped with the transaction open") {
                failure = failure.or(Some(StageError::Kafka(e)));
            }
        }
        self.counters.ready.store(false, Ordering::Relaxed);
        lag_watch.stop().await;
        drop(ack_tx);
        match acker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(StageError::Internal(format!("ack task panicked: {e}")))),
        }
        // Offsets stored so far are durable work (the ack task stores an offset only after its
        // records are delivered, and stops at the first failure): commit them before leaving the
        // group, also when stopping for a failure.
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit (nothing to commit is fine)");
        }
        let _ = producer.flush(Timeout::After(Duration::from_secs(10)));
        drop(follower);
        // the consumer leaves its group on a thread of its own, waited for a bounded time
        tokio::task::block_in_place(|| crate::kafka::rebalance::close_within(consumer, CONSUMER_CLOSE_LIMIT, "the infer consumer"));
        let summary = self.counters.snapshot();
        tracing::info!(?summary, "infer stage stopped");
        match failure {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// How long a stopping stage waits for its consumer to leave the group (see
/// [`crate::kafka::rebalance::close_within`]).
const CONSUMER_CLOSE_LIMIT: Duration = Duration::from_secs(15);

/// Batches processed at once, each on a blocking thread: decoding, preprocessing and model runs of
/// one overlap those of the other. On the CPU each model version holds as many sessions (a session
/// runs one batch at a time), so the two can run the same model at once; more batches would hold
/// more documents in memory for cores this stage is not sized for.
pub const PIPELINE_DEPTH: usize = 2;

type BatchOutcome = Result<Result<Vec<Processed>, crate::inference::RunFailure>, tokio::task::JoinError>;

/// A batch on a blocking thread, with the first offset it read in each partition (where the
/// consumer goes back to when an earlier batch's transaction aborts).
struct InFlight {
    handle: tokio::task::JoinHandle<Result<Vec<Processed>, crate::inference::RunFailure>>,
    starts: BTreeMap<(String, i32), i64>,
    /// Bytes of the batch's values (what `batching.max_batch_bytes` bounds across batches in flight).
    bytes: usize,
}

impl InferStage {
    fn log_progress(&self, last_log: &mut Instant) {
        if last_log.elapsed() > Duration::from_secs(10) {
            *last_log = Instant::now();
            let s = self.counters.snapshot();
            tracing::info!(consumed = s.consumed, results = s.results, dead_letters = s.dead_letters, batches = s.batches, "progress");
        }
    }
}

/// Every 5 s, the lag of each assigned documents partition: its high watermark (fetched from the
/// broker, on a blocking thread) minus the consumer's position. Stops before the stage closes its
/// consumer.
struct LagWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Taken by [`Self::stop`].
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// A stage future dropped before it stopped (a caller's timeout, a cancelled task) still ends the
/// watch: its blocking thread would otherwise keep the runtime from shutting down.
impl Drop for LagWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl LagWatch {
    fn start(consumer: Arc<InferConsumer>, topic: String, counters: Arc<InferCounters>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut last = Instant::now() - Duration::from_secs(5);
            while !flag.load(Ordering::Relaxed) {
                if last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    let Ok(positions) = consumer.position() else { continue };
                    let mut lag = std::collections::BTreeMap::new();
                    for e in positions.elements().iter().filter(|e| e.topic() == topic) {
                        let rdkafka::Offset::Offset(pos) = e.offset() else { continue };
                        if let Ok((_, high)) = consumer.fetch_watermarks(&topic, e.partition(), Duration::from_secs(2)) {
                            lag.insert(e.partition(), (high - pos).max(0));
                        }
                    }
                    *counters.consumer_lag.lock().unwrap_or_else(|p| p.into_inner()) = lag;
                }
                // a stale assignment of another topic (see `KnownProtocol::expecting`): leave and
                // join again, so the group assigns this subscription
                crate::kafka::rebalance::KnownProtocol::rejoin_if_stale(&*consumer);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { stop, handle: Some(handle) }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

/// Queues one record. A dead letter too large for the producer is replaced by a shortened one
/// (key, headers, reason, original size and sha256, and as much of the payload as fits), so one
/// oversized document never stops the stage; any other refusal is returned.
async fn send(producer: &InferProducer, cfg: &PipelineConfig, p: Processed) -> Result<(DeliveryFuture, String, Processed), KafkaError> {
    let first = queue(producer, &p.out).await;
    match first {
        Ok(f) => Ok((f, p.out.topic.clone(), p)),
        Err(e) if e.is_too_large() && !p.out.is_result => {
            let short = messages::shortened_dead_letter(cfg, &p.out, &e);
            tracing::warn!(topic = %p.topic, partition = p.partition, offset = p.offset, size = p.out.payload.len(), "dead letter too large for the producer: publishing a shortened one");
            let f = queue(producer, &short).await?;
            Ok((f, short.topic.clone(), Processed { out: short, ..p }))
        }
        Err(e) => Err(e),
    }
}

async fn queue(producer: &InferProducer, out: &Outgoing) -> Result<DeliveryFuture, KafkaError> {
    let hs = out.headers.build();
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&out.topic).payload(&out.payload[..]).headers(hs);
    if let Some(k) = &out.key {
        record = record.key(&k[..]);
    }
    kafka::enqueue(producer, record).await
}

/// Every served version is loaded, or its model may serve degraded (`models.allow_degraded`).
fn check_served_models(cfg: &PipelineConfig, registry: &ModelRegistry) -> Result<(), StageError> {
    let status = registry.status();
    let missing: Vec<String> = cfg
        .models
        .serve
        .iter()
        .filter(|(model, _)| !cfg.models.allow_degraded.contains(model))
        .filter_map(|(model, version)| {
            let s = status.iter().find(|s| &s.model == model && &s.version == version);
            match s {
                Some(s) if s.state == crate::inference::LoadState::Loaded => None,
                Some(s) => Some(format!("{model} {version}: {}", s.reason.as_deref().unwrap_or("refused"))),
                None => Some(format!("{model} {version}: not loaded")),
            }
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (model, version) in cfg.models.serve.iter().filter(|(m, _)| cfg.models.allow_degraded.contains(m)) {
        if status.iter().any(|s| &s.model == model && &s.version == version && s.state != crate::inference::LoadState::Loaded) {
            tracing::warn!(%model, %version, "serving degraded (models.allow_degraded): its documents get MODEL_UNAVAILABLE");
        }
    }
    Err(StageError::ModelsUnavailable(format!(
        "not starting: served model versions cannot be loaded, so their documents could not be answered: {}. Fix what is named (`payslip-stream models verify` checks every model), or list the model in models.allow_degraded to answer its documents with MODEL_UNAVAILABLE",
        missing.join("; ")
    )))
}

/// The dead-letter topic accepts a dead letter of any document within `limits.max_payload_bytes`;
/// otherwise the stage refuses to start, naming both settings. A cluster that cannot describe the
/// topic (the embedded broker) is not checked; the shortened dead letter remains the safety net.
async fn check_dead_letter_size(cfg: &PipelineConfig, brokers: &str) -> Result<(), StageError> {
    if cfg.kafka.embedded {
        return Ok(());
    }
    let topic = &cfg.topics.documents_dlq;
    let needed = kafka::admin::dead_letter_max_bytes(cfg);
    // a topic created a moment ago may not be describable yet: passing errors are retried briefly
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let described = loop {
        match kafka::admin::max_message_bytes(brokers, &cfg.kafka, topic).await {
            Err(e) if e.retryable() && tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            other => break other,
        }
    };
    match described {
        Ok(accepted) if accepted < needed => Err(StageError::Config(format!(
            "limits.max_payload_bytes ({}) could not be dead-lettered whole: {topic} accepts records of up to {accepted} bytes (its max.message.bytes) and a dead letter needs up to {needed}; lower limits.max_payload_bytes to at most {} or raise max.message.bytes of {topic} to at least {needed}",
            cfg.limits.max_payload_bytes,
            accepted.saturating_sub(kafka::admin::DEAD_LETTER_HEADROOM_BYTES)
        ))),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(%topic, error = %e, "cannot read the dead-letter topic's max.message.bytes; not checked");
            Ok(())
        }
    }
}
