//! The monitor's scale-out (`monitor.scale_out: true`): a pre-aggregation consumer group over the
//! results and feedback topics, in front of the closing stage ([`super::MonitorStage`]).
//!
//! ```text
//! payslip.inference.v1 ─┐  group <infer_group>-monitor-pre       litert.monitor.partials.v1      closing partition p
//! payslip.feedback.v1 ──┴► member per process: its partitions ──► partial windows + clocks ──► (its owner, warm
//!                          predictions (RocksDB), feedback join     keyed by model, one trans-    copies): merge,
//!                                                                   action per batch with the     close, alerts,
//!                                                                   input offsets                 rollout
//! ```
//!
//! Every monitor process runs one member. The group uses the range assignor, so partition `p` of
//! the results topic and partition `p` of the feedback topic always go to the same member: both
//! topics are keyed by document id and must have the same partition count (checked at start; a
//! feedback producer must use the same partitioner as the infer stage, librdkafka's default), as
//! Kafka Streams requires of a join's inputs. A member aggregates what its partitions hold into
//! [`PartialBatch`]es (counts, error counts, HDR histograms, accuracy counts: all mergeable), one
//! per input partition and batch, and publishes them to the partials topic in a Kafka transaction
//! together with the group's next input offsets and any dead letters (KIP-447: the group generation
//! fences a member that lost its partitions). The leader reads the partials with `read_committed`,
//! so each input is counted exactly once: a batch either commits with its offsets or is read again.
//!
//! State per partition: the predictions a feedback joins, in this process's RocksDB
//! (`<monitor.state_dir>-pre`), written after the transaction that read them committed, with the
//! results offset they reflect. The results topic is their changelog (Kafka Streams' source-topic
//! changelog): when a partition is assigned, the member reads it from the offset its store reflects
//! (or from `monitor.prediction_retention_ms` ago) up to the group's committed offset before it
//! processes anything of it, and logs how long that took. Feedback whose prediction is not known yet
//! is held in memory, uncommitted, until the results partition's clock passes its time (or the
//! partition has been idle for `monitor.idle_timeout_ms`, the feedback is that old, and the broker
//! confirms this member has read the partition to its last stable offset): then it is joined or
//! counted as orphan. Held feedback is simply read again after a crash or rebalance.
//! While a partition's feedback is held, the member does not report that partition (results or
//! feedback) caught up, so the closing stage keeps the watermark at its clock and the windows the
//! feedback will count in stay open until it is sent. Nor does it report a partition caught up
//! after it was assigned or sought back before the broker confirms that its position is at the
//! partition's end: until its first fetch comes back, a partition is silent without being read.
//!
//! A rebalance in the middle of a batch discards the batch (nothing of it was sent) and rewinds
//! the partitions to the group's committed offsets; an aborted transaction does the same.
//!
//! Each input partition's partial is split over the closing partitions ([`super::shard::split`]):
//! partition p of the partials topic gets the subjects of the models that hash to p and a copy of
//! the pipeline subject, and every closing partition gets every source's clock and `caught_up`
//! report, so each one's watermark is the same function of the same per-partition clocks. The
//! counts that are not per subject go to the pipeline's partition only.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{BorrowedMessage, Message},
    producer::{FutureProducer, FutureRecord, Producer},
    Offset, TopicPartitionList,
};
use serde::Serialize;

use super::{
    expiry_key,
    outbox::monitor_dead_letter,
    partial::PartialBuilder,
    state::{prediction_of, Prediction},
    MonitorError, OutboxMessage,
};
use crate::{
    codec,
    config::PipelineConfig,
    document::DocumentFeedback,
    kafka::{self, headers as h, headers::HeaderSet, range::PartitionRange, rebalance::KnownProtocol, KafkaError, RangeCursor},
    state::{RocksStateStore, StateBatch, StateError, CF_OFFSETS, CF_PREDICTIONS, CF_PREDICTION_EXPIRY},
};

/// How long one transactional call may block.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Predictions written per chunk while a partition's predictions are restored.
const RESTORE_CHUNK: usize = 5_000;

/// What this process's pre-aggregation member did (logged at shutdown, exported on `/metrics`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PreCounters {
    /// Results aggregated into partials (redeliveries excluded).
    pub results: u64,
    pub feedback_joined: u64,
    pub feedback_orphans: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Transactions committed, and partials published in them.
    pub batches: u64,
    pub partials: u64,
    /// Batches discarded (a rebalance during the batch) or aborted, then read again.
    pub batches_discarded: u64,
    /// Input partitions this member owns now.
    pub partitions: usize,
    /// Predictions read back from the results topic when partitions were assigned.
    pub predictions_restored: u64,
    /// The last assignment: partitions taken and how long restoring their predictions took.
    pub last_assignment_ms: Option<u64>,
    /// Feedback read and held now: its prediction not known yet, its results partition not
    /// complete up to its time.
    pub feedback_held: u64,
}

/// Where a running member keeps its [`PreCounters`] for the operations API.
pub type PreCell = Arc<Mutex<Option<PreCounters>>>;

/// A results partition's clock: the highest event time read and when the last record came.
#[derive(Debug, Clone, Copy)]
struct Clock {
    max_event_ms: i64,
    last_wall_ms: i64,
}

enum Held {
    Feedback(DocumentFeedback),
    Dead(OutboxMessage),
}

/// One batch being built: nothing of it has left the process.
struct Batch {
    parts: PartialBuilder,
    staged: HashMap<String, Prediction>,
    dead: Vec<OutboxMessage>,
    /// Next offset per results partition read in the batch.
    results_next: BTreeMap<i32, i64>,
    /// Feedback partitions read or released in the batch.
    feedback_touched: BTreeSet<i32>,
    read: usize,
    /// What the batch counts once it commits.
    counts: PreCounters,
    /// The batch ended because nothing more was fetched (not because it was full).
    caught_up: bool,
    /// Partitions whose feedback partition has feedback held back (read, not yet joined or
    /// resolved): neither of the pair is reported caught up.
    holding: BTreeSet<i32>,
    /// Input partitions (`topic/partition`) not yet confirmed read to their end since they were
    /// assigned or sought back: not reported caught up.
    unread: BTreeSet<String>,
}

pub struct PreAggregator {
    cfg: PipelineConfig,
    brokers: String,
    member: String,
    store: RocksStateStore,
    cell: PreCell,
    counters: PreCounters,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl PreAggregator {
    pub fn open(cfg: PipelineConfig, brokers: String, cell: PreCell) -> Result<Self, MonitorError> {
        let dir = std::path::PathBuf::from(format!("{}-pre", cfg.monitor.state_dir.display()));
        std::fs::create_dir_all(&dir).map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
        let store = RocksStateStore::open(&dir)?;
        let member = cfg.kafka.instance_id();
        Ok(Self { cfg, brokers, member, store, cell, counters: PreCounters::default() })
    }

    fn group(&self) -> String {
        format!("{}-monitor-pre", self.cfg.kafka.infer_group)
    }

    fn publish_counters(&self) {
        *self.cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.counters.clone());
    }

    /// Runs until `stop` is set. Blocking: call from a blocking thread.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<PreCounters, MonitorError> {
        let cfg = self.cfg.clone();
        let (results_topic, feedback_topic) = (cfg.topics.inference.clone(), cfg.topics.feedback.clone());
        let group = self.group();
        // partitions, and the ends of partitions (a client that fetches nothing: `read_to_the_end`)
        let meta: BaseConsumer = kafka::end_reader(&self.brokers, &format!("{group}-meta"), &cfg.kafka.librdkafka, "the pre-aggregation metadata reader")?;
        let (rp, fp) = (kafka::partitions_of(&meta, &results_topic, Duration::from_secs(30))?, kafka::partitions_of(&meta, &feedback_topic, Duration::from_secs(30))?);
        if rp.len() != fp.len() {
            return Err(MonitorError::NotCoPartitioned { results: results_topic, results_partitions: rp.len(), feedback: feedback_topic, feedback_partitions: fp.len() });
        }

        let timeout = cfg.monitor.pre_transaction_timeout_ms;
        let mut pc = kafka::producer_config_with(&self.brokers, &cfg.kafka.librdkafka, timeout);
        pc.set("transactional.id", format!("{group}.{}", self.member)).set("transaction.timeout.ms", timeout.to_string());
        kafka::config::transactional_in_flight(&mut pc, &cfg.kafka.librdkafka);
        if !cfg.kafka.librdkafka.contains_key("linger.ms") {
            pc.set("linger.ms", "0");
        }
        if !cfg.kafka.librdkafka.contains_key("retry.backoff.ms") {
            pc.set("retry.backoff.ms", "5");
        }
        let producer: FutureProducer = pc.create().map_err(KafkaError::client("the pre-aggregation producer"))?;
        let started = Instant::now();
        loop {
            match producer.init_transactions(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(e) if started.elapsed() < Duration::from_millis(cfg.kafka.outage_tolerance_ms) && !fatal_txn(&e) => {
                    tracing::warn!(error = %e, "pre-aggregation: initialising transactions; retrying");
                }
                Err(e) => return Err(MonitorError::Delivery(KafkaError::Broker { what: "initialising the pre-aggregation transactions".into(), source: e })),
            }
        }

        let mut cc = kafka::consumer_config(&self.brokers, &group, &cfg.kafka.librdkafka);
        // partition p of both topics to one member (the feedback join); offsets move only in transactions
        cc.set("partition.assignment.strategy", "range").set("enable.auto.commit", "false").set("session.timeout.ms", "6000");
        if !cfg.kafka.embedded && cfg.kafka.static_membership {
            cc.set("group.instance.id", format!("{}-monitor", self.member));
        }
        let changes = Arc::new(AtomicU64::new(0));
        let consumer: BaseConsumer<KnownProtocol> = cc.create_with_context(KnownProtocol::of(&cc).counting(changes.clone()).expecting(&[&results_topic, &feedback_topic])).map_err(KafkaError::client("the pre-aggregation consumer"))?;
        consumer.subscribe(&[&results_topic, &feedback_topic]).map_err(KafkaError::broker("subscribe the pre-aggregation consumer"))?;
        tracing::info!(group = %group, member = %self.member, partitions = rp.len(), "monitor pre-aggregation started");

        let wcfg = cfg.monitor.window();
        let heartbeat_every = heartbeat_interval(&wcfg);
        let mut last_heartbeat = Instant::now();
        let mut seen_changes = 0u64;
        let mut owned: BTreeSet<(String, i32)> = BTreeSet::new();
        let mut clocks: BTreeMap<i32, Clock> = BTreeMap::new();
        let mut committed_clocks: BTreeMap<i32, Clock> = BTreeMap::new();
        let mut held: BTreeMap<i32, VecDeque<(i64, Held)>> = BTreeMap::new();
        let mut feedback_next: BTreeMap<i32, i64> = BTreeMap::new();
        // input partitions assigned or sought back and not yet confirmed read to their end
        let mut unread: BTreeSet<(String, i32)> = BTreeSet::new();
        let outcome = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            let mut b = Batch { parts: PartialBuilder::new(wcfg.size_ms), staged: HashMap::new(), dead: Vec::new(), results_next: BTreeMap::new(), feedback_touched: BTreeSet::new(), read: 0, counts: PreCounters::default(), caught_up: false, holding: BTreeSet::new(), unread: BTreeSet::new() };
            let mut discard = false;
            let mut fatal: Option<MonitorError> = None;
            let mut wait = Duration::from_millis(200);
            while b.read < cfg.monitor.max_batch {
                let polled = consumer.poll(wait);
                // a stale assignment of other topics (see `KnownProtocol::expecting`): join again
                crate::kafka::rebalance::KnownProtocol::rejoin_if_stale(&consumer);
                let c = changes.load(Ordering::SeqCst);
                if c != seen_changes {
                    seen_changes = c;
                    let now: BTreeSet<(String, i32)> = consumer.assignment().map(|t| t.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()).unwrap_or_default();
                    let gone: Vec<(String, i32)> = owned.difference(&now).cloned().collect();
                    let new: Vec<(String, i32)> = now.difference(&owned).cloned().collect();
                    if !gone.is_empty() {
                        discard = b.read > 0;
                        for (t, p) in &gone {
                            unread.remove(&(t.clone(), *p));
                            if *t == results_topic {
                                clocks.remove(p);
                                committed_clocks.remove(p);
                            } else {
                                held.remove(p);
                                feedback_next.remove(p);
                            }
                        }
                        tracing::info!(member = %self.member, revoked = ?gone, "pre-aggregation: partitions revoked");
                    }
                    if !new.is_empty() {
                        unread.extend(new.iter().cloned());
                        let t0 = Instant::now();
                        let mut restored = 0;
                        for (_, p) in new.iter().filter(|(t, _)| *t == results_topic) {
                            restored += self.restore(&consumer, *p)?;
                            // idle from when this member can start reading it, not from before a
                            // restore that may take longer than the idle timeout
                            let clock = Clock { max_event_ms: i64::MIN, last_wall_ms: now_ms() };
                            clocks.insert(*p, clock);
                            committed_clocks.insert(*p, clock);
                        }
                        let took = t0.elapsed().as_millis() as u64;
                        self.counters.predictions_restored += restored;
                        self.counters.last_assignment_ms = Some(took);
                        tracing::info!(member = %self.member, assigned = ?new, restored_predictions = restored, restore_ms = took, "pre-aggregation: partitions assigned; their predictions restored from the results topic");
                    }
                    owned = now;
                    self.counters.partitions = owned.len();
                    self.publish_counters();
                }
                if discard {
                    break;
                }
                let Some(m) = polled else {
                    b.caught_up = true;
                    break;
                };
                wait = Duration::ZERO;
                let m = match m {
                    Ok(m) => m,
                    Err(e) if kafka::error::is_fatal_consumer_error(&e) => {
                        fatal = Some(MonitorError::Kafka(KafkaError::Broker { what: "consuming the pre-aggregation inputs".into(), source: e }));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pre-aggregation: consume error");
                        break;
                    }
                };
                if !owned.contains(&(m.topic().to_string(), m.partition())) {
                    // fetched before a revocation this process has not noticed yet: read again by its owner
                    continue;
                }
                b.read += 1;
                if m.topic() == results_topic {
                    self.read_result(&m, &mut b, &mut clocks)?;
                } else {
                    let wall = now_ms();
                    let held_item = self.read_feedback(&m, wall);
                    held.entry(m.partition()).or_default().push_back((m.offset(), held_item));
                    feedback_next.insert(m.partition(), m.offset() + 1);
                    b.feedback_touched.insert(m.partition());
                }
            }
            if let Some(e) = fatal {
                break Err(e);
            }
            if discard {
                self.rewind(&consumer, &results_topic, &feedback_topic, &b, &mut held, &mut feedback_next, &mut clocks, &committed_clocks);
                unread.extend(owned.iter().cloned());
                continue;
            }
            self.release((&consumer, &meta), &mut b, &mut held, &clocks, (&results_topic, &feedback_topic), &wcfg)?;
            self.counters.feedback_held = held.values().map(|q| q.len() as u64).sum();
            // A partition pair whose feedback is still held is not reported caught up, so the
            // closing stage holds the watermark at its clock: a window that held feedback will
            // count cannot close before the feedback is released (by its prediction's arrival or
            // the idle rule) and sent. Both of the pair report caught up again from the batch
            // that releases it, or the next heartbeat.
            b.holding = held.iter().filter(|(_, q)| !q.is_empty()).map(|(p, _)| *p).collect();
            // every owned partition reports in regularly, so that the leader knows which ones may go
            // idle and which have lost their owner
            if last_heartbeat.elapsed() >= heartbeat_every {
                last_heartbeat = Instant::now();
                // A partition just assigned or sought back is silent until its first fetch comes
                // back, without having been read: it is reported caught up only once the broker
                // confirms that this member's position is at its end (asked here, at most once per
                // heartbeat, until it is), so that the closing stage does not let it go idle and
                // close windows its records are still to count in.
                if b.caught_up && !unread.is_empty() {
                    unread.retain(|(t, p)| !kafka::read_to_the_end(&meta, &consumer, t, *p, || committed_start(&consumer, t, *p)));
                }
                for (t, p) in &owned {
                    b.parts.heartbeat(&format!("{t}/{p}"));
                }
            }
            b.unread = unread.iter().map(|(t, p)| format!("{t}/{p}")).collect();
            if b.read == 0 && b.parts.is_empty() && b.dead.is_empty() {
                continue;
            }
            // offsets: results past what was read; feedback up to its first held record
            let mut offsets = TopicPartitionList::new();
            for (p, next) in &b.results_next {
                offsets.add_partition_offset(&results_topic, *p, Offset::Offset(*next)).map_err(KafkaError::broker("offsets"))?;
            }
            for p in &b.feedback_touched {
                let next = held.get(p).and_then(|q| q.front()).map(|(o, _)| *o).or(feedback_next.get(p).copied());
                if let Some(next) = next {
                    offsets.add_partition_offset(&feedback_topic, *p, Offset::Offset(next)).map_err(KafkaError::broker("offsets"))?;
                }
            }
            match self.commit(&producer, &consumer, &mut b, &offsets) {
                Ok(()) => {
                    committed_clocks = clocks.clone();
                    self.persist(&b, &clocks)?;
                }
                Err(Failure::Fatal(e)) => break Err(e),
                Err(Failure::Aborted(e)) => {
                    tracing::warn!(member = %self.member, error = %e, "pre-aggregation: transaction aborted; the batch is read again");
                    self.rewind(&consumer, &results_topic, &feedback_topic, &b, &mut held, &mut feedback_next, &mut clocks, &committed_clocks);
                    unread.extend(owned.iter().cloned());
                }
            }
            self.publish_counters();
        };
        kafka::rebalance::close_within(consumer, Duration::from_secs(15), "the pre-aggregation consumer");
        tracing::info!(member = %self.member, summary = ?self.counters, "monitor pre-aggregation stopped");
        outcome.map(|()| self.counters)
    }

    /// Decodes a result into the batch: dead-lettered, a redelivery, or counted.
    fn read_result(&mut self, m: &BorrowedMessage<'_>, b: &mut Batch, clocks: &mut BTreeMap<i32, Clock>) -> Result<(), MonitorError> {
        let source = format!("{}/{}", m.topic(), m.partition());
        b.results_next.insert(m.partition(), m.offset() + 1);
        let wall = now_ms();
        let ct = h::get(m.headers(), h::CONTENT_TYPE);
        let decoded = codec::decode_result_counted(m.payload().unwrap_or_default(), ct.as_deref()).map_err(|e| (e.class(), e.to_string())).and_then(|r| match self.cfg.limits.check_event_time("submitted_at", r.submitted_at, wall) {
            Ok(()) => Ok(r),
            Err(why) => Err(("bad_timestamp", why.to_string())),
        });
        let r = match decoded {
            Ok(r) => r,
            Err((class, why)) => {
                tracing::warn!(class, reason = %why, source = %source, offset = m.offset(), "monitor input dead-lettered");
                b.dead.push(monitor_dead_letter(&self.cfg, m, class, &why));
                b.parts.dead_letter(&source);
                b.counts.dead_lettered += 1;
                return Ok(());
            }
        };
        let clock = clocks.entry(m.partition()).or_insert(Clock { max_event_ms: i64::MIN, last_wall_ms: wall });
        clock.max_event_ms = clock.max_event_ms.max(r.submitted_at);
        clock.last_wall_ms = wall;
        if self.lookup(&b.staged, &r.document_id, r.submitted_at)?.is_some_and(|p| p.is_from(&r)) {
            b.parts.duplicate(&source, r.submitted_at);
            b.counts.duplicates += 1;
            return Ok(());
        }
        b.parts.result(&source, &r);
        b.counts.results += 1;
        if let Some(p) = prediction_of(&r) {
            b.staged.insert(r.document_id.clone(), p);
        }
        Ok(())
    }

    fn read_feedback(&mut self, m: &BorrowedMessage<'_>, wall: i64) -> Held {
        let ct = h::get(m.headers(), h::CONTENT_TYPE);
        let decoded = codec::decode::<DocumentFeedback>(m.payload().unwrap_or_default(), ct.as_deref()).map_err(|e| (e.class(), e.to_string())).and_then(|f| match self.cfg.limits.check_event_time("given_at", f.given_at, wall) {
            Ok(()) => Ok(f),
            Err(why) => Err(("bad_timestamp", why.to_string())),
        });
        match decoded {
            Ok(f) => Held::Feedback(f),
            Err((class, why)) => {
                tracing::warn!(class, reason = %why, source = %format!("{}/{}", m.topic(), m.partition()), offset = m.offset(), "monitor input dead-lettered");
                Held::Dead(monitor_dead_letter(&self.cfg, m, class, &why))
            }
        }
    }

    /// Joins or resolves held feedback, in order per partition, as far as it can.
    ///
    /// Feedback whose prediction is not known is an orphan once its results partition is complete
    /// up to its time: its clock has passed the feedback's time, or the partition has been idle
    /// for the idle timeout, the feedback is that old, and this member has read the partition to
    /// its end (asked of the broker, once per partition and call, only then). A partition just
    /// assigned or sought back, or whose leader is out of reach, can be silent without being
    /// read: the results fetched for it, the prediction among them, are then still to come.
    fn release(&mut self, (consumer, ends): (&BaseConsumer<KnownProtocol>, &BaseConsumer), b: &mut Batch, held: &mut BTreeMap<i32, VecDeque<(i64, Held)>>, clocks: &BTreeMap<i32, Clock>, (results_topic, feedback_topic): (&str, &str), wcfg: &crate::window::WindowConfig) -> Result<(), MonitorError> {
        let wall = now_ms();
        let cap = self.cfg.monitor.max_pending_feedback;
        for (p, q) in held.iter_mut() {
            let source = format!("{feedback_topic}/{p}");
            let clock = clocks.get(p);
            let mut read_to_end: Option<bool> = None;
            let mut released = false;
            while let Some((_, item)) = q.front() {
                match item {
                    Held::Dead(d) => {
                        b.dead.push(d.clone());
                        b.parts.dead_letter(&source);
                        b.counts.dead_lettered += 1;
                    }
                    Held::Feedback(f) => {
                        if let Some(pred) = self.lookup(&b.staged, &f.document_id, f.given_at)? {
                            b.parts.feedback(&source, f, &pred);
                            b.counts.feedback_joined += 1;
                        } else {
                            // the results partition is complete up to the feedback's time
                            let complete = clock.is_some_and(|c| {
                                c.max_event_ms >= f.given_at || (wall - c.last_wall_ms >= wcfg.idle_timeout_ms && wall - f.given_at >= wcfg.idle_timeout_ms && *read_to_end.get_or_insert_with(|| kafka::read_to_the_end(ends, consumer, results_topic, *p, || committed_start(consumer, results_topic, *p))))
                            });
                            let overflow = q.len() > cap;
                            if !complete && !overflow {
                                break;
                            }
                            b.parts.orphan(&source, f.given_at, !complete);
                            b.counts.feedback_orphans += 1;
                        }
                    }
                }
                q.pop_front();
                released = true;
            }
            if released {
                b.feedback_touched.insert(*p);
            }
        }
        Ok(())
    }

    /// The prediction of `document_id` seen within the retention before `at_ms`.
    fn lookup(&self, staged: &HashMap<String, Prediction>, document_id: &str, at_ms: i64) -> Result<Option<Prediction>, MonitorError> {
        let p = match staged.get(document_id) {
            Some(p) => Some(p.clone()),
            None => self.store.get_json::<Prediction>(CF_PREDICTIONS, document_id.as_bytes())?,
        };
        Ok(p.filter(|p| at_ms.saturating_sub(p.event_ms) <= self.cfg.monitor.prediction_retention_ms))
    }

    /// One transaction: the partials, the dead letters and the group's next offsets.
    fn commit(&mut self, producer: &FutureProducer, consumer: &BaseConsumer<KnownProtocol>, b: &mut Batch, offsets: &TopicPartitionList) -> Result<(), Failure> {
        // one partial per input partition, split over the closing partitions (keyed by model)
        let k = self.cfg.monitor.closing_partitions;
        let (caught_up, holding, unread) = (b.caught_up, &b.holding, &b.unread);
        let report = |source: &str| caught_up && !unread.contains(source) && !source.rsplit_once('/').and_then(|(_, p)| p.parse::<i32>().ok()).is_some_and(|p| holding.contains(&p));
        let partials: Vec<(u32, super::partial::PartialBatch)> = std::mem::take(&mut b.parts).finish(&self.member, report).into_iter().flat_map(|p| super::shard::split(p, k)).collect();
        let n = partials.len() as u64;
        let abort = |e: KafkaError| {
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            Failure::Aborted(e)
        };
        let classify = |what: &str, e: rdkafka::error::KafkaError| {
            let fatal = fatal_txn(&e);
            let e = KafkaError::Broker { what: what.to_string(), source: e };
            if fatal {
                Failure::Fatal(MonitorError::Delivery(e))
            } else {
                Failure::Aborted(e)
            }
        };
        producer.begin_transaction().map_err(|e| classify("begin a pre-aggregation transaction", e))?;
        let mut futures = Vec::new();
        let topic = self.cfg.topics.monitor_partials.clone();
        for (part, pb) in &partials {
            let payload = serde_json::to_vec(pb).expect("partials serialise");
            let hs = HeaderSet::new().with(h::CONTENT_TYPE, "application/json").with("member", &self.member);
            let rec = FutureRecord::to(&topic).partition(*part as i32).key(pb.source.as_bytes()).payload(&payload).headers(hs.build());
            futures.push((kafka::enqueue_blocking(producer, rec).map_err(abort)?, topic.clone()));
        }
        for d in &b.dead {
            let payload = hex::decode(&d.payload_hex).unwrap_or_default();
            let mut hs = HeaderSet::new();
            for (k, v) in &d.headers {
                hs = hs.with(k, v);
            }
            let rec = FutureRecord::to(&d.topic).key(&d.key).payload(&payload).headers(hs.build());
            futures.push((kafka::enqueue_blocking(producer, rec).map_err(abort)?, d.topic.clone()));
        }
        if offsets.count() > 0 {
            let Some(group) = consumer.group_metadata() else {
                return Err(abort(KafkaError::Timeout { what: "the pre-aggregation group membership (no group metadata yet)".into(), seconds: 0 }));
            };
            if let Err(e) = producer.send_offsets_to_transaction(offsets, &group, CALL_TIMEOUT) {
                let _ = producer.abort_transaction(CALL_TIMEOUT);
                return Err(classify("sending the pre-aggregation offsets", e));
            }
        }
        kafka::wait_deliveries(futures).map_err(abort)?;
        // the producer's thread releases the last report a moment after its future resolved
        kafka::wait_released(|| producer.in_flight_count(), Duration::from_millis(200));
        if let Err(e) = producer.commit_transaction(CALL_TIMEOUT) {
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            return Err(classify("committing a pre-aggregation transaction", e));
        }
        let (c, d) = (&mut self.counters, &b.counts);
        c.batches += 1;
        c.partials += n;
        c.results += d.results;
        c.feedback_joined += d.feedback_joined;
        c.feedback_orphans += d.feedback_orphans;
        c.duplicates += d.duplicates;
        c.dead_lettered += d.dead_lettered;
        Ok(())
    }

    /// After a commit: the batch's predictions and the results offsets they reflect, and expiry.
    fn persist(&self, b: &Batch, clocks: &BTreeMap<i32, Clock>) -> Result<(), MonitorError> {
        let store = &self.store;
        let mut w = StateBatch::default();
        for (id, p) in &b.staged {
            w.put_json(store, CF_PREDICTIONS, id.as_bytes(), p);
            w.put_raw(store, CF_PREDICTION_EXPIRY, &expiry_key(p.event_ms, id), b"null");
        }
        for (p, next) in &b.results_next {
            w.put_raw(store, CF_OFFSETS, format!("{}/{p}", self.cfg.topics.inference).as_bytes(), &next.to_be_bytes());
        }
        if let Some(max) = clocks.values().map(|c| c.max_event_ms).filter(|t| *t != i64::MIN).max() {
            let cutoff = max.saturating_sub(self.cfg.monitor.prediction_retention_ms);
            for key in store.scan_before(CF_PREDICTION_EXPIRY, &expiry_key(cutoff, ""), 10_000)? {
                w.delete(store, CF_PREDICTION_EXPIRY, &key);
                let id = &key[17..];
                let again = std::str::from_utf8(id).is_ok_and(|id| b.staged.contains_key(id));
                if !again && store.get_json::<Prediction>(CF_PREDICTIONS, id)?.is_some_and(|p| p.event_ms < cutoff) {
                    w.delete(store, CF_PREDICTIONS, id);
                }
            }
        }
        Ok(store.write(w)?)
    }

    /// Forgets a batch that did not commit: its partitions and every held feedback go back to the
    /// group's committed offsets, and the clocks to what was committed.
    #[allow(clippy::too_many_arguments)]
    fn rewind(&mut self, consumer: &BaseConsumer<KnownProtocol>, results_topic: &str, feedback_topic: &str, b: &Batch, held: &mut BTreeMap<i32, VecDeque<(i64, Held)>>, feedback_next: &mut BTreeMap<i32, i64>, clocks: &mut BTreeMap<i32, Clock>, committed_clocks: &BTreeMap<i32, Clock>) {
        self.counters.batches_discarded += 1;
        let mut tpl = TopicPartitionList::new();
        for p in b.results_next.keys() {
            tpl.add_partition(results_topic, *p);
        }
        for p in held.keys().chain(b.feedback_touched.iter()).collect::<BTreeSet<_>>() {
            tpl.add_partition(feedback_topic, *p);
        }
        held.clear();
        feedback_next.clear();
        *clocks = committed_clocks.clone();
        let assigned: BTreeSet<(String, i32)> = consumer.assignment().map(|t| t.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()).unwrap_or_default();
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "pre-aggregation: cannot read the committed offsets to rewind; rejoining the group");
                let _ = consumer.unsubscribe();
                let _ = consumer.subscribe(&[results_topic, feedback_topic]);
                return;
            }
        };
        for e in committed.elements() {
            if !assigned.contains(&(e.topic().to_string(), e.partition())) {
                continue;
            }
            let to = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(err) = consumer.seek(e.topic(), e.partition(), to, Duration::from_secs(10)) {
                tracing::warn!(error = %err, partition = %format!("{}/{}", e.topic(), e.partition()), "pre-aggregation: seek back failed; rejoining the group");
                let _ = consumer.unsubscribe();
                let _ = consumer.subscribe(&[results_topic, feedback_topic]);
                return;
            }
        }
    }

    /// Reads the predictions of results partition `p` that its store lacks, up to the group's
    /// committed offset (where this member starts processing it). Returns how many.
    fn restore(&self, consumer: &BaseConsumer<KnownProtocol>, p: i32) -> Result<u64, MonitorError> {
        let topic = &self.cfg.topics.inference;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(30)).map_err(KafkaError::broker(format!("committed offset of {topic}/{p}")))?;
        let end = match committed.elements().first().map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => return Ok(0),
        };
        let key = format!("{topic}/{p}");
        let stored = self.store.get_raw(CF_OFFSETS, key.as_bytes())?.and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes));
        let reader: BaseConsumer = kafka::reader_config(&self.brokers, &format!("{}-restore", self.group()), &self.cfg.kafka.librdkafka).create().map_err(KafkaError::client("the predictions restore reader"))?;
        let start = match stored {
            Some(o) => o,
            None => kafka::offset_at(&reader, topic, p, now_ms().saturating_sub(self.cfg.monitor.prediction_retention_ms))?,
        };
        if start >= end {
            return Ok(0);
        }
        let cursor = RangeCursor::open(reader, [(topic.clone(), PartitionRange { partition: p, start, end })], format!("restoring the predictions of {key}"))?;
        let mut w = StateBatch::default();
        let mut n = 0u64;
        let mut pending = 0usize;
        cursor.for_each(Duration::from_secs(60), |m| -> Result<(), MonitorError> {
            let ct = h::get(m.headers(), h::CONTENT_TYPE);
            if let Ok(r) = codec::decode_result_counted(m.payload().unwrap_or_default(), ct.as_deref()) {
                if let Some(pred) = prediction_of(&r) {
                    w.put_json(&self.store, CF_PREDICTIONS, r.document_id.as_bytes(), &pred);
                    w.put_raw(&self.store, CF_PREDICTION_EXPIRY, &expiry_key(pred.event_ms, &r.document_id), b"null");
                    n += 1;
                    pending += 1;
                }
            }
            if pending >= RESTORE_CHUNK {
                w.put_raw(&self.store, CF_OFFSETS, key.as_bytes(), &(m.offset() + 1).to_be_bytes());
                self.store.write(std::mem::take(&mut w))?;
                pending = 0;
            }
            Ok(())
        })?;
        w.put_raw(&self.store, CF_OFFSETS, key.as_bytes(), &end.to_be_bytes());
        self.store.write(w)?;
        Ok(n)
    }
}

/// Where this member's reading of `topic/p` began when it has read nothing since the assignment or
/// a seek: the group's committed offset (`None` without one, or when it cannot be read: then the
/// log start, where `auto.offset.reset` starts).
fn committed_start(consumer: &BaseConsumer<KnownProtocol>, topic: &str, p: i32) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    consumer.committed_offsets(tpl, kafka::END_QUERY_TIMEOUT).ok().and_then(|c| kafka::offset_in(&c, topic, p))
}

fn fatal_txn(e: &rdkafka::error::KafkaError) -> bool {
    matches!(e, rdkafka::error::KafkaError::Transaction(t) if t.is_fatal())
}

/// How often a member reports each partition it owns: a third of the idle timeout, at most 1 s.
pub fn heartbeat_interval(w: &crate::window::WindowConfig) -> Duration {
    Duration::from_millis((w.idle_timeout_ms / 3).clamp(50, 1_000) as u64)
}

enum Failure {
    Aborted(KafkaError),
    Fatal(MonitorError),
}
