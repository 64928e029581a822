//! Pipeline configuration (`pipelines/payslip.yaml`): parsed once at start-up, validated, then
//! handed to the stages as typed values. Unknown keys are errors, so a typo cannot silently fall
//! back to a default. Every error message names the key and says what to change.

use std::{collections::BTreeMap, path::{Path, PathBuf}};

use serde::Deserialize;

use crate::document::DocumentLimits;

/// An event time from outside that the limits refuse (the record goes to a dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTimeError {
    #[error("{what} {ts_ms} is more than limits.max_past_ms ({max_past_ms} ms) before now ({now_ms}); milliseconds since the epoch are expected")]
    TooOld { what: &'static str, ts_ms: i64, now_ms: i64, max_past_ms: i64 },
    #[error("{what} {ts_ms} is more than limits.max_future_ms ({max_future_ms} ms) after now ({now_ms})")]
    TooFarAhead { what: &'static str, ts_ms: i64, now_ms: i64, max_future_ms: i64 },
}

impl EventTimeError {
    /// Never: the record carries the time (it goes to a dead-letter topic).
    pub fn retryable(&self) -> bool {
        false
    }
}

/// Why the configuration cannot be used; never retryable: the file must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// Never: the file must be fixed (except a file that could not be read, which may appear).
    pub fn retryable(&self) -> bool {
        matches!(self, ConfigError::Read { .. })
    }
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// The whole pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Kafka connection and client options.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Topic names and how they are created.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Which model versions are served and where their files are.
    pub models: ModelsConfig,
    /// ONNX Runtime library and execution providers.
    #[serde(default)]
    pub inference: InferenceConfig,
    /// Dynamic batching across documents.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Limits on incoming documents; anything beyond goes to the dead-letter topic.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Windows, state and alert rules of the monitor stage.
    #[serde(default)]
    pub monitor: MonitorConfig,
    /// Fault injection for demos and chaos tests (off by default).
    #[serde(default)]
    pub faults: FaultsConfig,
    /// Phased rollout of a candidate model version (phases, criteria, emergency rollback).
    #[serde(default)]
    pub rollout: crate::rollout::RolloutConfig,
    /// The operations HTTP API (health, readiness, metrics, rollout commands).
    #[serde(default)]
    pub api: crate::ops::ApiConfig,
    /// Where alert events go besides their topic (`alerts.forward.alertmanager_url`).
    #[serde(default)]
    pub alerts: crate::alert::forward::AlertsConfig,
}

/// Header-driven fault injection, like Envoy's fault filter: when enabled, a document carrying
/// `fault-delay-ms: N` delays its batch's model runs by N ms (a real sleep, so every document in that
/// batch is slower), and `fault-error: MODEL` makes that model's output for the document fail with
/// `INFERENCE_FAILED`. `fault-ort-failures: N` fails the batch's next N model runs as ONNX Runtime
/// would, and `fault-txn-abort: 1` (exactly once) aborts the first transaction holding the message,
/// after its records and offsets were sent. Never enable it where producers are not trusted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Upper bound of an injected delay, ms.
    #[serde(default = "default_max_fault_delay")]
    pub max_delay_ms: u64,
}

fn default_max_fault_delay() -> u64 { 5_000 }

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// RocksDB directory of the monitor's state (one process at a time).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Tumbling window size in event time, milliseconds.
    #[serde(default = "default_window_ms")]
    pub window_size_ms: i64,
    /// How far behind the highest event time an event may be and still be counted, milliseconds.
    #[serde(default = "default_lateness_ms")]
    pub allowed_lateness_ms: i64,
    /// A partition without input for this long (processing time, ms) stops holding windows open.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: i64,
    /// How long predictions are kept to join feedback, milliseconds (event time).
    #[serde(default = "default_retention_ms")]
    pub prediction_retention_ms: i64,
    /// At most this many feedbacks wait for a prediction not seen yet; more count as orphans at
    /// once (`WindowMetrics.feedback_orphan_total`), so a feedback stream without results cannot
    /// grow the state without bound.
    #[serde(default = "default_max_pending_feedback")]
    pub max_pending_feedback: usize,
    /// Largest number of input messages applied in one state batch (one changelog transaction, one
    /// RocksDB write). A batch takes what is already fetched, so at low rates batches stay small;
    /// draining, 3,000 per batch applied about a quarter more results/s than 1,000 (each batch's
    /// commit and delivery wait is paid once; BENCHMARKS.md "The monitor's batch size").
    #[serde(default = "default_monitor_batch")]
    pub max_batch: usize,
    /// Wire format of `litert.metrics.v1`: avro or json.
    #[serde(default = "default_output_format")]
    pub metrics_format: crate::codec::WireFormat,
    /// Wire format of `litert.alerts.v1`: avro or json.
    #[serde(default = "default_output_format")]
    pub alerts_format: crate::codec::WireFormat,
    /// Replicate state to the changelog topic and elect one leader among the monitor processes
    /// (a standby takes over when the leader dies). Needs Kafka transactions.
    #[serde(default = "yes")]
    pub changelog: bool,
    /// Warm standbys: with 1 or more, a monitor process waiting for the leadership tails the
    /// changelog into its own state, so a takeover replays seconds of changes instead of the whole
    /// topic; 0 keeps waiting processes cold (they replay everything when they take over). With
    /// this ≥ 1 every process is a warm replica of every closing partition it does not lead.
    #[serde(default = "default_standby_replicas")]
    pub standby_replicas: u32,
    /// A firing alert whose subject has had no window for this many closed window ranges (a
    /// rolled-back candidate, a retired version) resolves with the reason "no data"; 0: never.
    #[serde(default = "default_resolve_silent_after")]
    pub resolve_silent_after_windows: u32,
    /// Scale-out: every monitor process also runs a pre-aggregation member of the consumer group
    /// `<kafka.infer_group>-monitor-pre` over the results and feedback topics (co-partitioned by
    /// document id). Each member aggregates its partitions into partial windows and publishes them
    /// to `topics.monitor_partials` in Kafka transactions with its input offsets; the leader merges
    /// the partials, closes windows, evaluates alerts and runs the rollout (src/monitor/pre.rs).
    /// Off (default): the leader reads the results and feedback itself.
    #[serde(default)]
    pub scale_out: bool,
    /// Scale-out: the pre-aggregation members' transaction timeout, ms. A member killed in the
    /// middle of a commit holds the partials topic's readers back this long at most; a
    /// transaction lasts one batch's sends and its commit.
    #[serde(default = "default_pre_transaction_timeout_ms")]
    pub pre_transaction_timeout_ms: u64,
    /// Scale-out: partitions of the closing stage. The partials are keyed by model (the pipeline
    /// subject is copied to every partition, for the rollout's memory criteria); each partition has
    /// its own changelog partition, transactional id and state directory, and the monitor
    /// processes share the partitions out through a consumer group on the changelog topic
    /// (src/monitor/shard.rs). 1 (default): one process closes every window. The changelog and
    /// partials topics are created with this many partitions; existing ones must have exactly as
    /// many.
    #[serde(default = "default_closing_partitions")]
    pub closing_partitions: u32,
    /// Alert rules (default: the runbook's thresholds; see src/alert/mod.rs `default_rules`).
    #[serde(default = "crate::alert::default_rules")]
    pub alerts: Vec<crate::alert::AlertRule>,
}

fn default_state_dir() -> PathBuf { ".state/monitor".into() }
fn default_window_ms() -> i64 { 60_000 }
fn default_max_pending_feedback() -> usize { crate::monitor::state::DEFAULT_MAX_PENDING_FEEDBACK }
fn default_lateness_ms() -> i64 { 5_000 }
fn default_idle_ms() -> i64 { 10_000 }
fn default_retention_ms() -> i64 { 7 * 24 * 3_600_000 }
fn default_monitor_batch() -> usize { 3000 }
fn default_resolve_silent_after() -> u32 { 5 }
fn yes() -> bool { true }
fn default_standby_replicas() -> u32 { 1 }
fn default_pre_transaction_timeout_ms() -> u64 { 10_000 }
fn default_closing_partitions() -> u32 { 1 }
fn default_commit_interval_ms() -> u64 { 100 }

impl Default for MonitorConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all monitor fields have defaults")
    }
}

impl MonitorConfig {
    pub fn window(&self) -> crate::window::WindowConfig {
        crate::window::WindowConfig { size_ms: self.window_size_ms, allowed_lateness_ms: self.allowed_lateness_ms, idle_timeout_ms: self.idle_timeout_ms }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.window_size_ms < 1 {
            return Err(invalid("monitor.window_size_ms", "must be at least 1"));
        }
        if self.allowed_lateness_ms < 0 {
            return Err(invalid("monitor.allowed_lateness_ms", "must not be negative"));
        }
        if self.idle_timeout_ms < 1 {
            return Err(invalid("monitor.idle_timeout_ms", "must be at least 1"));
        }
        if self.max_pending_feedback == 0 {
            return Err(invalid("monitor.max_pending_feedback", "must be at least 1"));
        }
        if self.max_batch == 0 {
            return Err(invalid("monitor.max_batch", "must be at least 1"));
        }
        if self.scale_out && !self.changelog {
            return Err(invalid("monitor.scale_out", "needs monitor.changelog: true (the closing stage's leader election and state replication)"));
        }
        if !(1..=256).contains(&self.closing_partitions) {
            return Err(invalid("monitor.closing_partitions", format!("is {}; use 1 to 256", self.closing_partitions)));
        }
        if self.closing_partitions > 1 && !self.scale_out {
            return Err(invalid("monitor.closing_partitions", "more than 1 needs monitor.scale_out: true (the partials are what is keyed by model)"));
        }
        if !(1_000..=900_000).contains(&self.pre_transaction_timeout_ms) {
            return Err(invalid("monitor.pre_transaction_timeout_ms", format!("is {}; use 1000 to 900000", self.pre_transaction_timeout_ms)));
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &self.alerts {
            r.validate("monitor.alerts")?;
            if !names.insert(r.name.clone()) {
                return Err(invalid("monitor.alerts", format!("rule name {} is used twice", r.name)));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, e.g. `broker1:9092,broker2:9092`. Empty: start the embedded in-process
    /// broker (for trying the program only). Overridden by `--brokers` / `PAYSLIP_BROKERS`.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Consumer group of the infer stage.
    #[serde(default = "default_group")]
    pub infer_group: String,
    /// Extra librdkafka properties for every client (security, timeouts, buffer sizes, ...), passed
    /// through as is. Keys that would weaken the delivery guarantees are refused at start-up.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// How long a broker outage is waited out before a delivery counts as failed, ms (librdkafka's
    /// `message.timeout.ms`). A stage keeps its work in memory meanwhile and loses nothing.
    #[serde(default = "default_outage_tolerance_ms")]
    pub outage_tolerance_ms: u64,
    /// `exactly_once` (default): the infer stage writes each batch's results, dead letters and input
    /// offsets in one Kafka transaction, so a crash or rebalance never publishes a result twice.
    /// `at_least_once`: offsets are committed after delivery; a redelivered document gets its
    /// result again (the monitor still counts it once).
    #[serde(default)]
    pub processing_guarantee: Guarantee,
    /// Exactly once: the infer stage's transaction timeout, ms (default: `outage_tolerance_ms`). It bounds how long readers wait behind the open transaction of a process that
    /// died and does not return (one that returns with its instance id aborts it at once).
    #[serde(default)]
    pub transaction_timeout_ms: Option<u64>,
    /// Exactly once: how long one transaction of the infer stage may go on taking batches, ms
    /// (Kafka Streams' `commit.interval.ms`; 100, its exactly-once default, is ours). 0: one
    /// transaction per batch. Longer: a busy stage commits the batches of an interval together,
    /// paying a transaction's round trips once for all of them, while their results become visible
    /// to `read_committed` readers up to this much later. An idle stage (no batch in flight,
    /// nothing fetched) commits at once whatever the interval.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// This process's stable identity in the infer group (`group.instance.id`, static membership:
    /// a restarted process gets its partitions back at once) and in its transactional id. Default:
    /// the host name. Processes of one group on one host need distinct values
    /// (`--instance-id` / `PAYSLIP_INSTANCE_ID`).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Join the infer group as a static member (`group.instance.id` = the instance id). Off: a
    /// restarted process waits for a rebalance (the session timeout) before it gets partitions.
    #[serde(default = "yes")]
    pub static_membership: bool,
    /// How long a process or command waits at start for a broker to answer before it exits with
    /// the reason none does, seconds (1 to 3600). Raise it where the brokers may start after the
    /// pipeline (a compose file, a cluster restart).
    #[serde(default = "default_startup_wait_s")]
    pub startup_wait_s: u64,
    /// SASL authentication of every client. The password is read from a file or an environment
    /// variable when the configuration is loaded, never written in this file, and never printed.
    #[serde(default)]
    pub sasl: Option<SaslConfig>,
    /// Set by `run --embedded`, not in the file: the in-process broker cannot describe topic
    /// configurations, so checks that need it are skipped.
    #[serde(skip)]
    pub embedded: bool,
}

fn default_outage_tolerance_ms() -> u64 {
    600_000
}

fn default_startup_wait_s() -> u64 {
    30
}



/// `kafka.sasl`: who every client of this process authenticates as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    /// SCRAM-SHA-512 (default), SCRAM-SHA-256 or PLAIN.
    #[serde(default = "default_sasl_mechanism")]
    pub mechanism: String,
    pub username: String,
    /// A file holding the password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// SASL_SSL (TLS to the brokers; `ssl.ca.location` etc. through `kafka.librdkafka`) instead of
    /// SASL_PLAINTEXT.
    #[serde(default)]
    pub tls: bool,
}

fn default_sasl_mechanism() -> String {
    "SCRAM-SHA-512".into()
}

/// A value that is never printed (`Debug` and `Display` show `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl SaslConfig {
    /// The password, from `password_file` or `password_env` (exactly one of them).
    pub fn password(&self) -> Result<Secret, ConfigError> {
        let p = match (&self.password_file, &self.password_env) {
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| invalid("kafka.sasl.password_file", format!("cannot read {}: {e}", path.display())))?;
                text.lines().next().unwrap_or("").to_string()
            }
            (None, Some(var)) => std::env::var(var).map_err(|_| invalid("kafka.sasl.password_env", format!("environment variable {var} is not set")))?,
            _ => return Err(invalid("kafka.sasl", "set exactly one of password_file and password_env")),
        };
        if p.is_empty() {
            return Err(invalid("kafka.sasl", "the password is empty"));
        }
        Ok(Secret(p))
    }
}

/// Keys whose values are secrets: refused in `kafka.librdkafka` (use `kafka.sasl`) and never printed.
const SECRET_KEYS: &[&str] = &["sasl.password", "sasl.jaas.config", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"];

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let passthrough: BTreeMap<&String, &str> = self.librdkafka.iter().map(|(k, v)| (k, if SECRET_KEYS.contains(&k.as_str()) { "***" } else { v.as_str() })).collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("infer_group", &self.infer_group)
            .field("librdkafka", &passthrough)
            .field("outage_tolerance_ms", &self.outage_tolerance_ms)
            .field("transaction_timeout_ms", &self.transaction_timeout_ms)
            .field("commit_interval_ms", &self.commit_interval_ms)
            .field("processing_guarantee", &self.processing_guarantee)
            .field("instance_id", &self.instance_id)
            .field("static_membership", &self.static_membership)
            .field("startup_wait_s", &self.startup_wait_s)
            .field("sasl", &self.sasl)
            .finish()
    }
}

/// How the infer stage hands its work to Kafka (`kafka.processing_guarantee`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

impl KafkaConfig {
    /// `kafka.instance_id`, else the host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`), else
    /// `payslip-stream`.
    pub fn instance_id(&self) -> String {
        self.instance_id
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()))
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "payslip-stream".into())
    }
}

const IN_FLIGHT_WHY: &str = "with more than one produce request in flight librdkafka can report a record delivered that the broker never wrote (kafka::config::MAX_IN_FLIGHT)";

/// Passthrough keys the project sets itself because the delivery guarantees rest on them, with the
/// only values that may be passed (empty: none).
const GUARDED_KEYS: &[(&str, &[&str], &str)] = &[
    ("enable.auto.offset.store", &["false"], "offsets are stored only after the results they caused are delivered"),
    ("enable.idempotence", &["true"], "the producers are idempotent so a retry never duplicates a record"),
    ("acks", &["all", "-1"], "a record counts as delivered only when every in-sync replica has it"),
    ("request.required.acks", &["all", "-1"], "a record counts as delivered only when every in-sync replica has it"),
    ("max.in.flight.requests.per.connection", &["1"], IN_FLIGHT_WHY),
    ("max.in.flight", &["1"], IN_FLIGHT_WHY),
    ("enable.auto.commit", &[], "each client commits as its delivery semantics require"),
    ("isolation.level", &["read_committed"], "readers must not see aborted transactions"),
    ("group.id", &[], "set kafka.infer_group instead; the other readers choose their own"),
    ("transactional.id", &[], "the infer stage and the monitor's changelog set their own to fence stale processes"),
    ("group.instance.id", &[], "set kafka.instance_id instead"),
    ("message.timeout.ms", &[], "set kafka.outage_tolerance_ms instead"),
    ("delivery.timeout.ms", &[], "set kafka.outage_tolerance_ms instead"),
];

impl KafkaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in &self.librdkafka {
            // the password kafka.sasl put there itself is fine; one written in the file is not
            if SECRET_KEYS.contains(&key.as_str()) && !(key == "sasl.password" && self.sasl.is_some()) {
                return Err(invalid(&format!("kafka.librdkafka.{key}"), "secrets do not go in the configuration file: use kafka.sasl with password_file or password_env"));
            }
            if let Some((_, allowed, why)) = GUARDED_KEYS.iter().find(|(k, _, _)| k == key) {
                if !allowed.contains(&value.as_str()) {
                    let fix = if allowed.is_empty() { "remove it".to_string() } else { format!("remove it or use {}", allowed.join(" or ")) };
                    return Err(invalid(&format!("kafka.librdkafka.{key}"), format!("{value:?} would weaken the delivery guarantees ({why}); {fix}")));
                }
            }
        }
        if let Some(t) = self.transaction_timeout_ms.filter(|t| *t < 1_000 || *t > self.outage_tolerance_ms) {
            return Err(invalid("kafka.transaction_timeout_ms", format!("is {t}; use 1000 to kafka.outage_tolerance_ms ({})", self.outage_tolerance_ms)));
        }
        if self.commit_interval_ms > 10_000 || self.commit_interval_ms * 2 > self.transaction_timeout_ms() {
            return Err(invalid("kafka.commit_interval_ms", format!("is {}; use 0 to 10000, and at most half of the transaction timeout ({} ms)", self.commit_interval_ms, self.transaction_timeout_ms())));
        }
        if self.outage_tolerance_ms < 10_000 || self.outage_tolerance_ms > 900_000 {
            return Err(invalid("kafka.outage_tolerance_ms", format!("is {}; use 10000 to 900000 (the broker's default transaction.max.timeout.ms)", self.outage_tolerance_ms)));
        }
        if !(1..=3_600).contains(&self.startup_wait_s) {
            return Err(invalid("kafka.startup_wait_s", format!("is {}; use 1 to 3600 (seconds to wait at start for a broker to answer)", self.startup_wait_s)));
        }
        Ok(())
    }
}

impl KafkaConfig {
    /// Puts `kafka.sasl` into the client properties every client is built from (security
    /// protocol, mechanism, user name and the password read now).
    fn apply_sasl(&mut self) -> Result<(), ConfigError> {
        let Some(sasl) = &self.sasl else { return Ok(()) };
        if !["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"].contains(&sasl.mechanism.as_str()) {
            return Err(invalid("kafka.sasl.mechanism", format!("is {:?}; use SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN", sasl.mechanism)));
        }
        if sasl.username.trim().is_empty() {
            return Err(invalid("kafka.sasl.username", "is empty"));
        }
        let password = sasl.password()?;
        let protocol = if sasl.tls { "SASL_SSL" } else { "SASL_PLAINTEXT" };
        let (mechanism, username) = (sasl.mechanism.clone(), sasl.username.clone());
        self.librdkafka.insert("security.protocol".into(), protocol.into());
        self.librdkafka.insert("sasl.mechanisms".into(), mechanism);
        self.librdkafka.insert("sasl.username".into(), username);
        self.librdkafka.insert("sasl.password".into(), password.expose().to_string());
        Ok(())
    }

    /// How long to wait at start for a broker to answer (`startup_wait_s`).
    pub fn startup_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.startup_wait_s)
    }

    /// The infer stage's transaction timeout: `transaction_timeout_ms`, else the outage tolerance.
    pub fn transaction_timeout_ms(&self) -> u64 {
        self.transaction_timeout_ms.unwrap_or(self.outage_tolerance_ms)
    }

    /// The authenticated user name, when `kafka.sasl` is set.
    pub fn principal(&self) -> Option<String> {
        self.sasl.as_ref().map(|s| format!("User:{}", s.username))
    }
}

fn default_group() -> String {
    "payslip-infer".into()
}

// Section defaults are the serde field defaults (never `derive(Default)`, whose zeros would differ
// from what an absent key means).
impl Default for KafkaConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all kafka fields have defaults")
    }
}

impl Default for FaultsConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all fault fields have defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    #[serde(default = "t_documents")]
    pub documents: String,
    #[serde(default = "t_inference")]
    pub inference: String,
    #[serde(default = "t_dlq")]
    pub documents_dlq: String,
    #[serde(default = "t_feedback")]
    pub feedback: String,
    #[serde(default = "t_metrics")]
    pub metrics: String,
    #[serde(default = "t_alerts")]
    pub alerts: String,
    #[serde(default = "t_decisions")]
    pub decisions: String,
    #[serde(default = "t_commands")]
    pub commands: String,
    /// The monitor's changelog (compacted, one partition): state replication and leader election.
    #[serde(default = "t_changelog")]
    pub monitor_changelog: String,
    /// Results, feedback and commands the monitor could not decode, with the reason.
    #[serde(default = "t_monitor_dlq")]
    pub monitor_dlq: String,
    /// The model registry (compacted, one partition, key `model/version`): `models publish`
    /// announces versions here and every infer process follows it.
    #[serde(default = "t_models")]
    pub models: String,
    /// Scale-out (`monitor.scale_out`): partial window aggregates from the pre-aggregation
    /// members to the closing stage (one partition).
    #[serde(default = "t_monitor_partials")]
    pub monitor_partials: String,
    /// Partitions for topics this program creates (existing topics are left as they are).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor for topics this program creates.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Retention of the data topics in hours (decisions are compacted, not deleted).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u32,
    /// Wire format of results written to `inference`: `avro` or `json` (for kcat readers).
    #[serde(default = "default_output_format")]
    pub inference_format: crate::codec::WireFormat,
}

fn t_documents() -> String { "payslip.documents.v1".into() }
fn t_inference() -> String { "payslip.inference.v1".into() }
fn t_dlq() -> String { "payslip.documents.dlq.v1".into() }
fn t_feedback() -> String { "payslip.feedback.v1".into() }
fn t_metrics() -> String { "litert.metrics.v1".into() }
fn t_alerts() -> String { "litert.alerts.v1".into() }
fn t_decisions() -> String { "litert.rollout.decisions.v1".into() }
fn t_commands() -> String { "litert.rollout.commands.v1".into() }
fn t_changelog() -> String { "litert.monitor.changelog.v1".into() }
fn t_monitor_dlq() -> String { "litert.monitor.dlq.v1".into() }
fn t_monitor_partials() -> String { "litert.monitor.partials.v1".into() }
fn t_models() -> String { "litert.models.v1".into() }
fn default_partitions() -> i32 { 6 }
fn default_replication() -> i32 { 1 }
fn default_retention_hours() -> u32 { 168 }
fn default_output_format() -> crate::codec::WireFormat { crate::codec::WireFormat::Avro }

impl Default for TopicsConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all topic fields have defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// `model_metadata.json` (name, version, file, sha256, shapes, labels, accuracy). Model files are
    /// resolved relative to its directory.
    pub metadata: PathBuf,
    /// Version served for each model: `document_classifier`, `table_detection`, `text_recognition`.
    pub serve: BTreeMap<String, String>,
    /// Models allowed to serve degraded: when their served version cannot be loaded, the infer
    /// stage still runs and answers with `MODEL_UNAVAILABLE` for them. For every other model a
    /// version that cannot be loaded stops the stage before it consumes anything.
    #[serde(default)]
    pub allow_degraded: Vec<String>,
    /// A version that nothing routes to any more (a candidate rolled back, a baseline replaced by a
    /// promoted candidate) is unloaded after this many milliseconds, so memory does not grow with
    /// every rollout. The wait lets batches routed before the decision finish on it.
    #[serde(default = "default_unload_after_ms")]
    pub unload_after_ms: u64,
}

fn default_unload_after_ms() -> u64 { 30_000 }

/// Execution providers, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Cpu,
}

impl Provider {
    /// Whether this is a GPU provider (TensorRT or CUDA).
    pub fn is_gpu(self) -> bool {
        !matches!(self, Provider::Cpu)
    }
}

/// What to do when no configured GPU provider can be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderFailure {
    /// Run on the providers that registered, CPU at the least (and say so in the log, the model
    /// status and each result's provider).
    #[default]
    Fallback,
    /// Refuse the model unless a GPU provider registered in its session (TensorRT failing while
    /// CUDA works is not a failure: CUDA runs).
    Fail,
}

/// How the CUDA provider's memory arena grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArenaGrowth {
    /// Doubles each extension (ONNX Runtime's default): few allocations, up to twice the need.
    NextPowerOfTwo,
    /// Extends by what is asked: tighter memory for the varying shapes of a stream.
    #[default]
    SameAsRequested,
}

/// cuDNN's convolution algorithm search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConvSearch {
    /// cuDNN's heuristics: no benchmarking per new shape (the batch axis changes every batch).
    #[default]
    Heuristic,
    /// Benchmarks every algorithm for each new input shape (slow first run of each shape).
    Exhaustive,
    /// A fixed default algorithm.
    Default,
}

/// Options of the CUDA execution provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaConfig {
    /// GPU ordinal.
    #[serde(default)]
    pub device_id: i32,
    /// Most device memory the provider's arena may take, MiB (0 = no limit).
    #[serde(default)]
    pub memory_limit_mb: usize,
    #[serde(default)]
    pub arena_extend_strategy: ArenaGrowth,
    #[serde(default)]
    pub conv_algorithm_search: ConvSearch,
}

impl Default for CudaConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all cuda fields have defaults")
    }
}

/// Options of the TensorRT execution provider. Its optimisation profile (min/opt/max of each
/// model's batch axis) is derived from `batching` and `limits`, so engines are built once per
/// model for every shape the batcher can produce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorrtConfig {
    /// Half-precision kernels where TensorRT finds them faster.
    #[serde(default = "default_true")]
    pub fp16: bool,
    /// Where engines and the timing cache are kept across restarts (created if missing); empty:
    /// no cache (every start builds its engines again, seconds per model).
    #[serde(default = "default_trt_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Largest scratch memory TensorRT may use while building, MiB.
    #[serde(default = "default_trt_workspace")]
    pub max_workspace_mb: usize,
}

fn default_true() -> bool { true }
fn default_trt_cache() -> Option<PathBuf> { Some(PathBuf::from(".cache/tensorrt")) }
fn default_trt_workspace() -> usize { 1024 }

impl Default for TensorrtConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all tensorrt fields have defaults")
    }
}

/// The largest batch axis each model sees, from `batching` and `limits` (set by
/// [`PipelineConfig::validate`]'s caller; defaults match the defaults of those sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShapes {
    /// Documents in one run (classifier rows).
    pub max_documents: usize,
    /// Page rasters in one run (table model rows).
    pub max_pages: usize,
    /// Line rasters in one run (text model rows).
    pub max_lines: usize,
}

impl Default for RunShapes {
    fn default() -> Self {
        Self::of(&BatchingConfig::default(), &LimitsConfig::default())
    }
}

impl RunShapes {
    pub fn of(b: &BatchingConfig, l: &LimitsConfig) -> Self {
        Self { max_documents: b.max_batch, max_pages: b.max_batch * l.max_pages, max_lines: b.max_lines_per_run }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Path of `libonnxruntime.so`. Empty: the `ORT_DYLIB_PATH` environment variable.
    #[serde(default)]
    pub ort_dylib_path: Option<PathBuf>,
    /// Providers in the order they are tried; `cpu` should be last.
    #[serde(default = "default_providers")]
    pub providers: Vec<Provider>,
    /// `fallback` (default) or `fail` when a GPU provider cannot be registered.
    #[serde(default)]
    pub on_provider_failure: ProviderFailure,
    /// Threads ONNX Runtime uses inside one model run (0 = its default).
    #[serde(default = "default_intra_threads")]
    pub intra_threads: usize,
    /// ONNX Runtime sessions each loaded model version holds. A session runs one batch at a time,
    /// so with one session the infer stage's two batches in flight queue for each model in turn,
    /// and one of the two cores idles while the text model runs (BENCHMARKS.md "A session per
    /// batch in flight"). Left out: 2 on the CPU provider (one per batch in flight, more could
    /// never run at once), 1 on a GPU provider (a device runs one batch at a time anyway, and each
    /// session holds its own device memory). 1 to 8.
    #[serde(default)]
    pub sessions_per_model: Option<usize>,
    /// Tries of a model run ONNX Runtime fails (the input is valid, so the failure is the
    /// runtime's: a device error, memory): each retry waits (200 ms, then 4 times longer each
    /// time) and runs on a rebuilt session. When every try fails the batch is not answered and
    /// the infer stage stops without storing its offsets.
    #[serde(default = "default_run_attempts")]
    pub run_attempts: u32,
    /// Refuse a model version unless every node of its graph runs on a GPU provider: ONNX
    /// Runtime's CPU fallback is disabled in its session (`session.disable_cpu_ep_fallback`) and
    /// the profiled warm-up must place no node on the CPU.
    #[serde(default)]
    pub require_gpu: bool,
    /// Directories of the CUDA and cuDNN libraries, loaded before the CUDA provider registers.
    /// Empty: the `nvidia/*/lib` directories of the Python environment that holds the ONNX Runtime
    /// library (the `onnxruntime-gpu` wheel's `nvidia-*` dependencies), when there are any.
    #[serde(default)]
    pub library_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub cuda: CudaConfig,
    #[serde(default)]
    pub tensorrt: TensorrtConfig,
    /// Batch axes the warm-up runs and TensorRT's profile covers (from `batching` and `limits`).
    #[serde(skip)]
    pub shapes: RunShapes,
}

fn default_providers() -> Vec<Provider> {
    vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]
}
fn default_intra_threads() -> usize { 1 }
fn default_run_attempts() -> u32 { 3 }

impl Default for InferenceConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all inference fields have defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Largest number of documents in one model run.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest a document waits for its batch to fill while the batch before it is running, in
    /// milliseconds. An idle stage runs a batch at once with whatever is already fetched: batches
    /// fill only while the models are busy, so low load pays no batching delay.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Most text lines in one model run: a batch whose documents hold more is run in several
    /// (each line is a 48 x 64 float input, about 12 KiB), so memory follows this bound rather
    /// than the documents' size.
    #[serde(default = "default_max_lines_per_run")]
    pub max_lines_per_run: usize,
    /// A batch stops taking documents once their values add up to this many bytes (a document is
    /// never split: one larger than this is a batch of its own), so a burst of large documents is
    /// decoded and held a few at a time.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
}

fn default_max_batch() -> usize { 32 }
fn default_max_batch_bytes() -> usize { 4_000_000 }
fn default_max_wait_ms() -> u64 { 20 }
fn default_max_lines_per_run() -> usize { 1024 }

impl Default for BatchingConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all batching fields have defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted message value in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    #[serde(default = "default_max_pages")]
    pub max_pages: usize,
    #[serde(default = "default_max_lines")]
    pub max_lines_per_page: usize,
    /// Largest raster, in pixels.
    #[serde(default = "default_max_raster")]
    pub max_raster_pixels: usize,
    /// Most text lines in one document, over all its pages; a document with more is dead-lettered
    /// as `too_large_for_models` (it would need a model run of its own beyond
    /// `batching.max_lines_per_run`).
    #[serde(default = "default_max_lines_per_document")]
    pub max_lines_per_document: usize,
    /// Oldest event time accepted from outside, ms before now: older documents are dead-lettered
    /// (`bad_timestamp`), older commands go to the monitor's dead-letter topic (e.g. a command
    /// stamped in seconds instead of milliseconds).
    #[serde(default = "default_max_past_ms")]
    pub max_past_ms: i64,
    /// Latest event time accepted, ms after now (clock skew allowance): a far-future time would
    /// move the monitor's watermark past every later event.
    #[serde(default = "default_max_future_ms")]
    pub max_future_ms: i64,
}

fn default_max_past_ms() -> i64 { 30 * 24 * 3_600_000 }
fn default_max_future_ms() -> i64 { 600_000 }

fn default_max_payload() -> usize { 1_000_000 }
fn default_max_pages() -> usize { 16 }
fn default_max_lines() -> usize { 400 }
fn default_max_raster() -> usize { 4_000_000 }
fn default_max_lines_per_document() -> usize { 1024 }

impl Default for LimitsConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all limits have defaults")
    }
}

impl LimitsConfig {
    /// Whether an event time taken from outside lies in `[now - max_past_ms, now + max_future_ms]`;
    /// the error says which bound it broke. Checked arithmetic: any `i64` is safe here.
    pub fn check_event_time(&self, what: &'static str, ts_ms: i64, now_ms: i64) -> Result<(), EventTimeError> {
        let (lo, hi) = (now_ms.saturating_sub(self.max_past_ms), now_ms.saturating_add(self.max_future_ms));
        if ts_ms < lo {
            return Err(EventTimeError::TooOld { what, ts_ms, now_ms, max_past_ms: self.max_past_ms });
        }
        if ts_ms > hi {
            return Err(EventTimeError::TooFarAhead { what, ts_ms, now_ms, max_future_ms: self.max_future_ms });
        }
        Ok(())
    }

    pub fn document_limits(&self) -> DocumentLimits {
        DocumentLimits { max_pages: self.max_pages, max_lines_per_page: self.max_lines_per_page, max_raster_pixels: self.max_raster_pixels }
    }
}

use crate::inference::MODEL_NAMES;

impl PipelineConfig {
    /// Reads, parses and validates a config file; relative paths inside it are resolved against
    /// the file's directory's parent when they do not exist relative to the working directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg: PipelineConfig = serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        if cfg.models.metadata.is_relative() && !cfg.models.metadata.exists() {
            if let Some(root) = path.parent().and_then(Path::parent) {
                let alt = root.join(&cfg.models.metadata);
                if alt.exists() {
                    cfg.models.metadata = alt;
                }
            }
        }
        cfg.inference.shapes = RunShapes::of(&cfg.batching, &cfg.limits);
        cfg.validate()?;
        cfg.kafka.apply_sasl()?;
        Ok(cfg)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: PipelineConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse { path: "<inline>".into(), message: e.to_string() })?;
        cfg.inference.shapes = RunShapes::of(&cfg.batching, &cfg.limits);
        cfg.validate()?;
        cfg.kafka.apply_sasl()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.api.validate()?;
        self.alerts.validate()?;
        if self.batching.max_batch == 0 || self.batching.max_batch > 4096 {
            return Err(invalid("batching.max_batch", format!("is {}; use a value from 1 to 4096", self.batching.max_batch)));
        }
        if let Some(n) = self.inference.sessions_per_model.filter(|n| !(1..=8).contains(n)) {
            return Err(invalid("inference.sessions_per_model", format!("is {n}; use 1 to 8, or leave it out (2 on the CPU, 1 on a GPU)")));
        }
        if !(1..=10).contains(&self.inference.run_attempts) {
            return Err(invalid("inference.run_attempts", format!("is {}; use 1 to 10", self.inference.run_attempts)));
        }
        if self.batching.max_batch_bytes == 0 {
            return Err(invalid("batching.max_batch_bytes", "must be at least 1"));
        }
        if self.batching.max_lines_per_run == 0 {
            return Err(invalid("batching.max_lines_per_run", "must be at least 1"));
        }
        if self.limits.max_lines_per_document > self.batching.max_lines_per_run {
            return Err(invalid(
                "limits.max_lines_per_document",
                format!("is {}, above batching.max_lines_per_run ({}): one document must fit one model run", self.limits.max_lines_per_document, self.batching.max_lines_per_run),
            ));
        }
        if self.batching.max_wait_ms > 60_000 {
            return Err(invalid("batching.max_wait_ms", format!("is {} ms; use at most 60000", self.batching.max_wait_ms)));
        }
        if self.inference.providers.is_empty() {
            return Err(invalid("inference.providers", "is empty; list at least `cpu`"));
        }
        if self.inference.on_provider_failure == ProviderFailure::Fail && !self.inference.providers.iter().any(|p| p.is_gpu()) {
            return Err(invalid("inference.on_provider_failure", "is `fail` (refuse unless a GPU provider loads) but inference.providers lists no GPU provider; add `cuda` or `tensorrt`, or use `fallback`"));
        }
        if self.inference.require_gpu && !self.inference.providers.iter().any(|p| p.is_gpu()) {
            return Err(invalid("inference.require_gpu", "is true but inference.providers lists no GPU provider; add `cuda` or `tensorrt`"));
        }
        if self.inference.cuda.device_id < 0 {
            return Err(invalid("inference.cuda.device_id", "must be 0 or more (a GPU ordinal)"));
        }
        let mut seen = Vec::new();
        for p in &self.inference.providers {
            if seen.contains(p) {
                return Err(invalid("inference.providers", format!("lists {p:?} twice")));
            }
            seen.push(*p);
        }
        if self.topics.partitions < 1 {
            return Err(invalid("topics.partitions", "must be at least 1"));
        }
        if self.topics.replication_factor < 1 {
            return Err(invalid("topics.replication_factor", "must be at least 1"));
        }
        self.topics.check_names().map_err(|(k, m)| invalid(&k, m))?;
        if self.limits.max_past_ms < 60_000 || self.limits.max_future_ms < 0 {
            return Err(invalid("limits", "max_past_ms must be at least 60000 and max_future_ms at least 0"));
        }
        if self.limits.max_payload_bytes < 1024 {
            return Err(invalid("limits.max_payload_bytes", "must be at least 1024"));
        }
        if self.models.serve.is_empty() {
            return Err(invalid("models.serve", format!("is empty; name a version for each of {MODEL_NAMES:?}")));
        }
        if self.models.unload_after_ms < 100 {
            return Err(invalid("models.unload_after_ms", "must be at least 100 (batches routed before a decision finish on the version meanwhile)"));
        }
        for name in &self.models.allow_degraded {
            if !MODEL_NAMES.contains(&name.as_str()) {
                return Err(invalid("models.allow_degraded", format!("{name} is not a known model; known models are {MODEL_NAMES:?}")));
            }
        }
        for name in self.models.serve.keys() {
            if !MODEL_NAMES.contains(&name.as_str()) {
                return Err(invalid(&format!("models.serve.{name}"), format!("unknown model; known models are {MODEL_NAMES:?}")));
            }
        }
        if !self.models.metadata.exists() {
            return Err(invalid("models.metadata", format!("{} does not exist; point it at models/model_metadata.json", self.models.metadata.display())));
        }
        self.monitor.validate()?;
        self.rollout.validate()?;
        if let Some(p) = &self.inference.ort_dylib_path {
            if !p.exists() {
                return Err(invalid("inference.ort_dylib_path", format!("{} does not exist; install onnxruntime (pip install onnxruntime==1.32.*) and point this at its capi/libonnxruntime.so.*", p.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "models:\n  metadata: Cargo.toml\n  serve: {document_classifier: '1.0.0'}\n";

    #[test]
    fn sasl_reads_the_password_from_a_file_or_the_environment_and_never_prints_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let c = PipelineConfig::from_yaml(&format!("{BASE}kafka:\n  sasl: {{username: ops, password_file: {}}}\n", file.display())).unwrap();
        assert_eq!(c.kafka.librdkafka["sasl.password"], "s3cret-from-file");
        assert_eq!((c.kafka.librdkafka["security.protocol"].as_str(), c.kafka.librdkafka["sasl.mechanisms"].as_str()), ("SASL_PLAINTEXT", "SCRAM-SHA-512"));
        assert_eq!(c.kafka.principal().as_deref(), Some("User:ops"));
        assert!(!format!("{c:?}").contains("s3cret-from-file"), "Debug hides it");
        std::env::set_var("PAYSLIP_TEST_SASL_PW", "s3cret-from-env");
        let c = PipelineConfig::from_yaml(&format!("{BASE}kafka:\n  sasl: {{username: ops, password_env: PAYSLIP_TEST_SASL_PW, tls: true}}\n")).unwrap();
        assert_eq!((c.kafka.librdkafka["sasl.password"].as_str(), c.kafka.librdkafka["security.protocol"].as_str()), ("s3cret-from-env", "SASL_SSL"));
        // a password written into the file is refused, naming where it goes instead
        let e = PipelineConfig::from_yaml(&format!("{BASE}kafka:\n  librdkafka: {{sasl.password: hunter2}}\n")).unwrap_err().to_string();
        assert!(e.contains("kafka.librdkafka.sasl.password") && e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}kafka:\n  sasl: {{username: ops, password_env: PAYSLIP_TEST_SASL_UNSET}}\n")).unwrap_err().to_string();
        assert!(e.contains("PAYSLIP_TEST_SASL_UNSET is not set"), "{e}");
        assert_eq!(format!("{:?}", Secret("x".into())), "***");
    }

    #[test]
    fn defaults_fill_in() {
        let c = PipelineConfig::from_yaml(BASE).unwrap();
        assert_eq!(c.topics.documents, "payslip.documents.v1");
        assert_eq!(c.batching.max_batch, 32);
        assert_eq!(c.inference.providers, vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]);
    }

    #[test]
    fn absent_sections_mean_the_same_as_empty_ones() {
        let absent = PipelineConfig::from_yaml(BASE).unwrap();
        let empty = PipelineConfig::from_yaml(&format!("{BASE}kafka: {{}}\nfaults: {{}}\nrollout: {{}}\nmonitor: {{}}\nbatching: {{}}\nlimits: {{}}\ninference: {{}}\ntopics: {{}}\n")).unwrap();
        assert_eq!(format!("{absent:?}"), format!("{empty:?}"));
        assert_eq!(absent.kafka.infer_group, "payslip-infer");
        assert_eq!(absent.faults.max_delay_ms, 5_000);
        assert!(!absent.faults.enabled);
    }

    #[test]
    fn errors_name_the_key() {
        let e = PipelineConfig::from_yaml(&format!("{BASE}batching: {{max_batch: 0}}\n")).unwrap_err().to_string();
        assert!(e.contains("batching.max_batch"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}batching: {{max_batchh: 3}}\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field `max_batchh`"), "{e}");
        let e = PipelineConfig::from_yaml("models:\n  metadata: Cargo.toml\n  serve: {ocr: '1'}\n").unwrap_err().to_string();
        assert!(e.contains("models.serve.ocr"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}inference: {{providers: [cuda, cuda]}}\n")).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}inference: {{sessions_per_model: 0}}\n")).unwrap_err().to_string();
        assert!(e.contains("inference.sessions_per_model") && e.contains("1 to 8"), "{e}");
        assert_eq!(PipelineConfig::from_yaml(&format!("{BASE}inference: {{sessions_per_model: 3}}\n")).unwrap().inference.sessions_per_model, Some(3));
        let e = PipelineConfig::from_yaml(&format!("{BASE}kafka: {{startup_wait_s: 0}}\n")).unwrap_err().to_string();
        assert!(e.contains("kafka.startup_wait_s") && e.contains("1 to 3600"), "{e}");
        assert_eq!(PipelineConfig::from_yaml(&format!("{BASE}kafka: {{startup_wait_s: 120}}\n")).unwrap().kafka.startup_wait(), std::time::Duration::from_secs(120));
        assert_eq!(PipelineConfig::from_yaml(BASE).unwrap().kafka.startup_wait_s, 30);
        let e = PipelineConfig::from_yaml(&format!("{BASE}rollout: {{auto_start: true}}\n")).unwrap_err().to_string();
        assert!(e.contains("rollout.auto_start") && e.contains("rollout.candidate"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}rollout: {{phases: [{{name: a, traffic_percent: 0, soak_ms: 1}}]}}\n")).unwrap_err().to_string();
        assert!(e.contains("rollout.phases[0] (a)") && e.contains("traffic_percent"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}rollout: {{phases: [{{name: a, traffic_percent: 5, soak_ms: 1, criteria: [{{name: m, metric: cpu_percent, vs_baseline_margin: 0.1}}]}}]}}\n")).unwrap_err().to_string();
        assert!(e.contains("criteria.m") && e.contains("no per-cohort baseline"), "{e}");
        let e = PipelineConfig::from_yaml(&format!("{BASE}rollout: {{phases: [{{name: a, traffic_percent: 5, soak_ms: 1, criteria: [{{name: m, metric: latency_p59, max: 1}}]}}]}}\n")).unwrap_err().to_string();
        assert!(e.contains("unknown metric `latency_p59`") && e.contains("latency_p95_ms"), "{e}");
    }

    #[test]
    fn gpu_options_parse_and_policies_without_a_gpu_provider_are_refused() {
        let c = PipelineConfig::from_yaml(&format!(
            "{BASE}batching: {{max_batch: 8, max_lines_per_run: 2048}}\nlimits: {{max_pages: 4}}\ninference: {{require_gpu: true, cuda: {{device_id: 1, memory_limit_mb: 2048, arena_extend_strategy: next_power_of_two, conv_algorithm_search: exhaustive}}, tensorrt: {{fp16: false, cache_dir: /var/cache/trt}}}}\n"
        ))
        .unwrap();
        assert_eq!((c.inference.cuda.device_id, c.inference.cuda.memory_limit_mb), (1, 2048));
        assert_eq!((c.inference.cuda.arena_extend_strategy, c.inference.cuda.conv_algorithm_search), (ArenaGrowth::NextPowerOfTwo, ConvSearch::Exhaustive));
        assert_eq!((c.inference.tensorrt.fp16, c.inference.tensorrt.cache_dir.as_deref()), (false, Some(Path::new("/var/cache/trt"))));
        // TensorRT's profile and the warm-up follow batching and limits
        assert_eq!(c.inference.shapes, RunShapes { max_documents: 8, max_pages: 32, max_lines: 2048 });
        // require_gpu: no CPU appended to the providers
        assert_eq!(c.inference.inference_order(), vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]);
        let d = PipelineConfig::from_yaml(BASE).unwrap();
        assert_eq!((d.inference.cuda.conv_algorithm_search, d.inference.tensorrt.fp16), (ConvSearch::Heuristic, true));
        for (yaml, key) in [
            ("inference: {providers: [cpu], on_provider_failure: fail}", "inference.on_provider_failure"),
            ("inference: {providers: [cpu], require_gpu: true}", "inference.require_gpu"),
            ("inference: {cuda: {device_id: -1}}", "inference.cuda.device_id"),
            ("inference: {tensorrt: {fp32: true}}", "unknown field `fp32`"),
        ] {
            let e = PipelineConfig::from_yaml(&format!("{BASE}{yaml}\n")).unwrap_err().to_string();
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_passthrough_cannot_weaken_delivery() {
        for (key, value) in [("enable.auto.offset.store", "true"), ("acks", "1"), ("enable.idempotence", "false"), ("isolation.level", "read_uncommitted"), ("message.timeout.ms", "5000"), ("max.in.flight.requests.per.connection", "5"), ("max.in.flight", "2")] {
            let e = PipelineConfig::from_yaml(&format!("{BASE}kafka: {{librdkafka: {{{key}: '{value}'}}}}\n")).unwrap_err().to_string();
            assert!(e.contains(&format!("kafka.librdkafka.{key}")) && e.contains("weaken"), "{e}");
        }
        // what does not touch the guarantees passes, and so does restating a guaranteed value
        PipelineConfig::from_yaml(&format!("{BASE}kafka: {{librdkafka: {{security.protocol: SASL_SSL, acks: all, max.in.flight: '1', queue.buffering.max.kbytes: '65536'}}}}\n")).unwrap();
    }
}
