//! Wiring: what `payslip-stream run` starts, as a library function, so the binary only parses
//! arguments and prints. It connects to the brokers (or starts the embedded broker when asked),
//! creates the topics, loads the models, and runs the infer stage, the monitor stage or both until
//! the shutdown signal; then each stage drains (see their module docs for what that guarantees). A
//! shutdown signal while the brokers do not answer yet ends the run before anything starts.
//!
//! With both stages in one process the monitor runs on a blocking thread beside the infer stage;
//! the shutdown signal reaches both.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::sync::watch;

use crate::{
    config::PipelineConfig,
    inference::{ModelError, ModelRegistry, ModelStatus},
    infer::{InferStage, StageError},
    kafka::{embedded::EmbeddedBroker, KafkaError},
    monitor::{MonitorError, MonitorSummary},
    telemetry::InferSummary,
};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stages {
    Infer,
    Monitor,
    All,
}

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Models(#[from] ModelError),
    #[error("infer stage: {0}")]
    Infer(#[from] StageError),
    #[error("monitor stage: {0}")]
    Monitor(#[from] MonitorError),
    #[error("demo: {0}")]
    Demo(#[from] crate::demo::DemoError),
    /// The configuration cannot work (e.g. the API's port is taken, a bad tokens file).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A stage's thread or task died (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl PipelineError {
    /// Whether running the pipeline again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            PipelineError::Kafka(e) => e.retryable(),
            PipelineError::Models(e) => e.retryable(),
            PipelineError::Infer(e) => e.retryable(),
            PipelineError::Monitor(e) => e.retryable(),
            PipelineError::Demo(_) | PipelineError::Internal(_) | PipelineError::Config(_) => false,
        }
    }
}

/// Where the brokers are.
pub enum Brokers {
    /// A real cluster's bootstrap servers.
    Cluster(String),
    /// The in-process embedded broker (trying the program only).
    Embedded,
}

/// What `run` does beyond the stages.
#[derive(Default)]
pub struct RunOptions {
    /// Run the demo (synthetic documents, printed results) instead of serving.
    pub demo: Option<crate::demo::DemoRun>,
}

/// What a run did, per stage.
#[derive(Debug, Default, serde::Serialize)]
pub struct RunSummary {
    pub infer: Option<InferSummary>,
    pub monitor: Option<MonitorSummary>,
    pub demo: Option<crate::demo::DemoSummary>,
}

/// Things the caller may want to show a person while the pipeline starts.
pub enum Started<'a> {
    /// The embedded broker is up at this address.
    EmbeddedBroker(&'a str),
    /// A model version was loaded or refused.
    Model(&'a ModelStatus),
    /// The operations API listens here.
    Api(std::net::SocketAddr),
}

/// A watch channel that turns true on SIGTERM or SIGINT. The handlers are installed before it
/// returns, so a signal that comes at any later point of start-up is not lost (nor kills the
/// process the default way).
pub fn shutdown_signal() -> watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    let (mut term, mut int) = match (term, int) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
            return rx;
        }
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutdown requested: draining in-flight work");
        let _ = tx.send(true);
    });
    rx
}

/// Runs the monitor stage on a blocking thread until `shutdown`; it publishes its view into `view`.
pub fn spawn_monitor(cfg: PipelineConfig, brokers: String, mut shutdown: watch::Receiver<bool>, view: crate::monitor::view::ViewHandle) -> tokio::task::JoinHandle<Result<MonitorSummary, MonitorError>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let _ = shutdown.changed().await;
        flag.store(true, Ordering::Relaxed);
    });
    tokio::task::spawn_blocking(move || {
        // scaled out, this process is also a member of the pre-aggregation group; either one
        // failing stops both
        let pre = if cfg.monitor.scale_out {
            let member = crate::monitor::pre::PreAggregator::open(cfg.clone(), brokers.clone(), view.pre_cell())?;
            let stop = stop.clone();
            let handle = std::thread::Builder::new()
                .name("monitor-pre".into())
                .spawn(move || {
                    let r = member.run(stop.clone());
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .map_err(|e| MonitorError::Thread { what: "monitor-pre", message: format!("cannot start it: {e}") })?;
            Some(handle)
        } else {
            None
        };
        let monitor = crate::monitor::run(cfg, brokers, view, stop.clone());
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = pre {
            match h.join() {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "monitor pre-aggregation failed");
                    return Err(e);
                }
                Err(_) => tracing::error!("monitor pre-aggregation panicked"),
                Ok(Ok(_)) => {}
            }
        }
        monitor
    })
}

/// Runs the Alertmanager bridge ([`crate::alert::forward`]) on a blocking thread until `shutdown`.
pub fn spawn_forwarder(cfg: PipelineConfig, brokers: String, mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        flag.store(true, Ordering::Relaxed);
    });
    tokio::task::spawn_blocking(move || match crate::alert::forward::run(&cfg, &brokers, stop) {
        Ok(s) => tracing::info!(summary = ?s, "Alertmanager bridge stopped"),
        Err(e) => tracing::error!(error = %e, "Alertmanager bridge stopped; alert events stay on their topic and are forwarded after a restart"),
    })
}

/// Loads the served models on a blocking thread.
pub async fn load_models(cfg: &PipelineConfig) -> Result<Arc<ModelRegistry>, PipelineError> {
    let (m, i) = (cfg.models.clone(), cfg.inference.clone());
    let registry = tokio::task::spawn_blocking(move || ModelRegistry::load(&m, &i, &[])).await.map_err(|e| PipelineError::Internal(e.to_string()))??;
    Ok(Arc::new(registry))
}

/// Runs the selected stages until `shutdown` (or, for the demo, until it is done).
pub async fn run(mut cfg: PipelineConfig, brokers: Brokers, stages: Stages, opts: RunOptions, shutdown: watch::Receiver<bool>, mut show: impl FnMut(Started<'_>)) -> Result<RunSummary, PipelineError> {
    let (brokers, embedded) = match brokers {
        // the brokers are waited for once the operations API serves (below)
        Brokers::Cluster(b) => (b, None),
        Brokers::Embedded => {
            let e = EmbeddedBroker::start(&cfg.topics)?;
            // the embedded broker forgets everything at exit, so the monitor's offsets must too
            cfg.monitor.state_dir = std::env::temp_dir().join(format!("payslip-embedded-state-{}", std::process::id()));
            cfg.monitor.changelog = false;
            cfg.monitor.scale_out = false;
            cfg.monitor.closing_partitions = 1;
            cfg.kafka.embedded = true;
            let b = e.bootstrap_servers();
            show(Started::EmbeddedBroker(&b));
            (b, Some(e))
        }
    };
    // one internal stop signal: the caller's shutdown, or the end of either stage (a process that
    // runs both stops when one of them fails rather than limping on with the other)
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let (mut ext, tx) = (shutdown, stop_tx.clone());
        tokio::spawn(async move {
            while !*ext.borrow() {
                if ext.changed().await.is_err() {
                    break;
                }
            }
            let _ = tx.send(true);
        });
    }
    // the operations API, when configured, serves from before the stages start until they stopped
    let ops = match cfg.api.listen {
        Some(addr) if opts.demo.is_none() => {
            let state = Arc::new(crate::ops::OpsState::new(cfg.clone(), brokers.clone())?);
            let listener = crate::ops::server::bind(addr).await?;
            let local = listener.local_addr().map_err(|e| PipelineError::Internal(e.to_string()))?;
            tracing::info!(%local, tokens = state.tokens.len(), read_requires_token = cfg.api.read_requires_token, "operations API listening");
            show(Started::Api(local));
            let (state2, rx) = (state.clone(), stop_rx.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::ops::server::serve(state2, listener, rx).await {
                    tracing::error!(error = %e, "operations API stopped");
                }
            });
            Some(state)
        }
        _ => None,
    };
    if embedded.is_none() {
        // SIGTERM while no broker answers yet ends the process here, with nothing started; the
        // operations API meanwhile answers /livez, and /readyz says what start-up waits for
        if let Some(o) = &ops {
            o.set_waiting(Some(format!("a broker of {brokers} to answer (up to kafka.startup_wait_s = {} s)", cfg.kafka.startup_wait_s)));
        }
        if crate::kafka::admin::ensure_topics_until(&brokers, &cfg, stop_rx.clone()).await?.is_none() {
            tracing::info!(%brokers, "shutdown requested before the brokers answered: nothing was started");
            return Ok(RunSummary::default());
        }
        if let Some(o) = &ops {
            o.set_waiting(None);
        }
    }
    let monitor_view = crate::monitor::view::ViewHandle::default();
    let mut summary = RunSummary::default();
    // alert events go to Alertmanager from the processes that run the monitor stage
    let forwarder = (stages != Stages::Infer && opts.demo.is_none() && cfg.alerts.forward.alertmanager_url.is_some()).then(|| spawn_forwarder(cfg.clone(), brokers.clone(), stop_rx.clone()));
    if stages == Stages::Monitor {
        if let Some(o) = &ops {
            o.set_monitor(monitor_view.clone());
        }
        let monitor = spawn_monitor(cfg, brokers, stop_rx, monitor_view).await;
        let _ = stop_tx.send(true);
        if let Some(f) = forwarder {
            let _ = f.await;
        }
        summary.monitor = Some(monitor.map_err(|e| PipelineError::Internal(e.to_string()))??);
        return Ok(summary);
    }
    let registry = load_models(&cfg).await?;
    for s in registry.status() {
        show(Started::Model(&s));
    }
    if let Some(o) = &ops {
        o.set_registry(registry.clone());
    }
    if let Some(demo) = opts.demo {
        let state: PathBuf = std::env::temp_dir().join(format!("payslip-demo-state-{}", std::process::id()));
        let cfg = crate::demo::demo_config(cfg, state.clone(), demo.candidate.clone());
        let result = crate::demo::run(cfg, brokers, registry, demo.options(), stop_rx).await;
        let _ = std::fs::remove_dir_all(&state);
        summary.demo = Some(result?);
        return Ok(summary);
    }
    let join = |e: tokio::task::JoinError| PipelineError::Internal(e.to_string());
    let stage = InferStage::new(cfg.clone(), brokers.clone(), registry);
    if let Some(o) = &ops {
        o.set_infer(stage.counters());
    }
    let mut infer = tokio::spawn(stage.run(stop_rx.clone()));
    if stages == Stages::Infer {
        summary.infer = Some(infer.await.map_err(join)??);
        return Ok(summary);
    }
    if let Some(o) = &ops {
        o.set_monitor(monitor_view.clone());
    }
    let mut monitor = spawn_monitor(cfg, brokers, stop_rx, monitor_view);
    let (infer, monitor) = tokio::select! {
        r = &mut infer => {
            if r.as_ref().map_or(true, |r| r.is_err()) {
                tracing::error!("infer stage failed: stopping the monitor stage too");
            }
            let _ = stop_tx.send(true);
            (r, monitor.await)
        }
        r = &mut monitor => {
            if r.as_ref().map_or(true, |r| r.is_err()) {
                tracing::error!("monitor stage failed: stopping the infer stage too");
            }
            let _ = stop_tx.send(true);
            (infer.await, r)
        }
    };
    if let Some(f) = forwarder {
        let _ = f.await;
    }
    // both have drained; the infer stage's error is reported first
    let (infer, monitor) = (infer.map_err(join)?, monitor.map_err(join)?);
    summary.infer = Some(infer?);
    summary.monitor = Some(monitor?);
    Ok(summary)
}
