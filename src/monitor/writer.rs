//! Write-behind of the monitor's batches: while batch N is written (its changelog transaction,
//! then its RocksDB `WriteBatch`, then its outbox published), batch N+1 is read and applied in
//! memory. Measured with `benches/throughput.rs` (BENCHMARKS.md, "The monitor's write-behind"):
//! the write was about half of every batch's time, with the stage's thread idle in it.
//!
//! Invariants:
//! - One batch is written at a time, in order: [`WriteBehind::submit`] waits for the batch before
//!   it, so batches reach the changelog, the store and the output topics in the order they were
//!   applied, and each is still one changelog transaction and one `WriteBatch` with its offsets and
//!   outbox (the delivery semantics of [`super`] are unchanged).
//! - A batch is built only after the one before it is in the store ([`WriteBehind::wait`] first),
//!   so what building reads from the store (the predictions past retention) is current.
//! - Until its batch is in the store, its predictions are answered from here
//!   ([`WriteBehind::prediction`]): a redelivered result or a feedback applied meanwhile finds them.
//! - A batch whose write failed stops the stage at the next wait; the batches applied after it
//!   were never written, so a restart resumes at the last stored offsets and loses nothing.
//! - Dropping it waits for the batch in hand: the store is not handed on (a warm copy, a new
//!   leader in this process) while a write to it is still running.

use std::{
    collections::BTreeMap,
    sync::{mpsc, Arc},
    thread::JoinHandle,
    time::Duration,
};

use rdkafka::producer::FutureRecord;

use super::{changelog, state::Prediction, MonitorError, OutboxMessage, META_PUBLISHED_PREFIX};
use crate::{
    kafka::{self, headers::HeaderSet},
    state::{RocksStateStore, StateBatch, CF_META, CF_OUTBOX},
};

/// Where a closing partition's batches and outputs go.
#[derive(Clone)]
pub(super) struct Sink {
    pub store: RocksStateStore,
    pub changelog: Option<Arc<changelog::Changelog>>,
    pub producer: kafka::stats::StatsProducer,
    /// How long a changelog write is tried again while the broker is away (`kafka.outage_tolerance_ms`).
    pub tolerance: Duration,
}

impl Sink {
    /// Writes a batch: first to the changelog (one transaction), then to RocksDB with the changelog
    /// position, so a standby replaying the changelog reaches exactly this state.
    ///
    /// A changelog transaction that fails for a passing reason (the broker is away) is aborted and
    /// tried again for up to the tolerance; nothing reaches RocksDB before it commits.
    pub fn write(&self, mut batch: StateBatch) -> Result<(), MonitorError> {
        if let Some(c) = &self.changelog {
            let deadline = std::time::Instant::now() + self.tolerance;
            let mut backoff = Duration::from_millis(200);
            let next = loop {
                match c.append(&batch) {
                    Ok(next) => break next,
                    Err(e) if e.retryable() && std::time::Instant::now() + backoff < deadline => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "changelog write failed; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(e),
                }
            };
            if let Some(next) = next {
                batch.put_json(&self.store, CF_META, changelog::META_CHANGELOG_NEXT, &next);
            }
        }
        Ok(self.store.write(batch)?)
    }

    /// Publishes outbox messages in order, then deletes them and records the confirmed positions.
    pub fn publish(&self, outbox: Vec<(Vec<u8>, OutboxMessage)>) -> Result<(), MonitorError> {
        if outbox.is_empty() {
            return Ok(());
        }
        let mut futures = Vec::with_capacity(outbox.len());
        for (_, m) in &outbox {
            let payload = hex::decode(&m.payload_hex).map_err(|e| MonitorError::CorruptOutbox { event_id: m.event_id.clone(), message: e.to_string() })?;
            let mut hs = HeaderSet::new();
            for (k, v) in &m.headers {
                hs = hs.with(k, v);
            }
            let rec = FutureRecord::to(&m.topic).key(&m.key).payload(&payload).headers(hs.build());
            futures.push((kafka::enqueue_blocking(&self.producer, rec).map_err(MonitorError::Delivery)?, m.topic.as_str()));
        }
        let delivered = kafka::wait_deliveries(futures).map_err(MonitorError::Delivery)?;
        let mut b = StateBatch::default();
        let mut positions: BTreeMap<String, i64> = BTreeMap::new();
        for ((key, m), d) in outbox.iter().zip(delivered) {
            let p = positions.entry(format!("{META_PUBLISHED_PREFIX}{}/{}", m.topic, d.partition)).or_insert(d.offset);
            *p = (*p).max(d.offset);
            b.delete(&self.store, CF_OUTBOX, key);
        }
        for (k, off) in positions {
            b.put_json(&self.store, CF_META, k.as_bytes(), &off);
        }
        self.write(b)
    }
}

/// A built batch, with what its log line reports.
pub(super) struct Job {
    pub batch: StateBatch,
    pub outbox: Vec<(Vec<u8>, OutboxMessage)>,
    /// Input messages applied in it.
    pub inputs: usize,
    /// How long the stage waited for the batch before it to be written, before building this one.
    pub waited: Duration,
}

struct Worker {
    jobs: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Result<(), MonitorError>>,
    thread: Option<JoinHandle<()>>,
}

/// The batch being written on the write-behind thread (started with the first batch), if any.
#[derive(Default)]
pub(super) struct WriteBehind {
    worker: Option<Worker>,
    /// A batch was handed over and its outcome not taken yet.
    busy: bool,
    /// That batch's predictions, until it is in the store.
    predictions: BTreeMap<String, Prediction>,
}

impl WriteBehind {
    /// Waits until the batch in hand (if any) is written and its outbox published.
    pub fn wait(&mut self) -> Result<(), MonitorError> {
        if !std::mem::take(&mut self.busy) {
            return Ok(());
        }
        let worker = self.worker.as_ref().expect("a busy write-behind has its thread");
        let outcome = worker.done.recv();
        // written (or failed, which stops the stage): the store answers from now on
        self.predictions.clear();
        outcome.unwrap_or_else(|_| Err(MonitorError::Thread { what: "monitor write-behind", message: "it ended without reporting its batch".into() }))
    }

    /// Hands a built batch over (after the one before it is written): it is written to `sink`
    /// (the one the thread was started with) and its outbox published while the caller goes on.
    pub fn submit(&mut self, sink: Sink, job: Job, predictions: BTreeMap<String, Prediction>) -> Result<(), MonitorError> {
        self.wait()?;
        if self.worker.is_none() {
            self.worker = Some(spawn(sink)?);
        }
        let worker = self.worker.as_ref().expect("just started");
        let sent = worker.jobs.as_ref().expect("open until dropped").send(job);
        if sent.is_err() {
            return Err(MonitorError::Thread { what: "monitor write-behind", message: "it is no longer running".into() });
        }
        self.busy = true;
        self.predictions = predictions;
        Ok(())
    }

    /// A prediction of the batch being written (not in the store yet).
    pub fn prediction(&self, document_id: &str) -> Option<&Prediction> {
        self.predictions.get(document_id)
    }
}

fn spawn(sink: Sink) -> Result<Worker, MonitorError> {
    let (jobs, rx) = mpsc::sync_channel::<Job>(1);
    let (tx, done) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("monitor-write".into())
        .spawn(move || {
            for job in rx {
                let (started, outputs) = (std::time::Instant::now(), job.outbox.len());
                let r = sink.write(job.batch);
                let written = started.elapsed();
                let r = r.and_then(|()| sink.publish(job.outbox));
                if r.is_ok() {
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::debug!(inputs = job.inputs, outputs, write_ms = ms(written), publish_ms = ms(started.elapsed() - written), waited_ms = ms(job.waited), "monitor batch");
                }
                if tx.send(r).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| MonitorError::Thread { what: "monitor write-behind", message: format!("cannot start it: {e}") })?;
    Ok(Worker { jobs: Some(jobs), done, thread: Some(thread) })
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        if let Some(w) = &mut self.worker {
            // closing the queue ends the thread once the batch in hand is written
            w.jobs.take();
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{state::CF_PREDICTIONS, window::aggregate::Subject};

    fn sink(dir: &std::path::Path) -> Sink {
        let store = RocksStateStore::open(dir).expect("store");
        // never used: the outboxes here are empty, so nothing is sent
        let producer = kafka::stats::producer_with_stats(kafka::producer_config_with("127.0.0.1:9", &Default::default(), 1_000), Default::default(), "a test producer").expect("producer");
        Sink { store, changelog: None, producer, tolerance: Duration::from_secs(1) }
    }

    fn prediction(event_ms: i64) -> Prediction {
        Prediction { subject: Subject { model: "classifier".into(), version: "v1".into(), cohort: "baseline".into() }, label: Some("a".into()), event_ms, result_id: Some(format!("r{event_ms}")) }
    }

    /// A batch with the predictions of `ids` (their event time is their index).
    fn job(sink: &Sink, ids: &[&str]) -> (Job, BTreeMap<String, Prediction>) {
        let mut batch = StateBatch::default();
        let mut predicted = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            batch.put_json(&sink.store, CF_PREDICTIONS, id.as_bytes(), &prediction(i as i64));
            predicted.insert(id.to_string(), prediction(i as i64));
        }
        (Job { batch, outbox: Vec::new(), inputs: ids.len(), waited: Duration::ZERO }, predicted)
    }

    fn stored(sink: &Sink, id: &str) -> Option<Prediction> {
        sink.store.get_json(CF_PREDICTIONS, id.as_bytes()).expect("read")
    }

    #[test]
    fn a_batch_being_written_answers_for_its_predictions_until_it_is_in_the_store() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = sink(dir.path());
        let mut behind = WriteBehind::default();
        let (first, predicted) = job(&sink, &["doc-1", "doc-2"]);
        let s = sink.clone();
        behind.submit(s, first, predicted).expect("submit");
        // whether or not the thread has written it yet, the predictions are found
        assert_eq!(behind.prediction("doc-1").map(|p| p.event_ms), Some(0));
        assert_eq!(behind.prediction("doc-2").map(|p| p.event_ms), Some(1));
        assert!(behind.prediction("doc-3").is_none());
        behind.wait().expect("written");
        assert!(behind.prediction("doc-1").is_none(), "once written, the store answers");
        assert_eq!(stored(&sink, "doc-1").map(|p| p.event_ms), Some(0));
        assert_eq!(stored(&sink, "doc-2").map(|p| p.event_ms), Some(1));
        // waiting again with nothing in hand returns at once
        behind.wait().expect("idle");
    }

    #[test]
    fn batches_are_written_one_at_a_time_in_the_order_they_were_handed_over() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = sink(dir.path());
        let mut behind = WriteBehind::default();
        for round in 0..50 {
            // the same key in every batch: the store must end with the last batch's value
            let id = "doc-same";
            let mut batch = StateBatch::default();
            batch.put_json(&sink.store, CF_PREDICTIONS, id.as_bytes(), &prediction(round));
            let predicted: BTreeMap<String, Prediction> = [(id.to_string(), prediction(round))].into();
            let s = sink.clone();
            behind.submit(s, Job { batch, outbox: Vec::new(), inputs: 1, waited: Duration::ZERO }, predicted).expect("submit");
            if round > 0 {
                // handing batch `round` over waited for batch `round - 1`
                assert!(stored(&sink, id).is_some_and(|p| p.event_ms >= round - 1), "round {round}");
            }
            assert_eq!(behind.prediction(id).map(|p| p.event_ms), Some(round), "the batch in hand answers, not an older one");
        }
        behind.wait().expect("written");
        assert_eq!(stored(&sink, "doc-same").map(|p| p.event_ms), Some(49));
    }

    #[test]
    fn dropping_it_waits_for_the_batch_in_hand() {
        let dir = tempfile::tempdir().expect("dir");
        let sink = sink(dir.path());
        let mut behind = WriteBehind::default();
        let ids: Vec<String> = (0..2000).map(|i| format!("doc-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (j, predicted) = job(&sink, &refs);
        let s = sink.clone();
        behind.submit(s, j, predicted).expect("submit");
        drop(behind);
        assert_eq!(stored(&sink, "doc-1999").map(|p| p.event_ms), Some(1999), "the batch was written before the drop returned");
    }
}
