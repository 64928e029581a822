//! Failover harness (not a test): time from SIGKILL of the leading monitor process until its
//! standby reads the inputs again, with a warm standby (`monitor.standby_replicas: 1`, the default)
//! and a cold one (`0`), over a changelog of a few million records, in one invocation.
//!
//!   scripts/kafka start
//!   eval "$(scripts/env)"; cargo build
//!   PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 cargo run --example failover
//!
//! For each mode: fresh topics; the changelog is filled with `BENCH_CHANGELOG_RECORDS` (default
//! 3,000,000) prediction records (what dominates a production changelog: one per document over the
//! 7-day retention), written the way a leader writes them (`predictions \0 document id` → JSON);
//! `payslip-stream run --stage monitor` (the real binary) starts and restores them as the first
//! leader; a second process starts as its standby (warm: until it logs that its copy caught up;
//! cold: until it waits). Results then flow at 100/s, the leader is killed with SIGKILL after 5 s
//! of them, and the clock runs until the standby logs `monitor stage started` (it reads the inputs
//! from there). The standby's own `takeover complete` line gives the part after the group handed it
//! the partition, and how many records it replayed. Logs: `BENCH_LOG=DIR` keeps both processes'.
//! Prints one JSON object; BENCHMARKS.md records it.

#[path = "support.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    document::InferenceResult,
    kafka,
};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

fn spawn(yaml: &Path, brokers: &str, prefix: &str, log: &Path) -> Child {
    support::spawn_monitor(yaml, brokers, &["--topic-prefix", prefix], log)
}

fn log_has(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).unwrap_or_default().contains(what)
}

fn wait_log(child: &mut Child, log: &Path, what: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while !log_has(log, what) {
        assert!(started.elapsed() < limit, "`{what}` not in {} after {limit:?}", log.display());
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the monitor exited ({status}) before `{what}`: see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// A `key=value` field of the last log line containing `marker`.
fn field(log: &Path, marker: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains(marker))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split(|c: char| !c.is_ascii_digit() && c != '.').next()?.parse().ok()
}

/// Writes `n` prediction records to the changelog as a leader would (not transactional: a
/// read_committed reader sees them like committed ones).
fn fill_changelog(brokers: &str, topic: &str, n: u64) -> f64 {
    let mut pc = kafka::producer_config(brokers, &Default::default());
    pc.set("linger.ms", "20").set("batch.size", "1000000").set("compression.type", "lz4").set("queue.buffering.max.messages", "500000");
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = pc.create().expect("producer");
    let started = Instant::now();
    for i in 0..n {
        let key = format!("predictions\0fill-{i:09}");
        let value = format!(r#"{{"subject":{{"model":"document_classifier","version":"1.0.0","cohort":"baseline"}},"label":"PCDA","event_ms":{},"result_id":"fill-{i}"}}"#, 1_800_000_000_000i64 + i as i64);
        let mut rec = BaseRecord::<str, str>::to(topic).key(&key).payload(&value);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(300)).expect("changelog filled");
    started.elapsed().as_secs_f64()
}

fn result(i: u64, at: i64) -> InferenceResult {
    support::synthetic_result(i, at, &["document_classifier"])
}

/// Results at 100/s (current event time) until `stop`.
fn feed(brokers: String, topic: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = kafka::producer_config(&brokers, &Default::default()).create().expect("producer");
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = result(i, chrono::Utc::now().timestamp_millis());
            let payload = codec::encode(&r, WireFormat::Avro).expect("encode");
            let hs = kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
            let key = r.document_id.clone();
            let _ = p.send(BaseRecord::to(&topic).key(&key).payload(&payload).headers(hs));
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = p.flush(Duration::from_secs(30));
        i
    })
}

fn round(brokers: &str, records: u64, warm: bool, rt: &tokio::runtime::Runtime, logs: &Path) -> serde_json::Value {
    let mode = if warm { "warm" } else { "cold" };
    let prefix = format!("bench-failover-{}-{}-{mode}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut cfg = PipelineConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml"))).expect("config");
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    let dir = std::env::temp_dir().join(format!("{prefix}dir"));
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml = |name: &str| -> PathBuf {
        let p = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "models:\n  metadata: {}/models/model_metadata.json\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 5000\n  standby_replicas: {}\n",
                env!("CARGO_MANIFEST_DIR"),
                dir.join(name).display(),
                warm as u32
            ),
        )
        .expect("yaml");
        p
    };
    rt.block_on(kafka::admin::ensure_topics(brokers, &cfg)).expect("topics");
    let fill_s = fill_changelog(brokers, &cfg.topics.monitor_changelog, records);
    let (log_a, log_b) = (logs.join(format!("{mode}-a.log")), logs.join(format!("{mode}-b.log")));
    let mut a = spawn(&yaml("a"), brokers, &prefix, &log_a);
    let first_restore = wait_log(&mut a, &log_a, "monitor stage started", Duration::from_secs(900));
    let mut b = spawn(&yaml("b"), brokers, &prefix, &log_b);
    let standby_ready = if warm { wait_log(&mut b, &log_b, "warm copy caught up", Duration::from_secs(900)) } else { wait_log(&mut b, &log_b, "waiting for leadership", Duration::from_secs(120)) };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = feed(brokers.to_string(), cfg.topics.inference.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(5));
    a.kill().expect("SIGKILL");
    let killed = Instant::now();
    a.wait().expect("wait");
    wait_log(&mut b, &log_b, "monitor stage started", Duration::from_secs(900));
    let kill_to_reading = killed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let fed = feeder.join().expect("feeder");
    let _ = Command::new("kill").args(["-TERM", &b.id().to_string()]).status();
    let _ = b.wait();
    let takeover_ms = field(&log_b, "monitor takeover complete", "takeover_ms");
    let replayed = field(&log_b, "monitor takeover complete", "replayed");
    let _ = std::fs::remove_dir_all(&dir);
    let r2 = |d: Duration| (d.as_secs_f64() * 100.0).round() / 100.0;
    serde_json::json!({
        "mode": mode,
        "changelog_records": records,
        "fill_s": (fill_s * 10.0).round() / 10.0,
        "first_leader_restore_s": r2(first_restore),
        "standby_ready_s": r2(standby_ready),
        "kill_to_reading_inputs_s": r2(kill_to_reading),
        "handed_partition_to_reading_s": takeover_ms.map(|ms| (ms / 10.0).round() / 100.0),
        "takeover_replayed_records": replayed,
        "results_fed": fed,
    })
}

fn main() {
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("set PAYSLIP_BENCH_BROKERS to a running broker (scripts/kafka start)");
    let records: u64 = std::env::var("BENCH_CHANGELOG_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000_000);
    let logs = std::env::var_os("BENCH_LOG").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join(format!("bench-failover-{}", std::process::id())));
    std::fs::create_dir_all(&logs).expect("log dir");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let warm = round(&brokers, records, true, &rt, &logs);
    let cold = round(&brokers, records, false, &rt, &logs);
    let report = serde_json::json!({
        "warm": warm,
        "cold": cold,
        "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "logs": logs.display().to_string(),
    });
    println!("{report}");
}
