//! `payslip-stream models bench`: the served models on synthetic documents, in the batches the
//! infer stage makes (`batching.max_batch` documents, split by `batching.max_lines_per_run`), with
//! no Kafka in the way. It measures what an execution provider gives this workload, so the same
//! command on the same machine compares CPU, CUDA and TensorRT (`scripts/gpu-check`).
//!
//! Documents are generated and validated before the clock starts; each round runs them all once.
//! Figures per round: documents per second, the share of the wall time spent inside ONNX
//! Runtime's `Session::run`, process CPU seconds, peak resident memory so far, and GPU memory
//! (NVML) after the round.

use std::time::Instant;

use crate::{
    config::PipelineConfig,
    document::PayslipDocument,
    synth::{Generator, GeneratorConfig},
};

use super::{gpu::GpuMemory, ModelRegistry, RunFailure};

/// One round's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Round {
    pub round: u32,
    pub documents: u64,
    pub seconds: f64,
    pub docs_per_s: f64,
    /// Time inside ONNX Runtime's `Session::run` / wall time.
    pub session_run_share: f64,
    pub cpu_seconds: Option<f64>,
    /// The providers the documents' outputs report (e.g. `CUDAExecutionProvider`).
    pub provider: String,
    pub peak_rss_mb: Option<f64>,
    pub gpu: Option<Vec<GpuMemory>>,
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `rounds` rounds of `docs` synthetic documents through the served versions.
pub fn run(cfg: &PipelineConfig, registry: &ModelRegistry, docs: u64, rounds: u32) -> Result<Vec<Round>, RunFailure> {
    let generator = Generator::new(GeneratorConfig { seed: 606, ..Default::default() });
    let limits = cfg.limits.document_limits();
    let documents: Vec<PayslipDocument> = (0..docs).map(|i| generator.document(i).document).filter(|d| d.validate(&limits).is_ok()).collect();
    // the stage's batches: at most max_batch documents and max_lines_per_run lines per run
    let mut batches: Vec<Vec<&PayslipDocument>> = vec![vec![]];
    let mut lines = 0;
    for d in &documents {
        let n: usize = d.pages.iter().map(|p| p.lines.len()).sum();
        let last = batches.last_mut().expect("one batch at least");
        if !last.is_empty() && (last.len() >= cfg.batching.max_batch || lines + n > cfg.batching.max_lines_per_run) {
            batches.push(vec![]);
            lines = 0;
        }
        batches.last_mut().expect("one batch at least").push(d);
        lines += n;
    }
    let versions = registry.served_versions().clone();
    let mut out = Vec::new();
    for round in 1..=rounds {
        let (started, cpu0, run0) = (Instant::now(), crate::telemetry::clock_ticks_of_self(), super::session_run_seconds());
        let mut providers = Vec::new();
        for batch in &batches {
            let outputs = registry.infer(batch, &versions)?;
            if providers.is_empty() {
                providers = outputs.first().map(|o| o.iter().map(|m| m.provider.clone()).collect()).unwrap_or_default();
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = crate::telemetry::clock_ticks_of_self().zip(cpu0).map(|(b, a)| b.saturating_sub(a) as f64 / 100.0);
        out.push(Round {
            round,
            documents: documents.len() as u64,
            seconds,
            docs_per_s: documents.len() as f64 / seconds.max(1e-9),
            session_run_share: (super::session_run_seconds() - run0) / seconds.max(1e-9),
            cpu_seconds,
            provider: super::provider_of(providers.iter().map(String::as_str)),
            peak_rss_mb: peak_rss_mb(),
            gpu: super::gpu::gpu_memory(),
        });
    }
    Ok(out)
}
