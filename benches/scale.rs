//! Monitor scale-out harness (not a test): results/s of the monitor with one process reading every
//! partition (`monitor.scale_out: false`), with 1, 2 and 3 scaled-out processes
//! (`monitor.scale_out: true`) closing every window in one closing partition, and with 2 and 3
//! processes sharing as many closing partitions (`monitor.closing_partitions`), on the same
//! backlog, in one invocation.
//!
//!   scripts/kafka start
//!   eval "$(scripts/env)"; cargo build --release --bins --example scale
//!   PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 $CARGO_TARGET_DIR/release/examples/scale
//!
//! Each round: fresh topics with 6 partitions; `BENCH_RESULTS` results (default 300,000, keyed by
//! document id, 1,000 per second of event time, then a tick far ahead on every results and feedback
//! partition that closes the last window without waiting for idleness) are written before any
//! monitor starts; then the processes (the real
//! binary next to this example, one state directory each) start together, and the clock runs until
//! the window snapshots on the metrics topic count every result. Reported per round: wall seconds
//! from spawn to the last window, results/s over that span, and the CPU seconds the monitor
//! processes used (utime + stime from /proc). Start-up (group joins, the leader election) is inside
//! the span, the same for every round. `BENCH_BROKER_PID=<pid>` also reports the broker's CPU
//! seconds over the same span. Logs: `BENCH_LOG=DIR`. Prints one JSON object.

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
    document::{DocumentFeedback, InferenceResult},
    kafka,
    monitor::records::WindowMetrics,
};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

fn spawn(yaml: &Path, brokers: &str, prefix: &str, member: &str, log: &Path) -> Child {
    support::spawn_monitor(yaml, brokers, &["--topic-prefix", prefix, "--group", &format!("{prefix}infer"), "--instance-id", member], log)
}

/// utime + stime of `pid`, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn result(i: u64, at: i64) -> InferenceResult {
    support::synthetic_result(i, at, &["table_detection", "text_recognition", "document_classifier"])
}

/// Writes the backlog: `n` results, then on every partition of the results and the feedback topic
/// a tick far ahead in event time, so the watermark passes every window of the backlog without
/// waiting for a partition to go idle (a feedback tick has no prediction: it ends as an orphan).
fn fill(brokers: &str, cfg: &PipelineConfig, n: u64, t0: i64) -> f64 {
    let mut pc = kafka::producer_config(brokers, &Default::default());
    pc.set("linger.ms", "20").set("batch.size", "1000000").set("queue.buffering.max.messages", "500000");
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = pc.create().expect("producer");
    let started = Instant::now();
    let hs = kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
    let tick = t0 + n as i64 + 600_000;
    let mut records: Vec<(String, Vec<u8>, Option<i32>)> = Vec::new();
    let send = |topic: &str, key: &str, payload: &[u8], partition: Option<i32>| {
        let mut rec = BaseRecord::to(topic).key(key).payload(payload).headers(hs.clone());
        if let Some(part) = partition {
            rec = rec.partition(part);
        }
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    // the local queue is full: give the sender thread a moment (poll interval)
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    };
    for i in 0..n {
        let r = result(i, t0 + i as i64);
        send(&cfg.topics.inference, &r.document_id, &codec::encode(&r, WireFormat::Avro).expect("encode"), None);
    }
    for part in 0..cfg.topics.partitions {
        let mut r = result(n + part as u64, tick);
        r.document_id = format!("tick-{part}");
        records.push((cfg.topics.inference.clone(), codec::encode(&r, WireFormat::Avro).expect("encode"), Some(part)));
        let f = DocumentFeedback { document_id: format!("tick-feedback-{part}"), user_id: "u".into(), given_at: tick, corrected_format: None, corrected_net_pay: None, rating: Some(5) };
        records.push((cfg.topics.feedback.clone(), codec::encode(&f, WireFormat::Avro).expect("encode"), Some(part)));
    }
    for (topic, payload, part) in &records {
        send(topic, "tick", payload, *part);
    }
    p.flush(Duration::from_secs(300)).expect("backlog written");
    started.elapsed().as_secs_f64()
}

/// Results counted by the pipeline's window snapshots on `topic` so far.
fn counted(brokers: &str, topic: &str) -> i64 {
    let reader = kafka::reader_config(brokers, "bench-scale-read", &Default::default()).create().expect("reader");
    let cursor = kafka::RangeCursor::to_end(reader, topic, |_, lo, _| lo, "metrics").expect("watermarks");
    let mut total = 0;
    cursor
        .for_each(Duration::from_secs(30), |m| {
            use rdkafka::message::Message;
            let ct = kafka::headers::get(m.headers(), kafka::headers::CONTENT_TYPE);
            if let Ok(w) = codec::decode::<WindowMetrics>(m.payload().unwrap_or_default(), ct.as_deref()) {
                if w.model == "pipeline" {
                    total += w.count;
                }
            }
            Ok::<(), kafka::KafkaError>(())
        })
        .expect("metrics read");
    total
}

fn round(brokers: &str, n: u64, processes: usize, scale_out: bool, closing: u32, rt: &tokio::runtime::Runtime, logs: &Path) -> serde_json::Value {
    let mode = if scale_out { format!("scale_out-{processes}-closing-{closing}") } else { "single".to_string() };
    let prefix = format!("bench-scale-{}-{}-{mode}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut cfg = PipelineConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml"))).expect("config");
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    cfg.topics.partitions = 6;
    cfg.monitor.scale_out = scale_out;
    cfg.monitor.closing_partitions = closing;
    rt.block_on(kafka::admin::ensure_topics(brokers, &cfg)).expect("topics");
    let t0 = (chrono::Utc::now().timestamp_millis() - 6 * 3_600_000) / 60_000 * 60_000;
    let fill_s = fill(brokers, &cfg, n, t0);
    let dir = std::env::temp_dir().join(format!("{prefix}dir"));
    std::fs::create_dir_all(&dir).expect("dir");
    let broker_pid: Option<u32> = std::env::var("BENCH_BROKER_PID").ok().and_then(|p| p.parse().ok());
    let broker_cpu0 = broker_pid.map(cpu_seconds);
    let started = Instant::now();
    let mut children: Vec<Child> = (0..processes)
        .map(|i| {
            let yaml = dir.join(format!("m{i}.yaml"));
            std::fs::write(
                &yaml,
                format!(
                    "models:\n  metadata: {}/models/model_metadata.json\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 5000\n  idle_timeout_ms: 60000\n  scale_out: {scale_out}\n  closing_partitions: {closing}\n",
                    env!("CARGO_MANIFEST_DIR"),
                    dir.join(format!("m{i}")).display(),
                ),
            )
            .expect("yaml");
            spawn(&yaml, brokers, &prefix, &format!("m{i}"), &logs.join(format!("{mode}-m{i}.log")))
        })
        .collect();
    loop {
        if counted(brokers, &cfg.topics.metrics) >= n as i64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "{mode}: the windows never counted every result (logs in {})", logs.display());
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{mode}: a monitor exited ({status}); logs in {}", logs.display());
            }
        }
        // poll interval of the metrics topic
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu: f64 = children.iter().map(|c| cpu_seconds(c.id())).sum();
    let broker_cpu = broker_pid.zip(broker_cpu0).map(|(p, c0)| ((cpu_seconds(p) - c0) * 100.0).round() / 100.0);
    for c in children.iter_mut() {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    serde_json::json!({
        "mode": mode,
        "processes": processes,
        "closing_partitions": closing,
        "results": n,
        "fill_s": (fill_s * 10.0).round() / 10.0,
        "wall_s": (wall * 100.0).round() / 100.0,
        "results_per_s": (n as f64 / wall).round(),
        "cpu_s": (cpu * 100.0).round() / 100.0,
        "cpu_ms_per_result": (cpu * 1e3 / n as f64 * 1e4).round() / 1e4,
        "broker_cpu_s": broker_cpu,
    })
}

fn main() {
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("PAYSLIP_BENCH_BROKERS names the broker");
    let n: u64 = std::env::var("BENCH_RESULTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let logs = std::env::var("BENCH_LOG").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir().join(format!("bench-scale-logs-{}", std::process::id())));
    std::fs::create_dir_all(&logs).expect("log dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let build = if support::sibling_binary().to_string_lossy().contains("/release/") { "release" } else { "debug" };
    let rounds: Vec<serde_json::Value> = [(1, false, 1), (1, true, 1), (2, true, 1), (3, true, 1), (2, true, 2), (3, true, 3)].into_iter().map(|(k, s, c)| round(&brokers, n, k, s, c, &rt, &logs)).collect();
    let base = rounds[0]["results_per_s"].as_f64().unwrap_or(1.0);
    let out = serde_json::json!({
        "build": build,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": rounds.iter().map(|r| {
            let mut r = r.clone();
            r["ratio_to_single"] = serde_json::json!(((r["results_per_s"].as_f64().unwrap_or(0.0) / base) * 100.0).round() / 100.0);
            r
        }).collect::<Vec<_>>(),
        "logs": logs.display().to_string(),
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
