//! Command line of payslip-stream: parses arguments ([`cli::args`]), loads and validates the
//! configuration, calls the library and prints what it returns. `anyhow`, `clap` and `indicatif`
//! live only here, in the binary.

mod cli;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use cli::args::*;
use payslip_stream::{
    config::PipelineConfig,
    demo::DemoRun,
    inference::{LoadState, ModelRegistry},
    inspect::{self, Bound, InspectOptions},
    kafka,
    pipeline::{self, Brokers, RunOptions, Stages, Started},
    produce::{self, ProduceOptions, Source},
};

/// Prints each model version's status as a JSON line; fails when any version was refused.
fn print_model_status(registry: &ModelRegistry, consequence: &str) -> Result<()> {
    let mut refused = 0;
    for s in registry.status() {
        println!("{}", serde_json::to_string(&s)?);
        refused += (s.state == LoadState::Refused) as usize;
    }
    if refused > 0 {
        bail!("{refused} model version(s) refused{consequence}");
    }
    Ok(())
}

fn load_config(common: &Common) -> Result<PipelineConfig> {
    let mut cfg = PipelineConfig::load(&common.config).map_err(|e| anyhow!("{e}"))?;
    cfg.topics = cfg.topics.clone().with_prefix(&common.topic_prefix);
    cfg.kafka.infer_group = prefixed_group(&common.topic_prefix, &cfg.kafka.infer_group);
    Ok(cfg)
}

/// The infer group under `--topic-prefix`: the prefix namespaces the group too (and so the groups
/// and transactional ids derived from it), as an application id does in Kafka Streams. Without it,
/// two pipelines with different prefixes on one host shared the group, the static member id and the
/// transactional id (`<group>.<host name>`) and fenced each other's transactions. A group already
/// in the prefix is kept; `run --group` sets the group verbatim after this.
fn prefixed_group(prefix: &str, group: &str) -> String {
    if group.starts_with(prefix) {
        group.to_string()
    } else {
        format!("{prefix}{group}")
    }
}

fn brokers_of(common: &Common, cfg: &PipelineConfig) -> Option<String> {
    common.brokers.clone().or_else(|| cfg.kafka.brokers.clone()).filter(|b| !b.trim().is_empty())
}

/// `brokers` once one of them answers ([`kafka::admin::reach`]): until then the reason none does is
/// logged, and after `kafka.startup_wait_s` it is the command's error. Without it a command given a
/// wrong address hung in its clients' retries, logging each refused connection.
async fn reached(brokers: String, cfg: &PipelineConfig) -> Result<String> {
    let (b, passthrough, patience) = (brokers.clone(), cfg.kafka.librdkafka.clone(), cfg.kafka.startup_wait());
    tokio::task::spawn_blocking(move || kafka::admin::reach(&b, &passthrough, patience, &std::sync::atomic::AtomicBool::new(false))).await?.map_err(|e| anyhow!(e))?;
    Ok(brokers)
}

// Other allocators for Rust's allocations, for the comparison in BENCHMARKS.md ("Allocator"); with
// both features, mimalloc.
#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "alloc-jemalloc", not(feature = "alloc-mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    // before any thread exists (see the module)
    payslip_stream::malloc::tune();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap_or_else(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        std::process::exit(1);
    });
    runtime.block_on(async_main())
}

async fn async_main() {
    payslip_stream::telemetry::init_tracing();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli).await {
        if json_logs() {
            tracing::error!(error = format!("{e:#}"), "exiting");
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}

/// Whether the log is JSON lines (`PAYSLIP_LOG_FORMAT=json`, see `telemetry::init_tracing`).
fn json_logs() -> bool {
    std::env::var("PAYSLIP_LOG_FORMAT").as_deref() == Ok("json")
}

/// What `run` tells a person on stderr; with JSON logs it goes through the log instead, so that
/// stderr stays one JSON object per line for whatever collects it.
fn say(text: &str) {
    if json_logs() {
        tracing::info!("{text}");
    } else {
        eprintln!("{text}");
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
        Command::Run { common, embedded, stage, group, instance_id, api_listen, demo, demo_count, demo_rate, demo_candidate } => {
            run(common, embedded, stage, group, instance_id, api_listen, demo.then_some(DemoRun { count: demo_count, rate: demo_rate, candidate: demo_candidate })).await
        }
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
        Command::Produce { common, files, count, seed, start, golden_fraction, rate, pool, producers, format, topic } => {
            let cfg = load_config(&common)?;
            let brokers = reached(brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?, &cfg).await?;
            let opts = ProduceOptions { brokers, topic: topic.unwrap_or(cfg.topics.documents.clone()), format, rate, progress: cli::progress::bar(), passthrough: cfg.kafka.librdkafka.clone(), producers: 1 };
            let opts = ProduceOptions { producers: produce::clients(producers, pool, !files.is_empty()), ..opts };
            let source = if files.is_empty() { Source::Synthetic { seed, start, count, golden_fraction, pool } } else { Source::Files(files) };
            let s = produce::produce(&opts, source).await.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&s)?);
            if s.missed_rate {
                eprintln!("produce: missed --rate {}: {:.1} documents/s achieved, up to {:.1} s behind schedule", s.requested_rate.unwrap_or_default(), s.achieved_rate, s.max_behind_seconds);
            }
            Ok(())
        }
        Command::Inspect { common, topic, offset, from_time, to, end, count, follow, full } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?;
            let topic = cfg.topics.resolve_alias(&topic).to_string();
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
            let opts = InspectOptions { brokers, topic, start, to, count, follow, full, passthrough: cfg.kafka.librdkafka.clone(), startup_wait: cfg.kafka.startup_wait() };
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
            print_model_status(&registry, "")
        }
        Command::Models { command: ModelsCommand::Bench { common, docs, rounds } } => {
            let cfg = load_config(&common)?;
            let registry = ModelRegistry::load(&cfg.models, &cfg.inference, &[]).map_err(|e| anyhow!(e))?;
            for round in payslip_stream::inference::bench::run(&cfg, &registry, docs, rounds).map_err(|e| anyhow!(e))? {
                println!("{}", serde_json::to_string(&round)?);
            }
            print_model_status(&registry, ": their outputs were MODEL_UNAVAILABLE")
        }
        Command::Models { command: ModelsCommand::Publish { common, model, version, file, operator } } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).ok_or_else(|| anyhow!("models publish needs a broker: pass --brokers (or PAYSLIP_BROKERS)"))?;
            payslip_stream::kafka::admin::ensure_topics(&brokers, &cfg).await.map_err(|e| anyhow!(e))?;
            let publisher = cfg.kafka.principal().unwrap_or(operator);
            let a = payslip_stream::inference::announce::publish(&cfg, &brokers, &model, &version, &file, &publisher).await.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&a)?);
            eprintln!("{model} {version} announced on {}; roll it out with `payslip-stream rollout start --model {model} --version {version}`", cfg.topics.models);
            Ok(())
        }
        Command::Models { command: ModelsCommand::Optimize { common, model, version, method, new_version } } => {
            let cfg = load_config(&common)?;
            let dir = cfg.models.metadata.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let script = [dir.join("optimize.py"), std::path::PathBuf::from("models/optimize.py")].into_iter().find(|p| p.exists()).ok_or_else(|| {
                anyhow!("models/optimize.py not found next to {} or under ./models: run from the repository root", cfg.models.metadata.display())
            })?;
            let new_version = new_version.unwrap_or_else(|| format!("{version}-{method}"));
            let python = std::env::var("PAYSLIP_PYTHON").unwrap_or_else(|_| "python3".into());
            let exe = std::env::current_exe().context("locating this binary for the held-out dump")?;
            let out = std::process::Command::new(&python)
                .arg(&script)
                .args(["--metadata".as_ref(), cfg.models.metadata.as_os_str()])
                .args(["--model", &model, "--version", &version, "--method", &method, "--as", &new_version])
                .args(["--bin".as_ref(), exe.as_os_str()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {python} {}", script.display()))?;
            if !out.status.success() {
                bail!("{} failed ({}); nothing was added to {}", script.display(), out.status, cfg.models.metadata.display());
            }
            print!("{}", String::from_utf8_lossy(&out.stdout));
            let written: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading the new entry optimize.py printed")?;
            let registry = ModelRegistry::load(&cfg.models, &cfg.inference, &[(model.clone(), new_version.clone())]).map_err(|e| anyhow!(e))?;
            match registry.status().into_iter().find(|s| s.model == model && s.version == new_version) {
                Some(s) if s.state == LoadState::Loaded => eprintln!("{model} {new_version} added to {} as a candidate and loaded on {}", cfg.models.metadata.display(), s.provider.unwrap_or_default()),
                s => bail!("{model} {new_version} was written but does not load: {:?}", s.and_then(|s| s.reason)),
            }
            // with a broker: announced on the registry topic with the comparison against its source
            if let Some(brokers) = brokers_of(&common, &cfg) {
                let file = cfg.models.metadata.parent().unwrap_or(std::path::Path::new(".")).join(written["file"].as_str().unwrap_or_default());
                let mut figures = serde_json::Map::new();
                figures.insert("optimization".into(), written["optimization"].clone());
                figures.insert("optimize_heldout".into(), written["heldout"].clone());
                payslip_stream::kafka::admin::ensure_topics(&brokers, &cfg).await.map_err(|e| anyhow!(e))?;
                let publisher = cfg.kafka.principal().unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "operator".into()));
                let a = payslip_stream::inference::announce::publish_with(&cfg, &brokers, &model, &new_version, &file, &publisher, figures).await.map_err(|e| anyhow!(e))?;
                eprintln!("{model} {new_version} announced on {} with its figures; roll it out with `payslip-stream rollout start --model {model} --version {new_version}`", cfg.topics.models);
                drop(a);
            } else {
                eprintln!("not announced (no broker given): infer processes see it at their next start; with --brokers it is announced on the model registry topic");
            }
            Ok(())
        }
        Command::Models { command: ModelsCommand::Backup { common, to } } => {
            let cfg = load_config(&common)?;
            let (dir, manifest) = payslip_stream::inference::backup::backup(&cfg.models.metadata, &to).map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::json!({"backup": dir.display().to_string(), "files": manifest.files, "created_at": manifest.created_at}));
            Ok(())
        }
        Command::Models { command: ModelsCommand::Restore { common, from, date, check } } => {
            use payslip_stream::inference::backup;
            let cfg = load_config(&common)?;
            let dir = backup::locate(&from, date.as_deref()).map_err(|e| anyhow!(e))?;
            let done = backup::restore(&dir, &cfg.models.metadata, check).map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::to_string(&done)?);
            if !check {
                eprintln!("restored {} file(s) from {} ({} replaced); infer processes load the restored files at their next load (restart them, or `payslip-stream models verify` first)", done.files, done.backup, done.replaced.len());
            }
            Ok(())
        }
        Command::Openapi => {
            print!("{}", payslip_stream::ops::server::openapi_text());
            Ok(())
        }
        Command::Report { common, period, at, out, font } => {
            use payslip_stream::report;
            let cfg = load_config(&common)?;
            let brokers = reached(brokers_of(&common, &cfg).ok_or_else(|| anyhow!("report needs a broker: pass --brokers (or PAYSLIP_BROKERS)"))?, &cfg).await?;
            let period = report::Period::parse(&period).map_err(|e| anyhow!("--period {e}"))?;
            let at = match at {
                Some(d) => chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d").map_err(|_| anyhow!("--at {d:?}: use YYYY-MM-DD"))?,
                None => chrono::Utc::now().date_naive(),
            };
            let r = tokio::task::spawn_blocking(move || report::generate(&cfg, &brokers, period, at)).await?.map_err(|e| anyhow!(e))?;
            let files = report::write(&r, &out, &font).map_err(|e| anyhow!(e))?;
            eprintln!("{} to {}: {} documents, {} model versions, {} alert events, {} rollout decisions", r.from, r.to, r.documents, r.versions.len(), r.alerts.len(), r.decisions.len());
            for f in files {
                println!("{}", f.display());
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
            let created = kafka::admin::ensure_topics(&brokers, &cfg).await.map_err(|e| anyhow!(e))?;
            println!("{}", serde_json::json!({ "created": created }));
            Ok(())
        }
    }
}

async fn run(common: Common, embedded: bool, stage_sel: Stage, group: Option<String>, instance_id: Option<String>, api_listen: Option<std::net::SocketAddr>, demo: Option<DemoRun>) -> Result<()> {
    let mut cfg = load_config(&common)?;
    if let Some(g) = group {
        cfg.kafka.infer_group = g;
    }
    if let Some(addr) = api_listen {
        cfg.api.listen = Some(addr);
    }
    if let Some(id) = instance_id {
        cfg.kafka.instance_id = Some(id);
    }
    let brokers = match (brokers_of(&common, &cfg), embedded) {
        (Some(b), true) => {
            say(&format!("--embedded: ignoring the configured brokers {b}"));
            Brokers::Embedded
        }
        (None, true) => Brokers::Embedded,
        (Some(b), false) => Brokers::Cluster(b),
        (None, false) => bail!(
            "no brokers: pass --brokers HOST:PORT (or set PAYSLIP_BROKERS or kafka.brokers in {}), or --embedded to try the program on an in-process broker",
            common.config.display()
        ),
    };
    let stages = match stage_sel {
        Stage::Infer => Stages::Infer,
        Stage::Monitor => Stages::Monitor,
        Stage::All => Stages::All,
    };
    let opts = RunOptions { demo };
    let show = |s: Started<'_>| match s {
        Started::EmbeddedBroker(b) => {
            say(&format!("no brokers configured: started an embedded in-process Kafka-protocol broker at {b}"));
            say(&format!("  try: kcat -b {b} -L        (in-memory, for trying the program only; NOT for production)"));
            say("  for a real cluster: --brokers HOST:PORT or PAYSLIP_BROKERS");
        }
        Started::Model(s) => say(&format!("model {} {}: {}{}", s.model, s.version, s.state, match (&s.provider, &s.reason) {
            (Some(p), _) => format!(" on {p} ({:.0} ms)", s.load_ms),
            (_, Some(r)) => format!(": {r}"),
            _ => String::new(),
        })),
        Started::Api(addr) => say(&format!("operations API on http://{addr} (try: curl http://{addr}/health/litert)")),
    };
    let summary = pipeline::run(cfg, brokers, stages, opts, pipeline::shutdown_signal(), show).await?;
    if let Some(d) = &summary.demo {
        eprintln!("demo done: {}", serde_json::to_string(d)?);
    }
    if let Some(s) = &summary.infer {
        say(&serde_json::to_string(s)?);
    }
    if let Some(s) = &summary.monitor {
        say(&serde_json::to_string(s)?);
    }
    Ok(())
}

async fn rollout_cli(command: RolloutCli) -> Result<()> {
    use payslip_stream::rollout::{action, default_rollout_id, ops, routing, RolloutCommand};
    let (args, act, model, version) = match command {
        RolloutCli::Status { common, id } => {
            let cfg = load_config(&common)?;
            let brokers = reached(brokers_of(&common, &cfg).ok_or_else(|| anyhow!("rollout status needs a broker: pass --brokers (or PAYSLIP_BROKERS)"))?, &cfg).await?;
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
        RolloutCli::Simulate { config, runs, seed, window_minutes, documents_per_minute, method, scenario, threads } => {
            use payslip_stream::rollout::{criteria::Method, simulate};
            let cfg = PipelineConfig::load(&config).map_err(|e| anyhow!("{}: {e}", config.display()))?;
            let methods = match method.as_str() {
                "sequential" => vec![Method::Sequential],
                "fixed-alpha" | "fixed_alpha" => vec![Method::FixedAlpha],
                "both" => vec![Method::Sequential, Method::FixedAlpha],
                other => bail!("--method {other}: use sequential, fixed-alpha or both"),
            };
            let all = simulate::default_scenarios();
            let scenarios: Vec<_> = if scenario.is_empty() { all.clone() } else { all.iter().filter(|s| scenario.contains(&s.name)).cloned().collect() };
            if scenarios.len() != scenario.len().max(if scenario.is_empty() { all.len() } else { 0 }) {
                bail!("--scenario: use some of {}", all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "));
            }
            if !(window_minutes > 0.0) || !(documents_per_minute > 0.0) || runs == 0 {
                bail!("--runs, --window-minutes and --documents-per-minute must be more than 0");
            }
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            let traffic = simulate::Traffic { documents_per_minute, ..Default::default() };
            let opts = simulate::SimOptions { runs, seed, window_minutes, traffic, methods, scenarios, threads };
            let report = tokio::task::spawn_blocking(move || simulate::simulate(&cfg.rollout, &opts)).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
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
    let brokers = reached(brokers_of(&args.common, &cfg).ok_or_else(|| anyhow!("rollout commands need a broker: pass --brokers (or PAYSLIP_BROKERS); the embedded broker of `run` prints its address"))?, &cfg).await?;
    let candidate = cfg.rollout.candidate.as_ref();
    let id = match (&args.id, &model, &version) {
        (Some(id), _, _) => id.clone(),
        (None, Some(m), Some(v)) => default_rollout_id(m, v),
        (None, None, Some(v)) if candidate.is_some() => default_rollout_id(&candidate.expect("checked").model, v),
        _ => candidate.map(|c| c.rollout_id()).ok_or_else(|| anyhow!("name the rollout with --id (or set rollout.candidate in the config)"))?,
    };
    // with SASL the operator is the authenticated principal, not a name anyone can type
    let operator = cfg.kafka.principal().unwrap_or_else(|| args.operator.clone());
    let cmd = RolloutCommand::new(id, act, operator, args.reason.clone(), model, version);
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
