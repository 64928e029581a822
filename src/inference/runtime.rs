//! ONNX Runtime: loading the shared library, the process-wide environment, and building the session
//! of a model version on the execution providers ONNX Runtime actually gives it.
//!
//! **One session, every provider.** The configured providers are registered together in one
//! session, in order (`[tensorrt, cuda, cpu]` by default), the way ONNX Runtime intends: its graph
//! partitioner gives TensorRT the nodes it takes, CUDA the nodes TensorRT rejects, and the CPU what
//! neither runs. A provider missing from the loaded ONNX Runtime build is left out with that
//! reason; one that is in the build but fails to register or to build the session (no device, a
//! missing CUDA/cuDNN/TensorRT library, an invalid device id) is dropped with ONNX Runtime's error
//! and the rest are tried again ([`build_on_providers`]).
//!
//! **Observed, not assumed.** Each session is built with profiling on; a warm-up runs the model on
//! zero inputs at the batch axes the batcher produces ([`warm_up_rows`]), then profiling ends and
//! the profile says on which provider each node ran and for how long ([`Placement`]). The provider
//! recorded for the session is the one that ran most of that time, and the shares go to the model
//! status, `models verify` and the log.
//!
//! **Policies.** `on_provider_failure: fail` refuses a model unless a GPU provider registered in its
//! session; `require_gpu: true` also disables ONNX Runtime's CPU fallback
//! (`session.disable_cpu_ep_fallback`) and refuses a model whose warm-up placed any node on the CPU.
//!
//! CUDA and cuDNN are looked for before the first GPU session: the `nvidia-*` wheels that
//! `onnxruntime-gpu` depends on put them under `site-packages/nvidia/*/lib`, which the dynamic
//! loader does not search; they are loaded from there (or from `inference.library_dirs`) once.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Instant,
};

use ort::{
    ep::{ArenaExtendStrategy, ExecutionProvider, ExecutionProviderDispatch, CPU, CUDA, TensorRT},
    session::{builder::SessionBuilder, Session},
    value::Tensor,
};

use crate::config::{ArenaGrowth, ConvSearch, InferenceConfig, Provider, ProviderFailure};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found: {0}")]
    LibraryMissing(String),
    #[error("cannot initialise ONNX Runtime from {path}: {message}")]
    Init { path: String, message: String },
    #[error("no execution provider could load {model}: {attempts}")]
    NoProvider { model: String, attempts: String },
    /// `on_provider_failure: fail` or `require_gpu`, and the session has no GPU provider.
    #[error("{model}: {policy} and no GPU provider registered ({attempts})")]
    NoGpu { model: String, policy: &'static str, attempts: String },
    /// `require_gpu`, and the warm-up ran nodes on the CPU.
    #[error("{model}: inference.require_gpu is true and {nodes} of its nodes ran on CPUExecutionProvider ({placement})")]
    CpuNodes { model: String, nodes: u32, placement: String },
    /// ONNX Runtime could not say whether a provider is in its build.
    #[error("availability check of {provider} failed: {message}")]
    Availability { provider: &'static str, message: String },
    /// The warm-up or its profile failed on a session that was built.
    #[error("{model}: warm-up failed: {message}")]
    WarmUp { model: String, message: String },
}

impl RuntimeError {
    /// A missing or broken library needs an operator; a provider may register later (a GPU that
    /// was busy or not yet visible).
    pub fn retryable(&self) -> bool {
        matches!(self, RuntimeError::NoProvider { .. } | RuntimeError::NoGpu { .. } | RuntimeError::Availability { .. } | RuntimeError::WarmUp { .. })
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

/// ONNX Runtime's name of a provider, e.g. `CUDAExecutionProvider`.
pub fn provider_name(p: Provider) -> &'static str {
    match p {
        Provider::Tensorrt => TensorRT::NAME,
        Provider::Cuda => CUDA::NAME,
        Provider::Cpu => CPU::NAME,
    }
}

/// Whether an ONNX Runtime provider name (or a `+`-joined list of them) names a GPU provider.
pub fn is_gpu_provider(name: &str) -> bool {
    name.split('+').any(|n| n == TensorRT::NAME || n == CUDA::NAME)
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

/// The profiled warm-up could not run or its profile could not be read (retryable: a rebuilt
/// session may warm up).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct WarmUpError(pub String);

impl WarmUpError {
    pub fn retryable(&self) -> bool {
        true
    }
}

/// How much of a model one provider ran in its profiled warm-up.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Placement {
    pub provider: String,
    /// Distinct graph nodes (after ONNX Runtime's fusions: a TensorRT engine is one node).
    pub nodes: u32,
    pub node_share: f64,
    /// Share of the nodes' kernel time.
    pub time_share: f64,
}

/// `CUDAExecutionProvider 100% of 3 nodes, 100% of time; ...`
pub fn placement_text(p: &[Placement]) -> String {
    p.iter().map(|p| format!("{} {:.0}% of nodes ({}), {:.0}% of time", p.provider, p.node_share * 100.0, p.nodes, p.time_share * 100.0)).collect::<Vec<_>>().join("; ")
}

/// Reads an ONNX Runtime profile (a JSON array of trace events): per provider, the distinct nodes
/// that ran and their kernel time. Ordered by time, largest first.
pub fn placement_from_profile(json: &str) -> Result<Vec<Placement>, WarmUpError> {
    let events: Vec<serde_json::Value> = serde_json::from_str(json).map_err(|e| WarmUpError(format!("profile is not a JSON array of events: {e}")))?;
    let mut per: std::collections::BTreeMap<String, (std::collections::BTreeSet<String>, f64)> = Default::default();
    for e in &events {
        if e.get("cat").and_then(|c| c.as_str()) != Some("Node") {
            continue;
        }
        let Some(name) = e.get("name").and_then(|n| n.as_str()).and_then(|n| n.strip_suffix("_kernel_time")) else { continue };
        let Some(provider) = e.pointer("/args/provider").and_then(|p| p.as_str()) else { continue };
        let slot = per.entry(provider.to_string()).or_default();
        slot.0.insert(name.to_string());
        slot.1 += e.get("dur").and_then(|d| d.as_f64()).unwrap_or(0.0);
    }
    let nodes: usize = per.values().map(|(n, _)| n.len()).sum();
    let time: f64 = per.values().map(|(_, t)| t).sum();
    if nodes == 0 {
        return Err(WarmUpError("the profile records no node (did the warm-up run?)".into()));
    }
    let mut out: Vec<Placement> = per
        .into_iter()
        .map(|(provider, (n, t))| Placement { provider, nodes: n.len() as u32, node_share: n.len() as f64 / nodes as f64, time_share: if time > 0.0 { t / time } else { 0.0 } })
        .collect();
    out.sort_by(|a, b| b.time_share.total_cmp(&a.time_share).then(b.nodes.cmp(&a.nodes)));
    Ok(out)
}

/// Batch axes the warm-up runs a model at: 1 on the CPU (its kernels need no per-shape set-up);
/// with a GPU provider also the typical and the largest (TensorRT builds its engine for its
/// profile, CUDA/cuDNN pick kernels and grow their arena per shape), so that the first batches
/// of a stream do not pay for it.
pub fn warm_up_rows(max_rows: usize, typical_rows: usize, gpu: bool) -> Vec<usize> {
    let mut v = vec![1];
    if gpu {
        v.push(typical_rows.clamp(1, max_rows.max(1)));
        v.push(max_rows.max(1));
    }
    v.dedup();
    v.sort_unstable();
    v.dedup();
    v
}

/// What the session of one model version is built for.
pub struct SessionSpec<'a> {
    pub model: &'a str,
    /// The graph input's name (TensorRT's profile names it).
    pub input: &'a str,
    /// The input's dimensions after the batch axis.
    pub dims: &'a [i64],
    /// Largest and typical batch axis the batcher produces for this model.
    pub max_rows: usize,
    pub typical_rows: usize,
}

/// A session, the providers it was built with, and where its warm-up ran.
pub struct ProvidedSession {
    pub session: Session,
    /// The provider that ran most of the warm-up's kernel time, e.g. `CUDAExecutionProvider`.
    pub provider: String,
    /// Providers registered in the session, in priority order.
    pub registered: Vec<&'static str>,
    /// Why listed providers are not in the session.
    pub skipped: Vec<String>,
    /// Per provider, its share of the warm-up's nodes and time.
    pub placement: Vec<Placement>,
    pub warm_up_ms: f64,
}

/// Why one attempt at building a session failed.
#[derive(Debug, Clone)]
pub enum BuildError {
    /// This provider failed to register.
    Register(Provider, String),
    /// The session failed to build with these providers registered.
    Commit(String),
    /// A GPU policy refuses to build on the providers left (none of them is a GPU).
    NoGpuLeft,
}

/// Why [`build_on_providers`] gave up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GaveUp {
    /// Every listed provider was dropped (the list had no CPU).
    #[error("no provider left")]
    NoProviderLeft,
    /// A GPU policy stopped once no GPU provider was left.
    #[error("no GPU provider left")]
    NoGpuLeft,
    /// The session failed on the CPU alone: ONNX Runtime's reason.
    #[error("{0}")]
    Failed(String),
}

/// Builds a session on `providers` with `build`, dropping failed providers: a provider that fails
/// to register is dropped with its error; when the session fails to build, the first GPU provider
/// still listed is taken as the cause and dropped. Returns what was built, the providers it was
/// built on, and one reason per dropped provider. Gives up when the CPU alone fails (or, without
/// the CPU in the list, when no provider is left).
pub fn build_on_providers<S>(mut providers: Vec<Provider>, mut build: impl FnMut(&[Provider]) -> Result<S, BuildError>) -> (Result<(S, Vec<Provider>), GaveUp>, Vec<String>) {
    let mut dropped = Vec::new();
    loop {
        if providers.is_empty() {
            return (Err(GaveUp::NoProviderLeft), dropped);
        }
        match build(&providers) {
            Ok(s) => return (Ok((s, providers)), dropped),
            Err(BuildError::NoGpuLeft) => return (Err(GaveUp::NoGpuLeft), dropped),
            Err(BuildError::Register(p, e)) => {
                dropped.push(format!("{}: registered but failed: {e}", provider_name(p)));
                providers.retain(|&q| q != p);
            }
            Err(BuildError::Commit(e)) => match providers.iter().position(|p| p.is_gpu()) {
                Some(i) => {
                    let p = providers.remove(i);
                    dropped.push(format!("{}: session failed to build with it: {e}", provider_name(p)));
                }
                None => return (Err(GaveUp::Failed(e)), dropped),
            },
        }
    }
}

fn dispatch(cfg: &InferenceConfig, p: Provider, spec: &SessionSpec) -> ExecutionProviderDispatch {
    match p {
        Provider::Tensorrt => {
            let t = &cfg.tensorrt;
            let profile = |rows: usize| {
                let dims: Vec<String> = std::iter::once(rows as i64).chain(spec.dims.iter().copied()).map(|d| d.to_string()).collect();
                format!("{}:{}", spec.input, dims.join("x"))
            };
            let mut trt = TensorRT::default()
                .with_device_id(cfg.cuda.device_id)
                .with_fp16(t.fp16)
                .with_max_workspace_size(t.max_workspace_mb << 20)
                .with_profile_min_shapes(profile(1))
                .with_profile_opt_shapes(profile(spec.typical_rows.clamp(1, spec.max_rows.max(1))))
                .with_profile_max_shapes(profile(spec.max_rows.max(1)));
            if let Some(dir) = &t.cache_dir {
                let dir = dir.display().to_string();
                trt = trt.with_engine_cache(true).with_engine_cache_path(&dir).with_timing_cache(true).with_timing_cache_path(&dir);
            }
            trt.build().error_on_failure()
        }
        Provider::Cuda => {
            let c = &cfg.cuda;
            let mut cuda = CUDA::default()
                .with_device_id(c.device_id)
                .with_arena_extend_strategy(match c.arena_extend_strategy {
                    ArenaGrowth::NextPowerOfTwo => ArenaExtendStrategy::NextPowerOfTwo,
                    ArenaGrowth::SameAsRequested => ArenaExtendStrategy::SameAsRequested,
                })
                .with_conv_algorithm_search(match c.conv_algorithm_search {
                    ConvSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
                    ConvSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
                    ConvSearch::Default => ort::ep::cuda::ConvAlgorithmSearch::Default,
                });
            if c.memory_limit_mb > 0 {
                cuda = cuda.with_memory_limit(c.memory_limit_mb << 20);
            }
            cuda.build().error_on_failure()
        }
        // The CPU arena keeps a run's intermediate values for the next run. Without it each run
        // took its ~4.6 MB buffers from glibc, which (with the binary's fixed mmap threshold,
        // src/malloc.rs) maps them and gives them back: a quarter of the stage's CPU went to page
        // faults (BENCHMARKS.md, "Allocator").
        Provider::Cpu => CPU::default().with_arena_allocator(true).build().error_on_failure(),
    }
}

/// Directories holding the CUDA/cuDNN/TensorRT libraries of the Python environment the ONNX
/// Runtime library comes from: `site-packages/nvidia/*/lib` (also `nvidia/cu13/lib`) and
/// `site-packages/tensorrt_libs`.
pub fn wheel_library_dirs(ort_dylib: &Path) -> Vec<PathBuf> {
    let Some(site) = ort_dylib.ancestors().find(|a| a.file_name().is_some_and(|n| n == "site-packages" || n == "dist-packages")) else { return vec![] };
    let mut dirs = Vec::new();
    let mut visit = |d: PathBuf| {
        if d.is_dir() && std::fs::read_dir(&d).is_ok_and(|mut r| r.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().contains(".so")))) {
            dirs.push(d);
        }
    };
    if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
        let mut pkgs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        pkgs.sort();
        for p in pkgs {
            visit(p.join("lib"));
        }
    }
    visit(site.join("tensorrt_libs"));
    dirs
}

/// TensorRT's libraries (its provider loads them by these names).
const TENSORRT_DYLIBS: &[&str] = &["libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10"];

/// Loads the CUDA, cuDNN and TensorRT libraries found in `dirs`, in dependency order, so the
/// providers find them. Returns (loaded, missing) library names.
fn preload_gpu_libraries(dirs: &[PathBuf]) -> (Vec<String>, Vec<String>) {
    let (mut loaded, mut missing) = (Vec::new(), Vec::new());
    for name in ort::ep::cuda::CUDA_DYLIBS.iter().chain(ort::ep::cuda::CUDNN_DYLIBS).chain(TENSORRT_DYLIBS) {
        match dirs.iter().map(|d| d.join(name)).find(|p| p.exists()) {
            Some(path) => match ort::util::preload_dylib(&path) {
                Ok(()) => loaded.push(name.to_string()),
                Err(e) => missing.push(format!("{name} ({e})")),
            },
            None => missing.push(name.to_string()),
        }
    }
    (loaded, missing)
}

static PRELOADED: OnceLock<()> = OnceLock::new();

/// Once per process, before the first GPU session: CUDA/cuDNN/TensorRT from
/// `inference.library_dirs`, else from the ONNX Runtime library's Python environment.
fn ensure_gpu_libraries(cfg: &InferenceConfig) {
    PRELOADED.get_or_init(|| {
        let dirs = if cfg.library_dirs.is_empty() { dylib_path(cfg).map(|p| wheel_library_dirs(&p)).unwrap_or_default() } else { cfg.library_dirs.clone() };
        if dirs.is_empty() {
            tracing::info!("no CUDA library directory configured or found next to ONNX Runtime; the GPU providers rely on the loader's path (LD_LIBRARY_PATH)");
            return;
        }
        let (loaded, missing) = preload_gpu_libraries(&dirs);
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        tracing::info!(dirs = %dirs.join(":"), loaded = loaded.len(), missing = %missing.join(", "), "GPU libraries preloaded");
    });
}

fn build_session(env: &ort::environment::Environment, cfg: &InferenceConfig, spec: &SessionSpec, providers: &[Provider], bytes: &[u8], profile: &Path) -> Result<Session, BuildError> {
    let commit = |e: ort::Error<SessionBuilder>| BuildError::Commit(e.to_string());
    // The batch axis varies with every batch (documents, pages, lines): memory patterns are
    // planned and kept per input shape, which grew the process with each new batch size.
    let mut b = Session::builder(env).map_err(|e| BuildError::Commit(e.to_string()))?.with_memory_pattern(false).map_err(commit)?;
    if cfg.intra_threads > 0 {
        b = b.with_intra_threads(cfg.intra_threads).map_err(commit)?;
    }
    if cfg.require_gpu {
        b = b.with_disable_cpu_fallback().map_err(commit)?;
    }
    b = b.with_profiling(profile).map_err(commit)?;
    for &p in providers {
        dispatch(cfg, p, spec).register(&mut b).map_err(|e| BuildError::Register(p, e.to_string().trim().to_string()))?;
    }
    b.commit_from_memory(bytes).map_err(|e| BuildError::Commit(e.to_string().trim().to_string()))
}

/// Runs the warm-up shapes on zero inputs with profiling on, ends profiling and reads where the
/// nodes ran. (A failed run returns early; [`session_for`] removes the profile its dropped session
/// writes.)
fn warm_up(session: &mut Session, spec: &SessionSpec, gpu: bool) -> Result<Vec<Placement>, WarmUpError> {
    let per_row: usize = spec.dims.iter().map(|&d| d.max(1) as usize).product();
    for rows in warm_up_rows(spec.max_rows, spec.typical_rows, gpu) {
        let shape: Vec<i64> = std::iter::once(rows as i64).chain(spec.dims.iter().copied()).collect();
        let input = Tensor::from_array((shape, vec![0f32; rows * per_row].into_boxed_slice())).map_err(|e| WarmUpError(e.to_string()))?;
        session.run(ort::inputs![input]).map_err(|e| WarmUpError(format!("run at batch axis {rows}: {e}")))?;
    }
    let file = session.end_profiling().map_err(|e| WarmUpError(format!("ending the profile: {e}")))?;
    let text = std::fs::read_to_string(&file).map_err(|e| WarmUpError(format!("reading the profile {file}: {e}")));
    let _ = std::fs::remove_file(&file);
    placement_from_profile(&text?)
}

/// Builds, warms up and observes the session of `spec.model` from verified bytes.
pub fn session_for(cfg: &InferenceConfig, spec: &SessionSpec, bytes: &[u8]) -> Result<ProvidedSession, RuntimeError> {
    // ONNX Runtime names the file prefix + a timestamp in seconds: sessions of the same model built
    // at the same time (a health check beside a rebuild, tests) need prefixes of their own
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let profile = std::env::temp_dir().join(format!("payslip-ort-profile-{}-{n}-{}", std::process::id(), spec.model));
    let built = build_and_observe(cfg, spec, bytes, &profile);
    if built.is_err() {
        // a session that failed to build leaves an empty profile, one that failed to warm up the
        // profile ONNX Runtime writes when the session is dropped (both gone by now)
        remove_profiles(&profile);
    }
    built
}

/// The files ONNX Runtime wrote for the profile prefix `prefix` (it appends `_<time>.json`).
fn remove_profiles(prefix: &Path) {
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name().and_then(|n| n.to_str())) else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|f| f.strip_prefix(name).is_some_and(|rest| rest.starts_with('_'))) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn build_and_observe(cfg: &InferenceConfig, spec: &SessionSpec, bytes: &[u8], profile: &Path) -> Result<ProvidedSession, RuntimeError> {
    let env = environment(cfg)?;
    let model = spec.model;
    let mut skipped = Vec::new();
    let mut order = Vec::new();
    for p in cfg.inference_order() {
        match provider_available(p) {
            Ok(true) => order.push(p),
            Ok(false) => skipped.push(format!("{}: not included in this ONNX Runtime build", provider_name(p))),
            Err(e) => skipped.push(format!("{}: {e}", provider_name(p))),
        }
    }
    if order.iter().any(|p| p.is_gpu()) {
        ensure_gpu_libraries(cfg);
        if let Some(dir) = &cfg.tensorrt.cache_dir {
            if order.contains(&Provider::Tensorrt) {
                let _ = std::fs::create_dir_all(dir);
            }
        }
    }
    let policy = if cfg.require_gpu { Some("inference.require_gpu is true") } else { (cfg.on_provider_failure == ProviderFailure::Fail).then_some("inference.on_provider_failure is fail") };
    let no_gpu = |skipped: &[String]| RuntimeError::NoGpu { model: model.into(), policy: policy.unwrap_or_default(), attempts: skipped.join("; ") };
    if policy.is_some() && !order.iter().any(|p| p.is_gpu()) {
        return Err(no_gpu(&skipped));
    }
    let (built, dropped) = build_on_providers(order, |ps| {
        // under a GPU policy a session on the CPU alone is not built at all
        if policy.is_some() && !ps.iter().any(|p| p.is_gpu()) {
            return Err(BuildError::NoGpuLeft);
        }
        build_session(&env, cfg, spec, ps, bytes, profile)
    });
    for d in &dropped {
        tracing::warn!(model, reason = %d, "execution provider dropped");
    }
    skipped.extend(dropped);
    let (mut session, providers) = match built {
        Ok(b) => b,
        Err(GaveUp::NoGpuLeft) => return Err(no_gpu(&skipped)),
        Err(e) => return Err(RuntimeError::NoProvider { model: model.into(), attempts: skipped.iter().cloned().chain([e.to_string()]).collect::<Vec<_>>().join("; ") }),
    };
    let gpu = providers.iter().any(|p| p.is_gpu());
    let started = Instant::now();
    let placement = warm_up(&mut session, spec, gpu).map_err(|e| RuntimeError::WarmUp { model: model.into(), message: e.0 })?;
    let warm_up_ms = started.elapsed().as_secs_f64() * 1e3;
    if cfg.require_gpu {
        if let Some(cpu) = placement.iter().find(|p| p.provider == CPU::NAME && p.nodes > 0) {
            return Err(RuntimeError::CpuNodes { model: model.into(), nodes: cpu.nodes, placement: placement_text(&placement) });
        }
    }
    let provider = placement.first().map(|p| p.provider.clone()).unwrap_or_else(|| provider_name(providers[0]).to_string());
    let registered: Vec<&'static str> = providers.iter().map(|&p| provider_name(p)).collect();
    tracing::info!(model, provider = %provider, registered = %registered.join(","), placement = %placement_text(&placement), warm_up_ms, skipped = %skipped.join("; "), "model session created");
    Ok(ProvidedSession { session, provider, registered, skipped, placement, warm_up_ms })
}

impl InferenceConfig {
    /// Providers in the order they are tried; CPU is appended when fallback is allowed and the list
    /// does not end with it, so fallback always has somewhere to go.
    pub fn inference_order(&self) -> Vec<Provider> {
        let mut v = self.providers.clone();
        if self.on_provider_failure == ProviderFailure::Fallback && !self.require_gpu && !v.contains(&Provider::Cpu) {
            v.push(Provider::Cpu);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Provider::*;

    #[test]
    fn a_provider_that_fails_to_register_is_dropped_and_the_rest_share_one_session() {
        let mut tries = Vec::new();
        let (built, dropped) = build_on_providers(vec![Tensorrt, Cuda, Cpu], |ps| {
            tries.push(ps.to_vec());
            if ps.contains(&Tensorrt) {
                Err(BuildError::Register(Tensorrt, "libnvinfer.so.10: cannot open shared object file".into()))
            } else {
                Ok("session")
            }
        });
        assert_eq!(built.unwrap(), ("session", vec![Cuda, Cpu]));
        assert_eq!(tries, vec![vec![Tensorrt, Cuda, Cpu], vec![Cuda, Cpu]]);
        assert_eq!(dropped, vec!["TensorrtExecutionProvider: registered but failed: libnvinfer.so.10: cannot open shared object file".to_string()]);
    }

    #[test]
    fn a_session_that_fails_to_build_drops_gpu_providers_in_order_down_to_the_cpu() {
        let (built, dropped) = build_on_providers(vec![Tensorrt, Cuda, Cpu], |ps| if ps.iter().any(|p| p.is_gpu()) { Err(BuildError::Commit("invalid device ordinal".into())) } else { Ok(()) });
        assert_eq!(built.unwrap().1, vec![Cpu]);
        assert_eq!(dropped.len(), 2);
        assert!(dropped[0].starts_with("TensorrtExecutionProvider: session failed") && dropped[1].starts_with("CUDAExecutionProvider: session failed"), "{dropped:?}");
        // the CPU failing too is the end
        let (built, _) = build_on_providers(vec![Cuda, Cpu], |_| Err::<(), _>(BuildError::Commit("bad model".into())));
        assert_eq!(built.unwrap_err(), GaveUp::Failed("bad model".into()));
        // no CPU in the list: nothing is left once the GPU providers are gone
        let (built, dropped) = build_on_providers(vec![Cuda], |_| Err::<(), _>(BuildError::Register(Cuda, "no device".into())));
        assert!(built.unwrap_err() == GaveUp::NoProviderLeft && dropped.len() == 1);
    }

    #[test]
    fn the_profile_says_where_nodes_ran_and_for_how_long() {
        let json = r#"[
            {"cat":"Session","name":"model_run","dur":900,"args":{}},
            {"cat":"Node","name":"fc1_kernel_time","dur":300,"args":{"op_name":"Gemm","provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"fc1_fence_before","dur":1,"args":{"op_name":"Gemm"}},
            {"cat":"Node","name":"fc1_kernel_time","dur":300,"args":{"op_name":"Gemm","provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"relu_kernel_time","dur":200,"args":{"op_name":"Relu","provider":"CUDAExecutionProvider"}},
            {"cat":"Node","name":"argmax_kernel_time","dur":200,"args":{"op_name":"ArgMax","provider":"CPUExecutionProvider"}}
        ]"#;
        let p = placement_from_profile(json).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].provider.as_str(), p[0].nodes), ("CUDAExecutionProvider", 2));
        assert!((p[0].node_share - 2.0 / 3.0).abs() < 1e-9 && (p[0].time_share - 0.8).abs() < 1e-9, "{p:?}");
        assert_eq!((p[1].provider.as_str(), p[1].nodes), ("CPUExecutionProvider", 1));
        assert!(placement_from_profile("[]").is_err());
    }

    #[test]
    fn warm_up_covers_the_batchers_shapes_on_a_gpu_and_one_row_on_the_cpu() {
        assert_eq!(warm_up_rows(1024, 512, false), vec![1]);
        assert_eq!(warm_up_rows(1024, 512, true), vec![1, 512, 1024]);
        assert_eq!(warm_up_rows(32, 32, true), vec![1, 32]);
        assert_eq!(warm_up_rows(1, 16, true), vec![1]);
    }

    #[test]
    fn gpu_provider_names() {
        assert!(is_gpu_provider("CUDAExecutionProvider") && is_gpu_provider("CPUExecutionProvider+TensorrtExecutionProvider"));
        assert!(!is_gpu_provider("CPUExecutionProvider") && !is_gpu_provider("none"));
    }

    #[test]
    fn wheel_library_dirs_are_found_next_to_the_onnxruntime_library() {
        let site = tempfile::tempdir().unwrap();
        let sp = site.path().join("lib/python3.11/site-packages");
        for d in ["onnxruntime/capi", "nvidia/cudnn/lib", "nvidia/cublas/lib", "nvidia/empty/lib"] {
            std::fs::create_dir_all(sp.join(d)).unwrap();
        }
        std::fs::write(sp.join("nvidia/cudnn/lib/libcudnn.so.9"), b"").unwrap();
        std::fs::write(sp.join("nvidia/cublas/lib/libcublas.so.13"), b"").unwrap();
        let dirs = wheel_library_dirs(&sp.join("onnxruntime/capi/libonnxruntime.so.1.31.0"));
        assert_eq!(dirs, vec![sp.join("nvidia/cublas/lib"), sp.join("nvidia/cudnn/lib")]);
        assert!(wheel_library_dirs(Path::new("/usr/lib/libonnxruntime.so")).is_empty());
    }

    /// Profiles of this process's sessions for `model` still in the temporary directory.
    fn profiles_left(model: &str) -> usize {
        let (start, end) = (format!("payslip-ort-profile-{}-", std::process::id()), format!("-{model}_"));
        std::fs::read_dir(std::env::temp_dir()).unwrap().flatten().filter(|e| e.file_name().to_str().is_some_and(|f| f.starts_with(&start) && f.contains(&end))).count()
    }

    #[test]
    fn a_session_that_fails_to_build_or_to_warm_up_leaves_no_profile_behind() {
        let cfg = InferenceConfig::default();
        let spec = SessionSpec { model: "profile_probe_build", input: "input", dims: &[4], max_rows: 2, typical_rows: 1 };
        assert!(session_for(&cfg, &spec, b"not an ONNX model").is_err());
        assert_eq!(profiles_left("profile_probe_build"), 0);
        // a real model warmed up at input dimensions it does not take: built, then the run fails
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/document_classifier/1.0.0.onnx")).unwrap();
        let spec = SessionSpec { model: "profile_probe_warm_up", input: "input", dims: &[5], max_rows: 2, typical_rows: 1 };
        assert!(matches!(session_for(&cfg, &spec, &bytes), Err(RuntimeError::WarmUp { .. })));
        assert_eq!(profiles_left("profile_probe_warm_up"), 0);
        // and a session that warms up leaves none either
        let spec = SessionSpec { model: "profile_probe_ok", input: "input", dims: &[crate::inference::preprocess::CLASSIFIER_DIM as i64], max_rows: 2, typical_rows: 1 };
        assert!(session_for(&cfg, &spec, &bytes).is_ok());
        assert_eq!(profiles_left("profile_probe_ok"), 0);
    }
}
