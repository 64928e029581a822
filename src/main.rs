//! Command line of payslip-stream. Parses arguments, loads and validates configuration, wires the
//! library together; `anyhow` lives only here.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rdkafka::{consumer::{Consumer, StreamConsumer}, message::Message};
use tokio::sync::watch;

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    document::InferenceResult,
    inference::ModelRegistry,
    inspect::{self, InspectOptions, StartAt},
    kafka::{self, embedded::EmbeddedBroker, headers as h},
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
        /// Which stage to run (the monitor stage is not built yet).
        #[arg(long, value_enum, default_value = "infer")]
        stage: Stage,
        /// Consumer group of the infer stage; overrides `kafka.infer_group`.
        #[arg(long)]
        group: Option<String>,
        /// Demo: also produce synthetic documents (some of them broken) and print each result.
        #[arg(long)]
        demo: bool,
        /// Demo: number of documents to produce before stopping.
        #[arg(long, default_value_t = 300)]
        demo_count: u64,
        /// Demo: documents per second.
        #[arg(long, default_value_t = 50.0)]
        demo_rate: f64,
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
        /// Topic name, or one of: documents, inference, dlq, feedback.
        #[arg(long, short)]
        topic: String,
        /// Start at this offset in every partition.
        #[arg(long, conflicts_with_all = ["from_time", "end"])]
        offset: Option<i64>,
        /// Start at the first message at or after this RFC 3339 time.
        #[arg(long)]
        from_time: Option<String>,
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
    /// Create the project's topics (partitions, retention, compaction) on a cluster.
    Topics {
        #[command(flatten)]
        common: Common,
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
        Command::Run { common, stage: Stage::Infer, group, demo, demo_count, demo_rate } => run(common, group, demo, demo_count, demo_rate).await,
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
        Command::Inspect { common, topic, offset, from_time, end, count, follow, full } => {
            let cfg = load_config(&common)?;
            let brokers = brokers_of(&common, &cfg).context("no brokers: pass --brokers, set PAYSLIP_BROKERS or kafka.brokers")?;
            let topic = match topic.as_str() {
                "documents" => cfg.topics.documents.clone(),
                "inference" => cfg.topics.inference.clone(),
                "dlq" => cfg.topics.documents_dlq.clone(),
                "feedback" => cfg.topics.feedback.clone(),
                t => t.to_string(),
            };
            let start = if let Some(o) = offset {
                StartAt::Offset(o)
            } else if let Some(t) = from_time {
                let ts = chrono::DateTime::parse_from_rfc3339(&t).with_context(|| format!("--from-time {t:?} is not RFC 3339 (e.g. 2026-11-27T10:00:00Z)"))?;
                StartAt::Timestamp(ts.timestamp_millis())
            } else if end {
                StartAt::End
            } else {
                StartAt::Beginning
            };
            let opts = InspectOptions { brokers, topic, start, count, follow, full, passthrough: cfg.kafka.librdkafka.clone() };
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
                println!("{}", serde_json::to_string(s)?);
                refused += (s.state != "loaded") as usize;
            }
            if refused > 0 {
                bail!("{refused} model version(s) refused");
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

async fn run(common: Common, group: Option<String>, demo: bool, demo_count: u64, demo_rate: f64) -> Result<()> {
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
            let b = e.bootstrap_servers();
            eprintln!("no brokers configured: started an embedded in-process Kafka-protocol broker at {b}");
            eprintln!("  try: kcat -b {b} -L        (in-memory, for trying the program only; NOT for production)");
            eprintln!("  for a real cluster: --brokers HOST:PORT or PAYSLIP_BROKERS");
            (b, Some(e))
        }
    };
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
    let stage = InferStage::new(cfg.clone(), brokers.clone(), registry.clone());
    if !demo {
        let summary = stage.run(shutdown).await?;
        eprintln!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    // Demo: the stage, a producer of synthetic documents with a few broken ones, and a result printer.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut outer = shutdown.clone();
    let stop_forward = stop_tx.clone();
    tokio::spawn(async move {
        if outer.changed().await.is_ok() {
            let _ = stop_forward.send(true);
        }
    });
    let stage_task = tokio::spawn(stage.run(stop_rx));
    let popts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(demo_rate), progress: false, passthrough: cfg.kafka.librdkafka.clone() };
    let bad_every = 50u64;
    let producer_task = tokio::spawn(async move {
        let s = produce::produce(&popts, Source::Synthetic { seed: 2026, start: 0, count: demo_count, golden_fraction: 1.0 }).await;
        // a few broken documents so the dead-letter path shows up
        let p: rdkafka::producer::FutureProducer = kafka::producer_config(&popts.brokers, &popts.passthrough).create().expect("producer");
        for i in 0..(demo_count / bad_every).max(1) {
            let hs = kafka::headers::HeaderSet::new().with(h::CONTENT_TYPE, "application/json").build();
            let body = format!("{{\"document_id\": \"broken-{i}\", \"pages\": \"not a list\"}}");
            let _ = p.send(rdkafka::producer::FutureRecord::to(&popts.topic).key("broken").payload(&body).headers(hs), Duration::from_secs(10)).await;
        }
        s
    });
    let mut printer_cfg = kafka::consumer_config(&brokers, &format!("payslip-demo-printer-{}", std::process::id()), &cfg.kafka.librdkafka);
    printer_cfg.set("enable.auto.offset.store", "true");
    let printer: StreamConsumer = printer_cfg.create()?;
    printer.subscribe(&[&cfg.topics.inference, &cfg.topics.documents_dlq])?;
    let (mut seen, mut correct, mut labelled, mut dead) = (0u64, 0u64, 0u64, 0u64);
    let expected_dead = (demo_count / bad_every).max(1);
    let mut shutdown_wait = shutdown.clone();
    while seen < demo_count || dead < expected_dead {
        let m = tokio::select! {
            _ = shutdown_wait.changed() => break,
            _ = tokio::time::sleep(Duration::from_secs(60)) => { eprintln!("demo: no output for 60 s, stopping"); break; }
            m = printer.recv() => m?,
        };
        let ct = h::get(m.headers(), h::CONTENT_TYPE);
        if m.topic() == cfg.topics.documents_dlq {
            dead += 1;
            println!("DLQ    key={} class={} reason={}", String::from_utf8_lossy(m.key().unwrap_or_default()), h::get(m.headers(), h::ERROR_CLASS).unwrap_or_default(), h::get(m.headers(), h::ERROR_MESSAGE).unwrap_or_default());
            continue;
        }
        let r: InferenceResult = match codec::decode(m.payload().unwrap_or_default(), ct.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("demo: undecodable result: {e}");
                continue;
            }
        };
        seen += 1;
        let cls = r.output("document_classifier");
        let label = cls.and_then(|o| o.label.clone()).unwrap_or_else(|| "-".into());
        if let Some(t) = &r.true_format {
            labelled += 1;
            correct += (t == &label) as u64;
        }
        let tables = r.output("table_detection").map(|o| o.regions.len()).unwrap_or(0);
        let first_line = r.output("text_recognition").and_then(|o| o.lines.first().cloned()).unwrap_or_default();
        println!(
            "RESULT {} format={label:<9} conf={:.2} truth={:<9} tables={tables} text={first_line:?} provider={} infer={:.1}ms e2e={:.0}ms{}",
            r.document_id,
            cls.and_then(|o| o.confidence).unwrap_or(0.0),
            r.true_format.clone().unwrap_or_default(),
            r.provider,
            r.inference_ms,
            r.end_to_end_ms,
            r.error_code.map(|c| format!(" error={c}")).unwrap_or_default()
        );
    }
    let _ = stop_tx.send(true);
    let produced = producer_task.await?.map_err(|e| anyhow!(e))?;
    let summary = stage_task.await??;
    eprintln!(
        "demo done: produced {} documents (+{} broken), {} results, {} dead letters; classifier accuracy {:.1}% on {} labelled documents",
        produced.sent,
        expected_dead,
        seen,
        dead,
        if labelled > 0 { 100.0 * correct as f64 / labelled as f64 } else { 0.0 },
        labelled
    );
    eprintln!("stage summary: {}", serde_json::to_string(&summary)?);
    Ok(())
}
