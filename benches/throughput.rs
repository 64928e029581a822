//! End-to-end throughput harness (not a test), all figures from one run on the same models,
//! documents, broker and machine:
//!
//! 1. **ONNX Runtime alone**: the time spent inside `Session::run` on exactly the batches the stage
//!    builds (the limit), and the same loop with the stage's preprocessing around it;
//! 2. **end to end**: the infer stage through the broker (consume, decode, validate, batch, infer,
//!    encode, produce in transactions), docs/s and process CPU per document;
//! 3. the same with a rollout sending 50 % of users to the candidate classifier;
//! 4. **latency**: a fixed offered load of half the measured end-to-end maximum, then a low load of
//!    20 documents/s, each document timed from its `submitted_at` (set when it is produced) until a
//!    `read_committed` reader sees its result: p50/p95/p99, and split at the result record's
//!    timestamp (set when the stage sent it): `submitted_to_result_sent` (queued, batched,
//!    processed) and `result_sent_to_visible` (its transaction's commit, the reader's fetch).
//!
//! 5. **peers** (benches/peers/): a plain Python worker (confluent-kafka, fastavro, numpy,
//!    onnxruntime) on the same documents; then the monitor stage (the real binary, as a child
//!    process) and a Quix Streams tumbling-window app, each on the results the plain run wrote:
//!    docs or results per second, CPU per document, peak RSS, and the ratios.
//! 6. **the load generator**: `produce` as `produce --pool 256` runs it (one producer client per
//!    core) into a fresh topic, `BENCH_GEN_DOCS` documents (default 20,000): documents/s, and its
//!    ratio to the stage's end-to-end maximum (the issue asks for at least 2).
//!
//!   scripts/setup --bench          # the peers' virtual environment (Quix Streams, fastavro)
//!   scripts/kafka start
//!   eval "$(scripts/env)"; cargo build --release
//!   PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 cargo run --release --example throughput
//!
//! Steps 1 and 2 alternate for `BENCH_ROUNDS` rounds (default 3) and the figures are medians over
//! them; `rounds` in the JSON has each round's. ONNX Runtime's CPU per document is this thread's
//! CPU time inside `Session::run` (`inference.intra_threads: 1` runs it on the calling thread), so
//! what the broker takes from the shared cores meanwhile does not count as ONNX Runtime's.
//!
//! Environment: `BENCH_DOCS` (default 5000), `BENCH_BATCH` (default from pipelines/payslip.yaml),
//! `BENCH_LATENCY_S` (seconds of each fixed-load run, default 20), `BENCH_PEERS=0` (skip the
//! peers), `BENCH_PYTHON` (the peers' interpreter, default the `scripts/setup --bench` one),
//! `BENCH_MONITOR_COPIES` (the monitor's input: this many copies of the end-to-end results, default 10),
//! `BENCH_MONITOR_ROUNDS` (monitor runs, each on its own copy of that input; the median is reported, default 3),
//! `BENCH_COMMIT_INTERVAL_MS` (overrides `kafka.commit_interval_ms`), `BENCH_SESSIONS_PER_MODEL`
//! (overrides `inference.sessions_per_model`: 1 is the stage before each batch in flight had a session), `BENCH_AT_LEAST_ONCE=1` (the stage
//! at least once instead of exactly once), `BENCH_MAX_IN_FLIGHT` (every producer's requests in
//! flight per broker; by default 1 without transactions and 5 with them),
//! `BENCH_LOAD_FRACTIONS=0.25,0.1` (latency runs at these fractions of the maximum too),
//! `BENCH_MONITOR_FROM=<prefix>` (only the monitor and, with the peers, Quix Streams, on the results
//! of an earlier run's end-to-end topics: its prefix, e.g. `bench-28779-1795967313578.`),
//! `BENCH_MONITOR_PERF=<file>` (`perf record -g` of the monitor process into that file),
//! `BENCH_MONITOR_BATCH` (overrides `monitor.max_batch`), `BENCH_LIBRDKAFKA=key=value,...` (added to
//! `kafka.librdkafka`, the stage's client settings, past the configuration's checks),
//! `BENCH_DOCS_LIBRDKAFKA=key=value,...` (the documents' producer's settings, for the backlog and
//! the load generator alike: what an upstream producer chooses, e.g. `compression.type=none`), `BENCH_MAX_RATE`
//! (the latency runs' loads are fractions of this instead of the measured maximum). At the end it
//! deletes the topics it created, except the plain end-to-end run's (its prefix is printed, for
//! `BENCH_MONITOR_FROM`). Prints one JSON object, with the build
//! it ran in; BENCHMARKS.md records the figures.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    document::PayslipDocument,
    inference::ModelRegistry,
    kafka,
    infer::InferStage,
    produce::{self, ProduceOptions, Source},
    synth::{Generator, GeneratorConfig},
};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[path = "support.rs"]
mod support;
#[path = "peers/mod.rs"]
mod peers;
use support::{delete_bench_topics, publish_split};

/// One pass of ONNX Runtime alone over the documents: wall and CPU seconds of the whole loop
/// (preprocessing included) and of `Session::run` alone.
struct Limit {
    raw_s: f64,
    raw_cpu_s: f64,
    ort_s: f64,
    ort_cpu_s: f64,
}

/// A round: ONNX Runtime alone, then the end-to-end run's seconds, CPU seconds, topic prefix and
/// loop phases, and the CPU seconds ONNX Runtime took inside it.
type Round = (Limit, (f64, f64, String, serde_json::Value, f64));

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// CPU time of this process (user + system) so far, seconds.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // the fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Busy and total CPU seconds of the whole machine so far (/proc/stat's first line; busy leaves out
/// idle and iowait): what the stage, the broker, the load generator and the reader used together.
fn machine_cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    (sorted[i] * 10.0).round() / 10.0
}

/// Peak resident memory of this process (VmHWM), MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0).round())
}

fn main() {
    // the binary's allocator settings, before any thread: the stage runs in this process
    payslip_stream::malloc::tune();
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("set PAYSLIP_BENCH_BROKERS to a running broker (scripts/kafka start)");
    let n: usize = std::env::var("BENCH_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut cfg = PipelineConfig::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml"))).expect("config");
    if let Some(b) = std::env::var("BENCH_BATCH").ok().and_then(|v| v.parse().ok()) {
        cfg.batching.max_batch = b;
    }
    if let Some(ms) = std::env::var("BENCH_COMMIT_INTERVAL_MS").ok().and_then(|v| v.parse().ok()) {
        cfg.kafka.commit_interval_ms = ms;
    }
    if let Some(n) = std::env::var("BENCH_SESSIONS_PER_MODEL").ok().and_then(|v| v.parse().ok()) {
        cfg.inference.sessions_per_model = Some(n);
    }
    if std::env::var("BENCH_AT_LEAST_ONCE").is_ok_and(|v| v == "1") {
        cfg.kafka.processing_guarantee = payslip_stream::config::Guarantee::AtLeastOnce;
    }
    if let Ok(n) = std::env::var("BENCH_MAX_IN_FLIGHT") {
        cfg.kafka.librdkafka.insert("max.in.flight.requests.per.connection".into(), n);
    }
    for kv in std::env::var("BENCH_LIBRDKAFKA").unwrap_or_default().split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').expect("BENCH_LIBRDKAFKA: key=value,key=value");
        cfg.kafka.librdkafka.insert(k.into(), v.into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let base_topics = cfg.topics.clone();
    let peers = std::env::var("BENCH_PEERS").map(|v| v != "0").unwrap_or(true);
    if let Ok(from) = std::env::var("BENCH_MONITOR_FROM") {
        let (monitor, quix) = monitor_and_quix(&rt, &cfg, &brokers, &base_topics.clone().with_prefix(&from), peers);
        let report = serde_json::json!({
            "results_from": from,
            "build": if cfg!(debug_assertions) { "dev profile" } else { "release" },
            "monitor_stage": monitor,
            "quix_streams_window": quix,
            "monitor_over_quix_streams": match (monitor["results_per_s"].as_f64(), quix["results_per_s"].as_f64()) {
                (Some(a), Some(b)) if b > 0.0 => serde_json::json!((a / b * 100.0).round() / 100.0),
                _ => serde_json::Value::Null,
            },
        });
        println!("{report}");
        eprintln!("deleted {} of this run's topics (kept {from}*)", delete_bench_topics(&brokers, Some(&from)));
        return;
    }
    let gen = Generator::new(GeneratorConfig { seed: 606, ..Default::default() });
    let docs: Vec<PayslipDocument> = (0..n as u64).map(|i| gen.document(i).document).collect();
    let avg_bytes = docs.iter().map(|d| codec::encode(d, WireFormat::Avro).map(|b| b.len()).unwrap_or(0)).sum::<usize>() / n.max(1);
    let registry = Arc::new(ModelRegistry::load(&cfg.models, &cfg.inference, &[]).expect("models"));
    // a version that did not load is answered with MODEL_UNAVAILABLE without running anything, which
    // would make the limit below meaningless (ORT_DYLIB_PATH unset: run `eval "$(scripts/env)"`)
    for (name, version) in registry.served_versions() {
        assert!(registry.is_loaded(name, version), "{name} {version} did not load: {:?}", registry.status());
    }
    let provider = registry.provider();

    // 1. raw ONNX Runtime: the same batching, no Kafka, no decode/encode; Session::run timed alone
    //    (wall and this thread's CPU), and the loop with the stage's preprocessing around it
    let versions = registry.served_versions().clone();
    let limit = || {
        let (t, cpu0, run0, run_cpu0) = (Instant::now(), process_cpu_s(), payslip_stream::inference::session_run_seconds(), payslip_stream::inference::session_run_cpu_seconds());
        for chunk in docs.chunks(cfg.batching.max_batch) {
            let refs: Vec<&PayslipDocument> = chunk.iter().collect();
            let out = registry.infer(&refs, &versions).expect("ONNX Runtime runs");
            assert_eq!(out.len(), chunk.len());
        }
        Limit {
            raw_s: t.elapsed().as_secs_f64(),
            raw_cpu_s: process_cpu_s() - cpu0,
            ort_s: payslip_stream::inference::session_run_seconds() - run0,
            ort_cpu_s: payslip_stream::inference::session_run_cpu_seconds() - run_cpu0,
        }
    };

    // 2. end to end: documents already on the topic, stage consumes, infers, produces, stores offsets
    // 3. the same with a rollout at 50 %: one decision on the decisions topic before the stage starts
    let e2e = |split: Option<f64>| {
        let mut cfg = cfg.clone();
        let (registry, docs, brokers, base_topics) = (registry.clone(), docs.clone(), brokers.clone(), base_topics.clone());
        rt.block_on(async move {
            let prefix = format!("bench-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
            cfg.topics = base_topics.clone().with_prefix(&prefix);
            cfg.kafka.infer_group = format!("{prefix}infer");
            kafka::admin::ensure_topics(&brokers, &cfg).await.expect("topics");
            if let Some(pct) = split {
                publish_split(&cfg, &brokers, pct).await;
            }
            let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: docs_producer_settings(), producers: 1 };
            produce::produce(&opts, Source::Documents(docs)).await.expect("produce");
            let (tx, rx) = tokio::sync::watch::channel(false);
            let stage = InferStage::new(cfg.clone(), brokers.clone(), registry);
            let counters = stage.counters();
            let mut handle = tokio::spawn(stage.run(rx));
            // clock starts at the first consumed document (excludes group join), ends when every
            // result is committed (the stage's own count: no reader competes for the CPU)
            // a stage that stopped (an error at start-up, say) ends the run with its error instead
            // of leaving these loops waiting for counts that will never come
            while counters.consumed.load(std::sync::atomic::Ordering::Relaxed) == 0 && !handle.is_finished() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let (t, cpu0, ort0) = (Instant::now(), process_cpu_s(), payslip_stream::inference::process_session_run_seconds().1);
            while counters.results.load(std::sync::atomic::Ordering::Relaxed) < n as u64 && !handle.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if handle.is_finished() {
                let outcome = (&mut handle).await;
                panic!("the infer stage stopped after {} of {n} results: {outcome:?}", counters.results.load(std::sync::atomic::Ordering::Relaxed));
            }
            // ONNX Runtime's own CPU inside the stage (its batches' threads), against the stage's whole
            let (s, cpu, ort_cpu) = (t.elapsed().as_secs_f64(), process_cpu_s() - cpu0, payslip_stream::inference::process_session_run_seconds().1 - ort0);
            eprintln!("end to end: {n} documents in {} batches, {s:.2} s", counters.batches.load(std::sync::atomic::Ordering::Relaxed));
            let _ = tx.send(true);
            handle.await.expect("join").expect("stage");
            // (the topic's offsets also hold the transactions' commit markers: count the stage's results)
            assert_eq!(counters.results.load(std::sync::atomic::Ordering::Relaxed), n as u64, "one result per document");
            (s, cpu, prefix, loop_json(&counters), ort_cpu)
        })
    };
    // 1 and 2 alternate for BENCH_ROUNDS rounds (default 3); the figures are each measure's median
    // over the rounds (the machine's other load moves single runs by 10-25 %)
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let mut measured: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let l = limit();
        let e = e2e(None);
        eprintln!("round {}: ONNX Runtime alone {:.3} ms/doc ({:.3} ms CPU), end to end {:.0} docs/s at {:.3} ms CPU/doc ({:.3} ms of it ONNX Runtime)", round + 1, l.ort_s / n as f64 * 1e3, l.ort_cpu_s / n as f64 * 1e3, n as f64 / e.0, e.1 / n as f64 * 1e3, e.4 / n as f64 * 1e3);
        measured.push((l, e));
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(measured.iter().map(f).collect());
    let (ort_s, ort_cpu_s, raw_s, raw_cpu_s) = (med(&|m| m.0.ort_s), med(&|m| m.0.ort_cpu_s), med(&|m| m.0.raw_s), med(&|m| m.0.raw_cpu_s));
    let (e2e_s, e2e_cpu) = (med(&|m| m.1 .0), med(&|m| m.1 .1));
    let (cpu_ratio, e2e_over_ort) = (med(&|m| m.1 .1 / m.0.ort_cpu_s), med(&|m| m.0.ort_s / m.1 .0));
    let rounds_json: Vec<serde_json::Value> = measured
        .iter()
        .map(|(l, e)| {
            serde_json::json!({
                "onnxruntime_alone_ms_per_doc": (l.ort_s / n as f64 * 1e5).round() / 100.0,
                "onnxruntime_alone_cpu_ms_per_doc": (l.ort_cpu_s / n as f64 * 1e5).round() / 100.0,
                "end_to_end_docs_per_s": (n as f64 / e.0).round(),
                "end_to_end_cpu_ms_per_doc": (e.1 / n as f64 * 1e5).round() / 100.0,
                "end_to_end_onnxruntime_cpu_ms_per_doc": (e.4 / n as f64 * 1e5).round() / 100.0,
            })
        })
        .collect();
    let e2e_ort_cpu = med(&|m| m.1 .4);
    let (_, (_, _, e2e_prefix, e2e_loop, _)) = measured.pop().expect("a round");
    let (split_s, _, _, _, _) = e2e(Some(50.0));
    // 5. the peers, on the same broker: a Python worker on the same documents, then the monitor
    //    stage and a Quix Streams window app on the results the plain run wrote
    let e2e_topics = base_topics.clone().with_prefix(&e2e_prefix);
    let (python, monitor, quix) = if peers {
        let python = peers::python_worker(&rt, &cfg, &brokers, &e2e_topics, n);
        let (monitor, quix) = monitor_and_quix(&rt, &cfg, &brokers, &e2e_topics, true);
        (python, monitor, quix)
    } else {
        (serde_json::Value::Null, serde_json::Value::Null, serde_json::Value::Null)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => serde_json::json!((a / b * 100.0).round() / 100.0),
        _ => serde_json::Value::Null,
    };
    let max_rate = n as f64 / e2e_s;
    // 6. the load generator, alone on the broker
    let load_generator = {
        let mut cfg = cfg.clone();
        let prefix = format!("bench-gen-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
        cfg.topics = base_topics.clone().with_prefix(&prefix);
        let count: u64 = std::env::var("BENCH_GEN_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        rt.block_on(kafka::admin::ensure_topics(&brokers, &cfg)).expect("topics");
        let producers = produce::clients(None, Some(256), false);
        let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: docs_producer_settings(), producers };
        let t = Instant::now();
        let sent = rt.block_on(produce::produce(&opts, Source::Synthetic { seed: 23, start: 0, count, golden_fraction: 1.0, pool: Some(256) })).expect("produce");
        assert_eq!(sent.sent, count, "every document acknowledged");
        eprintln!("load generator: {count} documents at {:.0}/s with {producers} clients ({:.1} s with the pool's rendering)", sent.achieved_rate, t.elapsed().as_secs_f64());
        serde_json::json!({
            "documents": count,
            "producers": producers,
            "docs_per_s": sent.achieved_rate.round(),
        })
    };
    // the latency runs' reference (comparisons at the same offered load): the measured maximum unless set
    let latency_max: f64 = std::env::var("BENCH_MAX_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(max_rate);
    let latency_s: f64 = std::env::var("BENCH_LATENCY_S").ok().and_then(|v| v.parse().ok()).unwrap_or(20.0);
    // half the maximum (the point), then any further fractions asked for
    let fractions: Vec<f64> = std::env::var("BENCH_LOAD_FRACTIONS").ok().map(|v| v.split(',').filter_map(|f| f.trim().parse().ok()).collect()).unwrap_or_default();
    let half = latency(&rt, &cfg, &brokers, registry.clone(), (latency_max / 2.0).round(), latency_s);
    let swept: Vec<serde_json::Value> = fractions
        .iter()
        .map(|f| {
            let mut v = latency(&rt, &cfg, &brokers, registry.clone(), (latency_max * f).round(), latency_s);
            v["fraction_of_max"] = serde_json::json!(f);
            v
        })
        .collect();
    let low = latency(&rt, &cfg, &brokers, registry.clone(), 20.0, latency_s.min(15.0));
    let report = serde_json::json!({
        "documents": n,
        "avg_document_bytes_avro": avg_bytes,
        "max_batch": cfg.batching.max_batch,
        "commit_interval_ms": cfg.kafka.commit_interval_ms,
        "sessions_per_model": registry.status().first().map(|s| s.sessions),
        "processing_guarantee": format!("{:?}", cfg.kafka.processing_guarantee),
        "provider": provider,
        "build": if cfg!(debug_assertions) { "dev profile (this crate and its per-document dependencies at opt-level 2)" } else { "release" },
        "rounds": rounds_json,
        "onnxruntime_alone_docs_per_s": (n as f64 / ort_s).round(),
        "onnxruntime_alone_ms_per_doc": (ort_s / n as f64 * 1e5).round() / 100.0,
        "onnxruntime_alone_cpu_ms_per_doc": (ort_cpu_s / n as f64 * 1e5).round() / 100.0,
        "preprocess_plus_onnxruntime_docs_per_s": (n as f64 / raw_s).round(),
        "preprocess_plus_onnxruntime_cpu_ms_per_doc": (raw_cpu_s / n as f64 * 1e5).round() / 100.0,
        "end_to_end_docs_per_s": max_rate.round(),
        "end_to_end_loop_seconds": e2e_loop,
        "end_to_end_cpu_ms_per_doc": (e2e_cpu / n as f64 * 1e5).round() / 100.0,
        // ONNX Runtime's CPU inside the stage's end-to-end run: the models as the stage runs them,
        // beside librdkafka and the next batch's preparation, against onnxruntime_alone_cpu_ms_per_doc
        "end_to_end_onnxruntime_cpu_ms_per_doc": (e2e_ort_cpu / n as f64 * 1e5).round() / 100.0,
        "end_to_end_over_onnxruntime_alone": (e2e_over_ort * 1000.0).round() / 1000.0,
        "end_to_end_cpu_over_onnxruntime_cpu": (cpu_ratio * 100.0).round() / 100.0,
        "end_to_end_over_raw": ((raw_s / e2e_s) * 1000.0).round() / 1000.0,
        "latency_at_half_max": half,
        "latency_at_20_per_s": low,
        "latency_at_fractions_of_max": swept,
        "end_to_end_canary_50pct_docs_per_s": (n as f64 / split_s).round(),
        "canary_50pct_over_end_to_end": ((e2e_s / split_s) * 1000.0).round() / 1000.0,
        "python_worker": python,
        "load_generator": load_generator,
        "load_generator_over_end_to_end": ratio(load_generator["docs_per_s"].as_f64(), Some(max_rate)),
        "end_to_end_over_python_worker": ratio(Some(n as f64 / e2e_s), python["docs_per_s"].as_f64()),
        "monitor_stage": monitor,
        "quix_streams_window": quix,
        "monitor_over_quix_streams": ratio(monitor["results_per_s"].as_f64(), quix["results_per_s"].as_f64()),
        "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{report}");
    // the plain run's topics stay for BENCH_MONITOR_FROM; everything else this run made goes
    eprintln!("deleted {} of this run's topics (kept {e2e_prefix}*)", delete_bench_topics(&brokers, Some(&e2e_prefix)));
}

/// The monitor stage (the median of `BENCH_MONITOR_ROUNDS` runs), and with `quix` the Quix Streams
/// peer, each on `BENCH_MONITOR_COPIES` (default 10)
/// copies of the results on `e2e`'s results topic.
fn monitor_and_quix(rt: &tokio::runtime::Runtime, cfg: &PipelineConfig, brokers: &str, e2e: &payslip_stream::config::TopicsConfig, quix: bool) -> (serde_json::Value, serde_json::Value) {
    let copies: usize = std::env::var("BENCH_MONITOR_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rounds: usize = std::env::var("BENCH_MONITOR_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    // each round on its own copy of the input (a monitor that read it before would restore its
    // state from the changelog and skip every result as already applied); the round with the
    // median results/s is reported, with every round's figure
    let mut runs = Vec::with_capacity(rounds);
    let mut first_input = None;
    for _ in 0..rounds {
        let (prefix, results) = peers::monitor_input(rt, cfg, brokers, e2e, copies);
        runs.push(peers::monitor_stage(brokers, &prefix, results));
        first_input.get_or_insert((prefix, results));
    }
    let rate = |m: &serde_json::Value| m["results_per_s"].as_f64().unwrap_or(0.0);
    let per_round: Vec<f64> = runs.iter().map(rate).collect();
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    let mut monitor = runs.swap_remove(rounds / 2);
    monitor["rounds_results_per_s"] = serde_json::json!(per_round);
    let (mon_prefix, results) = first_input.expect("at least one round");
    let quix = if quix { peers::quix_window(brokers, &cfg.topics.clone().with_prefix(&mon_prefix), &mon_prefix, results, cfg.monitor.window_size_ms) } else { serde_json::Value::Null };
    (monitor, quix)
}

/// Runs the stage on fresh topics while documents are produced at `rate`/s for `seconds`; a
/// `read_committed` reader times each document from its `submitted_at` to its result's arrival.
fn latency(rt: &tokio::runtime::Runtime, cfg: &PipelineConfig, brokers: &str, registry: Arc<ModelRegistry>, rate: f64, seconds: f64) -> serde_json::Value {
    use rdkafka::Message;
    let mut cfg = cfg.clone();
    let prefix = format!("bench-lat-{}-{}.", std::process::id(), chrono::Utc::now().timestamp_millis());
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    cfg.kafka.infer_group = format!("{prefix}infer");
    let count = (rate * seconds).round() as u64;
    rt.block_on(kafka::admin::ensure_topics(brokers, &cfg)).expect("topics");
    // the reader, assigned to the end of the (empty) results topic before anything is produced
    let reader: BaseConsumer = kafka::reader_config(brokers, &format!("{prefix}reader"), &Default::default()).set("fetch.wait.max.ms", "5").create().expect("reader");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in kafka::partitions_of(&reader, &cfg.topics.inference, Duration::from_secs(10)).expect("partitions") {
        tpl.add_partition_offset(&cfg.topics.inference, p, rdkafka::Offset::Beginning).expect("tpl");
    }
    reader.assign(&tpl).expect("assign");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stage = InferStage::new(cfg.clone(), brokers.to_string(), registry);
    let counters = stage.counters();
    let handle = rt.spawn(stage.run(rx));
    while !counters.ready.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // the load generator sends each document as it is due (no linger) unless BENCH_DOCS_LIBRDKAFKA
    // sets one: its own batching delay is not the stage's latency
    let mut passthrough = docs_producer_settings();
    passthrough.entry("linger.ms".to_string()).or_insert_with(|| "0".to_string());
    let opts = ProduceOptions { brokers: brokers.to_string(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(rate), progress: None, passthrough, producers: 1 };
    let producer = rt.spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 17, start: 0, count, golden_fraction: 1.0, pool: Some(256) }).await });
    let machine0 = machine_cpu_s();
    let mut lat: Vec<f64> = Vec::with_capacity(count as usize);
    // each latency split at the result record's timestamp (set by the stage's producer when it
    // sent the result): before it the document was queued, batched and processed; after it the
    // result waited for its transaction's commit and the reader's fetch
    let (mut in_stage, mut to_visible): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds + 120.0);
    while (lat.len() as u64) < count && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
            let arrived = chrono::Utc::now().timestamp_millis() as f64;
            let ct = kafka::headers::get(m.headers(), kafka::headers::CONTENT_TYPE);
            if let Ok(r) = codec::decode::<payslip_stream::document::InferenceResult>(m.payload().unwrap_or_default(), ct.as_deref()) {
                lat.push(arrived - r.submitted_at as f64);
                if let Some(sent) = m.timestamp().to_millis() {
                    in_stage.push((sent - r.submitted_at) as f64);
                    to_visible.push(arrived - sent as f64);
                }
            }
        }
    }
    let machine = machine_cpu_s();
    let busy_cores = (machine.0 - machine0.0) / (machine.1 - machine0.1).max(1e-9) * std::thread::available_parallelism().map(|p| p.get() as f64).unwrap_or(1.0);
    let sent = rt.block_on(producer).expect("join").expect("produce");
    let _ = tx.send(true);
    rt.block_on(handle).expect("join").expect("stage");
    lat.sort_by(f64::total_cmp);
    in_stage.sort_by(f64::total_cmp);
    to_visible.sort_by(f64::total_cmp);
    let split = |v: &[f64]| serde_json::json!({ "p50_ms": percentile(v, 0.5), "p95_ms": percentile(v, 0.95), "p99_ms": percentile(v, 0.99) });
    serde_json::json!({
        "offered_docs_per_s": rate,
        "achieved_offered_docs_per_s": (sent.achieved_rate * 10.0).round() / 10.0,
        "missed_rate": sent.missed_rate,
        "documents": count,
        "timed": lat.len(),
        "p50_ms": percentile(&lat, 0.5),
        "p95_ms": percentile(&lat, 0.95),
        "p99_ms": percentile(&lat, 0.99),
        "max_ms": lat.last().copied().unwrap_or(f64::NAN),
        "submitted_to_result_sent": split(&in_stage),
        "result_sent_to_visible": split(&to_visible),
        "loop_seconds": loop_json(&counters),
        "machine_busy_cores": (busy_cores * 100.0).round() / 100.0,
    })
}

/// Client settings of the documents' producer (the backlog and the load generator), from
/// `BENCH_DOCS_LIBRDKAFKA=key=value,...`: what an upstream producer chooses, e.g. its compression.
fn docs_producer_settings() -> std::collections::BTreeMap<String, String> {
    std::env::var("BENCH_DOCS_LIBRDKAFKA")
        .unwrap_or_default()
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("BENCH_DOCS_LIBRDKAFKA: key=value,key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The stage's loop time by phase (`payslip_infer_loop_seconds_total`), and its transactions.
fn loop_json(counters: &payslip_stream::telemetry::InferCounters) -> serde_json::Value {
    let mut m: serde_json::Map<String, serde_json::Value> = counters.loop_seconds().into_iter().map(|(k, v)| (k.to_string(), serde_json::json!((v * 1000.0).round() / 1000.0))).collect();
    m.insert("transactions".into(), serde_json::json!(counters.transactions_committed.load(std::sync::atomic::Ordering::Relaxed)));
    m.insert("batches".into(), serde_json::json!(counters.batches.load(std::sync::atomic::Ordering::Relaxed)));
    serde_json::Value::Object(m)
}
