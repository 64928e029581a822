//! The monitor's outbox: everything the stage publishes (window snapshots, alerts, decisions, dead
//! letters) is first written to RocksDB in the same batch as the state and input offsets that
//! caused it, then published; a confirmed message is deleted. After a crash the outbox is read back
//! against the output topics (by the `event-id` header) so nothing is published twice and nothing
//! is lost: each output is published exactly once.

use std::{collections::{BTreeMap, BTreeSet}, time::Duration};

use rdkafka::{consumer::BaseConsumer, message::Message};
use serde::{Deserialize, Serialize};

use super::{records::WindowMetrics, state::Emitted, MonitorError, MonitorStage, EVENT_ID, META_PUBLISHED_PREFIX};
use crate::{
    codec::{self, Record, WireFormat},
    config::PipelineConfig,
    kafka::{self, headers as h, KafkaError, RangeCursor},
    state::{StateBatch, CF_META, CF_OUTBOX},
};

/// A message waiting for its delivery report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutboxMessage {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub payload_hex: String,
    pub headers: Vec<(String, String)>,
}

impl MonitorStage {
    /// Publishes outbox messages at once (see [`super::writer::Sink::publish`]); no batch may be in
    /// the write-behind.
    pub(super) fn publish(&mut self, outbox: Vec<(Vec<u8>, OutboxMessage)>) -> Result<(), MonitorError> {
        self.sink().publish(outbox)
    }

    /// After a restart: publish what the outbox holds, except messages already on their topic.
    pub(super) fn recover_outbox(&mut self) -> Result<(), MonitorError> {
        let pending: Vec<(Vec<u8>, OutboxMessage)> = self.store.scan_json(CF_OUTBOX)?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut published: BTreeSet<String> = BTreeSet::new();
        let topics: BTreeSet<String> = pending.iter().map(|(_, m)| m.topic.clone()).collect();
        for t in topics {
            published.extend(self.read_back_event_ids(&t)?);
        }
        let (done, todo): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, m)| published.contains(&m.event_id));
        tracing::info!(already_published = done.len(), to_publish = todo.len(), "recovering outbox");
        if !done.is_empty() {
            let mut b = StateBatch::default();
            for (k, _) in &done {
                b.delete(&self.store, CF_OUTBOX, k);
            }
            self.write(b)?;
        }
        self.publish(todo)
    }

    /// Event ids on `topic` after the last confirmed positions.
    fn read_back_event_ids(&self, topic: &str) -> Result<BTreeSet<String>, MonitorError> {
        let consumer: BaseConsumer = kafka::reader_config(&self.brokers, "payslip-monitor-readback", &self.cfg.kafka.librdkafka)
            .create()
            .map_err(KafkaError::client("the read-back consumer"))?;
        let mut confirmed: BTreeMap<i32, i64> = BTreeMap::new();
        for p in kafka::partitions_of(&consumer, topic, Duration::from_secs(30))? {
            if let Some(c) = self.store.get_json::<i64>(CF_META, format!("{META_PUBLISHED_PREFIX}{topic}/{p}").as_bytes())? {
                confirmed.insert(p, c);
            }
        }
        let cursor = RangeCursor::to_end(consumer, topic, |p, lo, _| confirmed.get(&p).map(|c| c + 1).unwrap_or(lo), format!("reading back {topic}"))?;
        let mut ids = BTreeSet::new();
        cursor.for_each(Duration::from_secs(60), |m| {
            if let Some(id) = h::get(m.headers(), EVENT_ID) {
                ids.insert(id);
            }
            Ok::<(), MonitorError>(())
        })?;
        Ok(ids)
    }
}

/// Payload bytes a monitor dead letter keeps; longer payloads are cut and described by their size
/// and sha256, so the dead letter always fits the producer's limit.
const DEAD_LETTER_PAYLOAD_BYTES: usize = 256 * 1024;

/// A result, feedback or command the monitor could not use: its key, headers and (up to
/// [`DEAD_LETTER_PAYLOAD_BYTES`] of) its bytes, with the reason and where it came from. It leaves
/// through the outbox, so it is published exactly once like every other monitor output.
pub(super) fn monitor_dead_letter(cfg: &PipelineConfig, m: &rdkafka::message::BorrowedMessage<'_>, class: &str, reason: &str) -> OutboxMessage {
    use rdkafka::message::Headers;
    use sha2::Digest;
    let payload = m.payload().unwrap_or_default();
    let mut headers: Vec<(String, String)> = m
        .headers()
        .map(|hs| hs.iter().filter(|x| x.key != EVENT_ID).map(|x| (x.key.to_string(), x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect())
        .unwrap_or_default();
    headers.extend([
        (h::ERROR_CLASS.to_string(), class.to_string()),
        (h::ERROR_MESSAGE.to_string(), reason.to_string()),
        (h::SOURCE_TOPIC.to_string(), m.topic().to_string()),
        (h::SOURCE_PARTITION.to_string(), m.partition().to_string()),
        (h::SOURCE_OFFSET.to_string(), m.offset().to_string()),
    ]);
    let kept = &payload[..payload.len().min(DEAD_LETTER_PAYLOAD_BYTES)];
    if kept.len() < payload.len() {
        headers.push(("dlq.original-size".into(), payload.len().to_string()));
        headers.push(("dlq.original-sha256".into(), hex::encode(sha2::Sha256::digest(payload))));
    }
    OutboxMessage {
        event_id: format!("dlq:{}/{}/{}", m.topic(), m.partition(), m.offset()),
        topic: cfg.topics.monitor_dlq.clone(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
        payload_hex: hex::encode(kept),
        headers: headers.into_iter().chain([(EVENT_ID.to_string(), format!("dlq:{}/{}/{}", m.topic(), m.partition(), m.offset()))]).collect(),
    }
}

impl crate::config::MonitorConfig {
    pub(crate) fn encode(&self, cfg: &PipelineConfig, e: &Emitted) -> OutboxMessage {
        let (topic, key, format, schema, payload) = match e {
            Emitted::Metrics(m) => (&cfg.topics.metrics, m.metrics_id.clone(), self.metrics_format, WindowMetrics::SCHEMA_NAME, codec::encode(m, self.metrics_format)),
            Emitted::Alert(a) => (&cfg.topics.alerts, a.alert_id.clone(), self.alerts_format, crate::alert::AlertEvent::SCHEMA_NAME, codec::encode(a, self.alerts_format)),
            Emitted::Decision(d) => (&cfg.topics.decisions, d.rollout_id.clone(), cfg.rollout.decisions_format, crate::rollout::RolloutDecision::SCHEMA_NAME, codec::encode(d, cfg.rollout.decisions_format)),
        };
        // our own records always encode; fall back to JSON rather than lose the event
        let (payload, format) = match payload {
            Ok(p) => (p, format),
            Err(err) => {
                tracing::error!(error = %err, "monitor record encoding failed; publishing JSON");
                let json = match e {
                    Emitted::Metrics(m) => serde_json::to_vec(m),
                    Emitted::Alert(a) => serde_json::to_vec(a),
                    Emitted::Decision(d) => serde_json::to_vec(d),
                };
                (json.unwrap_or_default(), WireFormat::Json)
            }
        };
        let mut headers = vec![
            (h::CONTENT_TYPE.to_string(), format.content_type().to_string()),
            (h::SCHEMA.to_string(), schema.to_string()),
            (EVENT_ID.to_string(), e.event_id()),
        ];
        match e {
            Emitted::Metrics(m) => {
                headers.push(("subject".into(), format!("{}/{}/{}", m.model, m.version, m.cohort)));
                headers.push(("window".into(), format!("{}..{}", m.window_start, m.window_end)));
            }
            Emitted::Alert(a) => {
                headers.push(("alert-code".into(), a.code.clone()));
                headers.push(("alert-status".into(), a.status.clone()));
                headers.push(("subject".into(), format!("{}/{}/{}", a.model, a.version, a.cohort)));
                headers.push(("window".into(), format!("{}..{}", a.window_start, a.window_end)));
            }
            Emitted::Decision(d) => {
                headers.push(("rollout-action".into(), d.action.to_string()));
                headers.push(("rollout-status".into(), d.status.to_string()));
                headers.push(("rollout-phase".into(), d.phase.to_string()));
                headers.push(("traffic-percent".into(), d.traffic_percent.to_string()));
                headers.push((h::MODEL_VERSIONS.into(), format!("{}={}(candidate),{}(baseline)", d.model, d.candidate_version, d.baseline_version)));
                if let Some(op) = &d.operator {
                    headers.push(("operator".into(), op.clone()));
                }
                if let (Some(s), Some(e)) = (d.window_start, d.window_end) {
                    headers.push(("window".into(), format!("{s}..{e}")));
                }
            }
        }
        OutboxMessage { event_id: e.event_id(), topic: topic.clone(), key, payload_hex: hex::encode(payload), headers }
    }
}
