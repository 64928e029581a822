//! Command-line arguments: the clap definitions of every subcommand. Parsing only; what each
//! command does lives in the library, and `main.rs` connects the two and prints.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use payslip_stream::{codec::WireFormat, inspect::Bound};

#[derive(Parser)]
#[command(name = "payslip-stream", version, about = "Kafka stream processor running ONNX Runtime inference on payslip documents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Common {
    /// Pipeline configuration file.
    #[arg(long, short, default_value = "pipelines/payslip.yaml", env = "PAYSLIP_CONFIG")]
    pub config: PathBuf,
    /// Kafka bootstrap servers; overrides `kafka.brokers` in the config.
    #[arg(long, short, env = "PAYSLIP_BROKERS")]
    pub brokers: Option<String>,
    /// Prefix for every topic name and for the infer group (isolated test or demo runs).
    #[arg(long, env = "PAYSLIP_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline against brokers (--brokers, PAYSLIP_BROKERS or kafka.brokers), or with
    /// --embedded on an in-process broker (for trying the program only).
    Run {
        #[command(flatten)]
        common: Common,
        /// Start an embedded in-process Kafka-protocol broker and use it (data is lost at exit; not
        /// for production). Configured brokers are ignored.
        #[arg(long)]
        embedded: bool,
        /// Which stage to run: infer, monitor, or all (both in this process).
        #[arg(long, value_enum, default_value = "all")]
        stage: Stage,
        /// Consumer group of the infer stage, as given (not prefixed by --topic-prefix); overrides
        /// `kafka.infer_group`.
        #[arg(long)]
        group: Option<String>,
        /// This process's identity in the infer group (static membership) and transactional id;
        /// overrides `kafka.instance_id` (default: the host name). Distinct per process on one host.
        #[arg(long, env = "PAYSLIP_INSTANCE_ID")]
        instance_id: Option<String>,
        /// Serve the operations HTTP API here (e.g. 127.0.0.1:9464); overrides `api.listen`.
        #[arg(long, env = "PAYSLIP_API_LISTEN")]
        api_listen: Option<std::net::SocketAddr>,
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
        /// Synthetic: render only this many documents and send them round-robin, each under its own
        /// id, user and time (a load generator: rendering costs ~14 ms a document, sending far less).
        #[arg(long)]
        pool: Option<u64>,
        /// Producer clients to spread the documents over, by key (each compresses and sends on its own
        /// thread). Default: one per core with --pool (a load generator), else one.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        producers: Option<u16>,
        /// Wire format of the values.
        #[arg(long, default_value = "avro")]
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
    /// The runbook's daily or weekly performance report: JSON, charts (SVG and PNG) with alert and
    /// rollout markers, and an HTML page, from the metrics, alerts and decisions topics.
    Report {
        #[command(flatten)]
        common: Common,
        /// day or week
        #[arg(long, default_value = "day")]
        period: String,
        /// The (last) UTC day of the period, YYYY-MM-DD (default: today).
        #[arg(long)]
        at: Option<String>,
        /// Directory for report.json, report.html and the charts.
        #[arg(long)]
        out: PathBuf,
        /// TrueType font for the PNG charts.
        #[arg(long, default_value = payslip_stream::report::chart::DEFAULT_FONT)]
        font: PathBuf,
    },
    /// Print the operations API's OpenAPI document (docs/openapi.json).
    Openapi,
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
pub struct RangeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start (inclusive): beginning, an offset N, -N, s@MILLIS or an RFC 3339 time.
    #[arg(long, default_value = "beginning", allow_hyphen_values = true)]
    pub from: String,
    /// Stop (exclusive), same forms; default: the end offsets when the replay starts.
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Consumer group of the reader (default payslip-replay-<mode>-<time>; never the production one).
    #[arg(long)]
    pub group: Option<String>,
}

impl RangeArgs {
    pub fn options(&self, brokers: String) -> Result<payslip_stream::replay::ReplayOptions> {
        Ok(payslip_stream::replay::ReplayOptions {
            brokers,
            from: Bound::parse(&self.from).map_err(|e| anyhow!("--from {e}"))?,
            to: self.to.as_deref().map(Bound::parse).transpose().map_err(|e| anyhow!("--to {e}"))?,
            group: self.group.clone(),
            progress: super::progress::bar_if_terminal(),
        })
    }
}

#[derive(Subcommand)]
pub enum ReplayCli {
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
pub enum DlqCli {
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
pub struct RolloutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rollout id (default: `rollout.candidate` of the config, i.e. `<model>-<version>`).
    #[arg(long)]
    pub id: Option<String>,
    /// Who is acting (written into the decision). Ignored with `kafka.sasl`: then the operator is
    /// the authenticated principal (`User:<name>`).
    #[arg(long, env = "USER", default_value = "operator")]
    pub operator: String,
    /// Why (written into the decision).
    #[arg(long)]
    pub reason: Option<String>,
    /// Do not wait for the controller's decision.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for the decision.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Subcommand)]
pub enum RolloutCli {
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
    /// Run the controller over simulated rollouts (no broker): false-rollback rate for a candidate
    /// as good as its baseline, detection rate and time for worse ones, promotion time; sequential
    /// and fixed-α verdicts on the same streams. Prints JSON.
    Simulate {
        /// Pipeline configuration file (its `rollout` section: phases, criteria, alpha).
        #[arg(long, short, default_value = "pipelines/payslip.yaml", env = "PAYSLIP_CONFIG")]
        config: PathBuf,
        /// Simulated rollouts per scenario and method.
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Window length (the controller judges at every window close).
        #[arg(long, default_value_t = 10.0)]
        window_minutes: f64,
        /// Documents per minute over both cohorts.
        #[arg(long, default_value_t = 100.0)]
        documents_per_minute: f64,
        /// sequential, fixed-alpha, or both.
        #[arg(long, default_value = "both")]
        method: String,
        /// Only these scenarios (aa, aa_spiky, pcda_accuracy_minus_10_points, error_rate_doubled,
        /// latency_plus_25_percent); default all.
        #[arg(long)]
        scenario: Vec<String>,
        /// Threads (default: the machine's cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Verify sha256 of every served model, load it, and print which provider runs it.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Also verify every version listed in the metadata, not only the served ones.
        #[arg(long)]
        all: bool,
    },
    /// Time the served models on synthetic documents in the batches the stage makes, without
    /// Kafka: per round, documents per second, ONNX Runtime's share of the time, resident and GPU
    /// memory; then each version's provider and node placement. One JSON line per round, then
    /// the status lines. What `scripts/gpu-check` compares providers with.
    Bench {
        #[command(flatten)]
        common: Common,
        /// Documents per round.
        #[arg(long, default_value_t = 2000)]
        docs: u64,
        /// Rounds over the same documents (the first pays for first-run allocations).
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// Check a model file and announce it on the model registry topic (litert.models.v1) as
    /// VERSION of MODEL: sha256, graph inputs against the preprocessing, a test inference and a
    /// held-out evaluation first; a refused file is never announced. Running infer processes take
    /// it in without a restart; `rollout start --model M --version V` then rolls it out.
    Publish {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// The .onnx file (copied into the model repository as MODEL/VERSION.onnx).
        #[arg(long)]
        file: PathBuf,
        /// Who publishes (with SASL: the authenticated principal instead).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
    },
    /// Quantize a model version (int8, ONNX Runtime's quantization tooling, models/optimize.py),
    /// measure it against its source on held-out documents (accuracy, size, batch run time), and
    /// add it to models.metadata as a candidate with those figures; then load it once to check it.
    Optimize {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// Only int8 (dynamic quantization) for now.
        #[arg(long, default_value = "int8")]
        method: String,
        /// The new version's name (default: VERSION-METHOD).
        #[arg(long = "as")]
        new_version: Option<String>,
    },
    /// Back up the model repository (models.metadata and every file it lists, each verified
    /// against its sha256 first) into DIR/YYYY-MM-DD.
    Backup {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore the model repository from a backup: every file verified against the backup's
    /// sha256 before anything is written; the whole restore is refused on a mismatch.
    Restore {
        #[command(flatten)]
        common: Common,
        /// A backup directory, or the directory of dated backups (the latest is taken).
        #[arg(long)]
        from: PathBuf,
        /// The backup of this day (YYYY-MM-DD) in --from.
        #[arg(long)]
        date: Option<String>,
        /// Verify the backup and say what would change, without writing.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
pub enum DatasetCommand {
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
pub enum Stage {
    Infer,
    Monitor,
    All,
}

#[derive(Subcommand)]
pub enum StateCommand {
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
