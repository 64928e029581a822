//! Replay against the real broker: backfill over a time range writes one result per document in
//! range and nothing to production topics; monitor replay is deterministic and follows the config;
//! dead letters re-driven after a fix get results that keep their history.

use std::{
    collections::BTreeSet,
    process::Command,
    time::Duration,
};

use payslip_stream::{
    alert::AlertEvent,
    codec::{self, WireFormat},
    document::{InferenceResult, ModelOutput, PayslipDocument},
    kafka::{self, headers as h, headers::HeaderSet, range::Bound},
    replay::{self, MonitorReplayOptions, ReplayOptions},
    rollout::{action, RolloutCommand, RolloutDecision},
    synth::{Generator, GeneratorConfig},
};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::*;

/// Produces documents 0..n with broker timestamps `t0 + 10 ms × i`.
async fn produce_stamped(topic: &str, n: u64, t0: i64) -> Vec<String> {
    let p: FutureProducer = kafka::producer_config(&brokers(), &Default::default()).create().unwrap();
    let g = Generator::new(GeneratorConfig { seed: 21, rasters: false, ..Default::default() });
    let mut ids = Vec::new();
    for i in 0..n {
        let doc: PayslipDocument = g.document(i).document;
        let payload = codec::encode(&doc, WireFormat::Avro).unwrap();
        let hs = HeaderSet::new().with(h::CONTENT_TYPE, WireFormat::Avro.content_type()).build();
        p.send(FutureRecord::to(topic).key(&doc.document_id).payload(&payload).headers(hs).timestamp(t0 + 10 * i as i64), Duration::from_secs(30)).await.unwrap();
        ids.push(doc.document_id);
    }
    ids
}

fn cli(args: &[&str], yaml_or_repo: Option<&std::path::Path>, prefix: &str) -> serde_json::Value {
    let config = yaml_or_repo.map(|p| p.to_path_buf()).unwrap_or_else(|| repo().join("pipelines/payslip.yaml"));
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .args(["--brokers", &brokers(), "--topic-prefix", prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_over_a_time_range_writes_one_result_per_document_in_range_and_nothing_to_production() {
    let (cfg, prefix) = isolated_config_with_prefix("backfill").await;
    // an hour ago, on a whole second: timestamps older than the topic's retention would be deleted
    // by the broker while the test runs
    let t0 = (chrono::Utc::now().timestamp() - 3_600) * 1_000;
    let ids = produce_stamped(&cfg.topics.documents, 300, t0).await;
    // [t0 + 1 s, t0 + 2 s): documents 100 (stamped exactly at --from) to 199; 200 is stamped at --to
    let from = format!("s@{}", t0 + 1_000);
    let to = chrono::DateTime::from_timestamp_millis(t0 + 2_000).unwrap().to_rfc3339();
    let summary = cli(&["replay", "infer", "--from", &from, "--to", &to, "--serve", "document_classifier=1.1.0"], None, &prefix);
    assert_eq!((summary["read"].as_u64(), summary["written"].as_u64(), summary["dead_lettered"].as_u64(), summary["skipped"].as_u64()), (Some(100), Some(100), Some(0), Some(0)), "{summary}");

    let backfill = read_all(&format!("{}.backfill", cfg.topics.inference));
    let got: Vec<InferenceResult> = backfill.iter().map(Read::result).collect();
    let got_ids: BTreeSet<&str> = got.iter().map(|r| r.document_id.as_str()).collect();
    let want: BTreeSet<&str> = ids[100..200].iter().map(String::as_str).collect();
    assert_eq!(got.len(), 100, "exactly one result per document");
    assert_eq!(got_ids, want);
    assert!(got.iter().all(|r| r.model_versions.get("document_classifier").map(String::as_str) == Some("1.1.0")));
    assert!(backfill.iter().all(|r| r.header("replay-id").is_some_and(|v| v.starts_with("backfill-")) && r.header(h::SOURCE).is_some()));
    for t in [&cfg.topics.inference, &cfg.topics.documents_dlq] {
        assert!(read_all(t).is_empty(), "nothing on the production topic {t}");
    }
    assert!(read_all(&format!("{}.backfill", cfg.topics.documents_dlq)).is_empty());

    // inspect selects the same range with the same words
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["inspect", "-t", "documents", "-o", &from, "--to", &to, "--brokers", &brokers(), "--topic-prefix", &prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys, want.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());

    // offsets work as bounds too, and the production topic needs an explicit flag
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["replay", "infer", "--output-topic", &cfg.topics.inference, "--brokers", &brokers(), "--topic-prefix", &prefix])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--allow-production-topics"));
    let opts = ReplayOptions { brokers: brokers(), from: Bound::Offset(0), to: Some(Bound::Offset(5)), group: None, progress: None };
    let b = replay::BackfillOptions { output_topic: Some(format!("{}.offsets", cfg.topics.inference)), ..Default::default() };
    let s = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || replay::backfill(&cfg, &opts, &b)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(s.written, 15, "offsets [0, 5) of each of 3 partitions: {}", serde_json::to_string(&s).unwrap());
}

/// Aligned to 1 s windows.
const BASE: i64 = 1_800_000_000_000;

fn output(version: &str, error: bool, label: &str) -> ModelOutput {
    ModelOutput {
        model: "document_classifier".into(),
        version: version.into(),
        provider: "CPUExecutionProvider".into(),
        latency_ms: 4.0,
        batch_size: 1,
        error_code: error.then(|| "INFERENCE_FAILED".to_string()),
        label: Some(label.into()),
        confidence: None,
        regions: vec![],
        lines: vec![],
        load_ms: Some(30.0),
    }
}

/// 30 windows of 60 results; every tenth canary on 1.1.0; windows 5-7 have 8 % errors.
fn recorded() -> Vec<InferenceResult> {
    let mut v = Vec::new();
    for w in 0..30i64 {
        for i in 0..60i64 {
            let canary = i % 10 == 0;
            let err = (5..8).contains(&w) && i % 12 == 1;
            let id = format!("d-{w}-{i}");
            let o = output(if canary { "1.1.0" } else { "1.0.0" }, err, "PCDA");
            v.push(InferenceResult {
                result_id: InferenceResult::id_for(&id),
                document_id: id,
                user_id: format!("u{i}"),
                tenant: "t".into(),
                cohort: if canary { "canary" } else { "baseline" }.into(),
                submitted_at: BASE + w * 1000 + i * 10,
                processed_at: BASE + w * 1000 + i * 10 + 20,
                provider: "CPUExecutionProvider".into(),
                model_versions: Default::default(),
                inference_ms: 4.0,
                error_code: o.error_code.clone(),
                outputs: vec![o],
                end_to_end_ms: 20.0,
                true_format: Some("PCDA".into()),
                source: "test".into(),
                process_rss_bytes: Some(80 * 1_048_576),
                process_cpu_percent: Some(20.0),
            });
        }
    }
    v
}

fn events_of(topic: &str) -> Vec<(Option<String>, Vec<u8>)> {
    let mut v: Vec<(Option<String>, Vec<u8>)> = read_all(topic).into_iter().map(|r| (r.key, r.payload)).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_replay_twice_gives_identical_events_and_a_changed_threshold_gives_the_expected_different_alerts() {
    let (mut cfg, _) = isolated_config_with_prefix("monitor-replay").await;
    cfg.monitor.window_size_ms = 1_000;
    cfg.monitor.allowed_lateness_ms = 0;
    for p in &mut cfg.rollout.phases {
        p.soak_ms = 3_000;
    }
    widen_effects(&mut cfg.rollout.phases);
    // results on three partitions (by key), feedback none, one operator START at the beginning
    let results = recorded();
    for (k, chunk) in results.chunks(600).enumerate() {
        produce_records(&cfg.topics.inference, &format!("k{k}"), chunk).await;
    }
    let start = RolloutCommand { command_id: "c1".into(), rollout_id: "document_classifier-1.1.0".into(), action: action::START.into(), operator: "alice".into(), reason: None, model: Some("document_classifier".into()), version: Some("1.1.0".into()), issued_at: BASE };
    produce_records(&cfg.topics.commands, "document_classifier-1.1.0", &[start]).await;

    let run = |cfg: &payslip_stream::config::PipelineConfig, suffix: &str, dry_run: bool| {
        let cfg = cfg.clone();
        let m = MonitorReplayOptions { output_suffix: suffix.into(), dry_run, allow_production: false };
        let opts = ReplayOptions { brokers: brokers(), from: Bound::Beginning, to: None, group: None, progress: None };
        tokio::task::spawn_blocking(move || replay::monitor_replay(&cfg, &opts, &m).unwrap())
    };
    let (s1, _) = run(&cfg, ".r1", false).await.unwrap();
    let (s2, _) = run(&cfg, ".r2", false).await.unwrap();
    assert_eq!(s1.read, 1801);
    assert_eq!(s1.written, s2.written);
    for t in [&cfg.topics.alerts, &cfg.topics.decisions, &cfg.topics.metrics] {
        let (a, b) = (events_of(&format!("{t}.r1")), events_of(&format!("{t}.r2")));
        assert!(!a.is_empty(), "{t}.r1 has events");
        assert_eq!(a, b, "{t}: byte-identical across replays");
    }
    let alerts = |t: &str| -> Vec<AlertEvent> { read_all(t).iter().map(|r| codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).unwrap()).collect() };
    let a1 = alerts(&format!("{}.r1", cfg.topics.alerts));
    let codes1: BTreeSet<(String, String)> = a1.iter().map(|a| (a.code.clone(), a.status.clone())).collect();
    assert!(codes1.contains(&("ERROR_RATE_WARNING".into(), "FIRING".into())) && codes1.contains(&("ERROR_RATE_WARNING".into(), "RESOLVED".into())), "{codes1:?}");
    let decisions: Vec<RolloutDecision> = read_all(&format!("{}.r1", cfg.topics.decisions)).iter().map(|r| codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).unwrap()).collect();
    assert_eq!(decisions[0].action, action::START);
    assert!(decisions.iter().any(|d| d.action == action::ADVANCE), "{:?}", decisions.iter().map(|d| &d.reason).collect::<Vec<_>>());

    // raise the error-rate warning to 10 %: the 8 % burst no longer fires, nothing else changes
    let mut changed = cfg.clone();
    changed.monitor.alerts.iter_mut().find(|r| r.name == "error_rate").unwrap().warning.as_mut().unwrap().threshold = 0.10;
    let (_, report) = run(&changed, ".r3", true).await.unwrap();
    let a3: Vec<AlertEvent> = report.iter().filter(|e| e.event_id.starts_with("alert:")).map(|e| serde_json::from_value(e.value.clone()).unwrap()).collect();
    assert!(!a3.iter().any(|a| a.code == "ERROR_RATE_WARNING"), "no error-rate warning at 10 %");
    let rest = |v: &[AlertEvent]| -> Vec<String> { v.iter().filter(|a| a.rule != "error_rate").map(|a| format!("{}:{}", a.alert_id, a.status)).collect() };
    assert_eq!(rest(&a1).into_iter().collect::<BTreeSet<_>>(), rest(&a3).into_iter().collect::<BTreeSet<_>>());
    assert!(read_all(&cfg.topics.alerts).is_empty() && read_all(&cfg.topics.decisions).is_empty(), "nothing on production topics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_after_a_fix_get_results_that_keep_their_history() {
    let (mut cfg, prefix) = isolated_config_with_prefix("dlq-replay").await;
    cfg.limits.max_lines_per_page = 2; // every generated page has more lines: all dead-lettered
    let ids = produce_stamped(&cfg.topics.documents, 20, chrono::Utc::now().timestamp_millis()).await;
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let dead = read_topic(&cfg.topics.documents_dlq, 20, Duration::from_secs(60), Duration::from_millis(500));
    stage.stop().await;
    assert_eq!(dead.len(), 20);
    assert!(read_all(&cfg.topics.inference).is_empty());

    // the fix: default limits; then re-drive
    let fixed = repo_config();
    let stage = RunningStage::start(&PipelineConfigExt::with_topics(fixed, &cfg), load_registry(&cfg));
    let summary = cli(&["dlq", "replay"], None, &prefix);
    assert_eq!((summary["read"].as_u64(), summary["written"].as_u64()), (Some(20), Some(20)), "{summary}");
    let results = read_topic(&cfg.topics.inference, 20, Duration::from_secs(60), Duration::from_millis(500));
    stage.stop().await;
    assert_eq!(results.len(), 20, "one result per dead letter");
    let got: BTreeSet<String> = results.iter().map(|r| r.result().document_id).collect();
    assert_eq!(got, ids.into_iter().collect::<BTreeSet<_>>());
    for r in &results {
        assert!(r.header("dlq.error.class").is_some_and(|c| !c.is_empty()), "{:?}", r.headers);
        assert!(r.header("dlq.replayed-from").is_some_and(|s| s.starts_with(&cfg.topics.documents_dlq)), "{:?}", r.headers);
    }
}

/// The repository config with a test's isolated topics and group.
trait PipelineConfigExt {
    fn with_topics(self, like: &payslip_stream::config::PipelineConfig) -> payslip_stream::config::PipelineConfig;
}

impl PipelineConfigExt for payslip_stream::config::PipelineConfig {
    fn with_topics(mut self, like: &payslip_stream::config::PipelineConfig) -> payslip_stream::config::PipelineConfig {
        self.topics = like.topics.clone();
        self.kafka = like.kafka.clone();
        self
    }
}
