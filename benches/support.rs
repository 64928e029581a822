//! What the benchmark harnesses share (included by each with `#[path]`; not a harness itself).

use std::time::Duration;

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    kafka,
};

/// Publishes a running rollout of document_classifier 1.1.0 at `pct` % (as the controller would), so
/// the stage loads the candidate too and splits each batch by version.
// not every harness that includes this file uses it
#[allow(dead_code)]
pub async fn publish_split(cfg: &PipelineConfig, brokers: &str, pct: f64) {
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

/// A synthetic result of document `bench-{i}` at event time `at`: one output per model in `models`
/// (the classifier's labelled PCDA), latencies and batch sizes varying with `i`.
// not every harness that includes this file uses it
#[allow(dead_code)]
pub fn synthetic_result(i: u64, at: i64, models: &[&str]) -> payslip_stream::document::InferenceResult {
    use payslip_stream::document::{InferenceResult, ModelOutput};
    let out = |model: &str| ModelOutput {
        model: model.into(),
        version: "1.0.0".into(),
        provider: "CPUExecutionProvider".into(),
        latency_ms: 3.0 + (i % 13) as f64,
        batch_size: 1 + (i % 8) as i32,
        error_code: None,
        label: (model == "document_classifier").then(|| "PCDA".to_string()),
        confidence: None,
        regions: vec![],
        lines: vec![],
        load_ms: None,
    };
    InferenceResult {
        result_id: InferenceResult::id_for(&format!("bench-{i}")),
        document_id: format!("bench-{i}"),
        user_id: format!("u-{}", i % 1000),
        tenant: "bench".into(),
        cohort: "baseline".into(),
        submitted_at: at,
        processed_at: at,
        provider: "CPUExecutionProvider".into(),
        model_versions: models.iter().map(|m| (m.to_string(), "1.0.0".to_string())).collect(),
        outputs: models.iter().map(|m| out(m)).collect(),
        inference_ms: 9.0,
        end_to_end_ms: 20.0 + (i % 31) as f64,
        error_code: None,
        true_format: Some("PCDA".into()),
        source: "bench".into(),
        process_rss_bytes: Some(90 << 20),
        process_cpu_percent: None,
    }
}

/// The `payslip-stream` binary built beside the running harness (same profile).
#[allow(dead_code)]
pub fn sibling_binary() -> std::path::PathBuf {
    std::env::current_exe().expect("exe").parent().and_then(|d| d.parent()).expect("target dir").join("payslip-stream")
}

/// `payslip-stream run --stage monitor --brokers B --config YAML ARGS...` from the repository,
/// logging at info to `log`.
#[allow(dead_code)]
pub fn spawn_monitor(yaml: &std::path::Path, brokers: &str, args: &[&str], log: &std::path::Path) -> std::process::Child {
    let exe = sibling_binary();
    std::process::Command::new(&exe)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--stage", "monitor", "--brokers", brokers, "--config"])
        .arg(yaml)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{} (build it first: see the harness's doc): {e}", exe.display()))
}

/// Deletes the topics this harness process created (their names hold `bench-` and `-<pid>-`: its
/// own runs' prefixes, and the Quix Streams peer's internal topics named after them), except those
/// starting with `keep` (a prefix a later `BENCH_MONITOR_FROM` run may read). A broker that keeps
/// every run's topics grows by thousands of partition directories a day, which slows the runs after.
/// Returns how many it deleted.
#[allow(dead_code)]
pub fn delete_bench_topics(brokers: &str, keep: Option<&str>) -> usize {
    use rdkafka::{
        admin::{AdminClient, AdminOptions},
        client::DefaultClientContext,
    };
    let own = format!("-{}-", std::process::id());
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(brokers, &Default::default()).create().expect("admin client");
    let names: Vec<String> = match admin.inner().fetch_metadata(None, Duration::from_secs(10)) {
        Ok(m) => m.topics().iter().map(|t| t.name().to_string()).filter(|n| n.contains("bench-") && n.contains(&own) && !keep.is_some_and(|k| n.starts_with(k))).collect(),
        Err(e) => {
            eprintln!("cannot list the topics to delete: {e}");
            return 0;
        }
    };
    if names.is_empty() {
        return 0;
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(admin.delete_topics(&refs, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))) {
        Ok(results) => results.iter().filter(|r| r.is_ok()).count(),
        Err(e) => {
            eprintln!("cannot delete the harness's topics: {e}");
            0
        }
    }
}
