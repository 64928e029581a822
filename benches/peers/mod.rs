//! The throughput harness's peers: what the infer and monitor stages are compared with, run on the
//! same broker and the same topics in the same invocation (benches/throughput.rs, step 5).
//!
//! - `python_worker.py`: a plain Python worker doing the infer stage's job on the same documents;
//! - the monitor stage itself (the real binary as a child process, timed from its per-batch log
//!   lines) and `quix_window.py`, a Quix Streams tumbling-window app, each on the same results
//!   topic: the end-to-end run's results copied under new document ids (`BENCH_MONITOR_COPIES`
//!   times, default 10), their event times spread over ten minutes so windows close.
//!
//! Each peer runs as a child process, so its CPU and peak RSS are its own. The Python peers time
//! themselves from their first record to their last and print one JSON line.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    config::{PipelineConfig, TopicsConfig},
    kafka,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The peers' interpreter: `BENCH_PYTHON`, else the virtual environment of `scripts/setup --bench`.
fn python() -> String {
    std::env::var("BENCH_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/payslip-stream/bench-venv/bin/python")
    })
}

/// Runs a Python peer to its end and returns the JSON line it printed.
fn run_python(script: &str, args: &[String]) -> serde_json::Value {
    let py = python();
    let out = Command::new(&py)
        .current_dir(ROOT)
        .arg(format!("benches/peers/{script}"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{py}: {e} (run scripts/setup --bench, or set BENCH_PYTHON)"));
    assert!(out.status.success(), "{script} failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rfind(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{script} printed no report: {text}"));
    serde_json::from_str(last).expect("peer report")
}

/// The plain Python worker on the end-to-end run's documents, writing to a results topic of its own.
pub fn python_worker(rt: &tokio::runtime::Runtime, cfg: &PipelineConfig, brokers: &str, e2e: &TopicsConfig, n: usize) -> serde_json::Value {
    let prefix = format!("bench-py-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut own = cfg.clone();
    own.topics = cfg.topics.clone().with_prefix(&prefix);
    rt.block_on(kafka::admin::ensure_topics(brokers, &own)).expect("topics");
    let args = [
        "--brokers", brokers, "--documents", &e2e.documents, "--results", &own.topics.inference, "--group", &format!("{prefix}python"),
        "--expect", &n.to_string(), "--batch", &cfg.batching.max_batch.to_string(),
    ];
    let report = run_python("python_worker.py", &args.map(String::from));
    assert_eq!(report["documents"].as_u64(), Some(n as u64), "the Python worker answered every document");
    report
}

/// The Quix Streams app on the end-to-end run's results.
pub fn quix_window(brokers: &str, e2e: &TopicsConfig, prefix: &str, n: usize, window_ms: i64) -> serde_json::Value {
    let state = tempfile::tempdir().expect("state dir");
    let args = [
        "--brokers", brokers, "--results", &e2e.inference, "--output", &format!("{prefix}quix.windows"), "--group", &format!("{prefix}quix"),
        "--expect", &n.to_string(), "--window-ms", &window_ms.to_string(), "--state-dir", &state.path().display().to_string(),
    ];
    let report = run_python("quix_window.py", &args.map(String::from));
    assert_eq!(report["results"].as_u64(), Some(n as u64), "Quix Streams windowed every result");
    // like the monitor, the peer must count every result: one refused as late is work it skipped
    assert_eq!(report["late"].as_u64(), Some(0), "Quix Streams refused results as late despite its grace period: {report}");
    report
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A results topic of `copies` times the end-to-end run's results for the monitor and Quix
/// Streams: each copy under its own document ids, event times spread evenly over the last ten
/// minutes (so ten one-minute windows close), written with the stage's headers. Returns the
/// prefix of its topics and the number of results.
pub fn monitor_input(rt: &tokio::runtime::Runtime, cfg: &PipelineConfig, brokers: &str, e2e: &TopicsConfig, copies: usize) -> (String, usize) {
    use payslip_stream::{
        codec::{self, WireFormat},
        document::InferenceResult,
        kafka::headers as h,
    };
    use rdkafka::{message::Message, producer::{FutureProducer, FutureRecord}};
    let prefix = format!("bench-mon-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut own = cfg.clone();
    own.topics = cfg.topics.clone().with_prefix(&prefix);
    rt.block_on(kafka::admin::ensure_topics(brokers, &own)).expect("topics");
    let reader: rdkafka::consumer::BaseConsumer = kafka::reader_config(brokers, &format!("{prefix}copy"), &Default::default()).set("isolation.level", "read_committed").create().expect("reader");
    let mut results: Vec<InferenceResult> = Vec::new();
    kafka::RangeCursor::to_end(reader, &e2e.inference, |_, lo, _| lo, "results")
        .expect("cursor")
        .for_each(Duration::from_secs(30), |m| {
            let ct = h::get(m.headers(), h::CONTENT_TYPE);
            results.push(codec::decode(m.payload().unwrap_or_default(), ct.as_deref()).expect("a result"));
            Ok::<(), kafka::KafkaError>(())
        })
        .expect("results read");
    let producer: FutureProducer = kafka::producer_config(brokers, &Default::default()).create().expect("producer");
    let total = results.len() * copies;
    let now = chrono::Utc::now().timestamp_millis();
    let mut futures = Vec::with_capacity(total);
    for k in 0..copies {
        for (i, r) in results.iter().enumerate() {
            let mut r = r.clone();
            r.document_id = format!("{}.{k}", r.document_id);
            r.result_id = InferenceResult::id_for(&r.document_id);
            r.submitted_at = now - 600_000 + ((k * results.len() + i) as i64 * 600_000) / total as i64;
            let payload = codec::encode(&r, WireFormat::Avro).expect("encode");
            let headers = h::HeaderSet::new().with(h::CONTENT_TYPE, codec::CONTENT_TYPE_AVRO).with(h::RESULT_ID, &r.result_id).with(h::COHORT, &r.cohort);
            let rec = FutureRecord::to(&own.topics.inference).key(&r.document_id).payload(&payload).headers(headers.build());
            futures.push((kafka::enqueue_blocking(&producer, rec).expect("enqueue"), own.topics.inference.clone()));
        }
    }
    kafka::wait_deliveries(futures).expect("delivered");
    (prefix, total)
}

/// The monitor stage (`payslip-stream run --stage monitor`, the binary next to this example's
/// directory) on the topics of `prefix`, with a fresh state directory. Timed from its own
/// per-batch log lines (`monitor batch`, debug level, logged once a batch is written and its
/// outputs published), read as they come: from the end of its first batch to the end of the batch
/// that applied the last result; the first batch (group start, first fetch) is left out of both
/// the time and the count.
pub fn monitor_stage(brokers: &str, prefix: &str, n: usize) -> serde_json::Value {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("state dir");
    let base = std::fs::read_to_string(format!("{ROOT}/pipelines/payslip.yaml")).expect("config");
    let config = dir.path().join("monitor.yaml");
    // BENCH_MONITOR_BATCH overrides monitor.max_batch
    let batch = std::env::var("BENCH_MONITOR_BATCH").map(|b| format!("  max_batch: {b}\n")).unwrap_or_default();
    std::fs::write(&config, format!("{base}\nmonitor:\n  state_dir: {}\n{batch}", dir.path().join("state").display())).expect("config copy");
    let exe = std::env::current_exe().expect("exe").parent().and_then(|d| d.parent()).expect("target dir").join("payslip-stream");
    let mut child = Command::new(&exe)
        .current_dir(ROOT)
        .args(["run", "--stage", "monitor", "--config"])
        .arg(&config)
        .args(["--brokers", brokers, "--topic-prefix", prefix])
        .env("RUST_LOG", "warn,payslip_stream::monitor=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} (build the binary first): {e}", exe.display()));
    let pid = child.id();
    // profiled when asked (BENCH_MONITOR_PERF=<output file>): perf attaches after the first batch,
    // once the monitor's threads run (it follows the threads that exist when it attaches)
    let mut perf = None;
    let stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    // (time, CPU, inputs so far) at the end of the first batch, and at the end of the last
    let mut first: Option<(Instant, f64, u64)> = None;
    let mut last: Option<(Instant, f64)> = None;
    let mut inputs = 0u64;
    // the timed batches: their time in writing (changelog and state) and publishing, on the
    // monitor's write-behind thread, and how long applying waited for them
    let (mut batches, mut write_ms, mut publish_ms, mut waited_ms) = (0u64, 0.0, 0.0, 0.0);
    for line in stderr.lines() {
        let line = strip_ansi(&line.expect("monitor log"));
        if !line.contains("monitor batch") {
            continue;
        }
        let k = line.split_whitespace().find_map(|w| w.strip_prefix("inputs=")).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if k == 0 && first.is_none() {
            // start-up writes (announcements) come before the first batch of input
            continue;
        }
        inputs += k;
        let ms = |field: &str| line.split_whitespace().find_map(|w| w.strip_prefix(field)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let (now, cpu) = (Instant::now(), cpu_seconds(pid));
        if first.is_some() {
            batches += 1;
            write_ms += ms("write_ms=");
            publish_ms += ms("publish_ms=");
            waited_ms += ms("waited_ms=");
        }
        if first.is_none() {
            first = Some((now, cpu, inputs));
            perf = std::env::var("BENCH_MONITOR_PERF").ok().map(|out| {
                Command::new("perf").args(["record", "-F", "999", "-g", "-o", &out, "-p", &pid.to_string()]).stderr(Stdio::null()).spawn().expect("perf record")
            });
        }
        if inputs >= n as u64 {
            last = Some((now, cpu));
            break;
        }
    }
    let peak_kb = proc_field(pid, "status", "VmHWM:").unwrap_or(0.0);
    if let Some(mut perf) = perf {
        // perf writes its profile on an interrupt
        let _ = Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
        let _ = perf.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    let ((t0, c0, a0), (t1, c1)) = (first.expect("the monitor logged its batches"), last.unwrap_or_else(|| panic!("the monitor applied {inputs} of {n} inputs")));
    let (seconds, timed) = ((t1 - t0).as_secs_f64(), (inputs - a0).max(1) as f64);
    serde_json::json!({
        "results": inputs,
        "timed_results": timed,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "results_per_s": (timed / seconds).round(),
        "cpu_ms_per_result": ((c1 - c0) * 1000.0 / timed * 1000.0).round() / 1000.0,
        "peak_rss_mb": (peak_kb / 1024.0).round(),
        "batches": batches,
        "write_s": write_ms.round() / 1000.0,
        "publish_s": publish_ms.round() / 1000.0,
        "waited_for_write_s": waited_ms.round() / 1000.0,
    })
}
