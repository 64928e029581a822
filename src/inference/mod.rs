//! Model registry and batched execution.
//!
//! At start the registry reads `model_metadata.json`, verifies each served file's sha256, checks the
//! file's declared inputs against what [`preprocess`] produces, and creates ONNX Runtime sessions
//! per (model, version) on the first execution provider that works ([`runtime`]): as many as the
//! infer stage has batches in flight on the CPU, one on a GPU (`inference.sessions_per_model`), a
//! run taking a free one, so concurrent batches never queue for the same model. A version that
//! fails any of these is refused, reported in [`ModelRegistry::status`], and never run; the other
//! models keep serving, and documents get an `error_code` for the refused one.
//!
//! [`ModelRegistry::infer`] runs a batch of documents through every served model with one
//! ONNX Runtime call per model (documents' pages and lines stacked along the batch axis). It blocks:
//! callers run it on a blocking thread.
//!
//! Failures are told apart by cause. Input that the preprocessing cannot use, or a model output of
//! the wrong shape, is an answer (`INFERENCE_FAILED` / `BAD_OUTPUT` in the result). A failed
//! ONNX Runtime run on valid input is the runtime's (device, memory): it is tried again
//! (`inference.run_attempts`, with backoff, each retry on a rebuilt session), and if every try fails
//! `infer` returns [`RunFailure`] instead of answers, so the caller acknowledges nothing.

pub mod announce;
pub mod backup;
pub mod bench;
pub mod gpu;
pub mod metadata;
pub mod preprocess;
pub mod runtime;
pub mod stats;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, RwLock, TryLockError,
    },
    time::{Duration, Instant},
};

use ort::{session::Session, value::TensorRef};

use crate::{
    codec::text_enum::text_enum,
    config::{InferenceConfig, ModelsConfig},
    document::{ModelOutput, PayslipDocument, Raster},
};
use metadata::{ModelEntry, ModelMetadata};
use preprocess::*;

pub const CLASSIFIER: &str = "document_classifier";
pub const TABLES: &str = "table_detection";
pub const TEXT: &str = "text_recognition";
/// Models the infer stage knows how to run.
pub const MODEL_NAMES: [&str; 3] = [CLASSIFIER, TABLES, TEXT];

/// Error codes written into results.
pub mod codes {
    /// The model version is not loaded (refused at load: integrity, shape or provider failure).
    pub const MODEL_UNAVAILABLE: &str = "MODEL_UNAVAILABLE";
    /// ONNX Runtime returned an error for the batch.
    pub const INFERENCE_FAILED: &str = "INFERENCE_FAILED";
    /// The model produced output of an unexpected shape.
    pub const BAD_OUTPUT: &str = "BAD_OUTPUT";
}

/// Marks a failed `Session::run` inside this module (never written into a result): retried, then
/// reported as [`RunFailure`].
const RUNTIME_FAILED: &str = "ONNX_RUNTIME_FAILED";

/// ONNX Runtime failed every try of a model run on valid input: nothing may be answered for the
/// batch. Retryable: restarting (a fresh runtime, a recovered device) may succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{model} {version}: ONNX Runtime failed {attempts} tries of a run (retries on rebuilt sessions): {message}")]
pub struct RunFailure {
    pub model: String,
    pub version: String,
    pub attempts: u32,
    pub message: String,
}

impl RunFailure {
    pub fn retryable(&self) -> bool {
        true
    }
}

text_enum! {
    /// Whether a model version runs.
    pub enum LoadState {
        Loaded = "loaded",
        Refused = "refused",
        /// Loaded earlier, unloaded once nothing routed to it (loaded again if something does).
        Unloaded = "unloaded",
    }
}

/// Why a model version cannot be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is not valid model metadata: {message}")]
    Metadata { path: String, message: String },
    #[error("{model} {version} is not listed in {path}")]
    Unlisted { model: String, version: String, path: String },
    #[error("no preprocessing for model {0}")]
    UnknownModel(String),
    #[error("{model} {version} declares input shape {declared:?}, this build feeds {expected:?}")]
    InputShape { model: String, version: String, declared: Vec<i64>, expected: Vec<i64> },
    #[error("sha256 mismatch for {model} {version} ({path}): expected {expected}, file has {actual}; refusing to load it")]
    Integrity { model: String, version: String, path: String, expected: String, actual: String },
    #[error("{model} {version}: graph inputs {actual:?} do not match metadata {declared:?}")]
    GraphInputs { model: String, version: String, actual: Vec<String>, declared: Vec<String> },
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
}

impl ModelError {
    /// Whether loading again may succeed: a file that could not be read may appear, a GPU may
    /// free up; a wrong shape, a tampered file or a broken metadata file will not change by itself.
    pub fn retryable(&self) -> bool {
        match self {
            ModelError::Read { .. } => true,
            ModelError::Runtime(e) => e.retryable(),
            _ => false,
        }
    }
}

/// Load state of one served model version, as reported by `models verify`, logs and results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    pub model: String,
    pub version: String,
    pub state: LoadState,
    /// The provider that ran most of the warm-up's kernel time.
    pub provider: Option<String>,
    pub load_ms: f64,
    pub reason: Option<String>,
    /// Why configured providers are not in the session (not in this ONNX Runtime build,
    /// registered but failed).
    pub skipped_providers: Vec<String>,
    /// Providers registered in the session, in priority order.
    pub registered_providers: Vec<String>,
    /// Where the profiled warm-up ran the graph's nodes, per provider.
    pub placement: Vec<runtime::Placement>,
    pub warm_up_ms: Option<f64>,
    /// ONNX Runtime sessions the version holds (`inference.sessions_per_model`; 0 when refused).
    pub sessions: usize,
}

struct LoadedModel {
    entry: ModelEntry,
    /// The first character of each label (what the text model's classes stand for).
    glyphs: Vec<char>,
    /// Sessions of the same model: a run takes a free one, so batches in flight run it at once.
    sessions: Vec<Mutex<Session>>,
    /// The session a run waits for when none is free (taken in turn).
    next: AtomicUsize,
    /// `Session::run` calls in progress, and the most there have been at once.
    running: AtomicUsize,
    running_peak: AtomicUsize,
    provider: String,
    registered: Vec<&'static str>,
    placement: Vec<runtime::Placement>,
    warm_up_ms: f64,
    load_ms: f64,
}

/// Sessions per loaded version on the CPU provider, unless `inference.sessions_per_model` says:
/// one per batch the infer stage has in flight ([`crate::infer::PIPELINE_DEPTH`]), so the batch
/// being decoded never waits for the one running a model. More could never run at once.
const CPU_SESSIONS: usize = crate::infer::PIPELINE_DEPTH;

impl LoadedModel {
    /// A free session, or when every one is running, the next in turn once it is done.
    fn session(&self) -> MutexGuard<'_, Session> {
        for s in &self.sessions {
            match s.try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        self.sessions[turn].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sessions of every served model version (and of rollout candidates, loaded when a rollout
/// needs them).
pub struct ModelRegistry {
    loaded: RwLock<BTreeMap<(String, String), Arc<LoadedModel>>>,
    serve: BTreeMap<String, String>,
    status: RwLock<Vec<ModelStatus>>,
    /// The seed (`model_metadata.json`) plus the versions announced on the registry topic since.
    metadata: RwLock<ModelMetadata>,
    inference: InferenceConfig,
    /// When a refused version may be tried again, and how many times it was refused.
    retry: Mutex<BTreeMap<(String, String), (Instant, u32)>>,
    /// One load at a time (loads are rare and heavy; two threads must not load the same version).
    load_lock: Mutex<()>,
    /// Model runs tried again after ONNX Runtime failed them.
    run_retries: AtomicU64,
    /// Run time and batch size of every successful model run, per version.
    runs: stats::RunStats,
    /// Loaded versions that routing no longer names, and since when ([`ModelRegistry::retire_unrouted`]).
    unrouted: Mutex<BTreeMap<(String, String), Instant>>,
}

/// Wait before the first retry of a failed run; each further retry waits 4 times longer.
const RUN_RETRY_FIRST: Duration = Duration::from_millis(200);

/// First wait before a refused version is tried again; doubles per refusal up to [`RETRY_MAX`].
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// Session spec of a model: its input's dimensions after the batch axis, and the largest and
/// typical batch axis the batcher gives it (documents, page rasters, line rasters).
fn spec_rows(name: &str, shapes: &crate::config::RunShapes) -> (usize, usize) {
    match name {
        CLASSIFIER => (shapes.max_documents, shapes.max_documents),
        TABLES => (shapes.max_pages, shapes.max_documents),
        // a synthetic payslip has about 16 text lines
        _ => (shapes.max_lines, (shapes.max_documents * 16).min(shapes.max_lines)),
    }
}

fn expected_input(name: &str) -> Option<Vec<i64>> {
    match name {
        CLASSIFIER => Some(vec![-1, CLASSIFIER_DIM as i64]),
        TABLES => Some(vec![-1, (PAGE_RASTER_H * PAGE_RASTER_W) as i64]),
        TEXT => Some(vec![-1, MAX_LINE_CHARS as i64, (GLYPH_H * GLYPH_W) as i64]),
        _ => None,
    }
}

impl ModelRegistry {
    /// Loads every version named in `models.serve` plus `extra` (name, version) pairs.
    /// Never fails as a whole: refusals are in `status()`. Fails only when the metadata file itself
    /// cannot be read, since then nothing can be verified.
    pub fn load(models: &ModelsConfig, inference: &InferenceConfig, extra: &[(String, String)]) -> Result<Self, ModelError> {
        let meta = ModelMetadata::load(&models.metadata)?;
        let mut wanted: Vec<(String, String)> = models.serve.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        wanted.extend(extra.iter().cloned());
        wanted.sort();
        wanted.dedup();
        let registry = Self::with_metadata(meta, models, inference);
        for (name, version) in wanted {
            registry.ensure_loaded(&name, &version);
        }
        Ok(registry)
    }

    /// A registry over `meta` that has loaded nothing yet (versions load on first use).
    pub fn with_metadata(meta: ModelMetadata, models: &ModelsConfig, inference: &InferenceConfig) -> Self {
        Self {
            loaded: RwLock::new(BTreeMap::new()),
            serve: models.serve.clone(),
            status: RwLock::new(Vec::new()),
            metadata: RwLock::new(meta),
            inference: inference.clone(),
            retry: Mutex::new(BTreeMap::new()),
            load_lock: Mutex::new(()),
            run_retries: AtomicU64::new(0),
            runs: stats::RunStats::default(),
            unrouted: Mutex::new(BTreeMap::new()),
        }
    }

    /// Takes a version announced on the registry topic into the metadata, so it can be loaded
    /// when a decision routes to it. Versions are immutable: the same version with another sha256
    /// is refused (false, logged); a repeated announcement changes nothing.
    pub fn announce(&self, entry: metadata::ModelEntry) -> bool {
        let mut meta = self.metadata.write().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = meta.entry(&entry.name, &entry.version) {
            if !known.sha256.eq_ignore_ascii_case(&entry.sha256) {
                tracing::error!(model = %entry.name, version = %entry.version, known = %known.sha256, announced = %entry.sha256, "announcement refused: this version is known with another sha256 (versions are immutable)");
            }
            return false;
        }
        tracing::info!(model = %entry.name, version = %entry.version, file = %entry.file, "model version announced");
        meta.models.push(entry);
        true
    }

    /// Every version the metadata knows (seed and announced), as (model, version).
    pub fn listed_versions(&self) -> Vec<(String, String)> {
        self.metadata.read().unwrap_or_else(|p| p.into_inner()).models.iter().map(|m| (m.name.clone(), m.version.clone())).collect()
    }

    /// Held-out figures of one version on `docs` (their ground truth): the classifier's accuracy
    /// (overall and on PCDA payslips), the text model's share of lines read exactly.
    pub fn evaluate(&self, name: &str, version: &str, docs: &[PayslipDocument]) -> Result<serde_json::Map<String, serde_json::Value>, RunFailure> {
        let versions: BTreeMap<String, String> = [(name.to_string(), version.to_string())].into();
        let (mut right, mut labelled, mut pcda_right, mut pcda, mut lines_exact, mut lines) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for chunk in docs.chunks(32) {
            let refs: Vec<&PayslipDocument> = chunk.iter().collect();
            for (doc, outs) in chunk.iter().zip(self.run_models(&refs, &versions, &mut 0, false)?) {
                let Some(o) = outs.first() else { continue };
                if let (Some(truth), Some(label)) = (doc.labels.as_ref().map(|l| &l.format), &o.label) {
                    labelled += 1;
                    right += (truth == label) as u64;
                    if truth == "PCDA" {
                        pcda += 1;
                        pcda_right += (truth == label) as u64;
                    }
                }
                let truth: Vec<&str> = doc.pages.iter().flat_map(|p| p.lines.iter()).filter(|l| l.raster.is_some()).map(|l| l.text.trim_end()).collect();
                if !o.lines.is_empty() {
                    lines += truth.len() as u64;
                    lines_exact += truth.iter().zip(&o.lines).filter(|(t, r)| **t == r.as_str()).count() as u64;
                }
            }
        }
        let mut m = serde_json::Map::new();
        m.insert("documents".into(), docs.len().into());
        if labelled > 0 {
            m.insert("accuracy".into(), (right as f64 / labelled as f64).into());
        }
        if pcda > 0 {
            m.insert("pcda_accuracy".into(), (pcda_right as f64 / pcda as f64).into());
        }
        if lines > 0 {
            m.insert("line_exact".into(), (lines_exact as f64 / lines as f64).into());
        }
        Ok(m)
    }

    /// Whether `name` `version` is loaded (never blocks on a load in progress).
    pub fn is_loaded(&self, name: &str, version: &str) -> bool {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).contains_key(&(name.to_string(), version.to_string()))
    }

    /// Loads `name` `version` unless it is loaded; returns whether it is loaded. A refused version
    /// is tried again only after a backoff (2 s, doubling per refusal, at most 5 minutes), so a
    /// passing failure (a file being replaced, a busy device) heals without a restart while a
    /// lasting one costs little.
    pub fn ensure_loaded(&self, name: &str, version: &str) -> bool {
        let key = (name.to_string(), version.to_string());
        if self.is_loaded(name, version) {
            return true;
        }
        let _one_at_a_time = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_loaded(name, version) {
            return true; // another thread loaded it meanwhile
        }
        if self.retry.lock().unwrap_or_else(|p| p.into_inner()).get(&key).is_some_and(|(at, _)| Instant::now() < *at) {
            return false;
        }
        let started = Instant::now();
        let meta = self.metadata.read().unwrap_or_else(|p| p.into_inner()).clone();
        let result = Self::load_one(&meta, &self.inference, name, version);
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        // the latest attempt is the status
        status.retain(|s| !(s.model == name && s.version == version));
        match result {
            Ok((mut model, skipped)) => {
                model.load_ms = load_ms;
                tracing::info!(model = %name, %version, provider = %model.provider, load_ms, warm_up_ms = model.warm_up_ms, "model loaded");
                status.push(ModelStatus {
                    model: name.into(),
                    version: version.into(),
                    state: LoadState::Loaded,
                    provider: Some(model.provider.clone()),
                    load_ms,
                    reason: None,
                    skipped_providers: skipped,
                    registered_providers: model.registered.iter().map(|p| p.to_string()).collect(),
                    placement: model.placement.clone(),
                    warm_up_ms: Some(model.warm_up_ms),
                    sessions: model.sessions.len(),
                });
                self.retry.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                self.loaded.write().unwrap_or_else(|p| p.into_inner()).insert(key, Arc::new(model));
                true
            }
            Err(reason) => {
                let mut retry = self.retry.lock().unwrap_or_else(|p| p.into_inner());
                let refusals = retry.get(&key).map_or(0, |(_, n)| *n) + 1;
                let wait = RETRY_FIRST.saturating_mul(1 << (refusals - 1).min(16)).min(RETRY_MAX);
                retry.insert(key, (Instant::now() + wait, refusals));
                tracing::error!(model = %name, %version, %reason, refusals, retry_in_s = wait.as_secs(), "model version refused");
                status.push(ModelStatus {
                    model: name.into(),
                    version: version.into(),
                    state: LoadState::Refused,
                    provider: None,
                    load_ms,
                    reason: Some(reason.to_string()),
                    skipped_providers: vec![],
                    registered_providers: vec![],
                    placement: vec![],
                    warm_up_ms: None,
                    sessions: 0,
                });
                false
            }
        }
    }

    fn load_one(meta: &ModelMetadata, inference: &InferenceConfig, name: &str, version: &str) -> Result<(LoadedModel, Vec<String>), ModelError> {
        let (model, ver) = (name.to_string(), version.to_string());
        let entry = meta.entry(name, version).ok_or_else(|| ModelError::Unlisted { model: model.clone(), version: ver.clone(), path: meta.dir.join("model_metadata.json").display().to_string() })?;
        let expected = expected_input(name).ok_or_else(|| ModelError::UnknownModel(model.clone()))?;
        let declared = entry.inputs.first().map(|i| i.shape.clone()).unwrap_or_default();
        if declared != expected {
            return Err(ModelError::InputShape { model, version: ver, declared, expected });
        }
        let bytes = metadata::read_verified(meta, entry)?;
        let input = entry.inputs.first().map(|i| i.name.as_str()).unwrap_or("input");
        let (max_rows, typical_rows) = spec_rows(name, &inference.shapes);
        let spec = runtime::SessionSpec { model: name, input, dims: &expected[1..], max_rows, typical_rows };
        let ps = runtime::session_for(inference, &spec, &bytes)?;
        let actual: Vec<String> = ps.session.inputs().iter().map(|i| i.name().to_string()).collect();
        if actual.first().map(String::as_str) != entry.inputs.first().map(|i| i.name.as_str()) {
            return Err(ModelError::GraphInputs { model, version: ver, actual, declared: entry.inputs.iter().map(|i| i.name.clone()).collect() });
        }
        let glyphs = entry.labels.iter().map(|l| l.chars().next().unwrap_or(' ')).collect();
        // more sessions of the same bytes on the same providers, each warmed up like the first
        let count = inference.sessions_per_model.unwrap_or(if runtime::is_gpu_provider(&ps.provider) { 1 } else { CPU_SESSIONS });
        let mut sessions = vec![Mutex::new(ps.session)];
        for _ in 1..count {
            sessions.push(Mutex::new(runtime::session_for(inference, &spec, &bytes)?.session));
        }
        let model = LoadedModel {
            entry: entry.clone(),
            glyphs,
            sessions,
            next: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            running_peak: AtomicUsize::new(0),
            provider: ps.provider,
            registered: ps.registered,
            placement: ps.placement,
            warm_up_ms: ps.warm_up_ms,
            load_ms: 0.0,
        };
        Ok((model, ps.skipped))
    }

    /// Versions loaded.
    pub fn loaded_count(&self) -> usize {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// ONNX Runtime sessions held, over every loaded version.
    pub fn session_count(&self) -> usize {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).values().map(|m| m.sessions.len()).sum()
    }

    /// The most `Session::run` calls of `name` `version` there have been at once since it was
    /// loaded (0 when it is not loaded or never ran).
    pub fn concurrent_runs_peak(&self, name: &str, version: &str) -> usize {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).get(&(name.to_string(), version.to_string())).map_or(0, |m| m.running_peak.load(Ordering::Relaxed))
    }

    /// Unloads the loaded versions that `in_use` has not named for `grace`: their sessions and
    /// memory go as soon as no batch holds them (a batch in flight keeps its own reference). A
    /// version named again before the grace is over stays. Returns the versions unloaded.
    pub fn retire_unrouted(&self, in_use: &std::collections::BTreeSet<(String, String)>, grace: Duration) -> Vec<(String, String)> {
        let now = Instant::now();
        let loaded: Vec<(String, String)> = self.loaded.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let mut unrouted = self.unrouted.lock().unwrap_or_else(|p| p.into_inner());
        unrouted.retain(|k, _| !in_use.contains(k) && loaded.contains(k));
        let mut gone = Vec::new();
        for key in loaded.into_iter().filter(|k| !in_use.contains(k)) {
            let since = *unrouted.entry(key.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                gone.push(key);
            }
        }
        if gone.is_empty() {
            return gone;
        }
        let _one_at_a_time = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        for key in &gone {
            unrouted.remove(key);
            loaded.remove(key);
            if let Some(s) = status.iter_mut().find(|s| s.model == key.0 && s.version == key.1) {
                s.state = LoadState::Unloaded;
                s.reason = Some(format!("unloaded: no rollout or served version routed to it for {} ms", grace.as_millis()));
            }
            tracing::info!(model = %key.0, version = %key.1, sessions = loaded.len(), "model version unloaded: nothing routes to it");
        }
        gone
    }

    pub fn status(&self) -> Vec<ModelStatus> {
        self.status.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Versions served by default (the baseline), by model name.
    pub fn served_versions(&self) -> &BTreeMap<String, String> {
        &self.serve
    }

    /// The providers the served versions run on, distinct, `+`-joined in model order (e.g.
    /// `CUDAExecutionProvider`, or `CUDAExecutionProvider+CPUExecutionProvider` when one model
    /// fell back); `none` when none is loaded.
    pub fn provider(&self) -> String {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        provider_of(self.serve.iter().filter_map(|(m, v)| loaded.get(&(m.clone(), v.clone()))).map(|m| m.provider.as_str()))
    }

    /// Model runs tried again after ONNX Runtime failed them (since start).
    pub fn run_retries(&self) -> u64 {
        self.run_retries.load(Ordering::Relaxed)
    }

    /// Run statistics per version (`/metrics`, `/performance/slow-models`).
    pub fn run_stats(&self) -> &stats::RunStats {
        &self.runs
    }

    /// Every version this registry knows (loaded or refused), as (model, version).
    pub fn known_versions(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self.status().into_iter().map(|s| (s.model, s.version)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks one version in isolation, without touching what serves: reads the file and verifies
    /// its sha256 and input shape, builds a fresh session (reporting the provider it got and the
    /// load time) and runs `doc` through it once.
    pub fn check_isolated(&self, name: &str, version: &str, doc: &PayslipDocument) -> ModelCheck {
        let started = Instant::now();
        let meta = self.metadata.read().unwrap_or_else(|p| p.into_inner()).clone();
        let loaded = Self::load_one(&meta, &self.inference, name, version);
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut check = ModelCheck {
            model: name.into(),
            version: version.into(),
            ok: false,
            provider: None,
            placement: vec![],
            skipped_providers: vec![],
            load_ms,
            test_inference_ms: None,
            result: None,
            error: None,
        };
        let (model, model_skipped) = match loaded {
            Ok(m) => m,
            Err(e) => {
                check.error = Some(e.to_string());
                return check;
            }
        };
        check.provider = Some(model.provider.clone());
        check.placement = model.placement.clone();
        check.skipped_providers = model_skipped;
        let t = Instant::now();
        let run = match name {
            CLASSIFIER => run_classifier(&model, &[doc]),
            TABLES => run_tables(&model, &[doc]),
            TEXT => run_text(&model, &[doc]),
            _ => Err((codes::MODEL_UNAVAILABLE, format!("no runner for {name}"))),
        };
        check.test_inference_ms = Some(t.elapsed().as_secs_f64() * 1e3);
        match run {
            Ok(fills) => {
                let mut o = unavailable(name, version);
                o.error_code = None;
                if let Some(f) = fills.into_iter().next() {
                    f(&mut o);
                }
                check.ok = o.error_code.is_none();
                check.error = o.error_code.clone();
                check.result = Some(match (&o.label, o.regions.len(), o.lines.len()) {
                    (Some(l), _, _) => format!("label {l} ({:.2})", o.confidence.unwrap_or_default()),
                    (None, r, 0) => format!("{r} table regions"),
                    (None, _, n) => format!("{n} text lines read"),
                });
            }
            Err((code, message)) => check.error = Some(format!("{code}: {message}")),
        }
        check
    }

    /// Replaces the session of a loaded version with a fresh one (after a failed run). Keeps the
    /// old one when the rebuild fails.
    fn rebuild(&self, name: &str, version: &str) -> Option<Arc<LoadedModel>> {
        let _one_at_a_time = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let meta = self.metadata.read().unwrap_or_else(|p| p.into_inner()).clone();
        match Self::load_one(&meta, &self.inference, name, version) {
            Ok((mut model, _)) => {
                model.load_ms = started.elapsed().as_secs_f64() * 1e3;
                let model = Arc::new(model);
                self.loaded.write().unwrap_or_else(|p| p.into_inner()).insert((name.to_string(), version.to_string()), model.clone());
                tracing::info!(model = %name, %version, load_ms = model.load_ms, "session rebuilt");
                Some(model)
            }
            Err(e) => {
                tracing::warn!(model = %name, %version, error = %e, "session rebuild failed; retrying on the old session");
                None
            }
        }
    }

    /// Runs `docs` through each model at the version given in `versions`. Returns, per document, one
    /// output per model, in `versions` order. Documents must have passed `validate`.
    pub fn infer(&self, docs: &[&PayslipDocument], versions: &BTreeMap<String, String>) -> Result<Vec<Vec<ModelOutput>>, RunFailure> {
        self.infer_with_faults(docs, versions, &mut 0)
    }

    /// [`infer`](Self::infer) where the next `injected_failures` model runs fail as if ONNX Runtime
    /// had failed them (the `fault-ort-failures` test seam).
    pub fn infer_with_faults(&self, docs: &[&PayslipDocument], versions: &BTreeMap<String, String>, injected_failures: &mut u32) -> Result<Vec<Vec<ModelOutput>>, RunFailure> {
        self.run_models(docs, versions, injected_failures, true)
    }

    /// Runs `doc` once through every served version without counting it anywhere: ONNX Runtime's
    /// first-run allocations happen here rather than in the first batch, and a version that cannot
    /// run is found before the stage reads a document.
    pub fn warm_up(&self, doc: &PayslipDocument) -> Result<(), RunFailure> {
        self.run_models(&[doc], &self.serve, &mut 0, false).map(|_| ())
    }

    fn run_models(&self, docs: &[&PayslipDocument], versions: &BTreeMap<String, String>, injected_failures: &mut u32, record: bool) -> Result<Vec<Vec<ModelOutput>>, RunFailure> {
        let mut out: Vec<Vec<ModelOutput>> = vec![Vec::with_capacity(versions.len()); docs.len()];
        for (name, version) in versions {
            let get = || self.loaded.read().unwrap_or_else(|p| p.into_inner()).get(&(name.clone(), version.clone())).cloned();
            // a version refused earlier is tried again once its backoff has passed
            let model = get().or_else(|| self.ensure_loaded(name, version).then(get).flatten());
            let Some(model) = model else {
                for o in out.iter_mut() {
                    o.push(unavailable(name, version));
                }
                continue;
            };
            let mut model = model;
            let mut attempt = 1u32;
            let (per_doc, latency_ms) = loop {
                let started = Instant::now();
                let r = if *injected_failures > 0 {
                    *injected_failures -= 1;
                    Err((RUNTIME_FAILED, "injected failure (fault-ort-failures)".to_string()))
                } else {
                    match name.as_str() {
                        CLASSIFIER => run_classifier(&model, docs),
                        TABLES => run_tables(&model, docs),
                        TEXT => run_text(&model, docs),
                        _ => Err((codes::MODEL_UNAVAILABLE, format!("no runner for {name}"))),
                    }
                };
                let latency_ms = started.elapsed().as_secs_f64() * 1e3;
                match r {
                    Err((RUNTIME_FAILED, message)) => {
                        if attempt >= self.inference.run_attempts {
                            tracing::error!(model = %name, %version, attempts = attempt, %message, "ONNX Runtime failed every try; the batch is not answered");
                            return Err(RunFailure { model: name.clone(), version: version.clone(), attempts: attempt, message });
                        }
                        let wait = RUN_RETRY_FIRST.saturating_mul(4u32.saturating_pow(attempt - 1));
                        tracing::warn!(model = %name, %version, attempt, %message, retry_in_ms = wait.as_millis() as u64, "ONNX Runtime run failed; retrying on a rebuilt session");
                        self.run_retries.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(wait);
                        if let Some(m) = self.rebuild(name, version) {
                            model = m;
                        }
                        attempt += 1;
                    }
                    other => break (other, latency_ms),
                }
            };
            if record && per_doc.is_ok() {
                self.runs.observe(name, version, latency_ms, docs.len());
            }
            let base = ModelOutput {
                model: name.clone(),
                version: version.clone(),
                provider: model.provider.clone(),
                latency_ms,
                batch_size: docs.len() as i32,
                error_code: None,
                label: None,
                confidence: None,
                regions: vec![],
                lines: vec![],
                load_ms: Some(model.load_ms),
            };
            match per_doc {
                Ok(results) => {
                    for (o, r) in out.iter_mut().zip(results) {
                        let mut m = base.clone();
                        r(&mut m);
                        o.push(m);
                    }
                }
                Err((code, message)) => {
                    tracing::warn!(model = %name, %version, code, %message, "batch inference failed");
                    for o in out.iter_mut() {
                        o.push(ModelOutput { error_code: Some(code.to_string()), ..base.clone() });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One version checked in isolation ([`ModelRegistry::check_isolated`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCheck {
    pub model: String,
    pub version: String,
    /// The file verified, a session built, and the test inference answered without an error.
    pub ok: bool,
    pub provider: Option<String>,
    /// Where the session's profiled warm-up ran the graph's nodes.
    pub placement: Vec<runtime::Placement>,
    pub skipped_providers: Vec<String>,
    pub load_ms: f64,
    pub test_inference_ms: Option<f64>,
    /// What the test inference answered, in words.
    pub result: Option<String>,
    pub error: Option<String>,
}

/// A result's provider from its outputs' (or the served versions'): the distinct providers in
/// order, `+`-joined, without `none` (a model that did not run); `none` when nothing ran.
pub fn provider_of<'a>(providers: impl IntoIterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for p in providers {
        if p != "none" && !p.is_empty() && !seen.contains(&p) {
            seen.push(p);
        }
    }
    if seen.is_empty() {
        "none".into()
    } else {
        seen.join("+")
    }
}

fn unavailable(name: &str, version: &str) -> ModelOutput {
    ModelOutput {
        model: name.to_string(),
        version: version.to_string(),
        provider: "none".into(),
        latency_ms: 0.0,
        batch_size: 0,
        error_code: Some(codes::MODEL_UNAVAILABLE.into()),
        label: None,
        confidence: None,
        regions: vec![],
        lines: vec![],
        load_ms: None,
    }
}

type Fill = Box<dyn FnOnce(&mut ModelOutput) + Send>;
type RunResult = Result<Vec<Fill>, (&'static str, String)>;

/// Input buffers kept for reuse, per pool (the text model's, the other models'): at most
/// [`KEEP_INPUT_BUFFERS`] (one per batch in flight), each of at most [`KEEP_INPUT_FLOATS`] (a text
/// run on a GPU of `batching.max_lines_per_run` = 1,024 lines is 3.1 M floats; on the CPU a text run
/// is [`CPU_TEXT_RUN_LINES`] lines); a larger one is freed after its run. What is kept is what the
/// last batches needed anyway, so the peak does not grow, and a busy stage stops paying page faults
/// for fresh buffers.
const KEEP_INPUT_FLOATS: usize = 4 << 20;
const KEEP_INPUT_BUFFERS: usize = 2;

static INPUT_BUFFERS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// The text model's inputs, kept apart: each line slot remembers how many of its glyph cells may
/// be non-zero, so a line rewrites its cells and clears only the ones the slot's last line wrote
/// beyond them. Clearing every line's padding (most of its 48 cells) was more of the text model's
/// preprocessing than sampling the line itself.
static TEXT_INPUTS: Mutex<Vec<TextInput>> = Mutex::new(Vec::new());

#[derive(Default)]
struct TextInput {
    cells: Vec<f32>,
    /// Per line slot: the glyph cells that may be non-zero (the rest of the slot is zero).
    written: Vec<u8>,
}

/// A buffer the pools keep, by its size in floats.
trait Pooled: Default {
    fn floats(&self) -> usize;
}

impl Pooled for Vec<f32> {
    fn floats(&self) -> usize {
        self.capacity()
    }
}

impl Pooled for TextInput {
    fn floats(&self) -> usize {
        self.cells.capacity()
    }
}

/// Runs `f` on a buffer taken from `pool` (a new one when it is empty) and keeps the buffer
/// afterwards within [`KEEP_INPUT_BUFFERS`] and [`KEEP_INPUT_FLOATS`].
fn with_pooled<B: Pooled, T>(pool: &Mutex<Vec<B>>, f: impl FnOnce(&mut B) -> T) -> T {
    let mut buf = pool.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
    let out = f(&mut buf);
    if buf.floats() <= KEEP_INPUT_FLOATS {
        let mut kept = pool.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEEP_INPUT_BUFFERS {
            kept.push(buf);
        }
    }
    out
}

thread_local! {
    static SESSION_RUN_NANOS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static SESSION_RUN_CPU_NANOS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Time this thread spent inside ONNX Runtime's `Session::run` since it started, seconds: what the
/// models alone cost on exactly the inputs the stage built (the benchmark harness's limit).
pub fn session_run_seconds() -> f64 {
    SESSION_RUN_NANOS.with(|c| c.get()) as f64 / 1e9
}

/// CPU time of this thread inside `Session::run` since it started, seconds: [`session_run_seconds`]
/// without the time other processes had the core (with `inference.intra_threads: 1` ONNX Runtime
/// runs on the calling thread, so this is all of its CPU).
pub fn session_run_cpu_seconds() -> f64 {
    SESSION_RUN_CPU_NANOS.with(|c| c.get()) as f64 / 1e9
}

/// Time and CPU time inside `Session::run`, every thread of the process together, nanoseconds:
/// what `/metrics` shows against the process's own CPU ([`process_session_run_seconds`]).
static PROCESS_SESSION_RUN_NANOS: AtomicU64 = AtomicU64::new(0);
static PROCESS_SESSION_RUN_CPU_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time and CPU time spent inside ONNX Runtime's `Session::run` by every thread of this process
/// since it started, seconds: the models' own share of the process's CPU (with
/// `inference.intra_threads: 1` ONNX Runtime runs on the calling thread, so the CPU time is all of
/// its work; with more, its pool threads' work is not counted here).
pub fn process_session_run_seconds() -> (f64, f64) {
    (PROCESS_SESSION_RUN_NANOS.load(Ordering::Relaxed) as f64 / 1e9, PROCESS_SESSION_RUN_CPU_NANOS.load(Ordering::Relaxed) as f64 / 1e9)
}

/// This thread's CPU time, nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `f` on an input buffer of `len` floats (contents unspecified: `f` writes every element),
/// taken from the kept buffers when one is there.
fn with_input<T>(len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    with_pooled(&INPUT_BUFFERS, |buf: &mut Vec<f32>| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// The text model's input for `rasters` (one slot of `LINE_CELLS_LEN` per line), built in a kept
/// buffer that clears only what earlier lines left; `f` gets it once every line is in.
fn with_text_input<'r, T>(rasters: impl Iterator<Item = &'r Raster>, lines: usize, f: impl FnOnce(&[f32]) -> Result<T, (&'static str, String)>) -> Result<T, (&'static str, String)> {
    with_pooled(&TEXT_INPUTS, |buf: &mut TextInput| {
        if buf.written.len() < lines {
            buf.cells.resize(lines * LINE_CELLS_LEN, 0.0);
            buf.written.resize(lines, 0);
        }
        for ((r, out), written) in rasters.zip(buf.cells.chunks_exact_mut(LINE_CELLS_LEN)).zip(buf.written.iter_mut()) {
            let before = std::mem::replace(written, MAX_LINE_CHARS as u8);
            *written = line_cells_over(r, out, before as usize).map_err(|e| (codes::INFERENCE_FAILED, e.to_string()))? as u8;
        }
        f(&buf.cells[..lines * LINE_CELLS_LEN])
    })
}

/// Runs one model on a stacked input (a view of `data`, not a copy) and hands the output's shape and
/// values to `read` while they are still ONNX Runtime's (no copy either).
fn run_model<T>(model: &LoadedModel, shape: &[i64], data: &[f32], read: impl FnOnce(&[i64], &[f32]) -> Result<T, (&'static str, String)>) -> Result<T, (&'static str, String)> {
    let input = TensorRef::from_array_view((shape.to_vec(), data)).map_err(|e| (codes::INFERENCE_FAILED, e.to_string()))?;
    let mut session = model.session();
    let running = model.running.fetch_add(1, Ordering::Relaxed) + 1;
    model.running_peak.fetch_max(running, Ordering::Relaxed);
    let (started, cpu) = (Instant::now(), thread_cpu_nanos());
    let outputs = session.run(ort::inputs![input]);
    let (wall, cpu) = (started.elapsed().as_nanos() as u64, thread_cpu_nanos().saturating_sub(cpu));
    model.running.fetch_sub(1, Ordering::Relaxed);
    let outputs = outputs.map_err(|e| (RUNTIME_FAILED, e.to_string()))?;
    SESSION_RUN_NANOS.with(|c| c.set(c.get() + wall));
    SESSION_RUN_CPU_NANOS.with(|c| c.set(c.get() + cpu));
    PROCESS_SESSION_RUN_NANOS.fetch_add(wall, Ordering::Relaxed);
    PROCESS_SESSION_RUN_CPU_NANOS.fetch_add(cpu, Ordering::Relaxed);
    let (shape, values) = outputs[0].try_extract_tensor::<f32>().map_err(|e| (codes::BAD_OUTPUT, e.to_string()))?;
    read(shape, values)
}

/// The first position of the largest value above `f32::MIN` (NaN never wins), with the value;
/// `(0, f32::MIN)` when there is none. Both passes work eight values at a time, in the vector
/// registers the compiler keeps them in: the largest value, then the first chunk holding it (a
/// mask of the equal lanes) and its first lane there. The greedy text decoding calls this for
/// every glyph cell of every line, padding included.
fn argmax(row: &[f32]) -> (usize, f32) {
    const LANES: usize = 8;
    let mut lanes = [f32::MIN; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks.clone() {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::MIN, |m, &v| if v > m { v } else { m });
    if max <= f32::MIN {
        return (0, f32::MIN);
    }
    for (c, chunk) in chunks.enumerate() {
        let mut equal = 0u32;
        for (j, &v) in chunk.iter().enumerate() {
            equal |= ((v == max) as u32) << j;
        }
        if equal != 0 {
            let i = c * LANES + equal.trailing_zeros() as usize;
            return (i, row[i]);
        }
    }
    let i = row.len() - rest.len() + rest.iter().position(|&v| v == max).expect("the largest value is in the row");
    (i, row[i])
}

fn run_classifier(model: &LoadedModel, docs: &[&PayslipDocument]) -> RunResult {
    let n = docs.len();
    with_input(n * CLASSIFIER_DIM, |data| {
        for (d, out) in docs.iter().zip(data.chunks_exact_mut(CLASSIFIER_DIM)) {
            classifier_features_into(d.pages.iter().flat_map(|p| p.lines.iter().flat_map(|l| [l.text.as_str(), "\n"])), out);
        }
        run_model(model, &[n as i64, CLASSIFIER_DIM as i64], data, |shape, probs| {
            let k = model.entry.labels.len();
            if shape != [n as i64, k as i64] {
                return Err((codes::BAD_OUTPUT, format!("classifier output shape {shape:?}, expected [{n}, {k}]")));
            }
            Ok(probs
                .chunks_exact(k)
                .map(|row| {
                    let (best, p) = argmax(row);
                    let label = model.entry.labels[best].clone();
                    Box::new(move |o: &mut ModelOutput| {
                        o.label = Some(label);
                        o.confidence = Some(p);
                    }) as Fill
                })
                .collect())
        })
    })
}

fn run_tables(model: &LoadedModel, docs: &[&PayslipDocument]) -> RunResult {
    // (document index, page number, page size) for each stacked page raster
    let index: Vec<(usize, i32, f32, f32)> =
        docs.iter().enumerate().flat_map(|(i, d)| d.pages.iter().filter(|p| p.raster.is_some()).map(move |p| (i, p.number, p.width, p.height))).collect();
    let mut regions: Vec<Vec<crate::document::Region>> = vec![vec![]; docs.len()];
    if !index.is_empty() {
        let rasters = docs.iter().flat_map(|d| d.pages.iter().filter_map(|p| p.raster.as_ref()));
        let cells = TABLE_GRID_W * TABLE_GRID_H;
        with_input(index.len() * PAGE_TENSOR_LEN, |data| {
            for (r, out) in rasters.zip(data.chunks_exact_mut(PAGE_TENSOR_LEN)) {
                page_tensor_into(r, out).map_err(|e| (codes::INFERENCE_FAILED, e.to_string()))?;
            }
            run_model(model, &[index.len() as i64, PAGE_TENSOR_LEN as i64], data, |shape, probs| {
                if shape != [index.len() as i64, cells as i64] {
                    return Err((codes::BAD_OUTPUT, format!("table output shape {shape:?}, expected [{}, {cells}]", index.len())));
                }
                for (&(doc, page, w, h), row) in index.iter().zip(probs.chunks_exact(cells)) {
                    regions[doc].extend(regions_from_cells(row, page, w, h, 0.5));
                }
                Ok(())
            })
        })?;
    }
    Ok(regions.into_iter().map(|r| Box::new(move |o: &mut ModelOutput| o.regions = r) as Fill).collect())
}

/// Lines of the text model's input per ONNX Runtime run on the CPU. A batch of 32 synthetic
/// payslips holds about 500 lines: 6.3 MB of input and 4.5 MB of output in one run, and a batch
/// of the heaviest documents within limits far more, all of it kept (the input buffer in its pool,
/// ONNX Runtime's arena). In runs of 64 lines (786 KB in, 565 KB out) the stage drained a backlog
/// at 73 MB of peak RSS instead of 95, at the same CPU per document, and `models bench` ran a
/// quarter faster (BENCHMARKS.md "The text model in runs of 64 lines"). Each line's answer is its
/// own: a document gets the same answers alone as in any batch (tested).
pub const CPU_TEXT_RUN_LINES: usize = 64;

/// Lines per text-model run for a session on `provider`: on a GPU one run takes the whole batch,
/// where larger runs are what keeps the device busy.
fn text_run_lines_on(provider: &str) -> usize {
    if runtime::is_gpu_provider(provider) {
        usize::MAX
    } else {
        CPU_TEXT_RUN_LINES
    }
}

fn run_text(model: &LoadedModel, docs: &[&PayslipDocument]) -> RunResult {
    // the document each stacked line raster belongs to
    let owner: Vec<usize> = docs.iter().enumerate().flat_map(|(i, d)| d.pages.iter().flat_map(|p| p.lines.iter()).filter(|l| l.raster.is_some()).map(move |_| i)).collect();
    let mut lines: Vec<Vec<String>> = docs.iter().map(|d| Vec::with_capacity(d.pages.iter().map(|p| p.lines.len()).sum())).collect();
    let mut rasters = docs.iter().flat_map(|d| d.pages.iter().flat_map(|p| p.lines.iter().filter_map(|l| l.raster.as_ref())));
    for owner in owner.chunks(text_run_lines_on(&model.provider)) {
        with_text_input(rasters.by_ref().take(owner.len()), owner.len(), |data| {
            run_model(model, &[owner.len() as i64, MAX_LINE_CHARS as i64, (GLYPH_H * GLYPH_W) as i64], data, |shape, probs| {
                let k = model.entry.labels.len();
                if shape != [owner.len() as i64, MAX_LINE_CHARS as i64, k as i64] {
                    return Err((codes::BAD_OUTPUT, format!("text output shape {shape:?}, expected [{}, {MAX_LINE_CHARS}, {k}]", owner.len())));
                }
                for (&doc, line) in owner.iter().zip(probs.chunks_exact(MAX_LINE_CHARS * k)) {
                    let mut text = String::with_capacity(MAX_LINE_CHARS);
                    text.extend(line.chunks_exact(k).map(|p| model.glyphs[argmax(p).0]));
                    text.truncate(text.trim_end().len());
                    lines[doc].push(text);
                }
                Ok(())
            })
        })?;
    }
    Ok(lines.into_iter().map(|l| Box::new(move |o: &mut ModelOutput| o.lines = l) as Fill).collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// The argmax as first written: one fold, strictly greater replaces.
    fn reference_argmax(row: &[f32]) -> (usize, f32) {
        row.iter().enumerate().fold((0, f32::MIN), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc })
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => 0f32..1.0,
            1 => prop::sample::select(vec![0.0, -0.0, 1.0, 0.5, f32::MIN, f32::MAX, f32::NEG_INFINITY, f32::INFINITY, f32::NAN]),
            1 => any::<f32>(),
        ]
    }

    proptest! {
        #[test]
        fn text_inputs_from_kept_buffers_are_built_afresh(runs in prop::collection::vec(prop::collection::vec(1i32..420, 0..12), 1..6)) {
            use crate::document::{Raster, RasterEncoding};
            for (i, widths) in runs.iter().enumerate() {
                let rasters: Vec<Raster> = widths.iter().map(|&w| Raster { width: w, height: 8, encoding: RasterEncoding::GRAY8, pixels: vec![(i * 40 + 1) as u8; w as usize * 8] }).collect();
                let fresh: Vec<f32> = rasters.iter().flat_map(|r| super::line_cells(r).unwrap()).collect();
                let built = super::with_text_input(rasters.iter(), rasters.len(), |data| Ok(data.to_vec())).unwrap();
                prop_assert_eq!(built, fresh);
            }
        }

        #[test]
        fn argmax_matches_the_first_implementation(row in prop::collection::vec(value(), 0..40)) {
            let (i, v) = super::argmax(&row);
            let (ri, rv) = reference_argmax(&row);
            prop_assert_eq!(i, ri);
            prop_assert_eq!(v.to_bits(), rv.to_bits());
        }
    }
}
