//! One batch of the infer stage, on a blocking thread: decode and validate each message (bad ones
//! become dead letters), route each document to its model versions, run each model once per set
//! of versions, and build one answer per input message, in input order.

use std::collections::BTreeMap;

use rdkafka::message::{Message, OwnedMessage};

use super::messages::{dead_letter, result_message, Processed};
use crate::{
    codec,
    config::PipelineConfig,
    document::PayslipDocument,
    inference::{ModelRegistry, RunFailure},
    kafka::headers as h,
    rollout::routing::{Route, Routing},
    telemetry::InferCounters,
};

/// Decode, validate, route, infer and encode one batch. Runs on a blocking thread.
/// `live`: event times are checked against the wall clock (`limits.max_past_ms` / `max_future_ms`);
/// a backfill of recorded documents passes false.
///
/// Returns [`RunFailure`] when ONNX Runtime failed a model run every time it was tried: then nothing
/// of the batch may be published or acknowledged.
pub(crate) fn process_batch(cfg: &PipelineConfig, registry: &ModelRegistry, routing: &std::sync::RwLock<Routing>, counters: &InferCounters, batch: Vec<OwnedMessage>, live: bool) -> Result<Vec<Processed>, RunFailure> {
    let now = live.then(|| chrono::Utc::now().timestamp_millis());
    let limits = cfg.limits.document_limits();
    let mut docs: Vec<(usize, PayslipDocument)> = Vec::new();
    let mut delay_ms = 0u64;
    let mut forced_errors: BTreeMap<usize, String> = BTreeMap::new();
    let mut runtime_failures = 0u32;
    let abort_once = |m: &OwnedMessage| cfg.faults.enabled && h::get(m.headers(), "fault-txn-abort").is_some();
    let mut slots: Vec<Option<Processed>> = Vec::with_capacity(batch.len());
    for (i, m) in batch.iter().enumerate() {
        match decode_document(m, cfg, &limits, now) {
            Ok(d) => {
                if cfg.faults.enabled {
                    if let Some(ms) = h::get(m.headers(), "fault-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
                        delay_ms = delay_ms.max(ms.min(cfg.faults.max_delay_ms));
                    }
                    if let Some(model) = h::get(m.headers(), "fault-error") {
                        forced_errors.insert(i, model);
                    }
                    // the batch's next N model runs fail inside ONNX Runtime's place
                    if let Some(n) = h::get(m.headers(), "fault-ort-failures").and_then(|v| v.parse::<u32>().ok()) {
                        runtime_failures = runtime_failures.max(n.min(100));
                    }
                }
                docs.push((i, d));
                slots.push(None);
            }
            Err((class, message)) => {
                tracing::warn!(class, %message, topic = m.topic(), partition = m.partition(), offset = m.offset(), "document dead-lettered");
                slots.push(Some(Processed { out: dead_letter(cfg, m, class, &message), topic: m.topic().into(), partition: m.partition(), offset: m.offset(), abort_once: abort_once(m) }));
            }
        }
    }
    if !docs.is_empty() {
        // one route per document, then one model run per distinct set of versions
        let routes: Vec<Route> = {
            let r = routing.read().unwrap_or_else(|p| p.into_inner());
            docs.iter().map(|(_, d)| r.route(registry.served_versions(), &d.user_id)).collect()
        };
        let mut groups: BTreeMap<&BTreeMap<String, String>, Vec<usize>> = BTreeMap::new();
        for (k, r) in routes.iter().enumerate() {
            groups.entry(&r.versions).or_default().push(k);
        }
        if delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
        let mut outputs: Vec<Vec<crate::document::ModelOutput>> = vec![Vec::new(); docs.len()];
        for (versions, members) in &groups {
            // runs of at most `max_lines_per_run` text lines (a document always fits one run)
            for run in runs_by_lines(members, |k| lines_of(&docs[k].1), cfg.batching.max_lines_per_run) {
                let refs: Vec<&PayslipDocument> = run.iter().map(|&k| &docs[k].1).collect();
                for (&k, outs) in run.iter().zip(registry.infer_with_faults(&refs, versions, &mut runtime_failures)?) {
                    outputs[k] = outs;
                }
            }
        }
        for ((i, _), outs) in docs.iter().zip(outputs.iter_mut()) {
            if delay_ms > 0 {
                for o in outs.iter_mut() {
                    o.latency_ms += delay_ms as f64;
                }
            }
            // `fault-error: MODEL` fails that model; `MODEL@VERSION` only when that version ran
            if let Some(target) = forced_errors.get(i) {
                let (model, version) = target.split_once('@').map(|(m, v)| (m, Some(v))).unwrap_or((target.as_str(), None));
                for o in outs.iter_mut().filter(|o| o.model == model && version.is_none_or(|v| v == o.version)) {
                    o.error_code = Some(crate::inference::codes::INFERENCE_FAILED.into());
                }
            }
        }
        let model_us: f64 = outputs.iter().flatten().map(|o| o.latency_ms * 1000.0).sum();
        counters.inference_us.fetch_add(model_us as u64, std::sync::atomic::Ordering::Relaxed);
        counters.inferred_documents.fetch_add(outputs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let sample = counters.process.sample();
        for (((i, doc), outs), route) in docs.into_iter().zip(outputs).zip(routes) {
            let m = &batch[i];
            let out = result_message(cfg, m, doc, outs, &route, &sample);
            slots[i] = Some(Processed { out, topic: m.topic().into(), partition: m.partition(), offset: m.offset(), abort_once: abort_once(m) });
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn decode_document(m: &OwnedMessage, cfg: &PipelineConfig, limits: &crate::document::DocumentLimits, now: Option<i64>) -> Result<PayslipDocument, (&'static str, String)> {
    let max_payload = cfg.limits.max_payload_bytes;
    let payload = m.payload().ok_or(("undecodable", "message has no value".to_string()))?;
    if payload.len() > max_payload {
        return Err(("oversized", format!("value is {} bytes; limits.max_payload_bytes is {max_payload}", payload.len())));
    }
    let ct = h::get(m.headers(), h::CONTENT_TYPE);
    let doc: PayslipDocument = codec::decode(payload, ct.as_deref()).map_err(|e| (e.class(), e.to_string()))?;
    doc.validate(limits).map_err(|e| (e.class(), e.to_string()))?;
    let lines = lines_of(&doc);
    if lines > cfg.limits.max_lines_per_document {
        return Err(("too_large_for_models", format!("{lines} text lines; limits.max_lines_per_document is {}", cfg.limits.max_lines_per_document)));
    }
    if let Some(now) = now {
        cfg.limits.check_event_time("submitted_at", doc.submitted_at, now).map_err(|e| ("bad_timestamp", e.to_string()))?;
    }
    Ok(doc)
}

/// Text lines of a document, over all its pages (what the text model's input grows with).
fn lines_of(doc: &PayslipDocument) -> usize {
    doc.pages.iter().map(|p| p.lines.len()).sum()
}

/// Splits `members` into consecutive runs whose lines add up to at most `max_lines`; a member
/// larger than that on its own gets a run of its own.
fn runs_by_lines(members: &[usize], lines: impl Fn(usize) -> usize, max_lines: usize) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut total = 0;
    for &k in members {
        let n = lines(k);
        if runs.is_empty() || total + n > max_lines && !runs.last().is_some_and(Vec::is_empty) {
            runs.push(Vec::new());
            total = 0;
        }
        runs.last_mut().expect("pushed above").push(k);
        total += n;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::runs_by_lines;

    #[test]
    fn runs_hold_at_most_the_line_bound_and_keep_every_document_once() {
        let lines = [300, 500, 300, 1200, 10, 10];
        let runs = runs_by_lines(&[0, 1, 2, 3, 4, 5], |k| lines[k], 1024);
        assert_eq!(runs, vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        assert_eq!(runs_by_lines(&[], |k| lines[k], 1024), Vec::<Vec<usize>>::new());
    }
}
