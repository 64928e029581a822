//! Records the monitor publishes: `WindowMetrics` (one per closed window and subject) and alert
//! events (`alert::AlertEvent`), with their Avro schemas.

use serde::{Deserialize, Serialize};

use crate::{
    alert::AlertEvent,
    codec::Record,
    window::{
        aggregate::{Metric, Subject, WindowAggregate},
        WindowRange,
    },
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowMetrics {
    pub metrics_id: String,
    pub model: String,
    pub version: String,
    pub cohort: String,
    pub window_start: i64,
    pub window_end: i64,
    pub count: i64,
    pub errors: i64,
    #[serde(default)]
    pub error_rate: Option<f64>,
    pub unavailable: i64,
    #[serde(default)]
    pub latency_p50_ms: Option<f64>,
    #[serde(default)]
    pub latency_p95_ms: Option<f64>,
    #[serde(default)]
    pub latency_p99_ms: Option<f64>,
    #[serde(default)]
    pub latency_max_ms: Option<f64>,
    pub labelled: i64,
    #[serde(default)]
    pub accuracy: Option<f64>,
    pub pcda_labelled: i64,
    #[serde(default)]
    pub pcda_accuracy: Option<f64>,
    pub ratings: i64,
    #[serde(default)]
    pub satisfaction: Option<f64>,
    #[serde(default)]
    pub max_rss_mb: Option<f64>,
    #[serde(default)]
    pub max_cpu_percent: Option<f64>,
    #[serde(default)]
    pub max_load_ms: Option<f64>,
    pub dropped_late_total: i64,
    pub feedback_orphan_total: i64,
    /// Monitor inputs dead-lettered so far (undecodable, or an event time outside the limits).
    #[serde(default)]
    pub dead_lettered_total: i64,
    pub emitted_at: i64,
}

impl Record for WindowMetrics {
    const SCHEMA_NAME: &'static str = "litert.v1.WindowMetrics";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/window_metrics.avsc");
}

impl Record for AlertEvent {
    const SCHEMA_NAME: &'static str = "litert.v1.Alert";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/alert.avsc");
}

impl WindowMetrics {
    pub fn id(subject: &Subject, range: WindowRange) -> String {
        format!("{}|{}", subject.key(), range.start_ms)
    }

    /// The published record of a closed window; the `_total` fields are the monitor's counters,
    /// `emitted_at` the window's end (event time).
    pub fn from_window(subject: &Subject, range: WindowRange, a: &WindowAggregate, totals: &super::state::MonitorCounters) -> Self {
        let m = |x: Metric| a.metric(x).map(|(v, _)| v);
        WindowMetrics {
            metrics_id: Self::id(subject, range),
            model: subject.model.clone(),
            version: subject.version.clone(),
            cohort: subject.cohort.clone(),
            window_start: range.start_ms,
            window_end: range.end_ms,
            count: a.count as i64,
            errors: a.errors as i64,
            error_rate: m(Metric::ErrorRate),
            unavailable: a.unavailable as i64,
            latency_p50_ms: a.latency.quantile_ms(0.50),
            latency_p95_ms: a.latency.quantile_ms(0.95),
            latency_p99_ms: a.latency.quantile_ms(0.99),
            latency_max_ms: a.latency.max_ms(),
            labelled: a.labelled as i64,
            accuracy: m(Metric::Accuracy),
            pcda_labelled: a.pcda_labelled as i64,
            pcda_accuracy: m(Metric::PcdaAccuracy),
            ratings: a.ratings as i64,
            satisfaction: m(Metric::Satisfaction),
            max_rss_mb: m(Metric::MemoryMb),
            max_cpu_percent: m(Metric::CpuPercent),
            max_load_ms: m(Metric::ModelLoadMs),
            dropped_late_total: totals.dropped_late as i64,
            feedback_orphan_total: totals.feedback_orphans as i64,
            dead_lettered_total: totals.undecodable as i64,
            // event time, not the watermark of the moment: a live run, a scaled-out one and a
            // replay publish the same bytes for the same window
            emitted_at: range.end_ms,
        }
    }
}
