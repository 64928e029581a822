//! The Alertmanager bridge: forwards the alert events of `litert.alerts.v1` to Alertmanager's v2
//! API (`POST /api/v2/alerts`), so an on-call team routes them with the tools it has (critical to
//! a pager, warnings to chat, by the `severity` label).
//!
//! Mapping: one Alertmanager alert per alert episode. Labels: `alertname` (the event's code),
//! `severity` (`critical`/`warning`), `rule`, `model`, `version`, `cohort`, `service`
//! (`payslip-stream`) and `alert_id` (the episode), so a RESOLVED event matches its FIRING one.
//! Annotations: `summary`, `action` (the runbook's action), `value`, `threshold`. A FIRING alert is
//! sent with `endsAt` three resend intervals ahead and sent again every
//! `alerts.forward.resend_interval_ms` while it fires (as Prometheus does), so Alertmanager never
//! times it out; a RESOLVED one is sent with `endsAt` = when it resolved.
//!
//! Delivery: at least once, nothing lost while the events are on the topic. The bridge's progress
//! is the committed offset of its consumer group (`<infer group>-alertmanager`), committed only
//! after Alertmanager accepted the event; while Alertmanager is down, overloaded or failing
//! (unreachable, 5xx, 429) the bridge retries with backoff (1 s doubling to 30 s) and reads nothing
//! further. A 4xx answer means the post itself is wrong: it is logged at error level with the
//! alert, counted (`refused`) and passed, since sending it again could only block the bridge. At start it reads the topic from
//! its beginning to rebuild which alerts fire (events before the committed offset are not sent
//! again; those after are). Re-sending an event is harmless: Alertmanager deduplicates by labels.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    message::{Message, OwnedMessage},
    Offset, TopicPartitionList,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AlertEvent;
use crate::{
    codec,
    config::{invalid, ConfigError, PipelineConfig},
    kafka::{self, headers as h, KafkaError},
};

/// `alerts.forward` in the pipeline configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// e.g. `http://alertmanager:9093`; absent: nothing is forwarded.
    #[serde(default)]
    pub alertmanager_url: Option<String>,
    #[serde(default = "default_resend")]
    pub resend_interval_ms: u64,
}

fn default_resend() -> u64 { 60_000 }

impl Default for ForwardConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all forward fields have defaults")
    }
}

/// The top-level `alerts` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub forward: ForwardConfig,
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.forward.alertmanager_url {
            if !u.starts_with("http://") {
                return Err(invalid("alerts.forward.alertmanager_url", format!("{u:?}: use http://HOST:PORT (https is not supported yet; put a TLS proxy in front)")));
            }
        }
        if !(1_000..=3_600_000).contains(&self.forward.resend_interval_ms) {
            return Err(invalid("alerts.forward.resend_interval_ms", format!("is {}; use 1000 to 3600000", self.forward.resend_interval_ms)));
        }
        Ok(())
    }
}

/// What the bridge did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ForwardSummary {
    /// Events accepted by Alertmanager (resends not counted).
    pub forwarded: u64,
    /// Failed posts that were retried.
    pub retries: u64,
    /// Events Alertmanager refused for good (a 4xx answer): logged with the alert, not sent again.
    pub refused: u64,
    /// Events on the topic that could not be decoded (skipped, with a warning).
    pub undecodable: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The Alertmanager v2 alert for an event; `now_ms` places a firing alert's `endsAt`.
pub fn alertmanager_alert(e: &AlertEvent, now_ms: i64, resend_ms: u64) -> serde_json::Value {
    let firing = e.status == "FIRING";
    let ends = if firing { now_ms + 3 * resend_ms as i64 } else { e.emitted_at.min(now_ms) };
    json!({
        "labels": {
            "alertname": e.code,
            "severity": e.severity.to_ascii_lowercase(),
            "rule": e.rule,
            "model": e.model,
            "version": e.version,
            "cohort": e.cohort,
            "service": "payslip-stream",
            "alert_id": e.alert_id,
        },
        "annotations": {
            "summary": format!("{} {} is {} (threshold {}) on {} {} ({}), {} samples", e.rule, e.metric, e.value, e.threshold, e.model, e.version, e.cohort, e.samples),
            "action": e.action,
            "value": e.value.to_string(),
            "threshold": e.threshold.to_string(),
        },
        "startsAt": rfc3339(e.episode_start.min(now_ms)),
        "endsAt": rfc3339(ends.max(e.episode_start.min(now_ms))),
    })
}

/// Why Alertmanager did not take a post.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("Alertmanager answered {code}: {body}")]
    Refused { code: u16, body: String },
    #[error("Alertmanager unreachable: {0}")]
    Unreachable(String),
}

impl PostError {
    /// Whether the same post may succeed later: Alertmanager away, overloaded or failing (5xx,
    /// 429). A 4xx is the post itself being wrong; sending it again would block the bridge forever.
    pub fn retryable(&self) -> bool {
        match self {
            PostError::Unreachable(_) => true,
            PostError::Refused { code, .. } => *code >= 500 || *code == 429 || *code == 408,
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, alerts: &[serde_json::Value]) -> Result<(), PostError> {
    match agent.post(&format!("{}/api/v2/alerts", url.trim_end_matches('/'))).send_json(serde_json::Value::Array(alerts.to_vec())) {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, r)) => Err(PostError::Refused { code, body: r.into_string().unwrap_or_default() }),
        Err(e) => Err(PostError::Unreachable(e.to_string())),
    }
}

/// How a post ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    Accepted,
    /// Refused for good (a 4xx): logged and counted, not sent again.
    Refused,
    /// `stop` was set before Alertmanager accepted it.
    Stopped,
}

/// Posts until Alertmanager accepts, refuses for good, or `stop` is set.
fn post_until_accepted(agent: &ureq::Agent, url: &str, alerts: &[serde_json::Value], stop: &AtomicBool, summary: &mut ForwardSummary, live: &Mutex<ForwardSummary>) -> Posted {
    let mut backoff = Duration::from_secs(1);
    loop {
        match post(agent, url, alerts) {
            Ok(()) => return Posted::Accepted,
            Err(why) if !why.retryable() => {
                summary.refused += 1;
                *live.lock().unwrap_or_else(|p| p.into_inner()) = summary.clone();
                tracing::error!(%url, error = %why, alerts = %serde_json::Value::Array(alerts.to_vec()), "Alertmanager refused the alerts; not sent again");
                return Posted::Refused;
            }
            Err(why) => {
                summary.retries += 1;
                *live.lock().unwrap_or_else(|p| p.into_inner()) = summary.clone();
                tracing::warn!(%url, error = %why, retry_in_s = backoff.as_secs(), "cannot forward alerts to Alertmanager; the events stay on the topic and are retried");
            }
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Posted::Stopped;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn decode(m: &OwnedMessage) -> Option<AlertEvent> {
    let ct = h::get(m.headers(), h::CONTENT_TYPE);
    codec::decode::<AlertEvent>(m.payload()?, ct.as_deref()).map_err(|e| tracing::warn!(error = %e, partition = m.partition(), offset = m.offset(), "undecodable alert event not forwarded")).ok()
}

/// The bridge's state while it runs.
struct Bridge {
    url: String,
    resend_ms: u64,
    topic: String,
    agent: ureq::Agent,
    /// Offsets forwarded before this run, per partition.
    committed: BTreeMap<i32, i64>,
    /// Alerts firing now, by alert id (what the periodic resend sends).
    firing: BTreeMap<String, AlertEvent>,
    summary: ForwardSummary,
    /// A copy of `summary` others may read while the bridge runs.
    live: Arc<Mutex<ForwardSummary>>,
}

impl Bridge {
    /// Applies one event; false when stopped before Alertmanager accepted it.
    fn handle(&mut self, m: &OwnedMessage, consumer: &BaseConsumer, stop: &AtomicBool) -> Result<bool, ForwardError> {
        let Some(e) = decode(m) else {
            self.summary.undecodable += 1;
            return Ok(true);
        };
        if e.status == "FIRING" {
            self.firing.insert(e.alert_id.clone(), e.clone());
        } else {
            self.firing.remove(&e.alert_id);
        }
        if m.offset() < self.committed.get(&m.partition()).copied().unwrap_or(0) {
            return Ok(true); // forwarded before
        }
        let alert = alertmanager_alert(&e, chrono::Utc::now().timestamp_millis(), self.resend_ms);
        match post_until_accepted(&self.agent, &self.url, &[alert], stop, &mut self.summary, &self.live) {
            Posted::Stopped => return Ok(false),
            Posted::Refused => {}
            Posted::Accepted => {
                self.summary.forwarded += 1;
                *self.live.lock().unwrap_or_else(|p| p.into_inner()) = self.summary.clone();
                tracing::info!(alert_id = %e.alert_id, code = %e.code, status = %e.status, "alert forwarded to Alertmanager");
            }
        }
        let mut done = TopicPartitionList::new();
        done.add_partition_offset(&self.topic, m.partition(), Offset::Offset(m.offset() + 1)).map_err(KafkaError::broker("offset"))?;
        consumer.commit(&done, CommitMode::Sync).map_err(KafkaError::broker(format!("commit the Alertmanager bridge's offset on {}", self.topic)))?;
        Ok(true)
    }

    /// Sends every firing alert again with a fresh `endsAt`, so Alertmanager keeps it active.
    fn resend(&mut self, stop: &AtomicBool) {
        if self.firing.is_empty() {
            return;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let alerts: Vec<serde_json::Value> = self.firing.values().map(|e| alertmanager_alert(e, now, self.resend_ms)).collect();
        post_until_accepted(&self.agent, &self.url, &alerts, stop, &mut self.summary, &self.live);
    }
}

/// Forwards until `stop` is set. Blocking: run it on its own thread.
pub fn run(cfg: &PipelineConfig, brokers: &str, stop: Arc<AtomicBool>) -> Result<ForwardSummary, ForwardError> {
    run_observed(cfg, brokers, stop, Arc::default())
}

/// [`run`], keeping a copy of its summary in `live` as it changes (retries, events forwarded).
pub fn run_observed(cfg: &PipelineConfig, brokers: &str, stop: Arc<AtomicBool>, live: Arc<Mutex<ForwardSummary>>) -> Result<ForwardSummary, ForwardError> {
    let Some(url) = cfg.alerts.forward.alertmanager_url.clone() else { return Ok(ForwardSummary::default()) };
    let topic = cfg.topics.alerts.clone();
    let group = format!("{}-alertmanager", cfg.kafka.infer_group);
    let consumer: BaseConsumer = kafka::reader_config(brokers, &group, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the Alertmanager bridge's reader"))?;
    // what was forwarded before: the group's committed offsets
    let parts = kafka::partitions_of(&consumer, &topic, Duration::from_secs(30))?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(&topic, *p);
    }
    let committed: BTreeMap<i32, i64> = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .map_err(KafkaError::broker(format!("committed offsets of {group}")))?
        .elements()
        .iter()
        .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { o } else { 0 }))
        .collect();
    tracing::info!(%url, %topic, %group, ?committed, "forwarding alert events to Alertmanager");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let mut bridge = Bridge { url, resend_ms: cfg.alerts.forward.resend_interval_ms, topic: topic.clone(), agent, committed, firing: BTreeMap::new(), summary: ForwardSummary::default(), live };
    // from the beginning (to know what fires), then on past the end as events come
    let mut cursor = kafka::RangeCursor::to_end(consumer, &topic, |_, lo, _| lo, format!("reading {topic}"))?.including_past_end();
    while !cursor.done() {
        if stop.load(Ordering::Relaxed) {
            return Ok(bridge.summary);
        }
        let Some(m) = cursor.next(Duration::from_millis(200))?.map(|m| m.detach()) else { continue };
        if !bridge.handle(&m, cursor.consumer(), &stop)? {
            return Ok(bridge.summary);
        }
    }
    let consumer = cursor.into_consumer();
    let resend = Duration::from_millis(bridge.resend_ms);
    let mut last_resend = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_resend.elapsed() >= resend {
            last_resend = Instant::now();
            bridge.resend(&stop);
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let m = m.detach();
                if !bridge.handle(&m, &consumer, &stop)? {
                    break;
                }
            }
            Some(Err(e)) if kafka::error::is_fatal_consumer_error(&e) => return Err(KafkaError::Broker { what: format!("reading {topic}"), source: e }.into()),
            Some(Err(e)) => tracing::warn!(error = %e, "Alertmanager bridge: consume error"),
            None => {}
        }
    }
    Ok(bridge.summary)
}

#[cfg(test)]
mod post_tests {
    use super::PostError;

    #[test]
    fn only_what_may_succeed_later_is_retried() {
        assert!(PostError::Unreachable("connection refused".into()).retryable());
        for code in [500, 502, 503, 429, 408] {
            assert!(PostError::Refused { code, body: String::new() }.retryable(), "{code}");
        }
        for code in [400, 404, 422] {
            assert!(!PostError::Refused { code, body: String::new() }.retryable(), "{code}");
        }
    }
}
