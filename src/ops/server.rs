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
//! | `/reports/daily-performance`, `/reports/weekly-performance` | GET | read | the report as JSON, or `?format=html` with its charts inline (`?at=YYYY-MM-DD`, default today) |
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
        .route("/livez", get(livez))
        .route("/openapi.json", get(openapi_json))
        .route("/readyz", get(readyz))
        .route("/health/litert", get(health_litert))
        .route("/health/status", get(health_status))
        .route("/health/detailed", get(health_detailed))
        .route("/metrics", get(metrics_text))
        .route("/rollout/phase-status", get(phase_status))
        .route("/models/health-check", post(models_health_check))
        .route("/models/test-load", post(models_test_load))
        .route("/performance/slow-models", get(slow_models))
        .route("/reports/daily-performance", get(daily_report))
        .route("/reports/weekly-performance", get(weekly_report))
        .route("/backup/checkpoint", post(backup_checkpoint))
        .route("/backup/verify", get(backup_verify))
        .route("/backup/test-restore", post(backup_test_restore))
        .route("/features/rollout", post(start_rollout))
        .route("/features/advance-phase", post(advance_phase))
        .route("/features/rollback-phase", post(rollback_phase))
        .route("/features/emergency-rollback", post(emergency_rollback))
        .route("/features/pause", post(pause))
        .route("/features/resume", post(resume))
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

#[utoipa::path(get, path = "/livez", tag = "probes", summary = "Alive while the process serves HTTP", responses((status = 200, description = "ok")))]
async fn livez() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/health/status", tag = "health", summary = "Same as /health/litert", security((), ("bearer" = [])), responses((status = 200, description = "status, models, metrics")))]
async fn health_status(app: State<App>, headers: HeaderMap) -> Response {
    health_litert(app, headers).await
}

#[utoipa::path(get, path = "/readyz", tag = "probes", summary = "Ready once every stage of the process is", responses((status = 200, description = "every stage ready"), (status = 503, description = "a stage is not ready yet, or start-up still waits for the brokers; the body says which (stages, waiting_for)")))]
async fn readyz(State(app): State<App>) -> Response {
    let stages = app.ops.readiness();
    let waiting = app.ops.waiting();
    let ready = waiting.is_none() && !stages.is_empty() && stages.iter().all(|(_, r)| *r);
    let mut body = json!({ "ready": ready, "stages": stages.iter().map(|(s, r)| (s.to_string(), *r)).collect::<std::collections::BTreeMap<_, _>>() });
    if let Some(w) = waiting {
        body["waiting_for"] = json!(w);
    }
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
        for m in r.status().iter().filter(|m| m.state == LoadState::Refused && r.served_versions().get(&m.model) == Some(&m.version)) {
            degraded.push(format!("served model {} {} is not loaded: {}", m.model, m.version, m.reason.clone().unwrap_or_default()));
        }
    }
    if let Some(w) = ops.waiting() {
        degraded.push(format!("starting: waiting for {w}; no stage runs yet"));
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

#[utoipa::path(get, path = "/health/litert", tag = "health", summary = "The runbook's health check", security((), ("bearer" = [])), responses((status = 200, description = "status, models, metrics"), (status = 401, description = "a read token is required (api.read_requires_token)")))]
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

#[utoipa::path(get, path = "/health/detailed", tag = "health", summary = "Per stage: readiness, counters, consumer lag, models and providers, monitor role and firing alerts", security((), ("bearer" = [])), responses((status = 200, description = "details"), (status = 401, description = "a read token is required")))]
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
        "infer": ops.infer_counters().map(|c| json!({ "counters": c.snapshot(), "consumer_lag": c.consumer_lag.lock().unwrap_or_else(|p| p.into_inner()).clone() })),
        "monitor": ops.monitor_view(),
        "models": models,
    }))
    .into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "metrics", summary = "Prometheus metrics (OpenMetrics when accepted, else text 0.0.4)", security((), ("bearer" = [])), responses((status = 200, description = "the exposition"), (status = 401, description = "a read token is required")))]
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

#[utoipa::path(get, path = "/rollout/phase-status", tag = "rollout", summary = "Every rollout's phase status", security((), ("bearer" = [])), params(("rollout_id" = Option<String>, Query, description = "one rollout")), responses((status = 200, description = "rollouts: current_phase, success_rate, criteria_met, criteria"), (status = 404, description = "no such rollout"), (status = 401, description = "a read token is required")))]
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
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
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

#[utoipa::path(post, path = "/features/advance-phase", tag = "rollout", summary = "Advance the rollout to its next phase", security(("bearer" = [])), request_body(content = FeatureBody, description = "optional"), responses((status = 200, description = "the decision the command caused"), (status = 400, description = "bad body or no rollout named"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
async fn advance_phase(s: State<App>, h: HeaderMap, b: Bytes) -> Response {
    command(s, h, b, action::ADVANCE).await
}

#[utoipa::path(post, path = "/features/rollback-phase", tag = "rollout", summary = "Roll the rollout back one phase", security(("bearer" = [])), request_body(content = FeatureBody, description = "optional"), responses((status = 200, description = "the decision the command caused"), (status = 400, description = "bad body or no rollout named"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
async fn rollback_phase(s: State<App>, h: HeaderMap, b: Bytes) -> Response {
    command(s, h, b, action::ROLLBACK_PHASE).await
}

#[utoipa::path(post, path = "/features/emergency-rollback", tag = "rollout", summary = "Roll the candidate back to 0 % at once", security(("bearer" = [])), request_body(content = FeatureBody, description = "optional"), responses((status = 200, description = "the decision the command caused"), (status = 400, description = "bad body or no rollout named"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
async fn emergency_rollback(s: State<App>, h: HeaderMap, b: Bytes) -> Response {
    command(s, h, b, action::EMERGENCY_ROLLBACK).await
}

#[utoipa::path(post, path = "/features/pause", tag = "rollout", summary = "Pause the rollout (traffic stays)", security(("bearer" = [])), request_body(content = FeatureBody, description = "optional"), responses((status = 200, description = "the decision the command caused"), (status = 400, description = "bad body or no rollout named"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
async fn pause(s: State<App>, h: HeaderMap, b: Bytes) -> Response {
    command(s, h, b, action::PAUSE).await
}

#[utoipa::path(post, path = "/features/resume", tag = "rollout", summary = "Resume a paused rollout", security(("bearer" = [])), request_body(content = FeatureBody, description = "optional"), responses((status = 200, description = "the decision the command caused"), (status = 400, description = "bad body or no rollout named"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
async fn resume(s: State<App>, h: HeaderMap, b: Bytes) -> Response {
    command(s, h, b, action::RESUME).await
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
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
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
#[utoipa::path(post, path = "/features/rollout", tag = "rollout", summary = "Start the candidate's rollout at phase 1", security(("bearer" = [])), request_body = RolloutBody, responses((status = 200, description = "the START decision"), (status = 400, description = "not phase 1, another percentage, or no candidate"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 409, description = "REJECTED decision"), (status = 504, description = "no decision in time")))]
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

#[utoipa::path(post, path = "/models/health-check", tag = "models", summary = "Every model version verified, loaded and run once in isolation", security((), ("bearer" = [])), responses((status = 200, description = "all healthy"), (status = 503, description = "a version failed, or no infer stage here")))]
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

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TestLoadBody {
    model_type: String,
    /// Default: the served version.
    #[serde(default)]
    version: Option<String>,
}

#[utoipa::path(post, path = "/models/test-load", tag = "models", summary = "One model version loaded and run once in isolation", security((), ("bearer" = [])), request_body = TestLoadBody, responses((status = 200, description = "provider, load time, test inference"), (status = 400, description = "unknown model"), (status = 422, description = "the version failed")))]
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

#[utoipa::path(get, path = "/performance/slow-models", tag = "models", summary = "Run-time percentiles per model version, slowest first", security((), ("bearer" = [])), params(("threshold_ms" = Option<f64>, Query, description = "p95 above which a version is slow (default 500)")), responses((status = 200, description = "per version, and the slow ones"), (status = 503, description = "no infer stage here")))]
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

#[utoipa::path(post, path = "/backup/checkpoint", tag = "backup", summary = "A live checkpoint of the running monitor's state, verified", security(("bearer" = [])), responses((status = 200, description = "the checkpoint's path, entries and offsets"), (status = 401, description = "no valid token"), (status = 403, description = "a read token"), (status = 503, description = "no monitor stage here")))]
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

#[utoipa::path(get, path = "/backup/verify", tag = "backup", summary = "The latest checkpoint opened read-only, every value decoded", security((), ("bearer" = [])), responses((status = 200, description = "verified"), (status = 404, description = "no checkpoint yet"), (status = 422, description = "the checkpoint is damaged")))]
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

#[utoipa::path(post, path = "/backup/test-restore", tag = "backup", summary = "The latest checkpoint restored into a scratch directory and compared", security(("bearer" = [])), responses((status = 200, description = "identical"), (status = 404, description = "no checkpoint yet"), (status = 422, description = "not identical, or the restore failed")))]
async fn backup_test_restore(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = operator(&app, &headers) {
        return r;
    }
    let dir = backup_dir(&app.ops);
    let Some(latest) = latest_checkpoint(&dir) else {
        return error(StatusCode::NOT_FOUND, format!("no checkpoint in {} yet: POST /backup/checkpoint", dir.display()));
    };
    let result = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, crate::state::StateError> {
        let scratch = std::env::temp_dir().join(format!("payslip-test-restore-{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis()));
        let from = crate::state::verify(&latest)?;
        let restored = crate::state::restore(&latest, &scratch).and_then(|_| crate::state::verify(&scratch));
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

#[derive(Deserialize)]
struct ReportQuery {
    at: Option<String>,
    format: Option<String>,
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

#[utoipa::path(get, path = "/reports/daily-performance", tag = "reports", summary = "The day's performance report (JSON, or HTML with charts)", security((), ("bearer" = [])), params(("at" = Option<String>, Query, description = "the UTC day, YYYY-MM-DD (default today)"), ("format" = Option<String>, Query, description = "json (default) or html")), responses((status = 200, description = "the report"), (status = 400, description = "bad at or format")))]
async fn daily_report(a: State<App>, h: HeaderMap, q: Query<ReportQuery>) -> Response {
    report(a, h, q, crate::report::Period::Day).await
}

#[utoipa::path(get, path = "/reports/weekly-performance", tag = "reports", summary = "The seven days' performance report ending with `at` (JSON, or HTML with charts)", security((), ("bearer" = [])), params(("at" = Option<String>, Query, description = "the last UTC day, YYYY-MM-DD (default today)"), ("format" = Option<String>, Query, description = "json (default) or html")), responses((status = 200, description = "the report"), (status = 400, description = "bad at or format")))]
async fn weekly_report(a: State<App>, h: HeaderMap, q: Query<ReportQuery>) -> Response {
    report(a, h, q, crate::report::Period::Week).await
}

async fn report(State(app): State<App>, headers: HeaderMap, Query(q): Query<ReportQuery>, period: crate::report::Period) -> Response {
    if let Err(r) = authorise(&app, &headers, Role::Read) {
        return r;
    }
    let at = match q.at.as_deref().map(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")) {
        None => chrono::Utc::now().date_naive(),
        Some(Ok(d)) => d,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "at: use YYYY-MM-DD"),
    };
    let html = match q.format.as_deref() {
        None | Some("json") => false,
        Some("html") => true,
        Some(other) => return error(StatusCode::BAD_REQUEST, format!("format {other:?}: use json or html")),
    };
    let (cfg, brokers) = (app.ops.cfg.clone(), app.ops.brokers.clone());
    let built = tokio::task::spawn_blocking(move || -> Result<(crate::report::Report, Option<String>), crate::report::ReportError> {
        let r = crate::report::generate(&cfg, &brokers, period, at)?;
        if !html {
            return Ok((r, None));
        }
        let mut svgs = std::collections::BTreeMap::new();
        for c in crate::report::chart::CHARTS.iter() {
            svgs.insert(c.file, crate::report::chart::svg(&r, c, std::path::Path::new(crate::report::chart::DEFAULT_FONT))?);
        }
        let page = crate::report::chart::html(&r, |c| format!("data:image/svg+xml;base64,{}", base64(svgs[c.file].as_bytes())));
        Ok((r, Some(page)))
    })
    .await;
    match built {
        Ok(Ok((_, Some(page)))) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response(),
        Ok(Ok((r, None))) => Json(r).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")];
        for (plain, encoded) in cases {
            assert_eq!(super::base64(plain.as_bytes()), encoded);
        }
    }
}

/// The OpenAPI document of this API, generated from the handlers' annotations (kept in
/// docs/openapi.json; a unit test fails when the two differ).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "payslip-stream operations API", description = "Health, readiness, metrics, rollout commands, model checks, reports and backups of a payslip-stream process. GETs other than the probes need a `read` token when api.read_requires_token is set; POSTs that change something need an `operate` token."),
    paths(
        livez, readyz, health_litert, health_status, health_detailed, metrics_text, openapi_json, phase_status, start_rollout, advance_phase, rollback_phase,
        emergency_rollback, pause, resume, models_health_check, models_test_load, slow_models, daily_report, weekly_report, backup_checkpoint,
        backup_verify, backup_test_restore
    ),
    components(schemas(FeatureBody, RolloutBody, TestLoadBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("a token from api.tokens_file")).build()));
    }
}

/// The document as committed in docs/openapi.json.
pub fn openapi_text() -> String {
    use utoipa::OpenApi;
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/openapi.json", tag = "probes", summary = "This document", responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

#[cfg(test)]
mod openapi_drift {
    #[test]
    fn docs_openapi_json_is_the_generated_document() {
        let committed = include_str!("../../docs/openapi.json");
        assert!(committed == super::openapi_text(), "docs/openapi.json differs from the API's annotations: regenerate it with `payslip-stream openapi > docs/openapi.json`");
    }
}
