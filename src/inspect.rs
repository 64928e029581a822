//! `inspect`: reads any project topic and prints one JSON object per message (position, timestamp,
//! key, headers, decoded value), which kcat cannot do for Avro values. Positions use kcat's words
//! ([`crate::kafka::range`]: `beginning`, `end`, `N`, `-N`, `s@MS`, or an RFC 3339 time). It assigns
//! partitions directly (no consumer group, nothing committed) and, unless `follow` is set, stops at
//! `to` or at the end offsets captured when it started.

use std::{collections::BTreeMap, io::Write, time::Duration};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{BorrowedMessage, Headers, Message},
    Offset, TopicPartitionList,
};

use crate::{
    alert::AlertEvent,
    codec::{self, DecodeError, Record},
    document::{DocumentFeedback, InferenceResult, PayslipDocument},
    kafka::{self, headers as h, KafkaError, RangeCursor},
    monitor::records::WindowMetrics,
};

/// Why a topic could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The output could not be written (a closed pipe, a full disk).
    #[error("cannot write the output: {0}")]
    Write(#[from] std::io::Error),
}

impl InspectError {
    pub fn retryable(&self) -> bool {
        match self {
            InspectError::Kafka(e) => e.retryable(),
            InspectError::Write(_) => false,
        }
    }
}

pub use crate::kafka::range::Bound;

pub struct InspectOptions {
    pub brokers: String,
    pub topic: String,
    pub start: Bound,
    /// Stop before this position (exclusive); default: the end offsets at start (or never, with `follow`).
    pub to: Option<Bound>,
    pub count: Option<u64>,
    pub follow: bool,
    /// Print raster pixels in full instead of their size.
    pub full: bool,
    pub passthrough: BTreeMap<String, String>,
    /// How long to wait for a broker to answer before giving up (`kafka.startup_wait_s`).
    pub startup_wait: std::time::Duration,
}

/// Decodes one value to JSON by its `schema` header, else by what the bytes turn out to be.
pub fn decode_value(schema: Option<&str>, content_type: Option<&str>, bytes: &[u8]) -> Result<serde_json::Value, DecodeError> {
    fn as_json<T: Record + 'static>(b: &[u8], ct: Option<&str>) -> Result<serde_json::Value, DecodeError> {
        let v: T = codec::decode(b, ct)?;
        serde_json::to_value(v).map_err(|e| DecodeError::SchemaMismatch(e.to_string()))
    }
    match schema {
        Some(PayslipDocument::SCHEMA_NAME) => as_json::<PayslipDocument>(bytes, content_type),
        Some(InferenceResult::SCHEMA_NAME) => as_json::<InferenceResult>(bytes, content_type),
        Some(DocumentFeedback::SCHEMA_NAME) => as_json::<DocumentFeedback>(bytes, content_type),
        Some(WindowMetrics::SCHEMA_NAME) => as_json::<WindowMetrics>(bytes, content_type),
        Some(AlertEvent::SCHEMA_NAME) => as_json::<AlertEvent>(bytes, content_type),
        Some(crate::rollout::RolloutDecision::SCHEMA_NAME) => as_json::<crate::rollout::RolloutDecision>(bytes, content_type),
        Some(crate::rollout::RolloutCommand::SCHEMA_NAME) => as_json::<crate::rollout::RolloutCommand>(bytes, content_type),
        _ => serde_json::from_slice(bytes)
            .or_else(|_| as_json::<PayslipDocument>(bytes, content_type))
            .or_else(|_| as_json::<InferenceResult>(bytes, content_type))
            .map_err(|_| DecodeError::Undecodable { format: "json or avro", message: "value is neither JSON nor a known Avro record".into() }),
    }
}

fn shorten_rasters(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(px)) = map.get("pixels") {
                let n = px.len();
                map.insert("pixels".into(), serde_json::Value::String(format!("<{n} bytes>")));
            }
            map.values_mut().for_each(shorten_rasters);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(shorten_rasters),
        _ => {}
    }
}

/// Reads the topic and writes JSON lines to `out`. Returns the number of messages printed.
pub fn inspect(opts: &InspectOptions, out: &mut dyn Write) -> Result<u64, InspectError> {
    // waits for a broker as start-up does: the reason none answers is logged, and after
    // `startup_wait` it is the error
    kafka::admin::reach(&opts.brokers, &opts.passthrough, opts.startup_wait, &std::sync::atomic::AtomicBool::new(false))?;
    let mut cfg = kafka::reader_config(&opts.brokers, "payslip-inspect", &opts.passthrough);
    cfg.set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cfg.create().map_err(KafkaError::client("the inspect consumer"))?;
    let ranges = kafka::range::resolve(&consumer, &opts.topic, opts.start, opts.to)?;
    let mut printed = 0u64;
    let limit_reached = |printed: u64| opts.count.is_some_and(|c| printed >= c);
    if opts.follow && opts.to.is_none() {
        // unbounded: from the start positions on, until the count (or forever)
        let mut tpl = TopicPartitionList::new();
        for r in &ranges {
            tpl.add_partition_offset(&opts.topic, r.partition, Offset::Offset(r.start)).map_err(KafkaError::broker(format!("position {}", opts.topic)))?;
        }
        consumer.assign(&tpl).map_err(KafkaError::broker(format!("assign {}", opts.topic)))?;
        while !limit_reached(printed) {
            let Some(msg) = consumer.poll(Duration::from_millis(500)) else { continue };
            let m = msg.map_err(KafkaError::broker(format!("consume {}", opts.topic)))?;
            writeln!(out, "{}", render(&m, opts.full))?;
            printed += 1;
        }
        return Ok(printed);
    }
    let mut cursor = RangeCursor::open(consumer, ranges.iter().map(|r| (opts.topic.clone(), *r)), format!("reading {}", opts.topic))?;
    while !cursor.done() && !limit_reached(printed) {
        if let Some(m) = cursor.next(Duration::from_millis(500))? {
            writeln!(out, "{}", render(&m, opts.full))?;
            printed += 1;
        }
    }
    Ok(printed)
}

/// One message as a JSON object: position, timestamp, key, headers and the decoded value.
fn render(m: &BorrowedMessage<'_>, full: bool) -> serde_json::Value {
    let headers: BTreeMap<String, String> = m
        .headers()
        .map(|hs| hs.iter().map(|x| (x.key.to_string(), x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect())
        .unwrap_or_default();
    let value = match m.payload() {
        None => serde_json::Value::Null,
        Some(b) => match decode_value(headers.get(h::SCHEMA).map(String::as_str), headers.get(h::CONTENT_TYPE).map(String::as_str), b) {
            Ok(mut v) => {
                if !full {
                    shorten_rasters(&mut v);
                }
                v
            }
            Err(e) => serde_json::json!({ "undecodable": e.to_string(), "bytes": b.len() }),
        },
    };
    serde_json::json!({
        "topic": m.topic(),
        "partition": m.partition(),
        "offset": m.offset(),
        "timestamp": m.timestamp().to_millis(),
        "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": headers,
        "value": value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, WireFormat};

    #[test]
    fn every_project_record_decodes_by_its_schema_header() {
        let doc = crate::synth::Generator::new(Default::default()).document(0).document;
        let alert = crate::alert::update_available("m", "1.0.0", "1.1.0", 5);
        let metrics = WindowMetrics::from_window(
            &crate::window::aggregate::Subject::pipeline(),
            crate::window::WindowRange { start_ms: 0, end_ms: 10 },
            &Default::default(),
            &Default::default(),
        );
        for f in [WireFormat::Avro, WireFormat::Json] {
            let v = decode_value(Some(PayslipDocument::SCHEMA_NAME), Some(f.content_type()), &encode(&doc, f).unwrap()).unwrap();
            assert_eq!(v["document_id"], doc.document_id.as_str());
            let v = decode_value(Some(AlertEvent::SCHEMA_NAME), Some(f.content_type()), &encode(&alert, f).unwrap()).unwrap();
            assert_eq!(v["code"], "MODEL_UPDATE_AVAILABLE");
            let v = decode_value(Some(WindowMetrics::SCHEMA_NAME), Some(f.content_type()), &encode(&metrics, f).unwrap()).unwrap();
            assert_eq!(v["metrics_id"], metrics.metrics_id.as_str());
        }
    }
}
