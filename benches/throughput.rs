//! End-to-end throughput harness (not a test): documents/s through the real Kafka broker versus raw
//! ONNX Runtime documents/s on the same models, documents and machine, measured in one run; then the
//! same end-to-end run again while a rollout sends 50 % of users to the candidate classifier (both
//! versions loaded, each batch split by version).
//!
//!   scripts/kafka start
//!   eval "$(scripts/env)"; PAYSLIP_BENCH_BROKERS=127.0.0.1:19092 cargo run --example throughput
//!
//! Environment: `BENCH_DOCS` (default 5000), `BENCH_BATCH` (default from pipelines/payslip.yaml).
//! Prints one JSON object; BENCHMARKS.md records the figures.

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

fn results_on(brokers: &str, topic: &str) -> i64 {
    let c: BaseConsumer = kafka::client_config(brokers, &Default::default()).create().expect("consumer");
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("metadata");
    md.topics()[0].partitions().iter().map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(5)).map(|(lo, hi)| hi - lo).unwrap_or(0)).sum()
}

/// Peak resident memory of this process (VmHWM), MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0).round())
}

fn main() {
    let brokers = std::env::var("PAYSLIP_BENCH_BROKERS").expect("set PAYSLIP_BENCH_BROKERS to a running broker (scripts/kafka start)");
    let n: usize = std::env::var("BENCH_DOCS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut cfg = PipelineConfig::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/payslip.yaml"))).expect("config");
    if let Some(b) = std::env::var("BENCH_BATCH").ok().and_then(|v| v.parse().ok()) {
        cfg.batching.max_batch = b;
    }
    let gen = Generator::new(GeneratorConfig { seed: 606, ..Default::default() });
    let docs: Vec<PayslipDocument> = (0..n as u64).map(|i| gen.document(i).document).collect();
    let avg_bytes = docs.iter().map(|d| codec::encode(d, WireFormat::Avro).map(|b| b.len()).unwrap_or(0)).sum::<usize>() / n.max(1);
    let registry = Arc::new(ModelRegistry::load(&cfg.models, &cfg.inference, &[]).expect("models"));
    let provider = registry.provider();

    // 1. raw ONNX Runtime: the same batching, no Kafka, no decode/encode
    let versions = registry.served_versions().clone();
    let t = Instant::now();
    for chunk in docs.chunks(cfg.batching.max_batch) {
        let refs: Vec<&PayslipDocument> = chunk.iter().collect();
        let out = registry.infer(&refs, &versions).expect("ONNX Runtime runs");
        assert_eq!(out.len(), chunk.len());
    }
    let raw_s = t.elapsed().as_secs_f64();

    // 2. end to end: documents already on the topic, stage consumes, infers, produces, stores offsets
    // 3. the same with a rollout at 50 %: one decision on the decisions topic before the stage starts
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let base_topics = cfg.topics.clone();
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
            let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default() };
            produce::produce(&opts, Source::Documents(docs)).await.expect("produce");
            let (tx, rx) = tokio::sync::watch::channel(false);
            let stage = InferStage::new(cfg.clone(), brokers.clone(), registry);
            let counters = stage.counters();
            let handle = tokio::spawn(stage.run(rx));
            // clock starts at the first consumed document (excludes group join), ends when all results are on the topic
            while counters.consumed.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let t = Instant::now();
            while results_on(&brokers, &cfg.topics.inference) < n as i64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let s = t.elapsed().as_secs_f64();
            let _ = tx.send(true);
            handle.await.expect("join").expect("stage");
            s
        })
    };
    let e2e_s = e2e(None);
    let split_s = e2e(Some(50.0));
    let report = serde_json::json!({
        "documents": n,
        "avg_document_bytes_avro": avg_bytes,
        "max_batch": cfg.batching.max_batch,
        "provider": provider,
        "raw_onnxruntime_docs_per_s": (n as f64 / raw_s).round(),
        "end_to_end_docs_per_s": (n as f64 / e2e_s).round(),
        "end_to_end_over_raw": ((raw_s / e2e_s) * 1000.0).round() / 1000.0,
        "end_to_end_canary_50pct_docs_per_s": (n as f64 / split_s).round(),
        "canary_50pct_over_end_to_end": ((e2e_s / split_s) * 1000.0).round() / 1000.0,
        "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{report}");
}

/// Publishes a running rollout of document_classifier 1.1.0 at `pct` % (as the controller would).
async fn publish_split(cfg: &PipelineConfig, brokers: &str, pct: f64) {
    use payslip_stream::rollout::{action, Action, Controller, RolloutCommand};
    let mut c = Controller::default();
    let cmd = |a: Action| RolloutCommand { command_id: a.to_string(), rollout_id: "bench".into(), action: a.into(), operator: "bench".into(), reason: None, model: Some("document_classifier".into()), version: Some("1.1.0".into()), issued_at: 0 };
    let mut d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::START));
    while d.traffic_percent < pct {
        d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::ADVANCE));
    }
    assert_eq!(d.traffic_percent, pct, "a phase at exactly {pct} %");
    let payload = codec::encode(&d, WireFormat::Json).expect("decision encodes");
    let p: rdkafka::producer::FutureProducer = kafka::producer_config(brokers, &Default::default()).create().expect("producer");
    let hs = kafka::headers::HeaderSet::new().with("content-type", "application/json").build();
    p.send(rdkafka::producer::FutureRecord::to(&cfg.topics.decisions).key("bench").payload(&payload).headers(hs), Duration::from_secs(10)).await.expect("decision published");
}
