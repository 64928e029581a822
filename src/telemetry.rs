//! Tracing set-up and the infer stage's counters.
//!
//! Counters are monotonic and named `<namespace>_<name>_<unit>_total` as they will appear on the
//! Prometheus endpoint; every dropped, rejected or dead-lettered document is counted here.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

/// Installs the global tracing subscriber: `RUST_LOG` filter (default `info`), JSON when
/// `PAYSLIP_LOG_FORMAT=json`.
pub fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,ort=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = if std::env::var("PAYSLIP_LOG_FORMAT").as_deref() == Ok("json") { builder.json().try_init() } else { builder.try_init() };
}

/// Counters of the infer stage.
#[derive(Default, Debug)]
pub struct InferCounters {
    /// payslip_infer_documents_consumed_total
    pub consumed: AtomicU64,
    /// payslip_infer_results_produced_total
    pub results: AtomicU64,
    /// payslip_infer_results_with_error_total (a result whose error_code is set)
    pub results_with_error: AtomicU64,
    /// payslip_infer_dead_letters_total{class}
    pub dead_letters: Mutex<BTreeMap<&'static str, u64>>,
    /// payslip_infer_batches_total
    pub batches: AtomicU64,
    /// payslip_infer_offsets_stored_total
    pub offsets_stored: AtomicU64,
}

impl InferCounters {
    pub fn dead_letter(&self, class: &'static str) {
        *self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()).entry(class).or_default() += 1;
    }

    pub fn snapshot(&self) -> InferSummary {
        let dl = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        InferSummary {
            consumed: self.consumed.load(Ordering::Relaxed),
            results: self.results.load(Ordering::Relaxed),
            results_with_error: self.results_with_error.load(Ordering::Relaxed),
            dead_letters: dl.values().sum(),
            dead_letters_by_class: dl.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }
}

/// What a stage did, printed at shutdown.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct InferSummary {
    pub consumed: u64,
    pub results: u64,
    pub results_with_error: u64,
    pub dead_letters: u64,
    pub dead_letters_by_class: BTreeMap<String, u64>,
    pub batches: u64,
}
