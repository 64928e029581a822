//! The records the infer stage publishes: one `InferenceResult` per decoded document, or a dead
//! letter (original key, bytes and headers plus the reason) per message it could not use.

use rdkafka::message::{Message, OwnedMessage};
use sha2::{Digest, Sha256};

use crate::{
    codec::{self, Record},
    config::PipelineConfig,
    document::{InferenceResult, PayslipDocument},
    kafka::{headers as h, headers::HeaderSet, KafkaError},
    rollout::routing::Route,
    telemetry::ProcessSample,
};

/// One message to produce, with where it goes.
pub(crate) struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HeaderSet,
    pub is_result: bool,
    pub has_error: bool,
    /// A dead letter's class (`payslip_infer_dead_letters_total{class}` counts it once it is
    /// committed or delivered, not when it is made: an aborted batch is made again).
    pub dead_class: Option<&'static str>,
}

/// What one input message became, and its position.
pub(crate) struct Processed {
    pub out: Outgoing,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Fault injection (`fault-txn-abort` header, `faults.enabled`): the first transaction that
    /// holds this message is aborted just before its commit.
    pub abort_once: bool,
}

fn source_of(m: &OwnedMessage) -> String {
    format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
}

pub(super) fn dead_letter(cfg: &PipelineConfig, m: &OwnedMessage, class: &'static str, message: &str) -> Outgoing {
    let headers = HeaderSet::new()
        .copy_from(m.headers())
        .with(h::ERROR_CLASS, class)
        .with(h::ERROR_MESSAGE, message)
        .with(h::SOURCE_TOPIC, m.topic())
        .with(h::SOURCE_PARTITION, m.partition().to_string())
        .with(h::SOURCE_OFFSET, m.offset().to_string())
        .with("dead-lettered-at", chrono::Utc::now().to_rfc3339());
    Outgoing {
        topic: cfg.topics.documents_dlq.clone(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        is_result: false,
        has_error: false,
        dead_class: Some(class),
    }
}

pub(super) fn result_message(
    cfg: &PipelineConfig,
    m: &OwnedMessage,
    doc: PayslipDocument,
    outputs: Vec<crate::document::ModelOutput>,
    route: &Route,
    sample: &ProcessSample,
) -> Outgoing {
    // what ran this document: its outputs' providers (a canary may run elsewhere than the baseline)
    let provider = crate::inference::provider_of(outputs.iter().map(|o| o.provider.as_str()));
    let provider = provider.as_str();
    let now = chrono::Utc::now().timestamp_millis();
    let produced_at = m.timestamp().to_millis().unwrap_or(doc.submitted_at);
    let error_code = outputs.iter().find_map(|o| o.error_code.clone());
    let result = InferenceResult {
        result_id: InferenceResult::id_for(&doc.document_id),
        document_id: doc.document_id.clone(),
        user_id: doc.user_id,
        tenant: doc.tenant,
        cohort: route.cohort.into(),
        submitted_at: doc.submitted_at,
        processed_at: now,
        provider: provider.to_string(),
        model_versions: route.versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inference_ms: outputs.iter().map(|o| o.latency_ms).sum(),
        outputs,
        end_to_end_ms: (now - produced_at).max(0) as f64,
        error_code: error_code.clone(),
        true_format: doc.labels.map(|l| l.format),
        source: source_of(m),
        process_rss_bytes: sample.rss_bytes.map(|b| b as i64),
        process_cpu_percent: sample.cpu_percent,
    };
    let format = cfg.topics.inference_format;
    let has_error = error_code.is_some();
    let (payload, error_headers) = match codec::encode(&result, format) {
        Ok(p) => (p, None),
        // Our own record failed to encode: a defect. Still answer the document, as JSON, loudly.
        Err(e) => {
            tracing::error!(error = %e, "result encoding failed");
            (serde_json::to_vec(&result).unwrap_or_default(), Some(e.to_string()))
        }
    };
    let trace = h::get(m.headers(), h::TRACE_ID).unwrap_or_else(|| format!("{:016x}", fnv(&doc.document_id)));
    let mut headers = HeaderSet::new()
        .with(h::CONTENT_TYPE, if error_headers.is_some() { codec::CONTENT_TYPE_JSON } else { format.content_type() })
        .with(h::SCHEMA, InferenceResult::SCHEMA_NAME)
        .with(h::RESULT_ID, &result.result_id)
        .with(h::TRACE_ID, trace)
        .with(h::MODEL_VERSIONS, route.versions.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        .with(h::PROVIDER, provider)
        .with(h::SOURCE, &result.source)
        .with(h::COHORT, route.cohort);
    if !route.stamp.is_empty() {
        headers = headers.with(h::ROLLOUT, &route.stamp);
    }
    if let Some(code) = &error_code {
        headers = headers.with("error-code", code);
    }
    // a re-driven dead letter keeps its history (`dlq replay`): carried over to its result
    if let Some(hs) = m.headers() {
        use rdkafka::message::Headers;
        for x in hs.iter().filter(|x| x.key.starts_with("dlq.")) {
            headers = headers.with(x.key, String::from_utf8_lossy(x.value.unwrap_or_default()));
        }
    }
    Outgoing { topic: cfg.topics.inference.clone(), key: Some(doc.document_id.into_bytes()), payload, headers, is_result: true, has_error, dead_class: None }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Payload bytes kept in a shortened dead letter: well under librdkafka's default
/// `message.max.bytes` (1,000,000) and the broker's default, with room for the headers.
const SHORTENED_PAYLOAD_BYTES: usize = 256 * 1024;

/// A dead letter that fits: the key and headers, the reason, the original size and sha256, and the
/// first [`SHORTENED_PAYLOAD_BYTES`] of the payload.
pub(super) fn shortened_dead_letter(cfg: &PipelineConfig, original: &Outgoing, refusal: &KafkaError) -> Outgoing {
    let keep = original.payload.len().min(SHORTENED_PAYLOAD_BYTES);
    let headers = original
        .headers
        .clone()
        .with("dlq.original-size", original.payload.len().to_string())
        .with("dlq.original-sha256", hex::encode(Sha256::digest(&original.payload)))
        .with("dlq.truncated-to", keep.to_string())
        .with("dlq.truncated-because", refusal.to_string());
    Outgoing { topic: cfg.topics.documents_dlq.clone(), key: original.key.clone(), payload: original.payload[..keep].to_vec(), headers, is_result: false, has_error: false, dead_class: original.dead_class }
}
