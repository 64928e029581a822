//! Topic creation through the Kafka admin API, from the topic registry ([`super::topics`]).
//! Existing topics are left untouched (their partition count and configs are the operator's);
//! missing ones are created with the configured partitions and retention, or compacted where the
//! registry says so. Before anything else it waits for a broker to answer ([`reach`]), saying why
//! none does, so that a wrong address fails start-up with a reason instead of an admin timeout;
//! a shutdown signal ends that wait ([`ensure_topics_until`]), so SIGTERM stops a process that is
//! still looking for its brokers.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    error::KafkaError as RdKafkaError,
    producer::{BaseProducer, Producer},
    types::RDKafkaErrorCode,
};

use super::{
    topics::{TopicRole, REGISTRY},
    KafkaError,
};
use crate::config::{KafkaConfig, PipelineConfig, TopicsConfig};

/// Room a dead letter needs beyond its payload: the original headers plus the failure headers.
pub const DEAD_LETTER_HEADROOM_BYTES: usize = 64 * 1024;

/// Largest record a dead-letter topic must accept so that any document within
/// `limits.max_payload_bytes` can be dead-lettered whole.
pub fn dead_letter_max_bytes(cfg: &PipelineConfig) -> usize {
    cfg.limits.max_payload_bytes + DEAD_LETTER_HEADROOM_BYTES
}

/// How often [`reach`] says that it is still waiting, and why (the first time as soon as librdkafka
/// has given a reason).
const REACH_WARN_EVERY: Duration = Duration::from_secs(5);

/// The longest one metadata probe of [`reach`] waits: how late it notices its `stop` flag.
const REACH_PROBE: Duration = Duration::from_secs(1);

/// The topic [`reach`]'s metadata request names. Any answer will do (it need not exist, and an ACL
/// may hide it): naming one topic keeps the answer small where a cluster has thousands, which a
/// request for every topic would have to list within [`REACH_PROBE`].
const REACH_PROBE_TOPIC: &str = "payslip-stream.reach-probe";

/// The last client-level error librdkafka reported (a name that does not resolve, a refused
/// connection, a failed authentication): why no broker answers.
#[derive(Default)]
struct LastError(Mutex<Option<String>>);

impl ClientContext for LastError {
    fn error(&self, error: RdKafkaError, reason: &str) {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // "1/1 brokers are down" follows the error that says why; keep that one
        if last.is_some() && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        *last = Some(if reason.is_empty() { error.to_string() } else { format!("{reason} ({error})") });
    }

    /// A failed connection is logged (`FAIL`: "Connect to ... failed: Connection refused", "Failed
    /// to resolve ...") before, or instead of, an error event: kept as the reason, and said by
    /// [`reach`]'s own warnings rather than once per attempt.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if fac == "FAIL" || matches!(level, L::Emerg | L::Alert | L::Critical | L::Error | L::Warning) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.to_string());
        }
    }
}

impl rdkafka::producer::ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Waits until a broker of `brokers` answers a metadata request, for at most `patience`. While none
/// does, it logs why (as soon as librdkafka has said, then every 5 s) from librdkafka's own connection errors; after
/// `patience` it fails with that reason and the settings that name the brokers
/// ([`KafkaError::Unreachable`]). Without it, a mistyped address or a broker that refuses the
/// client's security settings left the process silent until an admin request timed out with
/// "OperationTimedOut". Blocking; it gives up within a second of `stop` turning true, and then
/// returns `Ok(false)` (`Ok(true)`: a broker answered).
pub fn reach(brokers: &str, passthrough: &BTreeMap<String, String>, patience: Duration, stop: &AtomicBool) -> Result<bool, KafkaError> {
    let mut config = super::client_config(brokers, passthrough);
    // the probe asks for one topic that need not exist, and must never create it
    config.set("allow.auto.create.topics", "false");
    let client: BaseProducer<LastError> = config.create_with_context(LastError::default()).map_err(KafkaError::client(format!("a client for {brokers}")))?;
    let started = Instant::now();
    let mut warned: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let asked = Instant::now();
        let left = patience.saturating_sub(started.elapsed());
        let failure = match client.client().fetch_metadata(Some(REACH_PROBE_TOPIC), left.clamp(Duration::from_millis(100), REACH_PROBE)) {
            Ok(_) => {
                if warned.is_some() {
                    tracing::info!(%brokers, waited_ms = started.elapsed().as_millis() as u64, "a broker answers");
                }
                return Ok(true);
            }
            Err(e) => e,
        };
        // serves librdkafka's error events into `LastError` (one event per call)
        for _ in 0..32 {
            client.poll(Duration::ZERO);
        }
        let reason = || client.context().0.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| failure.to_string());
        if started.elapsed() >= patience {
            return Err(KafkaError::Unreachable { brokers: brokers.to_string(), seconds: patience.as_secs(), reason: reason() });
        }
        // at once when librdkafka has said why (a refused connection, a name that does not
        // resolve); a slow first connection (TLS, SASL) gets the full interval before it is reported
        let said = client.context().0.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if warned.map_or(said || started.elapsed() >= REACH_WARN_EVERY, |w| w.elapsed() >= REACH_WARN_EVERY) {
            warned = Some(Instant::now());
            tracing::warn!(%brokers, reason = %reason(), waited_s = started.elapsed().as_secs(), patience_s = patience.as_secs(), "no broker answers yet; waiting");
        }
        // a refusal comes back at once: do not spin on it
        std::thread::sleep(Duration::from_millis(200).saturating_sub(asked.elapsed()));
    }
}

/// Creates the project's topics that do not exist yet. Returns the names created. The dead-letter
/// topics are created to accept [`dead_letter_max_bytes`].
pub async fn ensure_topics(brokers: &str, cfg: &PipelineConfig) -> Result<Vec<String>, KafkaError> {
    let (_keep, never) = tokio::sync::watch::channel(false);
    Ok(ensure_topics_until(brokers, cfg, never).await?.unwrap_or_default())
}

/// [`ensure_topics`] until `shutdown` turns true: `Ok(None)` when it did before the topics were
/// ensured (the wait for a broker is given up within a second; a CreateTopics request under way is
/// abandoned, and the broker completes or drops it on its own).
pub async fn ensure_topics_until(brokers: &str, cfg: &PipelineConfig, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<Option<Vec<String>>, KafkaError> {
    let stop = Arc::new(AtomicBool::new(false));
    let ensure = async {
        let (b, passthrough, flag) = (brokers.to_string(), cfg.kafka.librdkafka.clone(), stop.clone());
        let patience = cfg.kafka.startup_wait();
        let reached = tokio::task::spawn_blocking(move || reach(&b, &passthrough, patience, &flag)).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        if !reached {
            return Ok(None);
        }
        create_registry(brokers, cfg).await.map(Some)
    };
    tokio::select! {
        r = ensure => r,
        // a sender dropped without a signal is no shutdown
        Ok(_) = shutdown.wait_for(|s| *s) => {
            // the probing thread sees this within a second, so the runtime's exit does not wait on it
            stop.store(true, Ordering::Relaxed);
            Ok(None)
        }
    }
}

/// Creates the topics of the registry (the broker answers).
async fn create_registry(brokers: &str, cfg: &PipelineConfig) -> Result<Vec<String>, KafkaError> {
    let (kafka, topics) = (&cfg.kafka, &cfg.topics);
    let dlq_bytes = dead_letter_max_bytes(cfg).to_string();
    let specs: Vec<(String, i32, bool, Option<String>)> = REGISTRY
        .iter()
        .map(|s| {
            let max_bytes = matches!(s.role, TopicRole::DocumentsDlq | TopicRole::MonitorDlq).then(|| dlq_bytes.clone());
            (topics.name(s.role).to_string(), s.partition_count(topics, cfg.monitor.closing_partitions), s.compacted, max_bytes)
        })
        .collect();
    let created = create(brokers, kafka, topics, &specs).await?;
    if !created.is_empty() {
        tracing::info!(?created, "topics created");
    }
    Ok(created)
}

/// Creates the named topics that do not exist yet (replay and backfill outputs), with the configured
/// partitions and retention; those listed in `compacted` are compacted instead. Like
/// [`ensure_topics`] it first waits for a broker to answer ([`reach`]). Blocking.
pub fn ensure_named(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig, names: &[String], compacted: &[String]) -> Result<Vec<String>, KafkaError> {
    reach(brokers, &kafka.librdkafka, kafka.startup_wait(), &AtomicBool::new(false))?;
    let specs: Vec<(String, i32, bool, Option<String>)> = names.iter().map(|t| (t.clone(), topics.partitions, compacted.contains(t), None)).collect();
    futures::executor::block_on(create(brokers, kafka, topics, &specs))
}

/// (name, partitions, compacted, max.message.bytes) of each topic to create.
async fn create(brokers: &str, kafka: &KafkaConfig, topics: &TopicsConfig, specs: &[(String, i32, bool, Option<String>)]) -> Result<Vec<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(brokers, &kafka.librdkafka).create().map_err(KafkaError::client(format!("admin client for {brokers}")))?;
    let retention_ms = (topics.retention_hours as u64 * 3_600_000).to_string();
    let new: Vec<NewTopic> = specs
        .iter()
        .map(|(name, partitions, compacted, max_bytes)| {
            let mut n = NewTopic::new(name, *partitions, TopicReplication::Fixed(topics.replication_factor));
            n = if *compacted { n.set("cleanup.policy", "compact") } else { n.set("retention.ms", &retention_ms) };
            match max_bytes {
                Some(b) => n.set("max.message.bytes", b),
                None => n,
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))).request_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await.map_err(KafkaError::broker(format!("creating topics on {brokers}")))?;
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push(name),
            // one that already exists is fine; any other error is not
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::Broker { what: format!("cannot create topic {name}"), source: rdkafka::error::KafkaError::AdminOp(code) }),
        }
    }
    wait_until_led(&admin, &out, specs);
    Ok(out)
}

/// Waits (up to 30 s) until every partition of the topics just created is served by its leader:
/// the metadata names a leader *and* that leader answers a ListOffsets for the partition.
///
/// CreateTopics answers once the controller has recorded the topic. A KRaft broker then lists
/// itself as leader in its metadata a moment before its replica manager serves the partition, and
/// produce requests in between fail with NOT_LEADER_OR_FOLLOWER. Retried, those refusals could
/// still lose a record silently ([`super::config::MAX_IN_FLIGHT`] says how): a CI run lost document
/// 1 of 3,000, acknowledged, sent right after its topic was created; about 1 run in 50 of 40
/// documents lost one on a loaded machine, none in 195 runs with this wait. ListOffsets goes
/// through the same replica manager as Produce, so once it answers for every partition no produce
/// is refused as not-leader. Blocking (`ensure_named` runs outside tokio).
fn wait_until_led(admin: &AdminClient<DefaultClientContext>, created: &[String], specs: &[(String, i32, bool, Option<String>)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for name in created {
        let expected = specs.iter().find(|s| &s.0 == name).map_or(1, |s| s.1).max(1) as usize;
        let mut served = std::collections::BTreeSet::new();
        loop {
            let led: Vec<i32> = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .and_then(|m| m.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().iter().filter(|p| p.error().is_none() && p.leader() >= 0).map(|p| p.id()).collect()))
                .unwrap_or_default();
            for p in led {
                if !served.contains(&p) && admin.inner().fetch_watermarks(name, p, Duration::from_secs(5)).is_ok() {
                    served.insert(p);
                }
            }
            if served.len() >= expected {
                break;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(topic = %name, served = served.len(), expected, "a topic just created still has partitions its leader does not serve after 30 s");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `max.message.bytes` a topic accepts (its own setting, or the broker's default it inherits).
pub async fn max_message_bytes(brokers: &str, kafka: &KafkaConfig, topic: &str) -> Result<usize, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = super::client_config(brokers, &kafka.librdkafka).create().map_err(KafkaError::client(format!("admin client for {brokers}")))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let what = format!("describing the configuration of {topic}");
    // a topic created a moment ago may be described without its entries yet: ask again briefly
    for _ in 0..30 {
        let found = admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await.map_err(KafkaError::broker(what.clone()))?;
        let resource = found.into_iter().next().ok_or_else(|| KafkaError::MissingTopic { topic: topic.to_string() })?;
        let resource = resource.map_err(|code| KafkaError::Broker { what: what.clone(), source: rdkafka::error::KafkaError::AdminOp(code) })?;
        if let Some(v) = resource.get("max.message.bytes").and_then(|e| e.value.as_deref()).and_then(|v| v.parse().ok()) {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(KafkaError::Timeout { what: format!("{what}: max.message.bytes"), seconds: 9 })
}
