//! Memory harness (not a test): the infer stage's peak resident memory on a burst of the heaviest
//! documents `limits` allow, against a burst of ordinary synthetic payslips, in one invocation.
//!
//!   scripts/kafka start
//!   eval "$(scripts/env)"; cargo build
//!   PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 cargo run --example memory
//!
//! For each stream it produces the documents to fresh topics, starts `payslip-stream run --stage
//! infer` (the real binary, pipelines/payslip.yaml) as a child process, waits until the stage's
//! group has committed past every document (exactly once, offsets move with the document's result
//! or dead letter in one transaction), and stops it. `results` and `dead_letters` are records read
//! back, not offsets: a transactional topic's offsets include its commit markers. Two figures per
//! stream:
//! - `peak_rss_mb`: the highest `process_rss_bytes` in the results, which the stage takes from the
//!   kernel's high-water mark (VmHWM) and resets after each batch, so no peak between samples is missed;
//! - `sampled_rss_mb`: the highest VmRSS this harness saw polling the child every 20 ms (a cross-check).
//!
//! Then the runbook's phase-2 bound: a backlog of `BENCH_BACKLOG` ordinary documents (default 20,000,
//! produced from a pool of 256 rendered ones) drained by the stage with the three models loaded, and
//! the same backlog with a rollout at 50 % (the candidate classifier loaded as well).
//!
//! Each stream also reports its rate (from the stage's start, so start-up is included) and the
//! stage's CPU per document (user + system, from /proc), for comparing allocators
//! (`cargo build --features alloc-mimalloc` or `alloc-jemalloc` before running).
//!
//! Environment: `BENCH_DOCS` (default 200 per stream). Prints one JSON object; BENCHMARKS.md records it.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    document::{InferenceResult, PayslipDocument},
    kafka,
    produce::{self, ProduceOptions, Source},
    synth::{Generator, GeneratorConfig},
};
use rdkafka::{consumer::BaseConsumer, Message};

#[path = "support.rs"]
mod support;
use support::publish_split;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml");

/// The input offsets a group has committed on a topic, summed over its partitions: the documents
/// it is done with. Asked with a client of that group that never joins it.
struct Committed {
    client: BaseConsumer,
    partitions: rdkafka::TopicPartitionList,
}

impl Committed {
    fn new(brokers: &str, group: &str, topic: &str) -> Self {
        let client: BaseConsumer = kafka::reader_config(brokers, group, &Default::default()).create().expect("consumer");
        let mut partitions = rdkafka::TopicPartitionList::new();
        for p in kafka::partitions_of(&client, topic, Duration::from_secs(10)).expect("partitions") {
            partitions.add_partition(topic, p);
        }
        Committed { client, partitions }
    }

    fn sum(&self) -> i64 {
        use rdkafka::consumer::Consumer;
        let done = self.client.committed_offsets(self.partitions.clone(), Duration::from_secs(10)).expect("committed offsets");
        done.elements().iter().filter_map(|e| e.offset().to_raw()).filter(|o| *o > 0).sum()
    }
}

/// User plus system CPU seconds the process has used (/proc/PID/stat, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name, which is in parentheses and may hold spaces
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The records on `topic` (committed ones: the reader is `read_committed`), and the highest memory
/// figure the stage reported in them, MB.
fn read_back(brokers: &str, topic: &str) -> (u64, f64) {
    let c: BaseConsumer = kafka::reader_config(brokers, &format!("bench-memory-{}", std::process::id()), &Default::default()).create().expect("reader");
    let cursor = kafka::RangeCursor::to_end(c, topic, |_, lo, _| lo, "results").expect("cursor");
    let (mut records, mut peak) = (0u64, 0i64);
    cursor
        .for_each(Duration::from_secs(30), |m| {
            records += 1;
            let ct = kafka::headers::get(m.headers(), kafka::headers::CONTENT_TYPE);
            if let Ok(r) = codec::decode::<InferenceResult>(m.payload().unwrap_or_default(), ct.as_deref()) {
                peak = peak.max(r.process_rss_bytes.unwrap_or(0));
            }
            Ok::<(), kafka::KafkaError>(())
        })
        .expect("results read");
    (records, (peak as f64 / 1_048_576.0).round())
}

fn run_stream(cfg: &PipelineConfig, brokers: &str, name: &str, docs: Vec<PayslipDocument>, rt: &tokio::runtime::Runtime) -> serde_json::Value {
    let n = docs.len() as u64;
    let avg_bytes = docs.iter().map(|d| codec::encode(d, WireFormat::Avro).map(|b| b.len()).unwrap_or(0)).sum::<usize>() / docs.len().max(1);
    run_source(cfg, brokers, name, Source::Documents(docs), n, avg_bytes, false, rt)
}

#[allow(clippy::too_many_arguments)]
fn run_source(cfg: &PipelineConfig, brokers: &str, name: &str, source: Source, n: u64, avg_bytes: usize, canary: bool, rt: &tokio::runtime::Runtime) -> serde_json::Value {
    let n = n as i64;
    let prefix = format!("bench-mem-{name}-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut cfg = cfg.clone();
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    rt.block_on(async {
        kafka::admin::ensure_topics(brokers, &cfg).await.expect("topics");
        if canary {
            publish_split(&cfg, brokers, 50.0).await;
        }
        let opts = ProduceOptions { brokers: brokers.into(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
        produce::produce(&opts, source).await.expect("produce");
    });
    // the binary next to this example's directory (target/<profile>/payslip-stream)
    let exe = std::env::current_exe().expect("exe").parent().and_then(|d| d.parent()).expect("target dir").join("payslip-stream");
    let group = format!("{prefix}infer");
    let mut child = Command::new(&exe)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--stage", "infer", "--config", CONFIG, "--brokers", brokers, "--topic-prefix", &prefix, "--group", &group])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{} (run `cargo build` first): {e}", exe.display()));
    let started = Instant::now();
    let done = Committed::new(brokers, &group, &cfg.topics.documents);
    let mut sampled = 0u64;
    loop {
        sampled = sampled.max(rss_kb(child.id()).unwrap_or(0));
        if let Some(status) = child.try_wait().expect("child") {
            panic!("the infer stage exited ({status}) before answering every document");
        }
        if done.sum() >= n {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not every document answered in 10 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(child.id()).unwrap_or(0.0);
    let _ = child.kill();
    let _ = child.wait();
    let (results, peak_rss_mb) = read_back(brokers, &cfg.topics.inference);
    let (dead_letters, _) = read_back(brokers, &cfg.topics.documents_dlq);
    serde_json::json!({
        "documents": n,
        "avg_document_bytes_avro": avg_bytes,
        "results": results,
        "dead_letters": dead_letters,
        "seconds": (seconds * 10.0).round() / 10.0,
        "docs_per_s": (n as f64 / seconds).round(),
        "cpu_ms_per_doc": (cpu * 1000.0 / n.max(1) as f64 * 100.0).round() / 100.0,
        "peak_rss_mb": peak_rss_mb,
        "sampled_rss_mb": (sampled as f64 / 1024.0).round(),
    })
}

fn main() {
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("set PAYSLIP_BENCH_BROKERS to a running broker (scripts/kafka start)");
    let n: u64 = std::env::var("BENCH_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let cfg = PipelineConfig::load(std::path::Path::new(CONFIG)).expect("config");
    let gen = Generator::new(GeneratorConfig { seed: 909, ..Default::default() });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let ordinary = run_stream(&cfg, &brokers, "ordinary", (0..n).map(|i| gen.document(i).document).collect(), &rt);
    let worst = run_stream(&cfg, &brokers, "worst", (0..n).map(|i| gen.worst_case(i, &cfg.limits)).collect(), &rt);
    let backlog: u64 = std::env::var("BENCH_BACKLOG").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let avg = codec::encode(&gen.document(0).document, WireFormat::Avro).map(|b| b.len()).unwrap_or(0);
    let pooled = || Source::Synthetic { seed: 910, start: 0, count: backlog, golden_fraction: 1.0, pool: Some(256) };
    let drain = run_source(&cfg, &brokers, "backlog", pooled(), backlog, avg, false, &rt);
    let drain_canary = run_source(&cfg, &brokers, "backlog-canary", pooled(), backlog, avg, true, &rt);
    let ratio = worst["peak_rss_mb"].as_f64().unwrap_or(0.0) / ordinary["peak_rss_mb"].as_f64().unwrap_or(1.0).max(1.0);
    let report = serde_json::json!({
        "max_batch": cfg.batching.max_batch,
        "max_lines_per_run": cfg.batching.max_lines_per_run,
        "max_payload_bytes": cfg.limits.max_payload_bytes,
        "max_lines_per_document": cfg.limits.max_lines_per_document,
        "ordinary": ordinary,
        "worst_case": worst,
        "worst_over_ordinary_peak": (ratio * 100.0).round() / 100.0,
        "backlog": drain,
        "backlog_with_canary_50pct": drain_canary,
        "build": if cfg!(debug_assertions) { "dev" } else { "release" },
        "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
    });
    println!("{report}");
}

