//! Replay of recorded topics: backfill inference with a chosen model version (`replay infer`),
//! recompute windows, alerts and rollout decisions with a given config (`replay monitor`), and send
//! dead letters back through the infer stage after a fix (`dlq replay`).
//!
//! Every replay reads a bounded range ([`crate::kafka::range`]: offsets or times, `[from, to)` per
//! partition, default end = the end offsets captured at start) with its own consumer group (never the
//! production one; nothing is committed), shows a progress bar with rate and ETA, and ends with a
//! summary: read, written, dead-lettered, skipped. A message inside the offset range whose own
//! timestamp lies outside time bounds (producers may stamp out of order) is skipped and counted.
//!
//! Outputs never go to production topics unless asked: backfill writes `<topic>.backfill`, monitor
//! replay `<topic>.replay` (or a dry-run report). Delivery: a replay waits for every delivery report
//! before it reports success; rerunning a range writes the same results again (result ids and event
//! ids are deterministic, so a consumer can recognise them).
//!
//! Monitor replay is deterministic: it decodes the whole range, orders events by (event time, topic,
//! partition, offset), drives the monitor's state with event time as its clock (one virtual input
//! partition, so no idle timeouts depend on wall time), and closes the remaining windows at the end
//! of the input. The same input and config give byte-identical metrics, alert and decision events.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::BaseConsumer,
    message::{Message, OwnedMessage},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
};
use serde::Serialize;

use crate::{
    codec,
    config::PipelineConfig,
    document::{DocumentFeedback, InferenceResult},
    inference::ModelRegistry,
    inference::ModelError,
    kafka::{
        self,
        headers::{self as h, HeaderSet},
        range::{self, Bound},
        KafkaError, RangeCursor,
    },
    progress::{report, Progress, ProgressSink},
    monitor::{
        state::{Emitted, MonitorState, Prediction},
        OutboxMessage,
    },
    rollout::{routing::Routing, RolloutCommand},
    telemetry::InferCounters,
};

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Models(#[from] ModelError),
    /// ONNX Runtime failed a batch on every try: the backfill stops before publishing it.
    #[error(transparent)]
    Run(#[from] crate::inference::RunFailure),
    /// What was asked cannot be done as asked (a production output, an unknown model).
    #[error("{0}")]
    Refused(String),
    /// An event of our own could not be re-encoded (a defect).
    #[error("internal: {0}")]
    Internal(String),
}

impl ReplayError {
    /// Whether the same replay may succeed later (the broker was unreachable).
    pub fn retryable(&self) -> bool {
        match self {
            ReplayError::Kafka(e) => e.retryable(),
            ReplayError::Models(e) => e.retryable(),
            ReplayError::Run(e) => e.retryable(),
            ReplayError::Refused(_) | ReplayError::Internal(_) => false,
        }
    }
}

/// What to read.
#[derive(Clone)]
pub struct ReplayOptions {
    pub brokers: String,
    pub from: Bound,
    pub to: Option<Bound>,
    /// Consumer group id of the reader (default `payslip-replay-<mode>-<time>`).
    pub group: Option<String>,
    /// Where progress goes (the CLI draws a bar from it).
    pub progress: ProgressSink,
}

/// What a replay did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplaySummary {
    pub mode: String,
    pub read: u64,
    pub written: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    /// `topic/partition [start, end)` of every input partition.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub seconds: f64,
}

/// Reads bounded ranges of several topics.
struct RangeReader {
    cursor: RangeCursor,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    progress: ProgressSink,
    read: u64,
    skipped: u64,
    inputs: Vec<String>,
}

impl RangeReader {
    fn open(cfg: &PipelineConfig, opts: &ReplayOptions, topics: &[&str], mode: &str) -> Result<Self, ReplayError> {
        let group = opts.group.clone().unwrap_or_else(|| format!("payslip-replay-{mode}-{}", chrono::Utc::now().timestamp_millis()));
        if group == cfg.kafka.infer_group {
            return Err(ReplayError::Refused(format!("--group {group} is the production infer group; a replay uses its own")));
        }
        // waits for a broker as start-up does: the reason none answers is logged, and after
        // kafka.startup_wait_s it is the error
        kafka::admin::reach(&opts.brokers, &cfg.kafka.librdkafka, cfg.kafka.startup_wait(), &std::sync::atomic::AtomicBool::new(false))?;
        let consumer: BaseConsumer = kafka::reader_config(&opts.brokers, &group, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the replay reader"))?;
        let mut ranges = Vec::new();
        let mut inputs = Vec::new();
        let mut total = 0;
        for t in topics {
            for r in range::resolve(&consumer, t, opts.from, opts.to)? {
                inputs.push(format!("{t}/{} [{}, {})", r.partition, r.start, r.end));
                total += r.len() as u64;
                ranges.push((t.to_string(), r));
            }
        }
        let cursor = RangeCursor::open(consumer, ranges, format!("replay {mode}"))?;
        report(&opts.progress, Progress::Start { total, unit: "messages" });
        Ok(Self { cursor, from_ms: opts.from.time(), to_ms: opts.to.and_then(Bound::time), progress: opts.progress.clone(), read: 0, skipped: 0, inputs })
    }

    /// Fills in what was read and how long it took.
    fn finish(self, mut s: ReplaySummary, started: Instant) -> ReplaySummary {
        s.read = self.read;
        s.skipped += self.skipped;
        s.inputs = self.inputs;
        s.seconds = started.elapsed().as_secs_f64();
        s
    }

    /// Up to `max` messages inside the range; `None` once every partition reached its end.
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<OwnedMessage>>, ReplayError> {
        if self.cursor.done() {
            report(&self.progress, Progress::Finish);
            return Ok(None);
        }
        let mut out = Vec::new();
        let mut idle_since = Instant::now();
        while out.len() < max && !self.cursor.done() {
            let timeout = if out.is_empty() { Duration::from_millis(500) } else { Duration::ZERO };
            let Some(m) = self.cursor.next(timeout)? else {
                if !out.is_empty() {
                    break;
                }
                if idle_since.elapsed() > Duration::from_secs(60) {
                    return Err(KafkaError::Timeout { what: format!("replay: {} partitions short of their end", self.cursor.unfinished()), seconds: 60 }.into());
                }
                continue;
            };
            idle_since = Instant::now();
            self.read += 1;
            report(&self.progress, Progress::Advance(1));
            let ts = m.timestamp().to_millis();
            if ts.is_some_and(|t| self.from_ms.is_some_and(|f| t < f) || self.to_ms.is_some_and(|to| t >= to)) {
                self.skipped += 1;
                continue;
            }
            out.push(m.detach());
        }
        Ok(Some(out))
    }
}

fn send(producer: &FutureProducer, topic: &str, key: Option<&[u8]>, payload: &[u8], headers: &HeaderSet) -> Result<DeliveryFuture, KafkaError> {
    let hs = headers.build();
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload).headers(hs);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    kafka::enqueue_blocking(producer, rec)
}

/// Topics a replay must not write to unless asked.
fn guard(cfg: &PipelineConfig, outputs: &[String], allow_production: bool) -> Result<(), ReplayError> {
    if allow_production {
        return Ok(());
    }
    match outputs.iter().find(|o| cfg.topics.all().any(|(_, t)| t == o.as_str())) {
        Some(o) => Err(ReplayError::Refused(format!("{o} is a production topic; pass --allow-production-topics to write there, or choose another output"))),
        None => Ok(()),
    }
}

/// `replay infer`: which versions to run and where results go.
#[derive(Debug, Clone, Default)]
pub struct BackfillOptions {
    /// Input topic (default: the documents topic).
    pub topic: Option<String>,
    /// Model → version overriding `models.serve`.
    pub serve: BTreeMap<String, String>,
    /// Results topic (default `<inference>.backfill`); dead letters go to `<dlq>.backfill`.
    pub output_topic: Option<String>,
    pub dlq_topic: Option<String>,
    pub allow_production: bool,
}

/// Re-runs inference over recorded documents with the chosen versions. Blocking.
pub fn backfill(cfg: &PipelineConfig, opts: &ReplayOptions, b: &BackfillOptions) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let input = b.topic.clone().unwrap_or_else(|| cfg.topics.documents.clone());
    let out_results = b.output_topic.clone().unwrap_or_else(|| format!("{}.backfill", cfg.topics.inference));
    let out_dlq = b.dlq_topic.clone().unwrap_or_else(|| format!("{}.backfill", cfg.topics.documents_dlq));
    guard(cfg, &[out_results.clone(), out_dlq.clone()], b.allow_production)?;
    let mut run_cfg = cfg.clone();
    for (m, v) in &b.serve {
        if !crate::inference::MODEL_NAMES.contains(&m.as_str()) {
            return Err(ReplayError::Refused(format!("--serve {m}={v}: unknown model; known models are {:?}", crate::inference::MODEL_NAMES)));
        }
        run_cfg.models.serve.insert(m.clone(), v.clone());
    }
    run_cfg.topics.inference = out_results.clone();
    run_cfg.topics.documents_dlq = out_dlq.clone();
    run_cfg.faults.enabled = false;
    let registry = ModelRegistry::load(&run_cfg.models, &run_cfg.inference, &[])?;
    if let Some(s) = registry.status().iter().find(|s| s.state != crate::inference::LoadState::Loaded) {
        return Err(ReplayError::Refused(format!("{} {} cannot be loaded: {}", s.model, s.version, s.reason.clone().unwrap_or_default())));
    }
    kafka::admin::ensure_named(&opts.brokers, &cfg.kafka, &cfg.topics, &[out_results.clone(), out_dlq.clone()], &[])?;
    let producer: FutureProducer = kafka::producer_config(&opts.brokers, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the replay producer"))?;
    let mut reader = RangeReader::open(cfg, opts, &[&input], "infer")?;
    let routing = std::sync::RwLock::new(Routing::default());
    let counters = InferCounters::default();
    let replay_id = format!("backfill-{}", chrono::Utc::now().timestamp_millis());
    let versions = registry.served_versions().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let mut s = ReplaySummary { mode: "infer".into(), outputs: vec![out_results, out_dlq], ..Default::default() };
    tracing::info!(%input, versions = %versions, outputs = ?s.outputs, "backfill started");
    while let Some(batch) = reader.next_batch(run_cfg.batching.max_batch)? {
        let processed = crate::infer::process_batch(&run_cfg, &registry, &routing, &counters, batch, false)?;
        let mut futures = Vec::with_capacity(processed.len());
        for p in processed {
            let headers = p.out.headers.with("replay-id", &replay_id);
            if p.out.is_result {
                s.written += 1;
            } else {
                s.dead_lettered += 1;
            }
            futures.push((send(&producer, &p.out.topic, p.out.key.as_deref(), &p.out.payload, &headers)?, p.out.topic));
        }
        kafka::wait_deliveries(futures)?;
    }
    Ok(reader.finish(s, started))
}

/// `dlq replay`: where dead letters go back to.
#[derive(Debug, Clone, Default)]
pub struct DlqReplayOptions {
    /// Dead-letter topic to read (default: the configured one).
    pub topic: Option<String>,
    /// Where to send them (default: the documents topic, which the infer stage consumes).
    pub target: Option<String>,
}

/// Headers of a dead letter that described its failure; on re-drive they are kept under `dlq.` so
/// a second failure's headers do not mix with the first one's.
const FAILURE_HEADERS: [&str; 6] = [h::ERROR_CLASS, h::ERROR_MESSAGE, h::SOURCE_TOPIC, h::SOURCE_PARTITION, h::SOURCE_OFFSET, "dead-lettered-at"];

/// Sends dead letters back through the infer stage with their original key, bytes and headers.
/// Blocking.
pub fn dlq_replay(cfg: &PipelineConfig, opts: &ReplayOptions, d: &DlqReplayOptions) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let input = d.topic.clone().unwrap_or_else(|| cfg.topics.documents_dlq.clone());
    let target = d.target.clone().unwrap_or_else(|| cfg.topics.documents.clone());
    if target == input {
        return Err(ReplayError::Refused(format!("the target {target} is the dead-letter topic itself")));
    }
    let producer: FutureProducer = kafka::producer_config(&opts.brokers, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the replay producer"))?;
    let mut reader = RangeReader::open(cfg, opts, &[&input], "dlq")?;
    let at = chrono::Utc::now().to_rfc3339();
    let mut s = ReplaySummary { mode: "dlq".into(), outputs: vec![target.clone()], ..Default::default() };
    while let Some(batch) = reader.next_batch(500)? {
        let mut futures = Vec::with_capacity(batch.len());
        for m in &batch {
            let mut hs = HeaderSet::new();
            if let Some(headers) = m.headers() {
                use rdkafka::message::Headers;
                for x in headers.iter() {
                    let v = x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                    if FAILURE_HEADERS.contains(&x.key) {
                        hs = hs.with(&format!("dlq.{}", x.key), v);
                    } else {
                        hs = hs.with(x.key, v);
                    }
                }
            }
            hs = hs.with("dlq.replayed-from", format!("{}/{}/{}", m.topic(), m.partition(), m.offset())).with("dlq.replayed-at", &at);
            futures.push((send(&producer, &target, m.key(), m.payload().unwrap_or_default(), &hs)?, target.as_str()));
            s.written += 1;
        }
        kafka::wait_deliveries(futures)?;
    }
    Ok(reader.finish(s, started))
}

/// `replay monitor`: where recomputed events go.
#[derive(Debug, Clone)]
pub struct MonitorReplayOptions {
    /// Appended to the metrics, alerts and decisions topic names (default `.replay`).
    pub output_suffix: String,
    /// Publish nothing; return the events (the CLI prints them as a report).
    pub dry_run: bool,
    pub allow_production: bool,
}

enum Event {
    Result(InferenceResult),
    Feedback(DocumentFeedback),
    Command(RolloutCommand),
}

/// One recomputed event: what the live monitor would have published.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayedEvent {
    pub topic: String,
    pub key: String,
    pub event_id: String,
    pub headers: Vec<(String, String)>,
    pub value: serde_json::Value,
    /// The encoded value, hex (what is published).
    pub payload_hex: String,
}

/// Recomputes windows, alerts and rollout decisions from recorded results, feedback and commands.
/// Blocking.
pub fn monitor_replay(cfg: &PipelineConfig, opts: &ReplayOptions, m: &MonitorReplayOptions) -> Result<(ReplaySummary, Vec<ReplayedEvent>), ReplayError> {
    let started = Instant::now();
    let mut out_cfg = cfg.clone();
    for t in [&mut out_cfg.topics.metrics, &mut out_cfg.topics.alerts, &mut out_cfg.topics.decisions] {
        t.push_str(&m.output_suffix);
    }
    let outputs = vec![out_cfg.topics.metrics.clone(), out_cfg.topics.alerts.clone(), out_cfg.topics.decisions.clone()];
    if !m.dry_run {
        guard(cfg, &outputs, m.allow_production)?;
    }
    let t = &cfg.topics;
    let mut reader = RangeReader::open(cfg, opts, &[&t.inference, &t.feedback, &t.commands], "monitor")?;
    // (event time, topic rank, partition, offset) orders the input totally
    let mut events: Vec<((i64, u8, i32, i64), Event)> = Vec::new();
    let mut undecodable = 0u64;
    while let Some(batch) = reader.next_batch(1000)? {
        for msg in batch {
            let ct = h::get(msg.headers(), h::CONTENT_TYPE);
            let payload = msg.payload().unwrap_or_default();
            let pos = |ts: i64, rank: u8| (ts, rank, msg.partition(), msg.offset());
            let ev = if msg.topic() == t.inference {
                codec::decode_result_counted(payload, ct.as_deref()).ok().map(|r| (pos(r.submitted_at, 0), Event::Result(r)))
            } else if msg.topic() == t.feedback {
                codec::decode::<DocumentFeedback>(payload, ct.as_deref()).ok().map(|f| (pos(f.given_at, 1), Event::Feedback(f)))
            } else {
                codec::decode::<RolloutCommand>(payload, ct.as_deref()).ok().map(|c| (pos(c.issued_at, 2), Event::Command(c)))
            };
            match ev {
                Some(e) => events.push(e),
                None => undecodable += 1,
            }
        }
    }
    events.sort_by_key(|(k, _)| *k);
    let wcfg = cfg.monitor.window();
    let lane = format!("{}/replay", t.inference);
    let mut st = MonitorState { max_pending_feedback: cfg.monitor.max_pending_feedback, ..Default::default() };
    let mut predictions: BTreeMap<String, Prediction> = BTreeMap::new();
    let mut emitted: Vec<Emitted> = Vec::new();
    let retention = cfg.monitor.prediction_retention_ms;
    let lookup = |p: &BTreeMap<String, Prediction>, id: &str, at: i64| p.get(id).filter(|p| at - p.event_ms <= retention).cloned();
    if let (Some(c), Some(((first, ..), _))) = (cfg.rollout.candidate.as_ref().filter(|_| cfg.rollout.auto_start), events.first()) {
        let cmd = RolloutCommand {
            command_id: format!("auto-start-{first}"),
            rollout_id: c.rollout_id(),
            action: crate::rollout::action::START.into(),
            operator: "config (rollout.auto_start)".into(),
            reason: None,
            model: Some(c.model.clone()),
            version: None,
            issued_at: *first,
        };
        emitted.extend(st.apply_command(&cfg.rollout, &cfg.models.serve, &cmd));
    }
    let mut last_ms = i64::MIN;
    for ((ts, ..), ev) in events {
        last_ms = last_ms.max(ts);
        match ev {
            Event::Result(r) => {
                if lookup(&predictions, &r.document_id, r.submitted_at).is_some_and(|p| p.is_from(&r)) {
                    st.counters.duplicates_ignored += 1;
                    continue;
                }
                st.apply_result(&r, &lane, ts, &wcfg);
                predictions.extend(std::mem::take(&mut st.new_predictions));
            }
            Event::Feedback(f) => {
                let p = lookup(&predictions, &f.document_id, f.given_at);
                st.receive_feedback(f, p, &lane, ts, &wcfg);
            }
            Event::Command(c) => emitted.extend(st.apply_command(&cfg.rollout, &cfg.models.serve, &c)),
        }
        let frontier = st.watermark.frontier(&format!("{}/", t.inference), &wcfg, last_ms);
        for f in st.due_feedback(frontier) {
            let p = lookup(&predictions, &f.document_id, f.given_at);
            st.resolve_feedback(&f, p, &wcfg);
        }
        emitted.extend(st.close_windows(&cfg.monitor.alerts, cfg.monitor.resolve_silent_after_windows, &cfg.rollout, &wcfg, last_ms));
        st.dirty_windows.clear();
        st.closed_windows.clear();
        st.dirty_alerts.clear();
        st.dirty_pending.clear();
    }
    // the end of the input closes every remaining window
    if last_ms != i64::MIN {
        let end = last_ms.saturating_add(wcfg.size_ms).saturating_add(wcfg.allowed_lateness_ms).saturating_add(1);
        st.watermark.observe(&lane, end, end);
        for f in st.due_feedback(Some(end)) {
            let p = lookup(&predictions, &f.document_id, f.given_at);
            st.resolve_feedback(&f, p, &wcfg);
        }
        emitted.extend(st.close_windows(&cfg.monitor.alerts, cfg.monitor.resolve_silent_after_windows, &cfg.rollout, &wcfg, end));
    }
    let messages: Vec<OutboxMessage> = emitted.iter().map(|e| cfg.monitor.encode(&out_cfg, e)).collect();
    let report: Vec<ReplayedEvent> = emitted
        .iter()
        .zip(&messages)
        .map(|(e, msg)| ReplayedEvent {
            topic: msg.topic.clone(),
            key: msg.key.clone(),
            event_id: msg.event_id.clone(),
            headers: msg.headers.clone(),
            value: match e {
                Emitted::Metrics(x) => serde_json::to_value(x),
                Emitted::Alert(x) => serde_json::to_value(x),
                Emitted::Decision(x) => serde_json::to_value(x),
            }
            .unwrap_or_default(),
            payload_hex: msg.payload_hex.clone(),
        })
        .collect();
    let mut s = reader.finish(ReplaySummary { mode: "monitor".into(), skipped: undecodable, ..Default::default() }, started);
    if !m.dry_run {
        kafka::admin::ensure_named(&opts.brokers, &cfg.kafka, &cfg.topics, &outputs, &[out_cfg.topics.decisions.clone()])?;
        let producer: FutureProducer = kafka::producer_config(&opts.brokers, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the replay producer"))?;
        let mut futures = Vec::with_capacity(messages.len());
        for msg in &messages {
            let payload = hex::decode(&msg.payload_hex).map_err(|e| ReplayError::Internal(e.to_string()))?;
            let mut hs = HeaderSet::new();
            for (k, v) in &msg.headers {
                hs = hs.with(k, v);
            }
            futures.push((send(&producer, &msg.topic, Some(msg.key.as_bytes()), &payload, &hs)?, msg.topic.as_str()));
        }
        kafka::wait_deliveries(futures)?;
        s.written = messages.len() as u64;
        s.outputs = outputs;
    }
    s.seconds = started.elapsed().as_secs_f64();
    Ok((s, report))
}
