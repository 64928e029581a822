//! Test harness: broker address, isolated topics, the infer stage in-process or as a child process,
//! and readers that collect what landed on a topic.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::{AtomicU64, Ordering}, Arc},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec,
    config::PipelineConfig,
    document::InferenceResult,
    inference::ModelRegistry,
    kafka::{self, headers as h},
    infer::InferStage,
    telemetry::InferSummary,
};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    Offset, TopicPartitionList,
};
use tokio::{sync::watch, task::JoinHandle};

pub fn brokers() -> String {
    std::env::var("PAYSLIP_TEST_BROKERS").expect(
        "PAYSLIP_TEST_BROKERS is not set: run the tests with scripts/test, which starts a real Kafka broker, \
         or start one with scripts/kafka start and export PAYSLIP_TEST_BROKERS=127.0.0.1:19092",
    )
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{prefix}-{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The repository's pipeline config as it is.
pub fn repo_config() -> PipelineConfig {
    PipelineConfig::load(&repo().join("pipelines/payslip.yaml")).expect("pipelines/payslip.yaml is valid")
}

/// The repository's pipeline config with isolated topics (3 partitions) and group, topics created.
pub async fn isolated_config(name: &str) -> PipelineConfig {
    isolated_config_with_prefix(name).await.0
}

/// As [`isolated_config`], also returning the topic prefix (for child processes).
pub async fn isolated_config_with_prefix(name: &str) -> (PipelineConfig, String) {
    isolated_config_prepared(name, |_| {}).await
}

/// [`isolated_config_with_prefix`] with `prepare` applied before the topics are created (what
/// decides their partition counts: `monitor.closing_partitions`).
pub async fn isolated_config_prepared(name: &str, prepare: impl FnOnce(&mut PipelineConfig)) -> (PipelineConfig, String) {
    let mut cfg = repo_config();
    let prefix = format!("{}.", unique(name));
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    cfg.topics.partitions = 3;
    cfg.kafka.infer_group = format!("{prefix}infer");
    cfg.kafka.brokers = Some(brokers());
    prepare(&mut cfg);
    kafka::admin::ensure_topics(&brokers(), &cfg).await.expect("topics created");
    (cfg, prefix)
}

pub fn load_registry(cfg: &PipelineConfig) -> Arc<ModelRegistry> {
    Arc::new(ModelRegistry::load(&cfg.models, &cfg.inference, &[]).expect("model metadata readable"))
}

/// The infer stage running in this process.
pub struct RunningStage {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Result<InferSummary, payslip_stream::infer::StageError>>,
}

impl RunningStage {
    pub fn start(cfg: &PipelineConfig, registry: Arc<ModelRegistry>) -> Self {
        let (stop, rx) = watch::channel(false);
        let stage = InferStage::new(cfg.clone(), brokers(), registry);
        // a stage that fails says why at once (otherwise the test only sees results missing)
        let handle = tokio::spawn(async move {
            let r = stage.run(rx).await;
            if let Err(e) = &r {
                eprintln!("infer stage failed: {e}");
            }
            r
        });
        Self { stop, handle }
    }

    /// Waits for the stage to stop by itself with an error (at most 60 s).
    pub async fn failure(self) -> payslip_stream::infer::StageError {
        match tokio::time::timeout(Duration::from_secs(60), self.handle).await.expect("the stage stops within 60 s").expect("stage task") {
            Ok(s) => panic!("the stage stopped without an error: {s:?}"),
            Err(e) => e,
        }
    }

    /// Asks for a graceful stop and returns the stage's summary.
    pub async fn stop(self) -> InferSummary {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.handle).await.expect("stage stops within 60 s").expect("stage task").expect("stage ok")
    }
}

/// One message as read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
}

impl Read {
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        Read {
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: m
                .headers()
                .map(|hs| hs.iter().map(|x| (x.key.to_string(), x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect())
                .unwrap_or_default(),
            payload: m.payload().unwrap_or_default().to_vec(),
            partition: m.partition(),
            offset: m.offset(),
        }
    }

    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }

    pub fn result(&self) -> InferenceResult {
        codec::decode(&self.payload, self.header(h::CONTENT_TYPE)).expect("result decodes")
    }
}

/// A consumer that assigns partitions itself and commits nothing.
pub fn reader() -> BaseConsumer {
    kafka::client_config(&brokers(), &Default::default()).set("group.id", unique("reader")).set("enable.auto.commit", "false").create().expect("reader")
}

/// Reads `topic` from the beginning until `expected` messages arrived, then keeps reading for
/// `settle` more so that extra (duplicate) messages would be seen too. Panics after `timeout`.
pub fn read_topic(topic: &str, expected: usize, timeout: Duration, settle: Duration) -> Vec<Read> {
    let consumer = reader();
    let mut tpl = TopicPartitionList::new();
    for p in kafka::partitions_of(&consumer, topic, Duration::from_secs(30)).expect("metadata") {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let start = Instant::now();
    let mut out = Vec::new();
    let mut done_at: Option<Instant> = None;
    loop {
        if out.len() >= expected && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|d| d.elapsed() >= settle) {
            return out;
        }
        assert!(start.elapsed() < timeout, "only {} of {expected} messages on {topic} after {timeout:?}", out.len());
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            out.push(Read::of(&m));
        }
    }
}

/// Produces raw messages (for bad input) and waits for their delivery.
pub async fn produce_raw(topic: &str, messages: Vec<(String, Vec<u8>, Vec<(&str, &str)>)>) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = kafka::producer_config(&brokers(), &Default::default()).create().expect("producer");
    for (key, payload, headers) in messages {
        let mut hs = kafka::headers::HeaderSet::new();
        for (k, v) in headers {
            hs = hs.with(k, v);
        }
        let hs = hs.build();
        p.send(FutureRecord::to(topic).key(&key).payload(&payload).headers(hs), Duration::from_secs(30)).await.expect("delivered");
    }
}

/// Produces many records of one type (Avro, one key, so one partition in order): all are queued
/// first and the deliveries awaited together.
pub async fn produce_many<T: payslip_stream::codec::Record>(topic: &str, key: &str, records: &[T]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = kafka::producer_config(&brokers(), &Default::default()).set("queue.buffering.max.messages", "1000000").create().expect("producer");
    let hs = kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let payload = payslip_stream::codec::encode(r, payslip_stream::codec::WireFormat::Avro).unwrap();
        let record = FutureRecord::to(topic).key(key).payload(&payload).headers(hs.clone());
        pending.push(kafka::enqueue(&p, record).await.expect("queued"));
    }
    for f in pending {
        kafka::delivered(f, topic).await.expect("delivered");
    }
}

/// Reads everything on `topic` up to the end offsets at the time of the call (transaction markers
/// and aborted records included in the range are stepped over by the library's cursor).
pub fn read_all(topic: &str) -> Vec<Read> {
    let cursor = kafka::RangeCursor::to_end(reader(), topic, |_, lo, _| lo, "test read").expect("watermarks");
    let mut out = Vec::new();
    cursor
        .for_each(Duration::from_secs(30), |m| {
            out.push(Read::of(m));
            Ok::<(), kafka::KafkaError>(())
        })
        .expect("read to the end");
    out
}

/// The monitor stage running in this process (on a blocking thread).
pub struct RunningMonitor {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<JoinHandle<Result<payslip_stream::monitor::MonitorSummary, payslip_stream::monitor::MonitorError>>>,
}

impl RunningMonitor {
    pub fn start(cfg: &PipelineConfig) -> Self {
        Self::start_with_view(cfg).0
    }

    /// Starts the stage with the view the operations API would read (role, counters, changelog).
    pub fn start_with_view(cfg: &PipelineConfig) -> (Self, payslip_stream::monitor::view::ViewHandle) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let view = payslip_stream::monitor::view::ViewHandle::default();
        let (cfg, flag, v) = (cfg.clone(), stop.clone(), view.clone());
        let handle = tokio::task::spawn_blocking(move || payslip_stream::monitor::run(cfg, brokers(), v, flag));
        (Self { stop, handle: Some(handle) }, view)
    }

    pub async fn stop(mut self) -> payslip_stream::monitor::MonitorSummary {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), handle).await.expect("monitor stops within 60 s").expect("monitor task").expect("monitor ok")
    }
}

/// A test that fails before `stop` still stops the monitor, so the runtime can shut down (it waits
/// for blocking threads) and the failure is reported instead of hanging the run.
impl Drop for RunningMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An isolated config for monitor tests: short windows, a fresh state directory.
pub async fn monitor_config(name: &str, state_dir: &std::path::Path) -> (PipelineConfig, String) {
    let (mut cfg, prefix) = isolated_config_with_prefix(name).await;
    cfg.monitor.state_dir = state_dir.to_path_buf();
    cfg.monitor.window_size_ms = 10_000;
    cfg.monitor.allowed_lateness_ms = 0;
    cfg.monitor.idle_timeout_ms = 3_000;
    (cfg, prefix)
}

/// Produces records of one type (Avro) with a fixed key, so they share one partition and keep order.
pub async fn produce_records<T: payslip_stream::codec::Record>(topic: &str, key: &str, records: &[T]) {
    let ct = [("content-type", "application/avro")];
    let msgs = records.iter().map(|r| (key.to_string(), payslip_stream::codec::encode(r, payslip_stream::codec::WireFormat::Avro).unwrap(), ct.to_vec())).collect();
    produce_raw(topic, msgs).await;
}

/// Sizes every statistical rollout criterion for effects 4 times the production ones (the tests
/// compress 24-96 h soaks into seconds, and with them the evidence a phase can gather), and the
/// latency criteria for a 50-fold slowdown and non-blocking: at 200 documents/s the baseline runs
/// batches of several documents and a 1 % canary batches of one, so run times at equal batch size
/// may not meet within a test's seconds. The controller's statistics at production sizes, latency
/// included, are measured by `rollout simulate` (README, BENCHMARKS.md).
pub fn widen_effects(phases: &mut [payslip_stream::rollout::PhaseSpec]) {
    payslip_stream::rollout::config::scale_effects(phases, 4.0, 50.0);
}

/// Copies the repository's models/ (metadata and every version's file) into `to`.
pub fn copy_models(to: &std::path::Path) {
    let from = repo().join("models");
    for entry in std::fs::read_dir(&from).unwrap() {
        let e = entry.unwrap();
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(to.join(e.file_name())).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(e.file_name()).join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a test that fails while
/// it runs leaves no stage, Prometheus or Alertmanager behind to load the rest of the run.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `name{labels} value` lines of a Prometheus scrape → (name with labels, value).
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))).collect()
}

/// The samples of `GET http://addr/metrics` (no token; a blocking call, as the topic reads here).
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let url = format!("http://{addr}/metrics");
    samples(&ureq::get(&url).timeout(Duration::from_secs(30)).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_string().unwrap())
}
