//! The operations surface: an HTTP API (axum, on the stages' tokio runtime, its own listener at
//! `api.listen`) with the runbook's health, readiness, metrics and rollout endpoints. The library's
//! wiring (`pipeline::run`) starts it beside whichever stages the process runs.
//!
//! Invariants:
//! - Reads never block a stage: they use the stages' atomics and the monitor's published view
//!   ([`crate::monitor::view`]), or read Kafka topics on a blocking thread.
//! - Mutations go through Kafka like the CLI's: `POST /features/*` publishes a rollout command to
//!   the commands topic with the caller's token name as the operator, and answers with the decision
//!   the monitor published for it (or 504 when none came within `api.command_timeout_ms`). Nothing
//!   else changes state, so a refused request (401/403/400) changed nothing.
//! - `/livez` and `/readyz` are open (probes); other GETs need a `read` token when
//!   `api.read_requires_token`; every POST needs an `operate` token. Tokens are never logged.
//!
//! Files: [`config`] (the `api` section), [`auth`] (tokens and roles), [`metrics`] (`/metrics`),
//! [`server`] (routes and handlers).

pub mod auth;
pub mod config;
pub mod metrics;
pub mod server;

use std::{
    sync::{Arc, RwLock},
    time::Instant,
};

pub use config::ApiConfig;

use crate::{config::PipelineConfig, inference::ModelRegistry, monitor::view::{MonitorView, ViewHandle}, telemetry::InferCounters};

/// What the API reads: set by the wiring as the stages start.
pub struct OpsState {
    pub cfg: PipelineConfig,
    pub brokers: String,
    pub started: Instant,
    pub tokens: auth::Tokens,
    registry: RwLock<Option<Arc<ModelRegistry>>>,
    infer: RwLock<Option<Arc<InferCounters>>>,
    monitor: RwLock<Option<ViewHandle>>,
    /// What start-up waits for before any stage starts (the brokers), while it does.
    waiting: RwLock<Option<String>>,
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState").field("brokers", &self.brokers).field("tokens", &self.tokens).field("stages", &self.readiness()).finish_non_exhaustive()
    }
}

impl OpsState {
    /// Reads the tokens file, if any (a bad file stops start-up with what to fix).
    pub fn new(cfg: PipelineConfig, brokers: String) -> Result<Self, crate::config::ConfigError> {
        let tokens = match &cfg.api.tokens_file {
            Some(p) => auth::Tokens::load(p)?,
            None => auth::Tokens::default(),
        };
        Ok(Self { cfg, brokers, started: Instant::now(), tokens, registry: RwLock::new(None), infer: RwLock::new(None), monitor: RwLock::new(None), waiting: RwLock::new(None) })
    }

    /// Start-up waits for this (`Some`), or no longer (`None`).
    pub fn set_waiting(&self, what: Option<String>) {
        *self.waiting.write().unwrap_or_else(|p| p.into_inner()) = what;
    }

    /// What start-up waits for, while it does.
    pub fn waiting(&self) -> Option<String> {
        self.waiting.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_registry(&self, r: Arc<ModelRegistry>) {
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    pub fn set_infer(&self, c: Arc<InferCounters>) {
        *self.infer.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    pub fn set_monitor(&self, v: ViewHandle) {
        *self.monitor.write().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    pub fn registry(&self) -> Option<Arc<ModelRegistry>> {
        self.registry.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn infer_counters(&self) -> Option<Arc<InferCounters>> {
        self.infer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checkpoints of the running monitor's state, when this process runs the monitor stage.
    pub fn monitor_checkpointer(&self) -> Option<crate::state::Checkpointer> {
        self.monitor.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(ViewHandle::checkpointer)
    }

    /// librdkafka's latest statistics of each stage's producer, by client (`infer`, `monitor`).
    pub fn kafka_stats(&self) -> Vec<(&'static str, crate::kafka::stats::ClientStats)> {
        let mut out = Vec::new();
        if let Some(s) = self.infer_counters().and_then(|c| crate::kafka::stats::latest(&c.producer_stats)) {
            out.push(("infer", s));
        }
        let monitor = self.monitor.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(ViewHandle::producer_stats);
        if let Some(s) = monitor.and_then(|c| crate::kafka::stats::latest(&c)) {
            out.push(("monitor", s));
        }
        out
    }

    pub fn monitor_view(&self) -> Option<MonitorView> {
        self.monitor.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(ViewHandle::get)
    }

    /// Each stage this process runs, and whether it is ready: the infer stage once its start-up
    /// steps are done and it subscribed; the monitor once it leads or stands by.
    pub fn readiness(&self) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        if let Some(c) = self.infer_counters() {
            out.push(("infer", c.ready.load(std::sync::atomic::Ordering::Relaxed)));
        }
        if let Some(v) = self.monitor_view() {
            out.push(("monitor", v.role != crate::monitor::view::Role::Starting));
        }
        out
    }
}
