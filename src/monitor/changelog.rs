//! Changelog and leadership: how a standby monitor takes over.
//!
//! Every state batch the monitor writes to RocksDB is also written, before it, to the compacted
//! topic `monitor_changelog` (one message per key: `cf \0 key` → value, a tombstone for a delete)
//! inside one Kafka transaction. The topic has one partition, and the monitor processes of a
//! deployment join one consumer group on it: the member that is assigned the partition is the
//! leader and runs the stage; the others wait. When the leader dies, the group hands the partition to
//! a standby, which replays the committed changelog (read_committed, from the last offset its own
//! RocksDB has applied) into its local state and resumes at the input offsets found there. The
//! transactional id is shared, so initialising transactions fences a leader that is still alive but
//! no longer assigned.
//!
//! Why not split the state by input partition: results are keyed by document id, so every window of
//! every subject draws from all input partitions; partition-local state would split each window.
//! Scaling the monitor out needs a repartition by subject first (see README "Status").

use std::time::Duration;

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    producer::{FutureProducer, FutureRecord, Producer},
};

use super::MonitorError;
use crate::{
    config::PipelineConfig,
    kafka::{self, range::PartitionRange, rebalance::KnownProtocol, KafkaError, RangeCursor},
    state::{RocksStateStore, StateBatch, ALL_CFS},
};

/// Local meta key: next changelog offset this RocksDB has applied.
pub const META_CHANGELOG_NEXT: &[u8] = b"changelog_next";

pub struct Changelog {
    topic: String,
    producer: FutureProducer,
    /// Always `Some` until dropped (taken to be closed within a limit).
    leader: Option<BaseConsumer<KnownProtocol>>,
}

fn ck(cf: &str, key: &[u8]) -> Vec<u8> {
    let mut v = cf.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(key);
    v
}

impl Drop for Changelog {
    fn drop(&mut self) {
        if let Some(leader) = self.leader.take() {
            kafka::rebalance::close_within(leader, std::time::Duration::from_secs(15), "the monitor's leadership consumer");
        }
    }
}

impl Changelog {
    fn leader(&self) -> &BaseConsumer<KnownProtocol> {
        self.leader.as_ref().expect("present until dropped")
    }

    pub fn new(cfg: &PipelineConfig, brokers: &str) -> Result<Self, MonitorError> {
        let topic = cfg.topics.monitor_changelog.clone();
        // one deployment = one changelog topic: its group elects the leader, its transactional id fences
        let group = format!("{topic}.leader");
        // a transactional producer's message timeout may not exceed its transaction timeout: both
        // are the outage tolerance (a new leader's init_transactions aborts an open one at once)
        let tolerance = cfg.kafka.outage_tolerance_ms;
        let mut pc = kafka::producer_config_with(brokers, &cfg.kafka.librdkafka, tolerance);
        pc.set("transactional.id", format!("{topic}.writer")).set("transaction.timeout.ms", tolerance.to_string());
        // a transaction's first request may meet CONCURRENT_TRANSACTIONS while the broker finishes
        // the one before; retry it after 5 ms rather than librdkafka's 100 ms (as the infer stage does)
        if !cfg.kafka.librdkafka.contains_key("retry.backoff.ms") {
            pc.set("retry.backoff.ms", "5");
        }
        // a batch's records are enqueued at once and waited for: lingering only delays the batch
        if !cfg.kafka.librdkafka.contains_key("linger.ms") {
            pc.set("linger.ms", "0");
        }
        let producer: FutureProducer = pc.create().map_err(KafkaError::client("the changelog producer"))?;
        let mut cc = kafka::client_config(brokers, &cfg.kafka.librdkafka);
        cc.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            // a joining standby must not take the partition from a live leader
            .set("partition.assignment.strategy", "cooperative-sticky");
        let leader: BaseConsumer<KnownProtocol> = cc.create_with_context(KnownProtocol::of(&cc)).map_err(KafkaError::client("the leadership consumer"))?;
        leader.subscribe(&[&topic]).map_err(KafkaError::broker(format!("subscribe {topic}")))?;
        Ok(Self { topic, producer, leader: Some(leader) })
    }

    pub fn is_leader(&self) -> bool {
        self.leader().assignment().map(|a| a.count() > 0).unwrap_or(false)
    }

    /// Waits until this process leads (or `stop`); returns false when stopped first.
    pub fn wait_for_leadership(&self, stop: &std::sync::atomic::AtomicBool) -> bool {
        let mut said = false;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // polling serves the group protocol; the messages are read separately in `restore`
            let _ = self.leader().poll(Duration::from_millis(200));
            if self.is_leader() {
                return true;
            }
            if !said {
                tracing::info!(topic = %self.topic, "monitor standby: waiting for leadership");
                said = true;
            }
        }
        false
    }

    /// Keeps the group membership alive; false when leadership was lost.
    pub fn still_leader(&self) -> bool {
        let _ = self.leader().poll(Duration::ZERO);
        self.is_leader()
    }

    /// Fences earlier leaders (same transactional id).
    pub fn init(&self) -> Result<(), MonitorError> {
        Ok(self.producer.init_transactions(Duration::from_secs(60)).map_err(KafkaError::broker("init transactions"))?)
    }

    /// Writes a batch's operations in one transaction; returns the next changelog offset.
    pub fn append(&self, batch: &StateBatch) -> Result<Option<i64>, MonitorError> {
        if batch.ops().is_empty() {
            return Ok(None);
        }
        let err = |e: rdkafka::error::KafkaError| MonitorError::Delivery(KafkaError::Delivery { topic: self.topic.clone(), source: e });
        self.producer.begin_transaction().map_err(err)?;
        let mut futures = Vec::with_capacity(batch.ops().len());
        for (cf, key, value) in batch.ops() {
            let k = ck(cf, key);
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).key(&k[..]);
            if let Some(v) = value {
                rec = rec.payload(&v[..]);
            }
            match kafka::enqueue_blocking(&self.producer, rec) {
                Ok(f) => futures.push((f, self.topic.as_str())),
                Err(e) => {
                    let _ = self.producer.abort_transaction(Duration::from_secs(30));
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
                let _ = self.producer.abort_transaction(Duration::from_secs(30));
                return Err(MonitorError::Delivery(e));
            }
        };
        // the producer's thread releases the last report a moment after its future resolved
        let settle = std::time::Instant::now();
        while self.producer.in_flight_count() > 0 && settle.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(e) = self.producer.commit_transaction(Duration::from_secs(60)) {
            let _ = self.producer.abort_transaction(Duration::from_secs(30));
            return Err(err(e));
        }
        Ok(delivered.iter().map(|d| d.offset + 1).max())
    }

    /// Applies committed changelog entries after what `store` has applied, up to the current end.
    pub fn restore(&self, cfg: &PipelineConfig, brokers: &str, store: &RocksStateStore) -> Result<u64, MonitorError> {
        let from: i64 = store.get_json(crate::state::CF_META, META_CHANGELOG_NEXT)?.unwrap_or(0);
        let mut rc = kafka::reader_config(brokers, "payslip-monitor-restore", &cfg.kafka.librdkafka);
        rc.set("isolation.level", "read_committed");
        let reader: BaseConsumer = rc.create().map_err(KafkaError::client("the changelog reader"))?;
        // with read_committed, the high watermark is the last stable offset; what lies between the
        // last record and it (markers, aborted records) is passed over by the cursor
        let (lo, hi) = kafka::watermarks_of(&reader, &self.topic, 0, Duration::from_secs(30))?;
        let start = from.max(lo);
        if start >= hi {
            return Ok(0);
        }
        let cursor = RangeCursor::open(reader, [(self.topic.clone(), PartitionRange { partition: 0, start, end: hi })], format!("restoring from {}", self.topic))?;
        let mut batch = StateBatch::default();
        let mut applied = 0u64;
        // a restore of any length goes on while records arrive; it fails only when none do
        cursor.for_each(Duration::from_secs(60), |m| {
            let key = m.key().unwrap_or_default();
            let Some(sep) = key.iter().position(|&b| b == 0) else { return Ok(()) };
            let cf = std::str::from_utf8(&key[..sep]).unwrap_or("");
            let Some(cf) = ALL_CFS.iter().find(|c| **c == cf) else { return Ok(()) };
            match m.payload() {
                Some(v) => batch.put_raw(store, cf, &key[sep + 1..], v),
                None => batch.delete(store, cf, &key[sep + 1..]),
            }
            applied += 1;
            if applied % 5000 == 0 {
                batch.put_json(store, crate::state::CF_META, META_CHANGELOG_NEXT, &(m.offset() + 1));
                store.write(std::mem::take(&mut batch))?;
                tracing::info!(applied, offset = m.offset(), end = hi, "monitor state restore in progress");
            }
            Ok::<(), MonitorError>(())
        })?;
        batch.put_json(store, crate::state::CF_META, META_CHANGELOG_NEXT, &hi);
        store.write(batch)?;
        tracing::info!(applied, from = start, to = hi, "monitor state restored from the changelog");
        Ok(applied)
    }
}
