//! ONNX Runtime: loading the shared library, the process-wide environment, and choosing the
//! execution provider a session actually runs on.
//!
//! Providers are tried in configured order. A GPU provider that the loaded ONNX Runtime build does
//! not include, or that fails to register (no device, missing CUDA libraries), is skipped with a
//! logged reason, unless `on_provider_failure: fail`. Each provider is registered alone with
//! `error_on_failure`, so the provider recorded for a session is the one ONNX Runtime accepted, not
//! the one that was asked for.

use std::{path::PathBuf, sync::OnceLock};

use ort::{
    ep::{ExecutionProvider, CPU, CUDA, TensorRT},
    session::Session,
};

use crate::config::{InferenceConfig, Provider, ProviderFailure};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found: {0}")]
    LibraryMissing(String),
    #[error("cannot initialise ONNX Runtime from {path}: {message}")]
    Init { path: String, message: String },
    #[error("no execution provider could load {model}: {attempts}")]
    NoProvider { model: String, attempts: String },
    /// ONNX Runtime could not say whether a provider is in its build.
    #[error("availability check of {provider} failed: {message}")]
    Availability { provider: &'static str, message: String },
}

impl RuntimeError {
    /// A missing or broken library needs an operator; a provider may register later (a GPU that
    /// was busy or not yet visible).
    pub fn retryable(&self) -> bool {
        matches!(self, RuntimeError::NoProvider { .. } | RuntimeError::Availability { .. })
    }
}

static ENV: OnceLock<Result<ort::environment::Environment, RuntimeError>> = OnceLock::new();

/// Where `libonnxruntime.so` is: config, then `ORT_DYLIB_PATH`.
pub fn dylib_path(cfg: &InferenceConfig) -> Result<PathBuf, RuntimeError> {
    let path = cfg.ort_dylib_path.clone().or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from)).ok_or_else(|| {
        RuntimeError::LibraryMissing(
            "set ORT_DYLIB_PATH (or inference.ort_dylib_path) to libonnxruntime.so; `pip install onnxruntime==1.32.*` provides it at \
             site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0 and `scripts/setup` exports it"
                .into(),
        )
    })?;
    if !path.exists() {
        return Err(RuntimeError::LibraryMissing(format!("{} does not exist (from ORT_DYLIB_PATH or inference.ort_dylib_path)", path.display())));
    }
    Ok(path)
}

/// The process-wide ONNX Runtime environment, created on first use.
pub fn environment(cfg: &InferenceConfig) -> Result<ort::environment::Environment, RuntimeError> {
    ENV.get_or_init(|| {
        let path = dylib_path(cfg)?;
        let builder = ort::init_from(&path).map_err(|e| RuntimeError::Init { path: path.display().to_string(), message: e.to_string() })?;
        builder.with_name("payslip-stream").build().map_err(|e| RuntimeError::Init { path: path.display().to_string(), message: e.to_string() })
    })
    .clone()
}

/// A session and the provider it runs on.
pub struct ProvidedSession {
    pub session: Session,
    /// ONNX Runtime's name, e.g. `CPUExecutionProvider`.
    pub provider: &'static str,
    /// Why earlier providers in the list were not used.
    pub skipped: Vec<String>,
}

fn provider_name(p: Provider) -> &'static str {
    match p {
        Provider::Tensorrt => TensorRT::NAME,
        Provider::Cuda => CUDA::NAME,
        Provider::Cpu => CPU::NAME,
    }
}

/// Whether the loaded ONNX Runtime build includes a provider.
pub fn provider_available(p: Provider) -> Result<bool, RuntimeError> {
    let r = match p {
        Provider::Tensorrt => TensorRT::is_available(),
        Provider::Cuda => CUDA::is_available(),
        Provider::Cpu => CPU::is_available(),
    };
    r.map_err(|e| RuntimeError::Availability { provider: provider_name(p), message: e.to_string() })
}

/// Builds a session for `model` from verified bytes on the first provider that works.
pub fn session_for(cfg: &InferenceConfig, model: &str, bytes: &[u8]) -> Result<ProvidedSession, RuntimeError> {
    let env = environment(cfg)?;
    let mut skipped = Vec::new();
    for &p in &cfg.inference_order() {
        let name = provider_name(p);
        match provider_available(p) {
            Ok(true) => {}
            Ok(false) => {
                let why = format!("{name}: not included in this ONNX Runtime build");
                if cfg.on_provider_failure == ProviderFailure::Fail && p != Provider::Cpu {
                    return Err(RuntimeError::NoProvider { model: model.into(), attempts: why });
                }
                skipped.push(why);
                continue;
            }
            Err(e) => {
                skipped.push(format!("{name}: {e}"));
                continue;
            }
        }
        let dispatch = match p {
            Provider::Tensorrt => TensorRT::default().build().error_on_failure(),
            Provider::Cuda => CUDA::default().build().error_on_failure(),
            // The CPU arena keeps a run's intermediate values for the next run. Without it each run
            // took its ~4.6 MB buffers from glibc, which (with the binary's fixed mmap threshold,
            // src/main.rs) maps them and gives them back: a quarter of the stage's CPU went to page
            // faults. With it, a 20,000-document backlog peaks at the same ~115 MB and costs 0.56
            // instead of 0.89 ms of CPU per document (BENCHMARKS.md, "Allocator").
            Provider::Cpu => CPU::default().with_arena_allocator(true).build().error_on_failure(),
        };
        let built = (|| -> ort::Result<Session> {
            // The batch axis varies with every batch (documents, pages, lines): memory patterns are
            // planned and kept per input shape, which grew the process with each new batch size.
            let mut b = Session::builder(&env)?.with_memory_pattern(false)?;
            if cfg.intra_threads > 0 {
                b = b.with_intra_threads(cfg.intra_threads)?;
            }
            let mut b = b.with_execution_providers([dispatch])?;
            b.commit_from_memory(bytes)
        })();
        match built {
            Ok(session) => {
                if !skipped.is_empty() {
                    tracing::info!(model, provider = name, skipped = %skipped.join("; "), "model session created after skipping providers");
                } else {
                    tracing::info!(model, provider = name, "model session created");
                }
                return Ok(ProvidedSession { session, provider: name, skipped });
            }
            Err(e) => {
                let why = format!("{name}: {e}");
                tracing::warn!(model, provider = name, error = %e, "execution provider failed to register");
                if cfg.on_provider_failure == ProviderFailure::Fail {
                    return Err(RuntimeError::NoProvider { model: model.into(), attempts: why });
                }
                skipped.push(why);
            }
        }
    }
    Err(RuntimeError::NoProvider { model: model.into(), attempts: skipped.join("; ") })
}

impl InferenceConfig {
    /// Providers in the order they are tried; CPU is appended when fallback is allowed and the list
    /// does not end with it, so fallback always has somewhere to go.
    pub fn inference_order(&self) -> Vec<Provider> {
        let mut v = self.providers.clone();
        if self.on_provider_failure == ProviderFailure::Fallback && !v.contains(&Provider::Cpu) {
            v.push(Provider::Cpu);
        }
        v
    }
}
