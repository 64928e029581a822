//! The monitor stage: inference results and user feedback → event-time windows per
//! (model, version, cohort) and for the pipeline → `WindowMetrics` snapshots and runbook alerts.
//!
//! ```text
//! payslip.inference.v1 ─┐                                       ┌─► litert.metrics.v1
//!                       ├─► apply (windows, predictions) ─► close windows ─► alert rules ─┤
//! payslip.feedback.v1 ──┘        one RocksDB WriteBatch: state + offsets + outbox         └─► litert.alerts.v1
//! ```
//!
//! Delivery semantics: effectively once for state. Input partitions are assigned directly (no
//! consumer-group commits) at the offsets stored in RocksDB; each poll batch is applied in memory and
//! written with its offsets and the messages it caused (the outbox) in one `WriteBatch`. Only then are
//! outbox messages published; confirmed ones are deleted. The write and the publishing run on a
//! write-behind thread while the next batch is applied, one batch at a time and in order
//! ([`writer`]). After a crash the stage reloads the state,
//! reads back the output topics past the last confirmed positions to recognise messages that were
//! published but not yet confirmed, publishes the rest, and resumes at the stored offsets. So window
//! totals equal the input exactly and no alert or metrics message is published twice.
//!
//! Idleness: an input partition silent for `monitor.idle_timeout_ms` stops holding the watermark
//! (and the frontier that resolves waiting feedback) only once the broker has confirmed, after its
//! assignment, that this process's position is at its end. Before its first fetch comes back a
//! partition is silent without having been read.
//!
//! Operator commands (`litert.rollout.commands.v1`) are consumed the same way, and the rollout
//! controller ([`crate::rollout`]) runs on each closed window range: its state is part of the batch
//! and its decisions leave through the outbox like alerts, so they too are published exactly once.
//!
//! With `monitor.changelog` (the default), the stage is split into `monitor.closing_partitions`
//! closing partitions, each owned by one process of the deployment and replicated through its own
//! changelog partition; the processes share them out through a consumer group and keep warm copies
//! of the ones they do not own ([`shard`], [`changelog`]). With one closing partition (the
//! default) that is one leader and its standbys. Scaled out (`monitor.scale_out`), a pre-aggregation
//! group reads the results and feedback and the closing partitions read its partials, keyed by
//! model ([`pre`], [`partial`]).

pub mod changelog;
mod outbox;
pub mod partial;
pub mod pre;
pub mod records;
pub mod shard;
pub mod state;
pub mod view;
mod writer;

use crate::inference::announce::ModelAnnouncement;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Message,
    Offset, TopicPartitionList,
};

use crate::{
    codec,
    config::PipelineConfig,
    document::DocumentFeedback,
    kafka::{self, headers as h, KafkaError},
    state::{RocksStateStore, StateBatch, StateError, CF_ALERTS, CF_META, CF_OFFSETS, CF_OUTBOX, CF_PENDING_FEEDBACK, CF_PREDICTIONS, CF_PREDICTION_EXPIRY, CF_ROLLOUTS, CF_WINDOWS},
    window::WindowConfig,
};
use outbox::monitor_dead_letter;
pub(crate) use outbox::OutboxMessage;
use state::{pending_key, window_key, Emitted, MonitorCounters, MonitorState, Prediction, StoredWindow};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The rollout state could not be rebuilt from the decisions topic.
    #[error("rollout: {0}")]
    Rollout(#[from] crate::rollout::RolloutError),
    /// An output could not be delivered; it stays in the outbox and is published after restart.
    #[error("delivery failed, stopping (the message stays in the outbox): {0}")]
    Delivery(KafkaError),
    /// An outbox entry in the state store cannot be read back (a defect or a corrupted store).
    #[error("outbox entry {event_id} is corrupt: {message}")]
    CorruptOutbox { event_id: String, message: String },
    /// Another monitor process took over; this one stops (restart it to become a standby).
    #[error("lost leadership of the monitor group to another process")]
    LostLeadership,
    /// A thread of the stage could not be started, or ended without reporting.
    #[error("the {what} thread: {message}")]
    Thread { what: &'static str, message: String },
    /// The changelog or partials topic does not have `monitor.closing_partitions` partitions.
    #[error("monitor.closing_partitions is {configured} but {topic} has {partitions} partitions; they must match (create the topic with {configured} partitions, or set monitor.closing_partitions: {partitions})")]
    ClosingPartitions { topic: String, partitions: usize, configured: usize },
    /// `monitor.scale_out` joins feedback with results per partition: both topics need the same
    /// number of partitions.
    #[error("monitor.scale_out: {results} has {results_partitions} partitions and {feedback} has {feedback_partitions}; the feedback join needs both keyed by document id with the same partition count (add partitions to the smaller one, or set monitor.scale_out: false)")]
    NotCoPartitioned { results: String, results_partitions: usize, feedback: String, feedback_partitions: usize },
}

impl MonitorError {
    /// Whether restarting the stage may succeed: the broker may come back, a lost leadership
    /// makes the process a standby; a broken state store or a defect does not heal by itself.
    pub fn retryable(&self) -> bool {
        match self {
            MonitorError::Kafka(e) | MonitorError::Delivery(e) => e.retryable(),
            MonitorError::Rollout(e) => e.retryable(),
            MonitorError::LostLeadership => true,
            MonitorError::State(_) | MonitorError::CorruptOutbox { .. } | MonitorError::NotCoPartitioned { .. } | MonitorError::ClosingPartitions { .. } | MonitorError::Thread { .. } => false,
        }
    }
}


const META_WATERMARK: &[u8] = b"watermark";
const META_COUNTERS: &[u8] = b"counters";
const META_PENDING_FEEDBACK: &[u8] = b"pending_feedback";
const META_ANNOUNCED: &[u8] = b"announced";
/// Before one key per rollout: the whole controller as one value (read once, then deleted).
const META_ROLLOUT: &[u8] = b"rollout";
const META_ROLLOUT_BOOK: &[u8] = b"rollout_book";
const META_PUBLISHED_PREFIX: &str = "published:";
const EVENT_ID: &str = "event-id";
/// How often the monitor looks for partitions added to its inputs.
const PARTITION_CHECK: Duration = Duration::from_secs(5);
/// How often the monitor asks the broker whether input partitions not yet confirmed read to their
/// end since they were assigned are.
const UNREAD_CHECK: Duration = Duration::from_secs(1);

/// What the monitor did (also written to its log at shutdown).
pub type MonitorSummary = MonitorCounters;

pub struct MonitorStage {
    cfg: PipelineConfig,
    brokers: String,
    store: RocksStateStore,
    state: MonitorState,
    producer: kafka::stats::StatsProducer,
    changelog: Option<Arc<changelog::Changelog>>,
    /// The batch being written while the next one is applied ([`writer`]).
    behind: writer::WriteBehind,
    /// Set when the rollout state was rebuilt from the decisions topic: reading the commands topic
    /// starts here (a minute before the last answered command) instead of at its beginning; commands
    /// answered already are recognised by id and skipped.
    commands_from: Option<i64>,
    /// Rollouts (and the controller's book) as last written, so a batch writes only those that changed.
    written_rollouts: BTreeMap<String, Vec<u8>>,
    /// Keys of an older state layout to delete with the next batch.
    legacy_keys: Vec<&'static [u8]>,
    /// What the operations API sees of this stage.
    view: view::ViewHandle,
    /// The closing partition this stage runs ([`shard`]), of `monitor.closing_partitions`.
    partition: u32,
    /// Cleared when the group takes the partition away (None: not elected, it runs until stopped).
    owned: Option<Arc<AtomicBool>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl MonitorStage {
    /// Opens the state directory; the state is loaded when the stage runs (after it leads).
    pub fn open(cfg: PipelineConfig, brokers: String) -> Result<Self, MonitorError> {
        Self::open_with_view(cfg, brokers, view::ViewHandle::default())
    }

    /// [`Self::open`], publishing what the operations API sees into `view` (its checkpoints of the
    /// open state, and the producer's librdkafka statistics included).
    ///
    /// Without `monitor.changelog` this is the whole closing stage (one partition, nobody to fence);
    /// with it, use [`run`], which shares the closing partitions out among the processes.
    pub fn open_with_view(cfg: PipelineConfig, brokers: String, view: view::ViewHandle) -> Result<Self, MonitorError> {
        Self::open_inner(cfg, brokers, 0, view, None, None)
    }

    /// The stage of closing partition `partition`, owned by this process while `owned` holds.
    /// `store` is the partition's state when this process kept a warm copy of it: handed over
    /// open, since reopening a store that just took millions of writes first replays its
    /// write-ahead log (measured: 24 s for a 3-million-record changelog).
    pub fn open_partition(cfg: PipelineConfig, brokers: String, partition: u32, view: view::ViewHandle, owned: Arc<AtomicBool>, store: Option<RocksStateStore>) -> Result<Self, MonitorError> {
        Self::open_inner(cfg, brokers, partition, view, Some(owned), store)
    }

    fn open_inner(cfg: PipelineConfig, brokers: String, partition: u32, view: view::ViewHandle, owned: Option<Arc<AtomicBool>>, store: Option<RocksStateStore>) -> Result<Self, MonitorError> {
        view.set_role(view::Role::Starting);
        let store = match store {
            Some(s) => s,
            None => {
                let dir = shard::state_dir(&cfg, partition);
                std::fs::create_dir_all(&dir).map_err(|e| StateError::Rocks { path: dir.display().to_string(), message: e.to_string() })?;
                RocksStateStore::open(&dir)?
            }
        };
        view.set_checkpointer(store.checkpointer());
        let producer = kafka::stats::producer_with_stats(kafka::producer_config_with(&brokers, &cfg.kafka.librdkafka, cfg.kafka.outage_tolerance_ms), view.producer_stats(), "the monitor producer")?;
        let changelog = if cfg.monitor.changelog { Some(Arc::new(changelog::Changelog::writer(&cfg, &brokers, partition as i32, view.changelog_cell())?)) } else { None };
        Ok(Self { cfg, brokers, store, state: MonitorState::default(), producer, changelog, behind: writer::WriteBehind::default(), commands_from: None, written_rollouts: BTreeMap::new(), legacy_keys: Vec::new(), view, partition, owned })
    }

    /// Whether this partition closes `model`'s windows, announces its updates and runs its rollouts.
    fn mine(&self, model: &str) -> bool {
        shard::shard_of(model, self.cfg.monitor.closing_partitions) == self.partition
    }

    fn load(&mut self) -> Result<(), MonitorError> {
        let store = &self.store;
        let mut state = MonitorState::default();
        for (_, w) in store.scan_json::<StoredWindow>(CF_WINDOWS)? {
            state.windows.insert((w.range.start_ms, w.subject.clone()), w);
        }
        for (k, v) in store.scan_json(CF_ALERTS)? {
            state.alerts.insert(String::from_utf8_lossy(&k).into_owned(), v);
        }
        state.watermark = store.get_json(CF_META, META_WATERMARK)?.unwrap_or_default();
        state.counters = store.get_json(CF_META, META_COUNTERS)?.unwrap_or_default();
        for (_, (part, f)) in store.scan_json::<(String, DocumentFeedback)>(CF_PENDING_FEEDBACK)? {
            state.pending_feedback.insert((f.given_at, f.document_id.clone()), (part, f));
        }
        // a state written before pending feedback had one key per entry
        if let Some(old) = store.get_json::<Vec<(String, DocumentFeedback)>>(CF_META, META_PENDING_FEEDBACK)? {
            for (part, f) in old {
                let key = (f.given_at, f.document_id.clone());
                state.dirty_pending.insert(key.clone());
                state.pending_feedback.insert(key, (part, f));
            }
            self.legacy_keys.push(META_PENDING_FEEDBACK);
        }
        state.max_pending_feedback = self.cfg.monitor.max_pending_feedback;
        state.announced = store.get_json(CF_META, META_ANNOUNCED)?.unwrap_or_default();
        let rollouts: Vec<crate::rollout::RolloutState> = store.scan_json(CF_ROLLOUTS)?.into_iter().map(|(_, r)| r).collect();
        let book: Option<crate::rollout::ControllerBook> = store.get_json(CF_META, META_ROLLOUT_BOOK)?;
        let legacy: Option<crate::rollout::Controller> = store.get_json(CF_META, META_ROLLOUT)?;
        self.written_rollouts.clear();
        let stored = match (book, legacy) {
            (Some(book), _) => {
                // what is stored now is what was written: later batches write only changes
                for r in &rollouts {
                    self.written_rollouts.insert(r.rollout_id.clone(), serde_json::to_vec(r).expect("rollouts serialise"));
                }
                self.written_rollouts.insert(String::new(), serde_json::to_vec(&book).expect("rollouts serialise"));
                Some(crate::rollout::Controller::from_parts(rollouts, book))
            }
            (None, Some(c)) => {
                self.legacy_keys.push(META_ROLLOUT);
                state.rollout_dirty = true;
                Some(c)
            }
            (None, None) => None,
        };
        match stored {
            Some(c) => state.rollout = c,
            None => {
                // no rollout state here: the decisions topic is the truth (soak clocks included)
                let mut decisions = crate::rollout::routing::read_decisions(&self.cfg, &self.brokers)?;
                // this closing partition's rollouts only
                decisions.retain(|d| self.mine(&d.model));
                // commands those decisions answered are not applied again (their ids are remembered);
                // reading commands starts a minute before the last answered one, not at the beginning
                let answered = decisions.iter().filter(|d| d.command_id.is_some()).map(|d| d.decided_at).max();
                state.rollout = crate::rollout::Controller::restore(decisions);
                state.rollout_dirty = true;
                if !state.rollout.rollouts.is_empty() {
                    tracing::info!(rollouts = state.rollout.rollouts.len(), "rollout state restored from the decisions topic");
                }
                self.commands_from = answered.map(|t| t.saturating_sub(60_000).max(0));
            }
        }
        state.pipeline_copy = shard::pipeline_partition(self.cfg.monitor.closing_partitions) != self.partition;
        // after a restart no partition counts as idle until it has had time to deliver
        state.watermark.touch_all(now_ms());
        self.state = state;
        Ok(())
    }

    /// Writes a batch at once (see [`writer::Sink::write`]); no batch may be in the write-behind.
    fn write(&self, batch: StateBatch) -> Result<(), MonitorError> {
        self.sink().write(batch)
    }

    /// Where this stage's batches and outbox go, for the calling thread or the write-behind.
    fn sink(&self) -> writer::Sink {
        writer::Sink { store: self.store.clone(), changelog: self.changelog.clone(), producer: self.producer.clone(), tolerance: Duration::from_millis(self.cfg.kafka.outage_tolerance_ms) }
    }

    pub fn counters(&self) -> &MonitorCounters {
        &self.state.counters
    }

    /// The copy of this stage's role, counters and firing alerts that it keeps fresh while it runs.
    pub fn view(&self) -> view::ViewHandle {
        self.view.clone()
    }

    /// Publishes this stage's view into `v` (one the caller holds before the stage runs).
    fn window_config(&self) -> WindowConfig {
        self.cfg.monitor.window()
    }

    fn stored_offsets(&self) -> Result<BTreeMap<String, i64>, MonitorError> {
        Ok(self
            .store
            .scan_raw(CF_OFFSETS)?
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8_lossy(&k).into_owned(), i64::from_be_bytes(v.as_slice().try_into().ok()?))))
            .collect())
    }

    /// Runs until `stop` is set, or until the group takes the partition away
    /// ([`MonitorError::LostLeadership`]). Blocking: call from a blocking thread.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<MonitorSummary, MonitorError> {
        self.lead(&stop)?;
        let c = self.state.counters.clone();
        if self.owned.is_none() {
            tracing::info!(summary = ?c, "monitor stage stopped");
        } else {
            tracing::info!(partition = self.partition, summary = ?c, "monitor closing partition stopped");
        }
        Ok(c)
    }

    /// Whether the group still lets this process run the partition.
    fn still_owned(&self) -> bool {
        self.owned.as_ref().is_none_or(|o| o.load(Ordering::Relaxed))
    }

    /// Leads until `stop` (Ok) or until the partition is taken away (an error).
    fn lead(&mut self, stop: &AtomicBool) -> Result<(), MonitorError> {
        self.commands_from = None;
        let mut takeover: Option<(std::time::Instant, u64)> = None;
        if let Some(c) = &self.changelog {
            let won = std::time::Instant::now();
            // fences the partition's earlier owner, then replays what this copy lacks
            c.init()?;
            let owned = self.owned.clone();
            let alive = move || owned.as_ref().is_none_or(|o| o.load(Ordering::Relaxed)) && !stop.load(Ordering::Relaxed);
            let replayed = c.restore(&self.cfg, &self.brokers, &self.store, &alive)?;
            takeover = Some((won, replayed));
            tracing::info!(partition = self.partition, replayed, "monitor leads: state restored, resuming");
        }
        self.load()?;
        self.recover_outbox()?;
        // scaled out, the pre-aggregation members read the results and feedback, and the leader their partials
        let scale_out = self.cfg.monitor.scale_out;
        let topics: Vec<String> = if scale_out {
            vec![self.cfg.topics.monitor_partials.clone(), self.cfg.topics.commands.clone()]
        } else {
            vec![self.cfg.topics.inference.clone(), self.cfg.topics.feedback.clone(), self.cfg.topics.commands.clone()]
        };
        let consumer: BaseConsumer = kafka::reader_config(&self.brokers, &format!("{}-monitor-assign", self.cfg.kafka.infer_group), &self.cfg.kafka.librdkafka)
            .create()
            .map_err(KafkaError::client("the monitor consumer"))?;
        let ends = kafka::end_reader(&self.brokers, &format!("{}-monitor-ends", self.cfg.kafka.infer_group), &self.cfg.kafka.librdkafka, "the monitor's end reader")?;
        let stored = self.stored_offsets()?;
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            let parts = kafka::partitions_of(&consumer, t, Duration::from_secs(30))?;
            // of the partials, this closing partition's own
            for p in parts.into_iter().filter(|p| *t != self.cfg.topics.monitor_partials || *p == self.partition as i32) {
                let key = format!("{t}/{p}");
                let off = match (stored.get(&key), self.commands_from) {
                    (Some(o), _) => Offset::Offset(*o),
                    (None, Some(ts)) if *t == self.cfg.topics.commands => Offset::Offset(kafka::offset_at(&consumer, t, p, ts)?),
                    (None, _) => Offset::Beginning,
                };
                tpl.add_partition_offset(t, p, off).map_err(KafkaError::broker(format!("position {t}/{p}")))?;
            }
        }
        consumer.assign(&tpl).map_err(KafkaError::broker("assign the monitor's inputs"))?;
        // Not scaled out: an input partition is silent until its first fetch comes back, without
        // having been read. Until the broker confirms that this process's position is at its end,
        // it counts as having input (holding the watermark and the feedback frontier at its
        // clock), so that windows and feedback do not pass records still to be read. Each with
        // the offset reading began at (None: the log start).
        let mut unread: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
        if !scale_out {
            for e in tpl.elements().iter().filter(|e| e.topic() != self.cfg.topics.commands) {
                unread.insert((e.topic().to_string(), e.partition()), if let Offset::Offset(o) = e.offset() { Some(o) } else { None });
            }
        }
        let mut unread_checked = std::time::Instant::now();
        let wall = now_ms();
        // commands are rare and carry processing time: they do not hold the watermark back; nor do
        // the partials, which move the clocks of the input partitions they come from
        for e in tpl.elements().iter().filter(|e| e.topic() != self.cfg.topics.commands && e.topic() != self.cfg.topics.monitor_partials) {
            self.state.watermark.register(&format!("{}/{}", e.topic(), e.partition()), wall);
        }
        if scale_out {
            self.register_scaled_inputs(&consumer)?;
        }
        tracing::info!(partition = self.partition, state_dir = %self.store.path(), open_windows = self.state.windows.len(), resumed_partitions = stored.len(), "monitor stage started");
        if let (Some(c), Some((won, replayed))) = (&self.changelog, takeover) {
            let took = won.elapsed();
            c.note_takeover(took, replayed);
            tracing::info!(partition = self.partition, takeover_ms = took.as_millis() as u64, replayed, warm = c.progress().warm, "monitor takeover complete: from being handed the partition to reading the inputs");
        }
        self.view.set_role(view::Role::Leader);
        let mut view_published = std::time::Instant::now() - view::PUBLISH_EVERY;

        let wcfg = self.window_config();
        let max_batch = self.cfg.monitor.max_batch;
        // candidates newer than the served versions: the seed metadata's, the registry topic's, and
        // (below) each version announced there while the monitor runs
        let mut registry_versions = Vec::new();
        let registry_reader = crate::rollout::routing::catch_up_topic(&self.cfg, &self.brokers, &self.cfg.topics.models, |a: ModelAnnouncement| registry_versions.push(a))
            .map_err(|e| tracing::warn!(error = %e, "cannot read the model registry topic: MODEL_UPDATE_AVAILABLE from model_metadata.json only"))
            .ok();
        let mut updates = self.available_updates();
        updates.extend(self.updates_in(&registry_versions));
        let mut announced = self.state.announce_updates(&updates, now_ms());
        if let Some(cmd) = self.auto_start_command() {
            announced.extend(self.state.apply_command(&self.cfg.rollout, &self.cfg.models.serve, &cmd));
        }
        if !announced.is_empty() || self.state.rollout_dirty {
            self.commit(BTreeMap::new(), announced, Vec::new(), 0)?;
        }
        let mut assigned: BTreeSet<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        // the other closing partitions' partials count as known (they are not read here)
        if scale_out {
            for p in kafka::partitions_of(&consumer, &self.cfg.topics.monitor_partials, Duration::from_secs(30))? {
                assigned.insert((self.cfg.topics.monitor_partials.clone(), p));
            }
        }
        // scaled out: when each input partition's owner last reported it had read what there was
        let mut reported: BTreeMap<String, i64> = BTreeMap::new();
        let mut partitions_checked = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if !self.still_owned() {
                return Err(MonitorError::LostLeadership);
            }
            if partitions_checked.elapsed() >= PARTITION_CHECK {
                partitions_checked = std::time::Instant::now();
                for added in self.assign_new_partitions(&consumer, &topics, &mut assigned)? {
                    if !scale_out {
                        unread.insert(added, None);
                    }
                }
                if scale_out {
                    self.register_scaled_inputs(&consumer)?;
                }
                let mut fresh = Vec::new();
                while let Some(Ok(m)) = registry_reader.as_ref().and_then(|r| r.poll(Duration::ZERO)) {
                    fresh.extend(crate::rollout::routing::decode::<ModelAnnouncement>(&m));
                }
                let events = self.state.announce_updates(&self.updates_in(&fresh), now_ms());
                if !events.is_empty() {
                    self.commit(BTreeMap::new(), events, Vec::new(), 0)?;
                }
            }
            let mut consumed: BTreeMap<String, i64> = BTreeMap::new();
            let mut commanded: Vec<Emitted> = Vec::new();
            let mut dead: Vec<OutboxMessage> = Vec::new();
            let mut n = 0;
            let mut part_name: Option<(String, i32, String)> = None;
            let mut timeout = Duration::from_millis(200);
            while n < max_batch {
                let Some(m) = consumer.poll(timeout) else { break };
                timeout = Duration::ZERO;
                let m = match m {
                    Ok(m) => m,
                    Err(e) if kafka::error::is_fatal_consumer_error(&e) => return Err(KafkaError::Broker { what: "consuming the monitor's inputs".into(), source: e }.into()),
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error");
                        break;
                    }
                };
                n += 1;
                // the source's name, built again only when the partition changes (runs of one
                // partition's messages come together)
                if part_name.as_ref().is_none_or(|(t, p, _)| t != m.topic() || *p != m.partition()) {
                    part_name = Some((m.topic().to_string(), m.partition(), format!("{}/{}", m.topic(), m.partition())));
                }
                let part = &part_name.as_ref().expect("just named").2;
                match consumed.get_mut(part) {
                    Some(next) => *next = m.offset() + 1,
                    None => {
                        consumed.insert(part.clone(), m.offset() + 1);
                    }
                }
                let ct = h::get_str(m.headers(), h::CONTENT_TYPE);
                let payload = m.payload().unwrap_or_default();
                let wall = now_ms();
                // what cannot be used goes to the monitor's dead-letter topic with the reason
                let limits = &self.cfg.limits;
                let unusable: Option<(&str, String)> = if scale_out && m.topic() == self.cfg.topics.monitor_partials {
                    match serde_json::from_slice::<partial::PartialBatch>(payload) {
                        Ok(p) => {
                            self.state.apply_partial(&p, wall, &wcfg);
                            if p.caught_up {
                                reported.insert(p.source.clone(), wall);
                            } else {
                                reported.remove(&p.source);
                            }
                            None
                        }
                        Err(e) => Some(("undecodable_partial", e.to_string())),
                    }
                } else if m.topic() == self.cfg.topics.commands {
                    match codec::decode::<crate::rollout::RolloutCommand>(payload, ct.as_deref()) {
                        // a command routed to another closing partition is that one's to answer
                        Ok(cmd) if shard::command_partition(&self.cfg, &cmd) != self.partition => None,
                        Ok(cmd) => match limits.check_event_time("issued_at", cmd.issued_at, wall) {
                            Ok(()) => {
                                tracing::info!(rollout = %cmd.rollout_id, action = %cmd.action, operator = %cmd.operator, "rollout command");
                                commanded.extend(self.state.apply_command(&self.cfg.rollout, &self.cfg.models.serve, &cmd));
                                None
                            }
                            Err(why) => Some(("bad_timestamp", why.to_string())),
                        },
                        // an unreadable command is dead-lettered once, by the pipeline's partition
                        Err(_) if shard::pipeline_partition(self.cfg.monitor.closing_partitions) != self.partition => None,
                        Err(e) => Some((e.class(), e.to_string())),
                    }
                } else if m.topic() == self.cfg.topics.inference {
                    match codec::decode_result_counted(payload, ct.as_deref()) {
                        Ok(r) => match limits.check_event_time("submitted_at", r.submitted_at, wall) {
                            Ok(()) => {
                                // a result applied before (redelivered by an at-least-once writer) counts once
                                if self.lookup_prediction(&r.document_id, r.submitted_at)?.is_some_and(|p| p.is_from(&r)) {
                                    self.state.counters.duplicates_ignored += 1;
                                } else {
                                    self.state.apply_result(&r, part, wall, &wcfg);
                                }
                                None
                            }
                            Err(why) => Some(("bad_timestamp", why.to_string())),
                        },
                        Err(e) => Some((e.class(), e.to_string())),
                    }
                } else {
                    match codec::decode::<DocumentFeedback>(payload, ct.as_deref()) {
                        Ok(f) => match limits.check_event_time("given_at", f.given_at, wall) {
                            Ok(()) => {
                                let pred = self.lookup_prediction(&f.document_id, f.given_at)?;
                                self.state.receive_feedback(f, pred, part, wall, &wcfg);
                                None
                            }
                            Err(why) => Some(("bad_timestamp", why.to_string())),
                        },
                        Err(e) => Some((e.class(), e.to_string())),
                    }
                };
                if let Some((class, why)) = unusable {
                    self.state.counters.undecodable += 1;
                    tracing::warn!(class, reason = %why, source = %part, offset = m.offset(), "monitor input dead-lettered");
                    dead.push(monitor_dead_letter(&self.cfg, &m, class, &why));
                }
            }
            let wall = now_ms();
            if scale_out {
                // an input partition may go idle only while its owner in the pre-aggregation group
                // reports that it has read what there is; one without a fresh report (its member
                // died or is restoring, or none has joined yet) holds the watermark at its clock
                let stale = 2 * pre::heartbeat_interval(&wcfg).as_millis() as i64;
                let (results, feedback) = (format!("{}/", self.cfg.topics.inference), format!("{}/", self.cfg.topics.feedback));
                self.state.watermark.touch_where(wall, |k| (k.starts_with(&results) || k.starts_with(&feedback)) && reported.get(k).is_none_or(|t| wall - t > stale));
            }
            if !unread.is_empty() {
                // asked when the batch ended with nothing more fetched, at most once a second
                if n < max_batch && unread_checked.elapsed() >= UNREAD_CHECK {
                    unread_checked = std::time::Instant::now();
                    unread.retain(|(t, p), start| !kafka::read_to_the_end(&ends, &consumer, t, *p, || *start));
                    if unread.is_empty() {
                        tracing::info!(partition = self.partition, "monitor: every input partition read to its end once; silence may now mean idle");
                    }
                }
                let silent: BTreeSet<String> = unread.keys().map(|(t, p)| format!("{t}/{p}")).collect();
                self.state.watermark.touch_where(wall, |k| silent.contains(k));
            }
            let frontier = self.state.watermark.frontier(&format!("{}/", self.cfg.topics.inference), &wcfg, wall);
            let due = self.state.due_feedback(frontier);
            let resolved_any = !due.is_empty();
            for f in due {
                let pred = self.lookup_prediction(&f.document_id, f.given_at)?;
                self.state.resolve_feedback(&f, pred, &wcfg);
            }
            let mut emitted = commanded;
            emitted.extend(self.state.close_windows(&self.cfg.monitor.alerts, self.cfg.monitor.resolve_silent_after_windows, &self.cfg.rollout, &wcfg, wall));
            self.view.note_closed(&emitted);
            if consumed.is_empty() && emitted.is_empty() && !resolved_any && dead.is_empty() {
                self.view.refresh(&mut view_published, &self.state, frontier);
                continue;
            }
            self.commit(consumed, emitted, dead, n)?;
            self.view.refresh(&mut view_published, &self.state, frontier);
        }
        // the last batch is written before the stage reports that it stopped
        self.behind.wait()
    }

    /// Starts reading partitions added to the inputs since they were assigned (from their
    /// beginning: a new partition holds only what was written after it was added). A metadata
    /// request that fails is tried again at the next check.
    /// Returns the input partitions (results, feedback) it added, read from their beginning.
    fn assign_new_partitions(&mut self, consumer: &BaseConsumer, topics: &[String], assigned: &mut BTreeSet<(String, i32)>) -> Result<Vec<(String, i32)>, MonitorError> {
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            let Ok(md) = consumer.fetch_metadata(Some(t), Duration::from_secs(2)) else { continue };
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                if assigned.insert((t.clone(), p.id())) && (*t != self.cfg.topics.monitor_partials || p.id() == self.partition as i32) {
                    tpl.add_partition_offset(t, p.id(), Offset::Beginning).map_err(KafkaError::broker(format!("position {t}/{}", p.id())))?;
                }
            }
        }
        if tpl.count() == 0 {
            return Ok(Vec::new());
        }
        consumer.incremental_assign(&tpl).map_err(KafkaError::broker("assign new input partitions"))?;
        let wall = now_ms();
        let mut inputs = Vec::new();
        for e in tpl.elements().iter().filter(|e| e.topic() != self.cfg.topics.commands && e.topic() != self.cfg.topics.monitor_partials) {
            self.state.watermark.register(&format!("{}/{}", e.topic(), e.partition()), wall);
            inputs.push((e.topic().to_string(), e.partition()));
        }
        let added: Vec<String> = tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect();
        tracing::info!(?added, "monitor reads partitions added to its inputs");
        Ok(inputs)
    }

    /// Scaled out: the results and feedback partitions hold the watermark back under their own
    /// names (`topic/partition`), as when the leader reads them itself; the partials move them.
    fn register_scaled_inputs(&mut self, consumer: &BaseConsumer) -> Result<(), MonitorError> {
        let wall = now_ms();
        for t in [self.cfg.topics.inference.clone(), self.cfg.topics.feedback.clone()] {
            let Ok(md) = consumer.fetch_metadata(Some(&t), Duration::from_secs(5)) else { continue };
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                self.state.watermark.register(&format!("{t}/{}", p.id()), wall);
            }
        }
        Ok(())
    }

    /// START for the configured candidate when `rollout.auto_start` is set and it has no rollout yet.
    fn auto_start_command(&self) -> Option<crate::rollout::RolloutCommand> {
        let r = &self.cfg.rollout;
        let c = r.candidate.as_ref().filter(|c| r.auto_start && self.mine(&c.model))?;
        let id = c.rollout_id();
        if self.state.rollout.rollouts.contains_key(&id) {
            return None;
        }
        if let Some(why) = self.state.rollout.quarantine.get(&format!("{}@{}", c.model, c.version)) {
            tracing::warn!(rollout = %id, reason = %why, "rollout.auto_start skipped: the candidate is quarantined");
            return None;
        }
        let at = now_ms();
        Some(crate::rollout::RolloutCommand {
            command_id: format!("auto-start-{at}"),
            rollout_id: id,
            action: crate::rollout::action::START.into(),
            operator: "config (rollout.auto_start)".into(),
            reason: None,
            model: Some(c.model.clone()),
            version: None,
            issued_at: at,
        })
    }

    /// (model, served version, newer candidate version) among versions announced on the registry topic.
    fn updates_in(&self, announced: &[ModelAnnouncement]) -> Vec<(String, String, String)> {
        announced
            .iter()
            .filter(|a| self.mine(&a.name))
            .filter_map(|a| self.cfg.models.serve.get(&a.name).filter(|served| a.role == "candidate" && version_newer(&a.version, served)).map(|served| (a.name.clone(), served.clone(), a.version.clone())))
            .collect()
    }

    /// (model, served version, newer candidate version) from model_metadata.json.
    fn available_updates(&self) -> Vec<(String, String, String)> {
        let Ok(meta) = crate::inference::metadata::ModelMetadata::load(&self.cfg.models.metadata) else { return vec![] };
        let mut out = Vec::new();
        for (model, served) in self.cfg.models.serve.iter().filter(|(m, _)| self.mine(m)) {
            for m in meta.models.iter().filter(|m| &m.name == model && m.role == "candidate" && &m.version != served) {
                if version_newer(&m.version, served) {
                    out.push((model.clone(), served.clone(), m.version.clone()));
                }
            }
        }
        out
    }

    fn lookup_prediction(&self, document_id: &str, at_ms: i64) -> Result<Option<Prediction>, MonitorError> {
        // this batch's, the batch being written's, then the store's
        let p = match self.state.new_predictions.get(document_id).or_else(|| self.behind.prediction(document_id)) {
            Some(p) => Some(p.clone()),
            None => self.store.get_json::<Prediction>(CF_PREDICTIONS, document_id.as_bytes())?,
        };
        Ok(p.filter(|p| at_ms.saturating_sub(p.event_ms) <= self.cfg.monitor.prediction_retention_ms))
    }

    /// Builds the batch's state changes, offsets and outbox (one `WriteBatch`) once the batch before
    /// it is written, and hands it to the write-behind, which writes it and then publishes its
    /// outbox while the next batch is applied ([`writer`]). `inputs`: the messages applied in it.
    fn commit(&mut self, consumed: BTreeMap<String, i64>, emitted: Vec<Emitted>, dead: Vec<OutboxMessage>, inputs: usize) -> Result<(), MonitorError> {
        let waiting = std::time::Instant::now();
        self.behind.wait()?;
        let waited = waiting.elapsed();
        let sink = self.sink();
        let st = &mut self.state;
        let store = &self.store;
        let mut b = StateBatch::default();
        for key in std::mem::take(&mut st.dirty_windows) {
            if let Some(w) = st.windows.get(&key) {
                b.put_json(store, CF_WINDOWS, &window_key(&key.1, key.0), w);
            }
        }
        for key in std::mem::take(&mut st.closed_windows) {
            b.delete(store, CF_WINDOWS, &window_key(&key.1, key.0));
        }
        for key in std::mem::take(&mut st.dirty_alerts) {
            if let Some(v) = st.alerts.get(&key) {
                b.put_json(store, CF_ALERTS, key.as_bytes(), v);
            }
        }
        let predicted = std::mem::take(&mut st.new_predictions);
        for (id, p) in &predicted {
            b.put_json(store, CF_PREDICTIONS, id.as_bytes(), p);
            b.put_raw(store, CF_PREDICTION_EXPIRY, &expiry_key(p.event_ms, id), b"null");
        }
        // predictions past retention (event time), a bounded number per batch
        if let Some(wm) = st.watermark.current() {
            let cutoff = wm.saturating_sub(self.cfg.monitor.prediction_retention_ms);
            for key in store.scan_before(CF_PREDICTION_EXPIRY, &expiry_key(cutoff, ""), 10_000)? {
                b.delete(store, CF_PREDICTION_EXPIRY, &key);
                let id = &key[17..];
                // a document predicted again later keeps its newer prediction (also one put by this
                // very batch, which the store does not hold yet)
                let again = std::str::from_utf8(id).is_ok_and(|id| predicted.contains_key(id));
                if !again && store.get_json::<Prediction>(CF_PREDICTIONS, id)?.is_some_and(|p| p.event_ms < cutoff) {
                    b.delete(store, CF_PREDICTIONS, id);
                }
            }
        }
        for (part, next) in consumed {
            b.put_raw(store, CF_OFFSETS, part.as_bytes(), &next.to_be_bytes());
        }
        let mut outbox = Vec::new();
        for msg in emitted.iter().map(|e| self.cfg.monitor.encode(&self.cfg, e)).chain(dead) {
            st.counters.outbox_seq += 1;
            let key = st.counters.outbox_seq.to_be_bytes().to_vec();
            b.put_json(store, CF_OUTBOX, &key, &msg);
            outbox.push((key, msg));
        }
        b.put_json(store, CF_META, META_WATERMARK, &st.watermark);
        for key in std::mem::take(&mut st.dirty_pending) {
            let k = pending_key(key.0, &key.1);
            match st.pending_feedback.get(&key) {
                Some(v) => b.put_json(store, CF_PENDING_FEEDBACK, &k, v),
                None => b.delete(store, CF_PENDING_FEEDBACK, &k),
            }
        }
        for key in std::mem::take(&mut self.legacy_keys) {
            b.delete(store, CF_META, key);
        }
        b.put_json(store, CF_META, META_ANNOUNCED, &st.announced);
        if std::mem::take(&mut st.rollout_dirty) {
            // one value per rollout, written only when it changed ("" is the controller's book)
            let values = st.rollout.rollouts.iter().map(|(id, r)| (id.clone(), serde_json::to_vec(r))).chain([(String::new(), serde_json::to_vec(&st.rollout.book()))]);
            for (id, v) in values {
                let v = v.expect("rollouts serialise");
                if self.written_rollouts.get(&id) != Some(&v) {
                    if id.is_empty() {
                        b.put_raw(store, CF_META, META_ROLLOUT_BOOK, &v);
                    } else {
                        b.put_raw(store, CF_ROLLOUTS, id.as_bytes(), &v);
                    }
                    self.written_rollouts.insert(id, v);
                }
            }
        }
        b.put_json(store, CF_META, META_COUNTERS, &st.counters);
        self.behind.submit(sink, writer::Job { batch: b, outbox, inputs, waited }, predicted)
    }

}


/// Runs this process's part of the monitor's closing stage until `stop`: with `monitor.changelog`,
/// the closing partitions the group gives it, and warm copies of the others ([`shard::run`]);
/// without, the one stage over everything. Blocking: call from a blocking thread.
pub fn run(cfg: PipelineConfig, brokers: String, view: view::ViewHandle, stop: Arc<AtomicBool>) -> Result<MonitorSummary, MonitorError> {
    if cfg.monitor.changelog {
        shard::run(cfg, brokers, view, stop)
    } else {
        MonitorStage::open_with_view(cfg, brokers, view)?.run(stop)
    }
}

/// `event time (16 hex digits, order-preserving) | document id`.
pub(crate) fn expiry_key(event_ms: i64, document_id: &str) -> Vec<u8> {
    state::time_key(event_ms, document_id.as_bytes())
}

/// Whether dotted version `a` is newer than `b` (numeric parts compared, suffixes ignored).
fn version_newer(a: &str, b: &str) -> bool {
    let parts = |v: &str| v.split(['.', '-']).map_while(|p| p.parse::<u64>().ok()).collect::<Vec<_>>();
    parts(a) > parts(b)
}
