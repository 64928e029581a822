//! Per-window aggregates of one subject (model/version/cohort, or the whole pipeline) and the
//! metric values alert rules and rollout criteria read from them.
//!
//! Aggregates are plain counters plus HDR histograms (microsecond resolution, 3 significant digits,
//! up to one hour), serialisable so they live in RocksDB between batches. Applying the same input
//! twice counts twice: exactly-once comes from the state store writing aggregates and input offsets
//! in one batch, not from here.

use hdrhistogram::{
    serialization::{Deserializer, Serializer, V2Serializer},
    Histogram,
};
use serde::{Deserialize, Serialize};

/// What a window aggregates: a model version in a cohort, or the pipeline as a whole.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subject {
    /// Model name, or `pipeline`.
    pub model: String,
    /// Model version, or `-` for the pipeline.
    pub version: String,
    /// `baseline`, `canary`, or `all` for the pipeline.
    pub cohort: String,
}

impl Subject {
    pub fn pipeline() -> Self {
        Self { model: PIPELINE.into(), version: "-".into(), cohort: "all".into() }
    }

    pub fn is_pipeline(&self) -> bool {
        self.model == PIPELINE
    }

    /// `model/version/cohort`: the key of window snapshots and part of alert ids.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.model, self.version, self.cohort)
    }
}

pub const PIPELINE: &str = "pipeline";

const HIST_MAX_US: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// HDR histogram that serialises as V2 bytes.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(pub Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(new_hist())
    }
}

impl LatencyHistogram {
    pub fn record_ms(&mut self, ms: f64) {
        let us = (ms * 1000.0).round().clamp(1.0, HIST_MAX_US as f64) as u64;
        self.0.saturating_record(us);
    }

    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.max() as f64 / 1000.0)
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Raw samples are not kept; for statistical tests the histogram's recorded values are used.
    pub fn iter_ms(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.0.iter_recorded().map(|v| (v.value_iterated_to() as f64 / 1000.0, v.count_at_value()))
    }
}

impl Serialize for LatencyHistogram {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new().serialize(&self.0, &mut buf).map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&buf)
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).map_err(serde::de::Error::custom)?;
        Ok(Self(h))
    }
}

/// Everything counted for one subject in one window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowAggregate {
    /// Results (model subjects: outputs) in the window.
    pub count: u64,
    /// Outputs (or, for the pipeline, results) with an error code.
    pub errors: u64,
    /// Outputs whose model version was not loaded (refused at load).
    pub unavailable: u64,
    /// Per-model latency (model subjects) or end-to-end latency (pipeline).
    pub latency: LatencyHistogram,
    /// Classifier outputs with known truth, and how many were right.
    pub labelled: u64,
    pub correct: u64,
    /// The same, for documents whose true format is PCDA.
    pub pcda_labelled: u64,
    pub pcda_correct: u64,
    /// Feedback ratings and how many were positive (4 or 5 of 5).
    pub ratings: u64,
    pub ratings_positive: u64,
    /// Process samples of the infer stage (pipeline subject): maxima over the window.
    pub max_rss_bytes: u64,
    pub max_cpu_percent: f64,
    pub cpu_samples: u64,
    /// Longest model load time reported by results in the window.
    pub max_load_ms: f64,
    /// Results (pipeline subject) whose models ran on a GPU provider: the window is a GPU host's,
    /// and rules with `on_gpu` thresholds use them.
    #[serde(default)]
    pub gpu_results: u64,
    /// ONNX Runtime runs of this subject by batch size (documents per run): moments of ln(run time
    /// in ms), each run weighted 1 (each of its documents adds 1/batch size). What the rollout
    /// compares latency on: runs, corrected for batch size (see `rollout::stats`).
    #[serde(default)]
    pub runs: std::collections::BTreeMap<u16, Moments>,
}

/// Weighted moments of a sample (weight, Σ w·x, Σ w·x²): mergeable by addition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub w: f64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64, weight: f64) {
        self.w += weight;
        self.sum += weight * x;
        self.sum_sq += weight * x * x;
    }

    pub fn merge(&mut self, o: &Moments) {
        self.w += o.w;
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.w > 0.0).then(|| self.sum / self.w)
    }

    /// Σ w·(x − mean)², the within-sample sum of squares.
    pub fn sum_sq_dev(&self) -> f64 {
        if self.w <= 0.0 {
            return 0.0;
        }
        (self.sum_sq - self.sum * self.sum / self.w).max(0.0)
    }
}



/// Metrics alert rules can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// p95 of per-model latency (ms).
    LatencyP95Ms,
    /// Share of outputs that failed while their model was loaded. Outputs of a version refused at
    /// load are model health ([`Metric::ModelUnavailableRate`]), so one incident raises one alert.
    ErrorRate,
    /// Share of outputs whose model version was refused at load.
    ModelUnavailableRate,
    /// Classifier accuracy against ground truth.
    Accuracy,
    /// Classifier accuracy on documents that are truly PCDA.
    PcdaAccuracy,
    /// Share of positive ratings.
    Satisfaction,
    /// Longest model load time (ms).
    ModelLoadMs,
    /// Resident memory of the infer stage (MB).
    MemoryMb,
    /// CPU use of the infer stage (percent of one core).
    CpuPercent,
    /// p95 of end-to-end processing time per document (ms).
    ProcessingP95Ms,
}

impl Metric {
    /// Whether the metric is computed on the pipeline subject (else on model subjects).
    pub fn on_pipeline(self) -> bool {
        matches!(self, Metric::MemoryMb | Metric::CpuPercent | Metric::ProcessingP95Ms)
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::LatencyP95Ms => "latency_p95_ms",
            Metric::ErrorRate => "error_rate",
            Metric::ModelUnavailableRate => "model_unavailable_rate",
            Metric::Accuracy => "accuracy",
            Metric::PcdaAccuracy => "pcda_accuracy",
            Metric::Satisfaction => "satisfaction",
            Metric::ModelLoadMs => "model_load_ms",
            Metric::MemoryMb => "memory_mb",
            Metric::CpuPercent => "cpu_percent",
            Metric::ProcessingP95Ms => "processing_p95_ms",
        }
    }
}

impl WindowAggregate {
    /// Adds another window's counts into this one (rollout phases accumulate their windows).
    pub fn merge(&mut self, o: &WindowAggregate) {
        self.count += o.count;
        self.errors += o.errors;
        self.unavailable += o.unavailable;
        // both histograms share the same bounds, so adding cannot fail
        let _ = self.latency.0.add(&o.latency.0);
        self.labelled += o.labelled;
        self.correct += o.correct;
        self.pcda_labelled += o.pcda_labelled;
        self.pcda_correct += o.pcda_correct;
        self.ratings += o.ratings;
        self.ratings_positive += o.ratings_positive;
        self.max_rss_bytes = self.max_rss_bytes.max(o.max_rss_bytes);
        self.max_cpu_percent = self.max_cpu_percent.max(o.max_cpu_percent);
        self.cpu_samples += o.cpu_samples;
        self.max_load_ms = self.max_load_ms.max(o.max_load_ms);
        self.gpu_results += o.gpu_results;
        for (k, m) in &o.runs {
            self.runs.entry(*k).or_default().merge(m);
        }
    }

    /// Records one document's share of an ONNX Runtime run: `run_ms` is the run's wall time,
    /// `batch_size` the documents it served (the document adds 1/batch size of a run).
    pub fn record_run(&mut self, run_ms: f64, batch_size: i32) {
        let b = batch_size.max(1);
        self.runs.entry(b.min(u16::MAX as i32) as u16).or_default().add(run_ms.max(1e-3).ln(), 1.0 / b as f64);
    }

    /// Runs recorded (the sum of the runs' weights).
    pub fn run_count(&self) -> f64 {
        self.runs.values().map(|m| m.w).sum()
    }

    /// Counts one classification against its ground truth (overall and for PCDA payslips).
    pub fn score(&mut self, truth: &str, predicted: &str) {
        let right = (truth == predicted) as u64;
        self.labelled += 1;
        self.correct += right;
        if truth == "PCDA" {
            self.pcda_labelled += 1;
            self.pcda_correct += right;
        }
    }

    /// The metric's value and the sample size it rests on; `None` when the window has no source for it.
    pub fn metric(&self, m: Metric) -> Option<(f64, u64)> {
        let ratio = |num: u64, den: u64| (den > 0).then(|| (num as f64 / den as f64, den));
        match m {
            Metric::LatencyP95Ms | Metric::ProcessingP95Ms => self.latency.quantile_ms(0.95).map(|v| (v, self.latency.len())),
            Metric::ErrorRate => ratio(self.errors.saturating_sub(self.unavailable), self.count),
            Metric::ModelUnavailableRate => ratio(self.unavailable, self.count),
            Metric::Accuracy => ratio(self.correct, self.labelled),
            Metric::PcdaAccuracy => ratio(self.pcda_correct, self.pcda_labelled),
            Metric::Satisfaction => ratio(self.ratings_positive, self.ratings),
            Metric::ModelLoadMs => (self.count > 0 && self.max_load_ms > 0.0).then_some((self.max_load_ms, self.count)),
            Metric::MemoryMb => (self.max_rss_bytes > 0).then(|| (self.max_rss_bytes as f64 / 1_048_576.0, self.cpu_samples.max(1))),
            Metric::CpuPercent => (self.cpu_samples > 0).then_some((self.max_cpu_percent, self.cpu_samples)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_survives_serialisation() {
        let mut a = WindowAggregate::default();
        for ms in [1.0, 2.0, 3.0, 400.0] {
            a.latency.record_ms(ms);
        }
        let json = serde_json::to_vec(&a).unwrap();
        let b: WindowAggregate = serde_json::from_slice(&json).unwrap();
        assert_eq!(b.latency.len(), 4);
        assert!((b.latency.max_ms().unwrap() - 400.0).abs() < 0.5);
    }

    #[test]
    fn metrics_need_a_source() {
        let mut a = WindowAggregate { count: 10, errors: 1, ..Default::default() };
        assert_eq!(a.metric(Metric::ErrorRate), Some((0.1, 10)));
        a.unavailable = 1;
        assert_eq!(a.metric(Metric::ErrorRate), Some((0.0, 10)), "refused-at-load is not an error rate");
        assert_eq!(a.metric(Metric::ModelUnavailableRate), Some((0.1, 10)));
        assert_eq!(a.metric(Metric::PcdaAccuracy), None);
        a.pcda_labelled = 4;
        a.pcda_correct = 3;
        assert_eq!(a.metric(Metric::PcdaAccuracy), Some((0.75, 4)));
    }
}
