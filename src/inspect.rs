//! `inspect`: reads any project topic and prints one JSON object per message (position, timestamp,
//! key, headers, decoded value), which kcat cannot do for Avro values. Positions use kcat's words
//! ([`crate::kafka::range`]: `beginning`, `end`, `N`, `-N`, `s@MS`, or an RFC 3339 time). It assigns
//! partitions directly (no consumer group, nothing committed) and, unless `follow` is set, stops at
//! `to` or at the end offsets captured when it started.

use std::{collections::BTreeMap, io::Write, time::Duration};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    Offset, TopicPartitionList,
};

use crate::{
    alert::AlertEvent,
    codec::{self, Record},
    monitor::records::WindowMetrics,
    document::{DocumentFeedback, InferenceResult, PayslipDocument},
    kafka::headers as h,
};

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
}

/// Decodes one value to JSON by its `schema` header, else by what the bytes turn out to be.
pub fn decode_value(schema: Option<&str>, content_type: Option<&str>, bytes: &[u8]) -> Result<serde_json::Value, String> {
    fn as_json<T: Record + 'static>(b: &[u8], ct: Option<&str>) -> Result<serde_json::Value, String> {
        let v: T = codec::decode(b, ct).map_err(|e| e.to_string())?;
        serde_json::to_value(v).map_err(|e| e.to_string())
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
            .map_err(|_| "value is neither JSON nor a known Avro record".to_string()),
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
pub fn inspect(opts: &InspectOptions, out: &mut dyn Write) -> Result<u64, String> {
    let mut cfg = crate::kafka::client_config(&opts.brokers, &opts.passthrough);
    cfg.set("group.id", "payslip-inspect").set("enable.auto.commit", "false").set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cfg.create().map_err(|e| format!("cannot create consumer: {e}"))?;
    let ranges = crate::kafka::range::resolve(&consumer, &opts.topic, opts.start, opts.to)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &ranges {
        tpl.add_partition_offset(&opts.topic, r.partition, Offset::Offset(r.start)).map_err(|e| e.to_string())?;
        if !r.is_empty() && !(opts.follow && opts.to.is_none()) {
            remaining.insert(r.partition, r.end);
        }
    }
    let bounded = !(opts.follow && opts.to.is_none());
    consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let mut printed = 0u64;
    while !bounded || !remaining.is_empty() {
        if opts.count.is_some_and(|c| printed >= c) {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else { continue };
        let m = msg.map_err(|e| format!("consume: {e}"))?;
        if bounded {
            match remaining.get(&m.partition()) {
                Some(end) if m.offset() < *end => {
                    if m.offset() + 1 >= *end {
                        remaining.remove(&m.partition());
                    }
                }
                _ => continue, // past this partition's end
            }
        }
        let headers: BTreeMap<String, String> = m
            .headers()
            .map(|hs| hs.iter().map(|x| (x.key.to_string(), x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect())
            .unwrap_or_default();
        let value = match m.payload() {
            None => serde_json::Value::Null,
            Some(b) => match decode_value(headers.get(h::SCHEMA).map(String::as_str), headers.get(h::CONTENT_TYPE).map(String::as_str), b) {
                Ok(mut v) => {
                    if !opts.full {
                        shorten_rasters(&mut v);
                    }
                    v
                }
                Err(e) => serde_json::json!({ "undecodable": e, "bytes": b.len() }),
            },
        };
        let line = serde_json::json!({
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
            "timestamp": m.timestamp().to_millis(),
            "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": headers,
            "value": value,
        });
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        printed += 1;
    }
    Ok(printed)
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
            0,
            0,
            10,
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
