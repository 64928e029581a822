//! Performance reports (the runbook's daily and weekly reports): per model version and cohort,
//! volume, error rate, latency percentiles, accuracy, PCDA accuracy and satisfaction over a day or
//! a week, with the alerts and rollout decisions of the period, built from the metrics, alerts and
//! decisions topics; rendered as JSON, as charts (SVG and PNG, [`chart`]) with alert and rollout
//! markers on the time axis, and as an HTML page that embeds them.
//!
//! Reads are bounded (each topic to its end at the time of the call) and read_committed, so a
//! report is a snapshot; windows count in the period by their start (`[from, to)`).
//! Figures over several windows: counts and rates are exact (sums); accuracy, PCDA accuracy and
//! satisfaction are weighted by their windows' labelled / rated counts, so they are exact too;
//! latency percentiles cannot be merged from percentiles, so a period's p50/p95/p99 are the
//! count-weighted means of its windows' values, and `latency_max_ms` is the true maximum.

pub mod chart;

use std::{collections::BTreeMap, time::Duration};

use chrono::{NaiveDate, TimeZone, Utc};
use serde::Serialize;

use crate::{
    alert::AlertEvent,
    codec,
    config::PipelineConfig,
    kafka::{self, headers as h, KafkaError},
    monitor::records::WindowMetrics,
    rollout::RolloutDecision,
};

/// A day or a week, ending at the end of `at` (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Week,
}

impl Period {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "day" | "daily" => Ok(Period::Day),
            "week" | "weekly" => Ok(Period::Week),
            _ => Err(format!("{s:?}: use day or week")),
        }
    }

    /// `[from, to)` in ms: the UTC day `at`, or the seven days ending with it.
    pub fn range(self, at: NaiveDate) -> (i64, i64) {
        let end = Utc.from_utc_datetime(&(at + chrono::Days::new(1)).and_hms_opt(0, 0, 0).expect("midnight")).timestamp_millis();
        let days = if self == Period::Day { 1 } else { 7 };
        (end - days * 86_400_000, end)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("charts: {0}")]
    Chart(String),
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
}

/// One window of one model version and cohort, as the charts plot it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub window_start: i64,
    pub count: i64,
    pub error_rate: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub accuracy: Option<f64>,
}

/// A model version and cohort over the period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionReport {
    pub model: String,
    pub version: String,
    pub cohort: String,
    pub windows: usize,
    pub documents: i64,
    pub errors: i64,
    pub error_rate: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub labelled: i64,
    pub accuracy: Option<f64>,
    pub pcda_labelled: i64,
    pub pcda_accuracy: Option<f64>,
    pub ratings: i64,
    pub satisfaction: Option<f64>,
    pub series: Vec<Point>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: Period,
    pub from_ms: i64,
    pub to_ms: i64,
    pub from: String,
    pub to: String,
    /// Documents through the pipeline in the period (the `pipeline` subject's windows).
    pub documents: i64,
    pub versions: Vec<VersionReport>,
    pub alerts: Vec<AlertEvent>,
    pub decisions: Vec<RolloutDecision>,
}

fn weighted(ws: &[&WindowMetrics], value: impl Fn(&WindowMetrics) -> Option<f64>, weight: impl Fn(&WindowMetrics) -> i64) -> Option<f64> {
    let (sum, n) = ws.iter().filter_map(|w| value(w).map(|v| (v * weight(w) as f64, weight(w)))).fold((0.0, 0i64), |(s, n), (v, k)| (s + v, n + k));
    (n > 0).then(|| sum / n as f64)
}

/// Builds the report from already-read records (pure: the tests and the API share it).
pub fn build(period: Period, from_ms: i64, to_ms: i64, metrics: &[WindowMetrics], alerts: Vec<AlertEvent>, decisions: Vec<RolloutDecision>) -> Report {
    let in_period = |t: i64| t >= from_ms && t < to_ms;
    // the monitor may publish a window again after a restart (same metrics_id): count it once
    let mut unique: BTreeMap<&str, &WindowMetrics> = BTreeMap::new();
    for m in metrics.iter().filter(|m| in_period(m.window_start)) {
        unique.insert(m.metrics_id.as_str(), m);
    }
    let mut groups: BTreeMap<(String, String, String), Vec<&WindowMetrics>> = BTreeMap::new();
    for m in unique.values() {
        groups.entry((m.model.clone(), m.version.clone(), m.cohort.clone())).or_default().push(m);
    }
    let documents = groups.iter().filter(|((m, _, _), _)| m == "pipeline").flat_map(|(_, ws)| ws.iter()).map(|w| w.count).sum();
    let versions = groups
        .into_iter()
        .map(|((model, version, cohort), mut ws)| {
            ws.sort_by_key(|w| w.window_start);
            let documents: i64 = ws.iter().map(|w| w.count).sum();
            let errors: i64 = ws.iter().map(|w| w.errors).sum();
            let count = |w: &WindowMetrics| w.count;
            VersionReport {
                windows: ws.len(),
                documents,
                errors,
                error_rate: (documents > 0).then(|| errors as f64 / documents as f64),
                latency_p50_ms: weighted(&ws, |w| w.latency_p50_ms, count),
                latency_p95_ms: weighted(&ws, |w| w.latency_p95_ms, count),
                latency_p99_ms: weighted(&ws, |w| w.latency_p99_ms, count),
                latency_max_ms: ws.iter().filter_map(|w| w.latency_max_ms).reduce(f64::max),
                labelled: ws.iter().map(|w| w.labelled).sum(),
                accuracy: weighted(&ws, |w| w.accuracy, |w| w.labelled),
                pcda_labelled: ws.iter().map(|w| w.pcda_labelled).sum(),
                pcda_accuracy: weighted(&ws, |w| w.pcda_accuracy, |w| w.pcda_labelled),
                ratings: ws.iter().map(|w| w.ratings).sum(),
                satisfaction: weighted(&ws, |w| w.satisfaction, |w| w.ratings),
                series: ws.iter().map(|w| Point { window_start: w.window_start, count: w.count, error_rate: w.error_rate, latency_p95_ms: w.latency_p95_ms, accuracy: w.accuracy }).collect(),
                model,
                version,
                cohort,
            }
        })
        .collect();
    let fmt = |ms: i64| Utc.timestamp_millis_opt(ms).single().map(|t| t.to_rfc3339()).unwrap_or_default();
    Report {
        period,
        from_ms,
        to_ms,
        from: fmt(from_ms),
        to: fmt(to_ms),
        documents,
        versions,
        alerts: alerts.into_iter().filter(|a| in_period(a.emitted_at)).collect(),
        decisions: decisions.into_iter().filter(|d| in_period(d.decided_at)).collect(),
    }
}

/// Every record of `topic` that decodes as `T` (to the end at the time of the call).
fn read<T: codec::Record>(cfg: &PipelineConfig, brokers: &str, topic: &str) -> Result<Vec<T>, KafkaError> {
    let consumer = kafka::reader_config(brokers, &format!("payslip-report-{}", std::process::id()), &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the report reader"))?;
    let cursor = kafka::RangeCursor::to_end(consumer, topic, |_, lo, _| lo, format!("reading {topic}"))?;
    let mut out = Vec::new();
    cursor.for_each(Duration::from_secs(30), |m| {
        use rdkafka::message::Message;
        let ct = h::get(m.headers(), h::CONTENT_TYPE);
        if let Some(Ok(r)) = m.payload().map(|p| codec::decode::<T>(p, ct.as_deref())) {
            out.push(r);
        }
        Ok::<(), KafkaError>(())
    })?;
    Ok(out)
}

/// Reads the topics and builds the report for `period` ending with the UTC day `at`.
/// Blocking: call from a blocking thread.
pub fn generate(cfg: &PipelineConfig, brokers: &str, period: Period, at: NaiveDate) -> Result<Report, ReportError> {
    let (from, to) = period.range(at);
    let metrics: Vec<WindowMetrics> = read(cfg, brokers, &cfg.topics.metrics)?;
    let alerts: Vec<AlertEvent> = read(cfg, brokers, &cfg.topics.alerts)?;
    let decisions: Vec<RolloutDecision> = read(cfg, brokers, &cfg.topics.decisions)?;
    Ok(build(period, from, to, &metrics, alerts, decisions))
}

/// Writes `report.json`, the charts (`<metric>.svg` and `.png`) and `report.html` into `dir`;
/// returns the files written.
pub fn write(report: &Report, dir: &std::path::Path, font: &std::path::Path) -> Result<Vec<std::path::PathBuf>, ReportError> {
    let io = |path: &std::path::Path, e: std::io::Error| ReportError::Write { path: path.display().to_string(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut files = Vec::new();
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report).expect("a report serialises")).map_err(|e| io(&json, e))?;
    files.push(json);
    for c in chart::CHARTS.iter() {
        let svg = dir.join(format!("{}.svg", c.file));
        std::fs::write(&svg, chart::svg(report, c, font)?).map_err(|e| io(&svg, e))?;
        files.push(svg);
        let png = dir.join(format!("{}.png", c.file));
        chart::png(report, c, &png, font)?;
        files.push(png);
    }
    let html = dir.join("report.html");
    std::fs::write(&html, chart::html(report, |c| format!("{}.svg", c.file))).map_err(|e| io(&html, e))?;
    files.push(html);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(id: &str, model: &str, version: &str, start: i64, count: i64, errors: i64, p95: f64, labelled: i64, accuracy: f64) -> WindowMetrics {
        let mut w: WindowMetrics = serde_json::from_value(serde_json::json!({
            "metrics_id": id, "model": model, "version": version, "cohort": "baseline", "window_start": start, "window_end": start + 60_000,
            "count": count, "errors": errors, "unavailable": 0, "labelled": labelled, "pcda_labelled": 0, "ratings": 0,
            "dropped_late_total": 0, "feedback_orphan_total": 0, "emitted_at": start + 60_000
        }))
        .expect("window");
        w.error_rate = Some(errors as f64 / count as f64);
        w.latency_p95_ms = Some(p95);
        w.accuracy = Some(accuracy);
        w
    }

    #[test]
    fn totals_are_exact_and_weighted_figures_weigh_by_their_counts() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 27).unwrap();
        let (from, to) = Period::Day.range(day);
        assert_eq!(to - from, 86_400_000);
        let ws = vec![
            window("a", "document_classifier", "1.0.0", from, 100, 5, 10.0, 10, 0.9),
            window("b", "document_classifier", "1.0.0", from + 60_000, 300, 3, 20.0, 30, 0.5),
            window("b", "document_classifier", "1.0.0", from + 60_000, 300, 3, 20.0, 30, 0.5), // republished
            window("c", "document_classifier", "1.0.0", to, 999, 0, 1.0, 0, 1.0),                // the next day
            window("d", "pipeline", "-", from, 400, 8, 30.0, 0, 0.0),
        ];
        let r = build(Period::Day, from, to, &ws, vec![], vec![]);
        assert_eq!(r.documents, 400);
        let v = r.versions.iter().find(|v| v.model == "document_classifier").unwrap();
        assert_eq!((v.windows, v.documents, v.errors), (2, 400, 8));
        assert_eq!(v.error_rate, Some(0.02));
        assert_eq!(v.latency_p95_ms, Some((10.0 * 100.0 + 20.0 * 300.0) / 400.0));
        assert_eq!(v.accuracy, Some((0.9 * 10.0 + 0.5 * 30.0) / 40.0));
        assert_eq!(Period::Week.range(day).1 - Period::Week.range(day).0, 7 * 86_400_000);
    }
}
