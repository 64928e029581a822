//! Routes and handlers of the operations API (see the module above for the invariants).
//!
//! | path | method | role | answers |
//! |---|---|---|---|
//! | `/livez` | GET | open | 200 while the process serves HTTP |
//! | `/readyz` | GET | open | 200 once every stage of the process is ready, else 503 with which is not |
//! | `/health/litert`, `/health/status` | GET | read | the runbook's health JSON |
//! | `/health/detailed` | GET | read | per stage: readiness, counters, models and providers, firing alerts |
//! | `/metrics` | GET | read | Prometheus text format |
//! | `/rollout/phase-status` | GET | read | every rollout's phase status (`?rollout_id=` for one) |
//! | `/models/health-check` | POST | read | every known version re-verified (sha256) and run once in isolation; 503 if one fails |
//! | `/models/test-load` `{"model_type", "version"?}` | POST | read | one version loaded in isolation: provider, load time, a test inference |
//! | `/backup/checkpoint` | POST | operate | a checkpoint of the running monitor's RocksDB state, verified |
//! | `/backup/verify` | GET | read | the latest checkpoint opened read-only and every value decoded |
//! | `/backup/test-restore` | POST | operate | the latest checkpoint restored into a fresh directory and compared |
//! | `/performance/slow-models` | GET | read | run-time percentiles per model version, slowest first (`?threshold_ms=`, default 500) |
//! | `/features/rollout` `{"phase": 1, "percentage": P}` | POST | operate | START of `rollout.candidate` (or `model`/`version` in the body) at phase 1 |
//! | `/features/advance-phase`, `/features/rollback-phase`, `/features/emergency-rollback`, `/features/pause`, `/features/resume` | POST | operate | the decision the command caused |

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::{
    auth::{Caller, Denied, Role},
    OpsState,
};
use crate::{
    inference::LoadState,
    rollout::{action, ops as rollout_ops, routing, Action, RolloutCommand},
};

#[derive(Clone)]
struct App {
    ops: Arc<OpsState>,
    metrics: Arc<prometheus_client::registry::Registry>,
}

/// Binds the API's listener (a port in use stops start-up, naming `api.listen`).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::config::ConfigError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| crate::config::invalid("api.listen", format!("cannot listen on {addr}: {e}")))
}

/// Serves until `shutdown` turns true.
pub async fn serve(ops: Arc<OpsState>, listener: tokio::net::TcpListener, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let app = router(ops);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
}

pub fn router(ops: Arc<OpsState>) -> Router {
    let limit = ops.cfg.api.max_body_bytes;
    let metrics = Arc::new(super::metrics::registry(ops.clone()));
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health/litert", get(health_litert))
        .route("/health/status", get(health_litert))
        .route("/health/detailed", get(health_detailed))
        .route("/metrics", get(metrics_text))
        .route("/rollout/phase-status", get(phase_status))
        .route("/models/health-check", post(models_health_check))
        .route("/models/test-load", post(models_test_load))
        .route("/performance/slow-models", get(slow_models))
        .route("/backup/checkpoint", post(backup_checkpoint))
        .route("/backup/verify", get(backup_verify))
        .route("/backup/test-restore", post(backup_test_restore))
        .route("/features/rollout", post(start_rollout))
        .route("/features/advance-phase", post(|s: State<App>, h: HeaderMap, b: Bytes| command(s, h, b, action::ADVANCE)))
        .route("/features/rollback-phase", post(|s: State<App>, h: HeaderMap, b: Bytes| command(s, h, b, action::ROLLBACK_PHASE)))
        .route("/features/emergency-rollback", post(|s: State<App>, h: HeaderMap, b: Bytes| command(s, h, b, action::EMERGENCY_ROLLBACK)))
        .route("/features/pause", post(|s: State<App>, h: HeaderMap, b: Bytes| command(s, h, b, action::PAUSE)))
        .route("/features/resume", post(|s: State<App>, h: HeaderMap, b: Bytes| command(s, h, b, action::RESUME)))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(App { ops, metrics })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The caller, if the endpoint needs one: `Ok(None)` for an open read.
fn authorise(app: &App, headers: &HeaderMap, needs: Role) -> Result<Option<Caller>, Response> {
    if needs == Role::Read && !app.ops.cfg.api.read_requires_token {
        return Ok(None);
    }
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match app.ops.tokens.check(value, needs) {
        Ok(c) => Ok(Some(c)),
        Err(Denied::Unauthenticated) => Err((StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(json!({ "error": "a valid bearer token is required (Authorization: Bearer <token>)" }))).into_response()),
        Err(Denied::Forbidden { name, needs }) => {
            tracing::warn!(token = %name, needs = ?needs, "ops API: request refused for the token's role");
            let role = match needs {
                Role::Read => "read",
                Role::Operate => "operate",
            };
            Err(error(StatusCode::FORBIDDEN, format!("token {name:?} may not do this: it needs the {role} role")))
        }
    }
}

async fn readyz(State(app): State<App>) -> Response {
    let stages = app.ops.readiness();
    let ready = !stages.is_empty() && stages.iter().all(|(_, r)| *r);
    let body = json!({ "ready": ready, "stages": stages.iter().map(|(s, r)| (s.to_string(), *r)).collect::<std::collections::BTreeMap<_, _>>() });
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body)).into_response()
}

/// `healthy`, `degraded` or `critical`, and why.
fn overall(ops: &OpsState) -> (&'static str, Vec<String>) {
    let mut critical = Vec::new();
    let mut degraded = Vec::new();
    if let Some(v) = ops.monitor_view() {
        for a in &v.firing {
            let what = format!("{} alert {} on {}", a.severity, a.rule, a.subject);
            if a.severity == "critical" { critical.push(what) } else { degraded.push(what) }
        }
    }
    if let Some(r) = ops.registry() {
        for m in r.status().iter().filter(|m| m.state != LoadState::Loaded && r.served_versions().get(&m.model) == Some(&m.version)) {
            degraded.push(format!("served model {} {} is not loaded: {}", m.model, m.version, m.reason.clone().unwrap_or_default()));
        }
    }
    for (stage, ready) in ops.readiness() {
        if !ready {
            degraded.push(format!("{stage} stage not ready"));
        }
    }
    let status = if !critical.is_empty() { "critical" } else if !degraded.is_empty() { "degraded" } else { "healthy" };
    critical.extend(degraded);
    (status, critical)
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

async fn health_litert(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let ops = &app.ops;
    let (status, reasons) = overall(ops);
    let models: std::collections::BTreeMap<String, String> = ops.registry().map(|r| r.served_versions().iter().map(|(m, v)| (m.clone(), format!("v{v}"))).collect()).unwrap_or_default();
    let uptime = ops.started.elapsed().as_secs();
    let (avg_ms, error_rate) = match ops.infer_counters() {
        Some(c) => {
            use std::sync::atomic::Ordering::Relaxed;
            let docs = c.inferred_documents.load(Relaxed);
            let avg = (docs > 0).then(|| c.inference_us.load(Relaxed) as f64 / 1000.0 / docs as f64);
            let results = c.results.load(Relaxed);
            let rate = (results > 0).then(|| c.results_with_error.load(Relaxed) as f64 / results as f64);
            (avg, rate)
        }
        None => (None, None),
    };
    Json(json!({
        "status": status,
        "reasons": reasons,
        "models": models,
        "metrics": {
            "uptime": human_duration(uptime),
            "avg_inference_time": avg_ms.map(|a| format!("{a:.0}ms")),
            "error_rate": error_rate.map(|r| format!("{:.1}%", r * 100.0)),
        },
        "values": { "uptime_seconds": uptime, "avg_inference_ms": avg_ms, "error_rate": error_rate },
    }))
    .into_response()
}

async fn health_detailed(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let ops = &app.ops;
    let (status, reasons) = overall(ops);
    let readiness: std::collections::BTreeMap<String, bool> = ops.readiness().into_iter().map(|(s, r)| (s.to_string(), r)).collect();
    let models = ops.registry().map(|r| r.status()).unwrap_or_default();
    Json(json!({
        "status": status,
        "reasons": reasons,
        "uptime_seconds": ops.started.elapsed().as_secs(),
        "ready": readiness,
        "infer": ops.infer_counters().map(|c| c.snapshot()),
        "monitor": ops.monitor_view(),
        "models": models,
    }))
    .into_response()
}

async fn metrics_text(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match super::metrics::render(&app.metrics, accept) {
        Ok((content_type, text)) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed"),
    }
}

#[derive(Deserialize)]
struct PhaseQuery {
    rollout_id: Option<String>,
}

async fn phase_status(State(app): State<App>, headers: HeaderMap, Query(q): Query<PhaseQuery>) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let (cfg, brokers) = (app.ops.cfg.clone(), app.ops.brokers.clone());
    let decisions = match tokio::task::spawn_blocking(move || routing::read_decisions(&cfg, &brokers)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the decisions topic: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let status = rollout_ops::phase_status(decisions, q.rollout_id.as_deref());
    match (&q.rollout_id, status.len()) {
        (Some(id), 0) => error(StatusCode::NOT_FOUND, format!("no rollout {id} on the decisions topic")),
        _ => Json(json!({ "rollouts": status })).into_response(),
    }
}

/// Body of `POST /features/*` (every field optional).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FeatureBody {
    /// Default: the configured candidate's rollout.
    #[serde(default)]
    rollout_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// The caller with the `operate` role, or the refusal.
fn operator(app: &App, headers: &HeaderMap) -> Result<Caller, Response> {
    match authorise(app, headers, Role::Operate) {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "operate always needs a token")),
        Err(r) => Err(r),
    }
}

/// A JSON body (an empty one is the default).
fn parse_body<T: Default + serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}; expected {shape}")))
}

async fn command(State(app): State<App>, headers: HeaderMap, body: Bytes, act: Action) -> Response {
    let caller = match operator(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body: FeatureBody = match parse_body(&body, r#"{"rollout_id"?: string, "reason"?: string}"#) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let cfg = &app.ops.cfg;
    let Some(rollout_id) = body.rollout_id.clone().or_else(|| cfg.rollout.candidate.as_ref().map(|c| c.rollout_id())) else {
        return error(StatusCode::BAD_REQUEST, "name the rollout: {\"rollout_id\": ...} (no rollout.candidate is configured)");
    };
    publish_and_wait(&app, RolloutCommand::new(rollout_id, act, caller.name.clone(), body.reason.clone(), None, None), &caller).await
}

/// Body of `POST /features/rollout` (the runbook's `{"phase": 1, "percentage": 1}`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    #[serde(default)]
    phase: Option<i32>,
    #[serde(default)]
    percentage: Option<f64>,
    /// Default: `rollout.candidate`.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// Starts a rollout at phase 1. Later phases are entered by advance-phase (or by the controller
/// once a phase's criteria hold), so `phase` must be 1 and `percentage`, when given, phase 1's.
async fn start_rollout(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match operator(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body: RolloutBody = match parse_body(&body, r#"{"phase": 1, "percentage"?: number, "model"?: string, "version"?: string, "reason"?: string}"#) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let cfg = &app.ops.cfg;
    if body.phase.is_some_and(|p| p != 1) {
        return error(StatusCode::BAD_REQUEST, "a rollout starts at phase 1; later phases are entered with POST /features/advance-phase (or by the controller once a phase's criteria hold)");
    }
    let first = cfg.rollout.phases.first().map(|p| p.traffic_percent).unwrap_or(0.0);
    if let Some(p) = body.percentage.filter(|p| (p - first).abs() > 1e-9) {
        return error(StatusCode::BAD_REQUEST, format!("phase 1 routes {first} % of users (rollout.phases[0].traffic_percent), not {p} %"));
    }
    let candidate = cfg.rollout.candidate.as_ref();
    let (Some(model), Some(version)) = (body.model.clone().or_else(|| candidate.map(|c| c.model.clone())), body.version.clone().or_else(|| candidate.map(|c| c.version.clone()))) else {
        return error(StatusCode::BAD_REQUEST, "name the candidate: {\"model\": ..., \"version\": ...} (no rollout.candidate is configured)");
    };
    let id = crate::rollout::default_rollout_id(&model, &version);
    publish_and_wait(&app, RolloutCommand::new(id, action::START, caller.name.clone(), body.reason.clone(), Some(model), Some(version)), &caller).await
}

async fn publish_and_wait(app: &App, cmd: RolloutCommand, caller: &Caller) -> Response {
    let cfg = &app.ops.cfg;
    tracing::info!(token = %caller.name, action = %cmd.action, rollout = %cmd.rollout_id, command_id = %cmd.command_id, "ops API: rollout command");
    if let Err(e) = rollout_ops::send_command(cfg, &app.ops.brokers, &cmd).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("the command was not published: {e}"));
    }
    let timeout = Duration::from_millis(cfg.api.command_timeout_ms);
    match rollout_ops::wait_for_decision(cfg, &app.ops.brokers, &cmd.command_id, timeout).await {
        Ok(Some(d)) if d.action == action::REJECTED => (StatusCode::CONFLICT, Json(json!({ "command_id": cmd.command_id, "decision": d }))).into_response(),
        Ok(Some(d)) => Json(json!({ "command_id": cmd.command_id, "decision": d })).into_response(),
        Ok(None) => (
            StatusCode::GATEWAY_TIMEOUT,
            Json(json!({ "command_id": cmd.command_id, "error": format!("the command was published but no decision came within {} s: is a monitor stage running against these topics?", timeout.as_secs()) })),
        )
            .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the command was published; reading its decision failed: {e}")),
    }
}

/// A synthetic payslip for test inferences (the same one every time).
fn test_document() -> crate::document::PayslipDocument {
    crate::synth::Generator::new(crate::synth::GeneratorConfig { seed: 2026, ..Default::default() }).document(0).document
}

fn no_models() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "this process runs no infer stage: it has no models (ask an infer process)")
}

async fn models_health_check(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let Some(registry) = app.ops.registry() else { return no_models() };
    let checks = tokio::task::spawn_blocking(move || {
        let doc = test_document();
        registry.known_versions().iter().map(|(m, v)| registry.check_isolated(m, v, &doc)).collect::<Vec<_>>()
    })
    .await;
    let checks = match checks {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let healthy = checks.iter().all(|c| c.ok);
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "status": if healthy { "healthy" } else { "critical" }, "models": checks }))).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestLoadBody {
    model_type: String,
    /// Default: the served version.
    #[serde(default)]
    version: Option<String>,
}

async fn models_test_load(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let body: TestLoadBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}; expected {{\"model_type\": \"document_classifier\" | \"table_detection\" | \"text_recognition\", \"version\"?: string}}")),
    };
    let Some(registry) = app.ops.registry() else { return no_models() };
    let Some(version) = body.version.clone().or_else(|| registry.served_versions().get(&body.model_type).cloned()) else {
        return error(StatusCode::BAD_REQUEST, format!("{:?} is not a served model; name a version or use one of {:?}", body.model_type, registry.served_versions().keys().collect::<Vec<_>>()));
    };
    let model = body.model_type.clone();
    match tokio::task::spawn_blocking(move || registry.check_isolated(&model, &version, &test_document())).await {
        Ok(c) if c.ok => Json(c).into_response(),
        Ok(c) => (StatusCode::UNPROCESSABLE_ENTITY, Json(c)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct SlowQuery {
    threshold_ms: Option<f64>,
}

async fn slow_models(State(app): State<App>, headers: HeaderMap, Query(q): Query<SlowQuery>) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let Some(registry) = app.ops.registry() else { return no_models() };
    let threshold = q.threshold_ms.unwrap_or(500.0);
    let versions = registry.run_stats().by_version();
    let slow: Vec<_> = versions.iter().filter(|v| v.p95_run_ms > threshold).map(|v| format!("{} {}", v.model, v.version)).collect();
    Json(json!({ "threshold_ms": threshold, "slow": slow, "models": versions })).into_response()
}

fn backup_dir(ops: &OpsState) -> std::path::PathBuf {
    ops.cfg.api.backup_dir.clone().unwrap_or_else(|| {
        let mut d = ops.cfg.monitor.state_dir.clone().into_os_string();
        d.push(".backups");
        d.into()
    })
}

/// The newest checkpoint directory (names are UTC times, so the last in order is the newest).
fn latest_checkpoint(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).filter(|e| e.path().join("CURRENT").exists()).map(|e| e.path()).collect();
    names.sort();
    names.pop()
}

fn no_monitor() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "this process runs no monitor stage: it has no state to back up (ask the monitor process)")
}

async fn backup_checkpoint(State(app): State<App>, headers: HeaderMap) -> Response {
    let caller = match operator(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(cp) = app.ops.monitor_checkpointer() else { return no_monitor() };
    let dir = backup_dir(&app.ops).join(chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string());
    tracing::info!(token = %caller.name, path = %dir.display(), "ops API: checkpoint of the running monitor");
    let result = tokio::task::spawn_blocking(move || {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        cp.checkpoint(&dir).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(summary)) => Json(json!({ "checkpoint": summary })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("checkpoint failed: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn backup_verify(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let dir = backup_dir(&app.ops);
    let Some(latest) = latest_checkpoint(&dir) else {
        return error(StatusCode::NOT_FOUND, format!("no checkpoint in {} yet: POST /backup/checkpoint", dir.display()));
    };
    match tokio::task::spawn_blocking(move || crate::state::verify(&latest)).await {
        Ok(Ok(summary)) => Json(json!({ "verified": true, "checkpoint": summary })).into_response(),
        Ok(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "verified": false, "error": e.to_string() }))).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn backup_test_restore(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = operator(&app, &headers) {
        return r;
    }
    let dir = backup_dir(&app.ops);
    let Some(latest) = latest_checkpoint(&dir) else {
        return error(StatusCode::NOT_FOUND, format!("no checkpoint in {} yet: POST /backup/checkpoint", dir.display()));
    };
    let result = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        let scratch = std::env::temp_dir().join(format!("payslip-test-restore-{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis()));
        let from = crate::state::verify(&latest).map_err(|e| e.to_string())?;
        let restored = crate::state::restore(&latest, &scratch).and_then(|_| crate::state::verify(&scratch)).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&scratch);
        let restored = restored?;
        let identical = from.entries == restored.entries && from.offsets == restored.offsets;
        Ok(json!({ "identical": identical, "checkpoint": from, "restored": { "entries": restored.entries, "offsets": restored.offsets } }))
    })
    .await;
    match result {
        Ok(Ok(v)) if v["identical"] == true => Json(v).into_response(),
        Ok(Ok(v)) => (StatusCode::UNPROCESSABLE_ENTITY, Json(v)).into_response(),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("restore failed: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
