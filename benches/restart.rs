//! Restart harness (not a test): time from SIGKILL of the infer process to the first result its
//! restarted successor publishes, with static membership (the default) and without, in one
//! invocation.
//!
//!   scripts/kafka start
//!   eval "$(scripts/env)"; cargo build
//!   PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 cargo run --example restart
//!
//! For each mode and each of `BENCH_ROUNDS` rounds (default 3): documents flow at 100/s into fresh
//! topics, `payslip-stream run --stage infer` (the real binary, exactly once) answers them; once it
//! has answered 300, it is killed with SIGKILL and started again at once, and the clock runs from
//! the kill until the results topic (read_committed) holds a result processed after the kill.
//! `BENCH_LOG=FILE` keeps the stages' logs (info), with their start-up step timings.
//! Prints one JSON object; the README and BENCHMARKS.md record it.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::WireFormat,
    config::PipelineConfig,
    kafka,
    produce::{self, ProduceOptions, Source},
};
use rdkafka::{consumer::BaseConsumer, Message};

/// Results visible to a read_committed reader: how many, and the latest `processed_at` among them.
fn committed(brokers: &str, topic: &str) -> (u64, i64) {
    let c: BaseConsumer = kafka::reader_config(brokers, &format!("bench-restart-{}", std::process::id()), &Default::default()).create().expect("reader");
    let cursor = kafka::RangeCursor::to_end(c, topic, |_, lo, _| lo, "results").expect("cursor");
    let mut latest = 0i64;
    let n = cursor
        .for_each(Duration::from_secs(30), |m| {
            let ct = payslip_stream::kafka::headers::get(m.headers(), "content-type");
            if let Ok(r) = payslip_stream::codec::decode::<payslip_stream::document::InferenceResult>(m.payload().unwrap_or_default(), ct.as_deref()) {
                latest = latest.max(r.processed_at);
            }
            Ok::<(), kafka::KafkaError>(())
        })
        .expect("read");
    (n, latest)
}

fn spawn(yaml: &std::path::Path, brokers: &str, prefix: &str) -> Child {
    let log = std::env::var_os("BENCH_LOG").map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).expect("BENCH_LOG"));
    let log = log.as_ref();
    let exe = std::env::current_exe().expect("exe").parent().and_then(|d| d.parent()).expect("target dir").join("payslip-stream");
    Command::new(&exe)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--stage", "infer", "--brokers", brokers, "--topic-prefix", prefix, "--group", &format!("{prefix}infer"), "--config"])
        .arg(yaml)
        .env("RUST_LOG", if log.is_some() { "info" } else { "warn" })
        .stdout(Stdio::null())
        .stderr(log.map_or_else(Stdio::inherit, |f| Stdio::from(f.try_clone().expect("log file"))))
        .spawn()
        .unwrap_or_else(|e| panic!("{} (run `cargo build` first): {e}", exe.display()))
}

fn round(brokers: &str, static_membership: bool, rt: &tokio::runtime::Runtime) -> f64 {
    let prefix = format!("bench-restart-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut cfg = PipelineConfig::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml"))).expect("config");
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    let dir = std::env::temp_dir().join(format!("{}yaml", prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml = dir.join("pipeline.yaml");
    std::fs::write(
        &yaml,
        format!(
            "models:\n  metadata: {}/models/model_metadata.json\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nkafka:\n  static_membership: {static_membership}\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .expect("yaml");
    rt.block_on(kafka::admin::ensure_topics(brokers, &cfg)).expect("topics");
    let opts = ProduceOptions { brokers: brokers.into(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(100.0), progress: None, passthrough: Default::default(), producers: 1 };
    let feed = rt.spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 5, start: 0, count: 6_000, golden_fraction: 1.0, pool: None }).await });
    let mut child = spawn(&yaml, brokers, &prefix);
    let started = Instant::now();
    while committed(brokers, &cfg.topics.inference).0 < 300 {
        assert!(started.elapsed() < Duration::from_secs(120), "no results in 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // the successor's first result is the first one processed after the kill
    let killed_at_ms = chrono::Utc::now().timestamp_millis();
    child.kill().expect("SIGKILL");
    let killed = Instant::now();
    child.wait().expect("wait");
    let mut child = spawn(&yaml, brokers, &prefix);
    while committed(brokers, &cfg.topics.inference).1 <= killed_at_ms {
        assert!(killed.elapsed() < Duration::from_secs(120), "no result in 120 s after the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = killed.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    feed.abort();
    let _ = std::fs::remove_dir_all(&dir);
    (seconds * 100.0).round() / 100.0
}

fn main() {
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("set PAYSLIP_BENCH_BROKERS to a running broker (scripts/kafka start)");
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let static_s: Vec<f64> = (0..rounds).map(|_| round(&brokers, true, &rt)).collect();
    let dynamic_s: Vec<f64> = (0..rounds).map(|_| round(&brokers, false, &rt)).collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let report = serde_json::json!({
        "kill_to_first_result_s_static_membership": static_s,
        "kill_to_first_result_s_dynamic_membership": dynamic_s,
        "median_static_s": median(&static_s),
        "median_dynamic_s": median(&dynamic_s),
        "dynamic_over_static": ((median(&dynamic_s) / median(&static_s).max(0.001)) * 100.0).round() / 100.0,
        "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
    });
    println!("{report}");
}
