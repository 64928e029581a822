//! Run statistics per model version: every successful ONNX Runtime run's wall time and batch size,
//! as HDR histograms (for `/performance/slow-models`' percentiles) and as Prometheus histograms
//! (for `/metrics`). A run is the unit, not a document: every document of a batch shares its run's
//! time, so counting per document would weigh large batches many times over.

use std::{collections::BTreeMap, sync::Mutex};

use prometheus_client::metrics::{
    family::Family,
    histogram::{exponential_buckets, Histogram},
};
use serde::Serialize;

type Labels = Vec<(String, String)>;

fn run_seconds_histogram() -> Histogram {
    // 0.5 ms to 16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn batch_size_histogram() -> Histogram {
    // 1 to 1024 documents
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

struct One {
    micros: hdrhistogram::Histogram<u64>,
    documents: u64,
}

/// Shared by the stage's batches; cheap to record (one lock per model run).
#[derive(Debug)]
pub struct RunStats {
    book: Mutex<BTreeMap<(String, String), One>>,
    pub run_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub batch_sizes: Family<Labels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for One {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("One").field("runs", &self.micros.len()).field("documents", &self.documents).finish()
    }
}

impl Default for RunStats {
    fn default() -> Self {
        Self { book: Mutex::new(BTreeMap::new()), run_seconds: Family::new_with_constructor(run_seconds_histogram), batch_sizes: Family::new_with_constructor(batch_size_histogram) }
    }
}

/// One model version's runs, as `/performance/slow-models` shows them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionRuns {
    pub model: String,
    pub version: String,
    pub runs: u64,
    pub documents: u64,
    pub mean_run_ms: f64,
    pub p50_run_ms: f64,
    pub p95_run_ms: f64,
    pub p99_run_ms: f64,
    pub max_run_ms: f64,
    /// Mean run time divided by the mean batch size: what one document costs.
    pub mean_ms_per_document: f64,
}

impl RunStats {
    pub fn observe(&self, model: &str, version: &str, run_ms: f64, documents: usize) {
        let labels = vec![("model".to_string(), model.to_string()), ("version".to_string(), version.to_string())];
        self.run_seconds.get_or_create(&labels).observe(run_ms / 1000.0);
        self.batch_sizes.get_or_create(&labels).observe(documents as f64);
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let one = book.entry((model.to_string(), version.to_string())).or_insert_with(|| One {
            micros: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            documents: 0,
        });
        one.micros.saturating_record((run_ms * 1000.0).max(1.0) as u64);
        one.documents += documents as u64;
    }

    /// Every version that ran, slowest p95 first.
    pub fn by_version(&self) -> Vec<VersionRuns> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out: Vec<VersionRuns> = book
            .iter()
            .filter(|(_, o)| o.micros.len() > 0)
            .map(|((model, version), o)| VersionRuns {
                model: model.clone(),
                version: version.clone(),
                runs: o.micros.len(),
                documents: o.documents,
                mean_run_ms: o.micros.mean() / 1000.0,
                p50_run_ms: ms(o.micros.value_at_quantile(0.50)),
                p95_run_ms: ms(o.micros.value_at_quantile(0.95)),
                p99_run_ms: ms(o.micros.value_at_quantile(0.99)),
                max_run_ms: ms(o.micros.max()),
                mean_ms_per_document: o.micros.mean() / 1000.0 * o.micros.len() as f64 / o.documents.max(1) as f64,
            })
            .collect();
        out.sort_by(|a, b| b.p95_run_ms.total_cmp(&a.p95_run_ms));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_per_version_slowest_first() {
        let s = RunStats::default();
        for i in 1..=100 {
            s.observe("text_recognition", "1.0.0", i as f64, 4);
        }
        s.observe("document_classifier", "1.0.0", 0.5, 32);
        let v = s.by_version();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].model.as_str(), v[0].runs, v[0].documents), ("text_recognition", 100, 400));
        assert!((v[0].p95_run_ms - 95.0).abs() < 0.1, "{}", v[0].p95_run_ms);
        assert!((v[0].p50_run_ms - 50.0).abs() < 0.1);
        assert!((v[0].mean_ms_per_document - 50.5 / 4.0).abs() < 0.01, "{}", v[0].mean_ms_per_document);
        assert_eq!(v[1].model, "document_classifier");
    }
}
