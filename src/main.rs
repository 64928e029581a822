//! Command line of payslip-stream. Parses arguments, loads and validates configuration, wires the
//! library together; `anyhow` lives only here.

use std::{path::PathBuf, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use payslip_stream::{
    codec::WireFormat,
    config::PipelineConfig,
    inference::ModelRegistry,
    inspect::{self, Bound, InspectOptions},
    kafka::{self, embedded::EmbeddedBroker},
    pipeline::InferStage,
    produce::{self, ProduceOptions, Source},
};

#[derive(Parser)]
#[command(name = "payslip-stream", version, about = "Kafka stream processor running ONNX Runtime inference on payslip documents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Pipeline configuration file.
    #[arg(long, short, default_value = "pipelines/payslip.yaml", env = "PAYSLIP_CONFIG")]
    config: PathBuf,
    /// Kafka bootstrap servers; overrides `kafka.brokers` in the config.
    #[arg(long, short, env = "PAYSLIP_BROKERS")]
    brokers: Option<String>,
    /// Prefix for every topic name (isolated test or demo runs).
    #[arg(long, env = "PAYSLIP_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline. Without brokers it starts an embedded in-process broker (not for production).
    Run {
        #[command(flatten)]
        common: Common,
        /// Which stage to run: infer, monitor, or all (both in this process).
        #[arg(long, value_enum, default_value = "all")]
        stage: Stage,
        /// Consumer group of the infer stage; overrides `kafka.infer_group`.
        #[arg(long)]
        group: Option<String>,
        /// Demo: also produce synthetic documents (some of them broken) and print each result.
        #[arg(long)]
        demo: bool,
        /// Demo: number of documents to produce before stopping.
        #[arg(long, default_value_t = 7500)]
        demo_count: u64,
        /// Demo: documents per second.
        #[arg(long, default_value_t = 150.0)]
        demo_rate: f64,
        /// Demo: candidate classifier version to roll out (1.1.1-degraded shows a rollback).
        #[arg(long)]
        demo_candidate: Option<String>,
    },
    /// Produce documents from files or from the synthetic generator.
    Produce {
        #[command(flatten)]
        common: Common,
        /// JSON (document or JSON lines) or Avro container files; none = synthetic documents.
        files: Vec<PathBuf>,
        /// Synthetic: number of documents.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Synthetic: generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Synthetic: index of the first document (documents are a pure function of seed and index).
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Synthetic: share of documents carrying ground-truth labels.
        #[arg(long, default_value_t = 1.0)]
        golden_fraction: f64,
        /// Documents per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Wire format of the values.
        #[arg(long, value_enum, default_value = "avro")]
        format: WireFormat,
        /// Topic (default: the documents topic of the config).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Print messages of any project topic as JSON lines, Avro decoded.
    Inspect {
        #[command(flatten)]
        common: Common,
        /// Topic name, or one of: documents, inference, dlq, feedback, metrics, alerts, decisions, commands.
        #[arg(long, short)]
        topic: String,
        /// Where to start in every partition, as kcat's -o: beginning, end, N, -N (N before the end),
        /// s@MILLIS, or an RFC 3339 time.
        #[arg(long, short = 'o', conflicts_with_all = ["from_time", "end"], allow_hyphen_values = true)]
        offset: Option<String>,
        /// Start at the first message at or after this time (RFC 3339 or s@MILLIS).
        #[arg(long)]
        from_time: Option<String>,
        /// Stop before this position (same forms as --offset; a time excludes messages stamped at it).
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// Start at the end (with --follow: only new messages).
        #[arg(long)]
        end: bool,
        /// Stop after this many messages.
        #[arg(long, short = 'n')]
        count: Option<u64>,
        /// Keep reading new messages.
        #[arg(long, short)]
        follow: bool,
        /// Print raster pixels in full.
        #[arg(long)]
        full: bool,
    },
    /// Model files and metadata.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Training data for models/train.py.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Back up, verify and restore the monitor's RocksDB state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Create the project's topics (partitions, retention, compaction) on a cluster.
    Topics {
        #[command(flatten)]
        common: Common,
    },
    /// Phased rollout of a candidate model version: operator commands and phase status.
    Rollout {
        #[command(subcommand)]
        command: RolloutCli,
    },
    /// Replay a recorded range: backfill inference, or recompute windows, alerts and decisions.
    Replay {
        #[command(subcommand)]
        command: ReplayCli,
    },
    /// Dead-letter topic tools.
    Dlq {
        #[command(subcommand)]
        command: DlqCli,
    },
}

#[derive(Args, Clone)]
struct RangeArgs {
    #[command(flatten)]
    common: Common,
    /// Start (inclusive): beginning, an offset N, -N, s@MILLIS or an RFC 3339 time.
    #[arg(long, default_value = "beginning", allow_hyphen_values = true)]
    from: String,
    /// Stop (exclusive), same forms; default: the end offsets when the replay starts.
    #[arg(long, allow_hyphen_values = true)]
    to: Option<String>,
    /// Consumer group of the reader (default payslip-replay-<mode>-<time>; never the production one).
    #[arg(long)]
    group: Option<String>,
}

impl RangeArgs {
    fn options(&self, brokers: String) -> Result<payslip_stream::replay::ReplayOptions> {
        Ok(payslip_stream::replay::ReplayOptions {
            brokers,
            from: Bound::parse(&self.from).map_err(|e| anyhow!("--from {e}"))?,
            to: self.to.as_deref().map(Bound::parse).transpose().map_err(|e| anyhow!("--to {e}"))?,
            group: self.group.clone(),
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        })
    }
}

#[derive(Subcommand)]
enum ReplayCli {
    /// Re-run inference on recorded documents with chosen model versions into backfill topics.
    Infer {
        #[command(flatten)]
        range: RangeArgs,
        /// Input topic (default: the documents topic).
        #[arg(long)]
        topic: Option<String>,
        /// MODEL=VERSION to run instead of models.serve (repeatable).
        #[arg(long)]
        serve: Vec<String>,
        /// Results topic (default: the inference topic + `.backfill`).
        #[arg(long)]
        output_topic: Option<String>,
        /// Dead letters topic (default: the dead-letter topic + `.backfill`).
        #[arg(long)]
        dlq_topic: Option<String>,
        /// Allow writing to production topics.
        #[arg(long)]
        allow_production_topics: bool,
    },
    /// Recompute window metrics, alerts and rollout decisions from recorded results, feedback and
    /// commands with this config (deterministic: same input and config, same events).
    Monitor {
        #[command(flatten)]
        range: RangeArgs,
        /// Appended to the metrics, alerts and decisions topic names.
        #[arg(long, default_value = ".replay")]
        output_suffix: String,
        /// Publish nothing; print the events as JSON lines (or write them to --report).
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: write the events here instead of stdout.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Allow writing to production topics (e.g. --output-suffix '').
        #[arg(long)]
        allow_production_topics: bool,
    },
}

#[derive(Subcommand)]
enum DlqCli {
    /// Send dead letters back through the infer stage (after a fix), keeping their headers.
    Replay {
        #[command(flatten)]
        range: RangeArgs,
        /// Dead-letter topic to read (default: the configured one).
        #[arg(long)]
        dlq_topic: Option<String>,
        /// Where to send them (default: the documents topic).
        #[arg(long)]
        target_topic: Option<String>,
    },
}

#[derive(Args, Clone)]
struct RolloutArgs {
    #[command(flatten)]
    common: Common,
    /// Rollout id (default: `rollout.candidate` of the config, i.e. `<model>-<version>`).
    #[arg(long)]
    id: Option<String>,
    /// Who is acting (written into the decision).
    #[arg(long, env = "USER", default_value = "operator")]
    operator: String,
    /// Why (written into the decision).
    #[arg(long)]
    reason: Option<String>,
    /// Do not wait for the controller's decision.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the decision.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Subcommand)]
enum RolloutCli {
    /// Start a rollout at phase 1 (naming a quarantined version explicitly lifts its quarantine).
    Start {
        #[command(flatten)]
        args: RolloutArgs,
        /// Model (default: rollout.candidate.model).
        #[arg(long)]
        model: Option<String>,
        /// Candidate version (default: rollout.candidate.version).
        #[arg(long)]
        version: Option<String>,
    },
    /// Move to the next phase now (past the last one: promote).
    Advance {
        #[command(flatten)]
        args: RolloutArgs,
    },
    /// Go back one phase (from phase 1: remove the candidate).
    RollbackPhase {
        #[command(flatten)]
        args: RolloutArgs,
    },
    /// All traffic to the baseline at once; the candidate is quarantined.
    EmergencyRollback {
        #[command(flatten)]
        args: RolloutArgs,
    },
    /// Stop automatic advance and phase rollback (emergency rollback stays armed).
    Pause {
        #[command(flatten)]
        args: RolloutArgs,
    },
    Resume {
        #[command(flatten)]
        args: RolloutArgs,
    },
    /// Phase status of every rollout (or of --id) from the decisions topic, as JSON.
    Status {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Verify sha256 of every served model, load it, and print which provider runs it.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Also verify every version listed in the metadata, not only the served ones.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Print synthetic documents as JSON lines (e.g. to produce with kcat).
    Sample {
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u64,
        /// Leave out rasters (text only: small enough to read).
        #[arg(long)]
        no_rasters: bool,
    },
    /// Write generated documents as training arrays.
    Dump {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 3)]
        lines_per_doc: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Stage {
    Infer,
    Monitor,
    All,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Write a consistent RocksDB checkpoint of the monitor state (stop the monitor first: one
    /// process owns the state directory).
    Checkpoint {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        to: PathBuf,
    },
    /// Check that a checkpoint (or a stopped state directory) opens and every value decodes.
    Verify { dir: PathBuf },
    /// Replace the monitor's state directory with a verified checkpoint.
    Restore {
        #[command(flatten)]
        common: Common,
        dir: PathBuf,
    },
}

fn load_config(common: &Common) -> Result<PipelineConfig> {
    let cfg = PipelineConfig::load(&common.config).map_err(|e| anyhow!("{e}"))?;
    let topics = cfg.topics.clone().with_prefix(&common.topic_prefix);
    Ok(PipelineConfig { topics, ..cfg })
}

fn brokers_of(common: &Common, cfg: &PipelineConfig) -> Option<String> {
    common.brokers.clone().or_else(|| cfg.kafka.brokers.clone()).filter(|b| !b.trim().is_empty())
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutdown requested: draining in-flight work");
        let _ = tx.send(true);
    });
    rx
}

#[tokio::main]
async fn main() {
    payslip_stream::telemetry::init_tracing();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Rollout { command } => rollout_cli(command).await,
        Command::Replay { command } => replay_cli(command).await,
        Command::Dlq { command: DlqCli::Replay { range, dlq_topic, target_topic } } => {
            let cfg = load_config(&range.common)?;
            let brokers = brokers_of(&range.common, &cfg).context("dlq replay needs a broker: pass --brokers (or PAYSLIP_BROKERS)")?;
            let opts = range.options(brokers)?;
            let d = payslip_stream::replay::DlqReplayOptions { topic: dlq_topic, target: target_topic };
            let s = tokio::task::spawn_blocking(move || payslip_stream::replay::dlq_replay(&cfg, &opts, &d)).await?.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Command::Run { common, stage, group, demo, demo_count, demo_rate, demo_candidate } => run(common, stage, group, demo, demo_count, demo_rate, demo_candidate).await,
        Command::State { command } => match command {
            StateCommand::Checkpoint { common, to } => {
                let cfg = load_config(&common)?;
                let store = payslip_stream::state::RocksStateStore::open(&cfg.monitor.state_dir)
                    .map_err(|e| anyhow!("{e} (is the monitor still running? stop it first)"))?;
                store.checkpoint(&to).map_err(|e| anyhow!(e))?;
                drop(store);
                let s = payslip_stream::state::verify(&to).map_err(|e| anyhow!(e))?;
                println!("{}", serde_json::to_string(&s)?);
                Ok(())
            }
            StateCommand::Verify { dir } => {
                let s = payslip_stream::state::verify(&dir).map_err(|e| anyhow!(e))?;
                println!("{}", serde_json::to_string(&s)?);
                Ok(())
            }
            StateCommand::Restore { common, dir } => {
                let cfg = load_config(&common)?;
                let s = payslip_stream::state::restore(&dir, &cfg.monitor.state_dir).map_err(|e| anyhow!(e))?;
                println!("{}", serde_json::to_string(&s)?);
                Ok(())
            }
        },
        Command::Produce { common, files, count, seed, start, golden_fraction, rate, format, topic } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?;
            let opts = ProduceOptions { brokers, topic: topic.unwrap_or(cfg.topics.documents.clone()), format, rate, progress: true, passthrough: cfg.kafka.librdkafka.clone() };
            let source = if files.is_empty() { Source::Synthetic { seed, start, count, golden_fraction } } else { Source::Files(files) };
            let s = produce::produce(&opts, source).await.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&s)?);
            if s.failed > 0 {
                bail!("{} documents were not delivered", s.failed);
            }
            Ok(())
        }
        Command::Inspect { common, topic, offset, from_time, to, end, count, follow, full } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?;
            let topic = match topic.as_str() {
                "documents" => cfg.topics.documents.clone(),
                "inference" => cfg.topics.inference.clone(),
                "dlq" => cfg.topics.documents_dlq.clone(),
                "feedback" => cfg.topics.feedback.clone(),
                "metrics" => cfg.topics.metrics.clone(),
                "alerts" => cfg.topics.alerts.clone(),
                "decisions" => cfg.topics.decisions.clone(),
                "commands" => cfg.topics.commands.clone(),
                t => t.to_string(),
            };
            let start = if let Some(o) = offset {
                Bound::parse(&o).map_err(|e| anyhow!("--offset {e}"))?
            } else if let Some(t) = from_time {
                Bound::parse(&t).map_err(|e| anyhow!("--from-time {e}"))?
            } else if end {
                Bound::End
            } else {
                Bound::Beginning
            };
            let to = to.map(|t| Bound::parse(&t).map_err(|e| anyhow!("--to {e}"))).transpose()?;
            let opts = InspectOptions { brokers, topic, start, to, count, follow, full, passthrough: cfg.kafka.librdkafka.clone() };
            tokio::task::spawn_blocking(move || {
                let stdout = std::io::stdout();
                let mut lock = stdout.lock();
                inspect::inspect(&opts, &mut lock)
            })
            .await?
            .map_err(|e| anyhow!(e))?;
            Ok(())
        }
        Command::Models { command: ModelsCommand::Verify { common, all } } => {
            let cfg = load_config(&common)?;
            let extra: Vec<(String, String)> = if all {
                let meta = payslip_stream::inference::metadata::ModelMetadata::load(&cfg.models.metadata).map_err(|e| anyhow!(e))?;
                meta.models.iter().map(|m| (m.name.clone(), m.version.clone())).collect()
            } else {
                vec![]
            };
            let registry = ModelRegistry::load(&cfg.models, &cfg.inference, &extra).map_err(|e| anyhow!(e))?;
            let mut refused = 0;
            for s in registry.status() {
                println!("{}", serde_json::to_string(&s)?);
                refused += (s.state != "loaded") as usize;
            }
            if refused > 0 {
                bail!("{refused} model version(s) refused");
            }
            Ok(())
        }
        Command::Dataset { command: DatasetCommand::Sample { seed, start, count, no_rasters } } => {
            let gen = payslip_stream::synth::Generator::new(payslip_stream::synth::GeneratorConfig { seed, rasters: !no_rasters, ..Default::default() });
            for i in start..start + count {
                println!("{}", serde_json::to_string(&gen.document(i).document)?);
            }
            Ok(())
        }
        Command::Dataset { command: DatasetCommand::Dump { out, seed, count, lines_per_doc } } => {
            let meta = payslip_stream::dataset::dump(&out, seed, count, lines_per_doc)?;
            println!("{meta}");
            Ok(())
        }
        Command::Topics { common } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?;
            let created = kafka::admin::ensure_topics(&brokers, &cfg.kafka, &cfg.topics).await.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::json!({ "created": created }));
            Ok(())
        }
    }
}

/// Runs the monitor stage on a blocking thread until `shutdown`.
fn spawn_monitor(cfg: PipelineConfig, brokers: String, mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<Result<payslip_stream::monitor::MonitorSummary>> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let _ = shutdown.changed().await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    tokio::task::spawn_blocking(move || {
        let stage = payslip_stream::monitor::MonitorStage::open(cfg, brokers)?;
        Ok(stage.run(stop)?)
    })
}

async fn run(common: Common, stage_sel: Stage, group: Option<String>, demo: bool, demo_count: u64, demo_rate: f64, demo_candidate: Option<String>) -> Result<()> {
    let mut cfg = load_config(&common)?;
    if let Some(g) = group {
        cfg.kafka.infer_group = g;
    }
    let (brokers, _embedded) = match brokers_of(&common, &cfg) {
        Some(b) => {
            kafka::admin::ensure_topics(&b, &cfg.kafka, &cfg.topics).await.map_err(|e| anyhow!(e))?;
            (b, None)
        }
        None => {
            let e = EmbeddedBroker::start(&cfg.topics).map_err(|e| anyhow!(e))?;
            // the embedded broker forgets everything at exit, so the monitor's offsets must too
            cfg.monitor.state_dir = std::env::temp_dir().join(format!("payslip-embedded-state-{}", std::process::id()));
            cfg.monitor.changelog = false;
            let b = e.bootstrap_servers();
            eprintln!("no brokers configured: started an embedded in-process Kafka-protocol broker at {b}");
            eprintln!("  try: kcat -b {b} -L        (in-memory, for trying the program only; NOT for production)");
            eprintln!("  for a real cluster: --brokers HOST:PORT or PAYSLIP_BROKERS");
            (b, Some(e))
        }
    };
    if stage_sel == Stage::Monitor {
        let summary = spawn_monitor(cfg.clone(), brokers.clone(), shutdown_signal()).await??;
        eprintln!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let registry = {
        let (m, i) = (cfg.models.clone(), cfg.inference.clone());
        Arc::new(tokio::task::spawn_blocking(move || ModelRegistry::load(&m, &i, &[])).await?.map_err(|e| anyhow!(e))?)
    };
    for s in registry.status() {
        eprintln!("model {} {}: {}{}", s.model, s.version, s.state, match (&s.provider, &s.reason) {
            (Some(p), _) => format!(" on {p} ({:.0} ms)", s.load_ms),
            (_, Some(r)) => format!(": {r}"),
            _ => String::new(),
        });
    }
    let shutdown = shutdown_signal();
    if demo {
        let opts = payslip_stream::demo::DemoOptions::for_count(demo_count, demo_rate);
        let state = std::env::temp_dir().join(format!("payslip-demo-state-{}", std::process::id()));
        let cfg = payslip_stream::demo::demo_config(cfg, state.clone(), demo_candidate);
        let summary = payslip_stream::demo::run(cfg, brokers, registry, opts, shutdown).await.map_err(|e| anyhow!(e));
        let _ = std::fs::remove_dir_all(&state);
        eprintln!("demo done: {}", serde_json::to_string(&summary?)?);
        return Ok(());
    }
    let monitor = (stage_sel == Stage::All).then(|| spawn_monitor(cfg.clone(), brokers.clone(), shutdown.clone()));
    let stage = InferStage::new(cfg.clone(), brokers.clone(), registry.clone());
    let summary = stage.run(shutdown).await?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    if let Some(m) = monitor {
        let s = m.await??;
        eprintln!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

async fn rollout_cli(command: RolloutCli) -> Result<()> {
    use payslip_stream::rollout::{action, default_rollout_id, ops, routing, RolloutCommand};
    let (args, act, model, version) = match command {
        RolloutCli::Status { common, id } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).ok_or_else(|| anyhow!("rollout status needs a broker: pass --brokers (or PAYSLIP_BROKERS)"))?;
            let decisions = tokio::task::spawn_blocking(move || routing::read_decisions(&cfg, &brokers)).await?.map_err(|e| anyhow!(e))?;
            let status = ops::phase_status(decisions, id.as_deref());
            if status.is_empty() {
                bail!("no rollout{} on the decisions topic", id.map(|i| format!(" {i}")).unwrap_or_default());
            }
            for s in status {
                println!("{}", serde_json::to_string_pretty(&s)?);
            }
            return Ok(());
        }
        RolloutCli::Start { args, model, version } => (args, action::START, model, version),
        RolloutCli::Advance { args } => (args, action::ADVANCE, None, None),
        RolloutCli::RollbackPhase { args } => (args, action::ROLLBACK_PHASE, None, None),
        RolloutCli::EmergencyRollback { args } => (args, action::EMERGENCY_ROLLBACK, None, None),
        RolloutCli::Pause { args } => (args, action::PAUSE, None, None),
        RolloutCli::Resume { args } => (args, action::RESUME, None, None),
    };
    let cfg = load_config(&args.common)?;
    let brokers = brokers_of(&args.common, &cfg).ok_or_else(|| anyhow!("rollout commands need a broker: pass --brokers (or PAYSLIP_BROKERS); the embedded broker of `run` prints its address"))?;
    let candidate = cfg.rollout.candidate.as_ref();
    let id = match (&args.id, &model, &version) {
        (Some(id), _, _) => id.clone(),
        (None, Some(m), Some(v)) => default_rollout_id(m, v),
        (None, None, Some(v)) if candidate.is_some() => default_rollout_id(&candidate.expect("checked").model, v),
        _ => candidate.map(|c| c.rollout_id()).ok_or_else(|| anyhow!("name the rollout with --id (or set rollout.candidate in the config)"))?,
    };
    let issued_at = chrono::Utc::now().timestamp_millis();
    let cmd = RolloutCommand {
        command_id: format!("{}-{issued_at}-{}", args.operator, std::process::id()),
        rollout_id: id,
        action: act.to_string(),
        operator: args.operator.clone(),
        reason: args.reason.clone(),
        model,
        version,
        issued_at,
    };
    ops::send_command(&cfg, &brokers, &cmd).await.map_err(|e| anyhow!(e))?;
    eprintln!("sent {} for rollout {} to {}", cmd.action, cmd.rollout_id, cfg.topics.commands);
    if args.no_wait {
        return Ok(());
    }
    match ops::wait_for_decision(&cfg, &brokers, &cmd.command_id, std::time::Duration::from_secs(args.timeout)).await.map_err(|e| anyhow!(e))? {
        Some(d) => {
            println!("{}", serde_json::to_string_pretty(&d)?);
            if d.action == action::REJECTED {
                bail!("{}", d.reason);
            }
            Ok(())
        }
        None => bail!("no decision within {} s: is a monitor stage (`payslip-stream run --stage monitor`) running against these topics?", args.timeout),
    }
}

async fn replay_cli(command: ReplayCli) -> Result<()> {
    use payslip_stream::replay;
    match command {
        ReplayCli::Infer { range, topic, serve, output_topic, dlq_topic, allow_production_topics } => {
            let cfg = load_config(&range.common)?;
            let brokers = brokers_of(&range.common, &cfg).context("replay needs a broker: pass --brokers (or PAYSLIP_BROKERS)")?;
            let opts = range.options(brokers)?;
            let mut versions = std::collections::BTreeMap::new();
            for s in serve {
                let (m, v) = s.split_once('=').ok_or_else(|| anyhow!("--serve {s:?}: use MODEL=VERSION, e.g. document_classifier=1.1.0"))?;
                versions.insert(m.to_string(), v.to_string());
            }
            let b = replay::BackfillOptions { topic, serve: versions, output_topic, dlq_topic, allow_production: allow_production_topics };
            let s = tokio::task::spawn_blocking(move || replay::backfill(&cfg, &opts, &b)).await?.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&s)?);
        }
        ReplayCli::Monitor { range, output_suffix, dry_run, report, allow_production_topics } => {
            let cfg = load_config(&range.common)?;
            let brokers = brokers_of(&range.common, &cfg).context("replay needs a broker: pass --brokers (or PAYSLIP_BROKERS)")?;
            let opts = range.options(brokers)?;
            let m = replay::MonitorReplayOptions { output_suffix, dry_run, allow_production: allow_production_topics };
            let (s, events) = tokio::task::spawn_blocking(move || replay::monitor_replay(&cfg, &opts, &m)).await?.map_err(|e| anyhow!(e))?;
            if dry_run {
                let mut out: Box<dyn std::io::Write> = match &report {
                    Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?),
                    None => Box::new(std::io::stdout()),
                };
                for e in &events {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
            }
            let by_kind = events.iter().fold(std::collections::BTreeMap::<String, u64>::new(), |mut m, e| {
                *m.entry(e.event_id.split(':').next().unwrap_or("").to_string()).or_default() += 1;
                m
            });
            eprintln!("events: {}", serde_json::to_string(&by_kind)?);
            eprintln!("{}", serde_json::to_string(&s)?);
        }
    }
    Ok(())
}
