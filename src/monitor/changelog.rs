//! Changelog: how a closing partition's state is replicated and how a standby takes over.
//!
//! Every state batch a closing partition ([`super::shard`]) writes to RocksDB is also written,
//! before it, to its own partition of the compacted topic `monitor_changelog` (one message per key:
//! `cf \0 key` → value, a tombstone for a delete) inside one Kafka transaction; the predictions'
//! expiry index is derived by the reader instead of written. Each partition has its own
//! transactional id (`<topic>.writer` for partition 0, `<topic>.writer-<p>` for the others), so a
//! process that takes a partition over fences the one that held it before. A process that is
//! handed a partition replays its committed changelog (read_committed, from the last offset its own
//! copy has applied) into that partition's RocksDB and resumes at the input offsets found there.
//!
//! Warm standbys (`monitor.standby_replicas` ≥ 1): while a process does not own a partition it
//! tails that partition's committed changelog into its own copy, recording the next offset it
//! applied with every write, so a takeover replays only what the owner wrote since (seconds), not
//! the whole topic. With `standby_replicas: 0` nothing is tailed and a takeover replays
//! everything. Restores of any length go on while records arrive; their progress is logged and
//! shown in [`Progress`].

use std::time::Duration;

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{BorrowedMessage, Message},
    producer::{FutureProducer, FutureRecord, Producer},
    Offset, TopicPartitionList,
};
use serde::Serialize;

use super::MonitorError;
use crate::{
    config::PipelineConfig,
    kafka::{self, range::PartitionRange, KafkaError, RangeCursor},
    state::{RocksStateStore, StateBatch, ALL_CFS, CF_PREDICTIONS, CF_PREDICTION_EXPIRY},
};

/// Local meta key: next changelog offset this RocksDB has applied.
pub const META_CHANGELOG_NEXT: &[u8] = b"changelog_next";

/// Where this process's copy of the changelog stands (the log, `/health/detailed` and `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Progress {
    /// Whether a waiting member keeps its copy warm (`monitor.standby_replicas` ≥ 1).
    pub warm: bool,
    /// Next changelog offset the local state has applied.
    pub applied_offset: i64,
    /// The changelog's end as last seen (last stable offset, transaction markers included).
    pub end_offset: Option<i64>,
    /// Records between the local state and the changelog's end: 0 once the reader reached the end,
    /// else the end minus the next offset applied (an upper bound: it counts transaction markers).
    pub lag_records: Option<i64>,
    /// Changelog records this process applied since it started (tailing and restoring).
    pub records_applied: u64,
    /// The last takeover: from being handed the partition to reading the inputs, milliseconds.
    pub last_takeover_ms: Option<u64>,
    /// Records the last takeover replayed before it could resume.
    pub last_takeover_records: Option<u64>,
}

impl Progress {
    /// Records between the local state and the changelog's end, when known.
    pub fn lag(&self) -> Option<i64> {
        self.lag_records
    }
}

/// The tail reader's context: reaching the end of the partition is how a standby knows it is level
/// with the leader, not an error to log (librdkafka also reports it as a client error).
struct EndIsNews;

impl rdkafka::ClientContext for EndIsNews {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_) | rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(error = %error, reason, "librdkafka: the changelog tail reader");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndIsNews {}

/// A standby's reader of the committed changelog, positioned after what its store has applied.
pub struct Tail {
    reader: BaseConsumer<EndIsNews>,
    /// Asks for the changelog's end: a client that fetches nothing, so the question does not wait
    /// behind the fetch the broker holds open for `reader` (see [`kafka::read_to_the_end`]).
    ends: BaseConsumer,
    /// Whether the copy was level with the changelog's end at the last pump (logged on change).
    caught_up: bool,
    /// When the changelog's end was last asked for.
    end_checked: std::time::Instant,
    /// Whether the reader's last word was that it reached the end (no record since).
    at_end: bool,
}

/// Records applied in one RocksDB write while tailing or restoring.
const APPLY_CHUNK: u64 = 5_000;

/// One closing partition's changelog: its writer while the partition is owned here, its reader
/// for restores and for the warm copy while it is not.
pub struct Changelog {
    topic: String,
    partition: i32,
    /// Created when the partition is owned here (a standby only reads).
    producer: Option<FutureProducer>,
    /// Shared with the operations view ([`super::view::ViewHandle::changelog_cell`]).
    progress: ProgressCell,
}

/// Where [`Progress`] is kept: the changelog writes it, the operations view reads it.
pub type ProgressCell = std::sync::Arc<std::sync::Mutex<Option<Progress>>>;

fn ck(cf: &str, key: &[u8]) -> Vec<u8> {
    let mut v = cf.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(key);
    v
}

/// The transactional id of a closing partition's changelog writer (partition 0 keeps the id of
/// the single-partition design, so an existing deployment fences its old leader).
pub fn writer_id(topic: &str, partition: i32) -> String {
    if partition == 0 {
        format!("{topic}.writer")
    } else {
        format!("{topic}.writer-{partition}")
    }
}

impl Changelog {
    fn producer(&self) -> &FutureProducer {
        self.producer.as_ref().expect("the writer exists while the partition is owned")
    }

    /// A reader of `partition` (a standby's warm copy, a restore); [`Self::writer`] adds its writer.
    pub fn new(cfg: &PipelineConfig, partition: i32, progress: ProgressCell) -> Self {
        let warm = cfg.monitor.standby_replicas > 0;
        let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            *p = Some(Progress { warm, ..Progress::default() });
        }
        drop(p);
        Self { topic: cfg.topics.monitor_changelog.clone(), partition, producer: None, progress }
    }

    /// The partition's changelog with its transactional writer (the partition is owned here).
    pub fn writer(cfg: &PipelineConfig, brokers: &str, partition: i32, progress: ProgressCell) -> Result<Self, MonitorError> {
        let mut c = Self::new(cfg, partition, progress);
        let topic = &c.topic;
        // a transactional producer's message timeout may not exceed its transaction timeout: both
        // are the outage tolerance (a new owner's init_transactions aborts an open one at once)
        let tolerance = cfg.kafka.outage_tolerance_ms;
        let mut pc = kafka::producer_config_with(brokers, &cfg.kafka.librdkafka, tolerance);
        pc.set("transactional.id", writer_id(topic, partition)).set("transaction.timeout.ms", tolerance.to_string());
        kafka::config::transactional_in_flight(&mut pc, &cfg.kafka.librdkafka);
        // a transaction's first request may meet CONCURRENT_TRANSACTIONS while the broker finishes
        // the one before; retry it after 5 ms rather than librdkafka's 100 ms (as the infer stage does)
        if !cfg.kafka.librdkafka.contains_key("retry.backoff.ms") {
            pc.set("retry.backoff.ms", "5");
        }
        // a batch's records are enqueued at once and waited for: lingering only delays the batch
        if !cfg.kafka.librdkafka.contains_key("linger.ms") {
            pc.set("linger.ms", "0");
        }
        c.producer = Some(pc.create().map_err(KafkaError::client("the changelog producer"))?);
        Ok(c)
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Where the local copy stands now.
    pub fn progress(&self) -> Progress {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_default()
    }

    fn note(&self, f: impl FnOnce(&mut Progress)) {
        f(self.progress.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Progress::default));
    }

    /// Records the takeover that just completed (logged by the caller).
    pub fn note_takeover(&self, took: Duration, records: u64) {
        self.note(|p| {
            p.last_takeover_ms = Some(took.as_millis() as u64);
            p.last_takeover_records = Some(records);
        });
    }

    /// A read_committed reader of the changelog: the leader's aborted writes are never applied.
    fn reader(cfg: &PipelineConfig, brokers: &str, group: &str) -> Result<BaseConsumer, MonitorError> {
        let mut rc = kafka::reader_config(brokers, group, &cfg.kafka.librdkafka);
        rc.set("isolation.level", "read_committed");
        Ok(rc.create().map_err(KafkaError::client("the changelog reader"))?)
    }

    /// Adds one changelog record to `batch` (an unknown column family is skipped). The predictions'
    /// expiry index is not in the changelog (see [`Self::append`]): it is derived here from each
    /// prediction put, and its entry removed with each prediction deleted.
    fn apply(batch: &mut StateBatch, store: &RocksStateStore, m: &BorrowedMessage<'_>) {
        let key = m.key().unwrap_or_default();
        let Some(sep) = key.iter().position(|&b| b == 0) else { return };
        let cf = std::str::from_utf8(&key[..sep]).unwrap_or("");
        let Some(cf) = ALL_CFS.iter().find(|c| **c == cf) else { return };
        let id = &key[sep + 1..];
        let expiry = |event_ms: i64| std::str::from_utf8(id).ok().map(|id| super::expiry_key(event_ms, id));
        match m.payload() {
            Some(v) => {
                batch.put_raw(store, cf, id, v);
                if *cf == CF_PREDICTIONS {
                    if let Some(k) = serde_json::from_slice::<super::state::Prediction>(v).ok().and_then(|p| expiry(p.event_ms)) {
                        batch.put_raw(store, CF_PREDICTION_EXPIRY, &k, b"null");
                    }
                }
            }
            None => {
                if *cf == CF_PREDICTIONS {
                    if let Some(k) = store.get_json::<super::state::Prediction>(CF_PREDICTIONS, id).ok().flatten().and_then(|p| expiry(p.event_ms)) {
                        batch.delete(store, CF_PREDICTION_EXPIRY, &k);
                    }
                }
                batch.delete(store, cf, id);
            }
        }
    }

    pub fn open_tail(&self, cfg: &PipelineConfig, brokers: &str, store: &RocksStateStore) -> Result<Tail, MonitorError> {
        let from: i64 = store.get_json(crate::state::CF_META, META_CHANGELOG_NEXT)?.unwrap_or(0);
        let mut rc = kafka::reader_config(brokers, "payslip-monitor-standby", &cfg.kafka.librdkafka);
        // reaching the end is how the copy knows it is level with the leader
        rc.set("isolation.level", "read_committed").set("enable.partition.eof", "true");
        let reader: BaseConsumer<EndIsNews> = rc.create_with_context(EndIsNews).map_err(KafkaError::client("the changelog reader"))?;
        let mut tpl = TopicPartitionList::new();
        // an offset compacted or deleted away resets to the earliest one kept (reader_config)
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(from)).map_err(KafkaError::broker(format!("position {}/{}", self.topic, self.partition)))?;
        reader.assign(&tpl).map_err(KafkaError::broker(format!("assign {}", self.topic)))?;
        self.note(|p| p.applied_offset = from);
        tracing::info!(topic = %self.topic, partition = self.partition, from, "monitor standby: keeping a warm copy of the state (tailing the changelog)");
        let ends = kafka::end_reader(brokers, "payslip-monitor-standby", &cfg.kafka.librdkafka, "the changelog's end reader")?;
        Ok(Tail { reader, ends, caught_up: false, end_checked: std::time::Instant::now() - Duration::from_secs(60), at_end: false })
    }

    /// Applies what the changelog delivers within `wait` (at most [`APPLY_CHUNK`] records) to the
    /// local store, with the next offset; a read error is logged and tried again next time.
    pub fn pump(&self, tail: &mut Tail, store: &RocksStateStore, wait: Duration) -> Result<(), MonitorError> {
        let mut batch = StateBatch::default();
        let (mut n, mut next, mut at_end) = (0u64, None, false);
        let mut timeout = wait;
        while n < APPLY_CHUNK {
            match tail.reader.poll(timeout) {
                None => break,
                Some(Ok(m)) => {
                    Self::apply(&mut batch, store, &m);
                    next = Some(m.offset() + 1);
                    n += 1;
                    at_end = false;
                }
                // the reader passed the last committed record (and the markers after it)
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    at_end = true;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, partition = self.partition, "monitor standby: reading the changelog failed; trying again");
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if let Some(next) = next {
            batch.put_json(store, crate::state::CF_META, META_CHANGELOG_NEXT, &next);
            store.write(batch)?;
        }
        // the end (last stable offset) is asked for at most once a second
        let end = if tail.end_checked.elapsed() >= Duration::from_secs(1) {
            tail.end_checked = std::time::Instant::now();
            tail.ends.fetch_watermarks(&self.topic, self.partition, Duration::from_secs(2)).ok().map(|(_, hi)| hi).filter(|hi| *hi >= 0)
        } else {
            None
        };
        if n > 0 || at_end {
            tail.at_end = at_end;
        }
        let level = tail.at_end;
        self.note(|p| {
            if let Some(next) = next {
                p.applied_offset = next;
            }
            p.records_applied += n;
            if end.is_some() {
                p.end_offset = end;
            }
            if level {
                p.lag_records = Some(0);
            } else if let Some(e) = p.end_offset {
                p.lag_records = Some((e - p.applied_offset).max(0));
            }
        });
        if level != tail.caught_up {
            tail.caught_up = level;
            let p = self.progress();
            if level {
                tracing::info!(partition = self.partition, applied_offset = p.applied_offset, records_applied = p.records_applied, "monitor standby: warm copy caught up with the changelog");
            } else if let Some(lag) = p.lag().filter(|l| *l > APPLY_CHUNK as i64) {
                tracing::info!(partition = self.partition, lag, applied_offset = p.applied_offset, "monitor standby: warm copy behind the changelog");
            }
        }
        Ok(())
    }

    /// Fences earlier owners of the partition (same transactional id).
    pub fn init(&self) -> Result<(), MonitorError> {
        Ok(self.producer().init_transactions(Duration::from_secs(60)).map_err(KafkaError::broker("init transactions"))?)
    }

    /// Writes a batch's operations in one transaction; returns the next changelog offset. The
    /// predictions' expiry index is left out: a reader derives it from the predictions (half the
    /// records per result, so half the changelog to write, keep and replay).
    pub fn append(&self, batch: &StateBatch) -> Result<Option<i64>, MonitorError> {
        let ops: Vec<_> = batch.ops().iter().filter(|(cf, _, _)| *cf != CF_PREDICTION_EXPIRY).collect();
        if ops.is_empty() {
            return Ok(None);
        }
        let err = |e: rdkafka::error::KafkaError| MonitorError::Delivery(KafkaError::Delivery { topic: self.topic.clone(), source: e });
        self.producer().begin_transaction().map_err(err)?;
        let mut futures = Vec::with_capacity(ops.len());
        for (cf, key, value) in ops {
            let k = ck(cf, key);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).partition(self.partition).key(&k[..]);
            if let Some(v) = value {
                rec = rec.payload(&v[..]);
            }
            match kafka::enqueue_blocking(self.producer(), rec) {
                Ok(f) => futures.push((f, self.topic.as_str())),
                Err(e) => {
                    let _ = self.producer().abort_transaction(Duration::from_secs(30));
                    return Err(MonitorError::Delivery(e));
                }
            }
        }
        // Every delivery report before the commit: rust-rdkafka's commit_transaction flushes first,
        // and with records in flight that flush waits in 100 ms rounds (src/infer/txn.rs; measured
        // with benches/throughput.rs: the monitor's batches took over 100 ms each). A record the
        // broker refused aborts the transaction.
        let delivered = match kafka::wait_deliveries(futures) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.producer().abort_transaction(Duration::from_secs(30));
                return Err(MonitorError::Delivery(e));
            }
        };
        // the producer's thread releases the last report a moment after its future resolved
        kafka::wait_released(|| self.producer().in_flight_count(), Duration::from_millis(200));
        if let Err(e) = self.producer().commit_transaction(Duration::from_secs(60)) {
            let _ = self.producer().abort_transaction(Duration::from_secs(30));
            return Err(err(e));
        }
        let next = delivered.iter().map(|d| d.offset + 1).max();
        if let Some(next) = next {
            self.note(|p| {
                p.applied_offset = next;
                p.end_offset = Some(next);
                p.lag_records = Some(0);
            });
        }
        Ok(next)
    }

    /// Applies committed changelog entries after what `store` has applied, up to the current end;
    /// returns how many. `keep_alive` runs every [`APPLY_CHUNK`] records (the owner's own stop
    /// check), and progress is logged then.
    pub fn restore(&self, cfg: &PipelineConfig, brokers: &str, store: &RocksStateStore, keep_alive: &dyn Fn() -> bool) -> Result<u64, MonitorError> {
        let from: i64 = store.get_json(crate::state::CF_META, META_CHANGELOG_NEXT)?.unwrap_or(0);
        let reader = Self::reader(cfg, brokers, "payslip-monitor-restore")?;
        // with read_committed, the high watermark is the last stable offset; what lies between the
        // last record and it (markers, aborted records) is passed over by the cursor
        let (lo, hi) = kafka::watermarks_of(&reader, &self.topic, self.partition, Duration::from_secs(30))?;
        let start = from.max(lo);
        self.note(|p| {
            p.applied_offset = from;
            p.end_offset = Some(hi);
            p.lag_records = Some((hi - start).max(0));
        });
        if start >= hi {
            self.note(|p| p.lag_records = Some(0));
            tracing::info!(partition = self.partition, applied = 0, from = start, to = hi, "monitor state restored from the changelog (nothing to replay)");
            return Ok(0);
        }
        let cursor = RangeCursor::open(reader, [(self.topic.clone(), PartitionRange { partition: self.partition, start, end: hi })], format!("restoring from {}", self.topic))?;
        let mut batch = StateBatch::default();
        let mut applied = 0u64;
        let started = std::time::Instant::now();
        // a restore of any length goes on while records arrive; it fails only when none do
        cursor.for_each(Duration::from_secs(60), |m| {
            Self::apply(&mut batch, store, m);
            applied += 1;
            if applied % APPLY_CHUNK == 0 {
                batch.put_json(store, crate::state::CF_META, META_CHANGELOG_NEXT, &(m.offset() + 1));
                store.write(std::mem::take(&mut batch))?;
                if !keep_alive() {
                    return Err(MonitorError::LostLeadership);
                }
                self.note(|p| {
                    p.applied_offset = m.offset() + 1;
                    p.records_applied += APPLY_CHUNK;
                    p.lag_records = Some((hi - m.offset() - 1).max(0));
                });
                let rate = applied as f64 / started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(partition = self.partition, applied, offset = m.offset(), end = hi, records_per_s = rate.round(), remaining_s = ((hi - m.offset()) as f64 / rate).round(), "monitor state restore in progress");
            }
            Ok::<(), MonitorError>(())
        })?;
        batch.put_json(store, crate::state::CF_META, META_CHANGELOG_NEXT, &hi);
        store.write(batch)?;
        self.note(|p| {
            p.applied_offset = hi;
            p.records_applied += applied % APPLY_CHUNK;
            p.lag_records = Some(0);
        });
        tracing::info!(partition = self.partition, applied, from = start, to = hi, "monitor state restored from the changelog");
        Ok(applied)
    }
}
