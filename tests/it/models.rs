//! Model integrity and execution providers: a model file whose sha256 does not match is refused
//! with a clear error while the other models keep serving; provider fallback says what ran.

use std::{path::Path, process::Command, time::Duration};

use payslip_stream::{
    codec::WireFormat,
    config::{CudaConfig, InferenceConfig, Provider, ProviderFailure},
    inference::{codes, runtime, ModelRegistry},
    produce::{self, ProduceOptions, Source},
    synth::{Generator, GeneratorConfig},
};

use crate::support::*;


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_model_is_refused_and_the_rest_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    copy_models(dir.path());
    let tampered = dir.path().join("table_detection/1.0.0.onnx");
    let mut bytes = std::fs::read(&tampered).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&tampered, bytes).unwrap();

    let mut cfg = isolated_config("tampered").await;
    cfg.models.metadata = dir.path().join("model_metadata.json");
    let registry = load_registry(&cfg);
    let status = registry.status();
    let st = status.iter().find(|s| s.model == "table_detection").unwrap();
    assert_eq!(st.state, "refused");
    let reason = st.reason.clone().unwrap();
    assert!(reason.contains("sha256 mismatch") && reason.contains("table_detection") && reason.contains("refusing"), "{reason}");
    assert!(registry.status().iter().filter(|s| s.model != "table_detection").all(|s| s.state == "loaded"));

    // allowed to serve degraded, the stage still answers every document; the refused model's output
    // carries the error code
    cfg.models.allow_degraded = vec!["table_detection".into()];
    let stage = RunningStage::start(&cfg, registry);
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
    produce::produce(&opts, Source::Synthetic { seed: 8, start: 0, count: 20, golden_fraction: 1.0, pool: None }).await.unwrap();
    let t = cfg.topics.inference.clone();
    let reads = tokio::task::spawn_blocking(move || read_topic(&t, 20, Duration::from_secs(90), Duration::from_secs(1))).await.unwrap();
    stage.stop().await;
    assert_eq!(reads.len(), 20);
    for r in reads {
        let res = r.result();
        assert_eq!(res.error_code.as_deref(), Some(codes::MODEL_UNAVAILABLE));
        assert_eq!(res.output("table_detection").unwrap().error_code.as_deref(), Some(codes::MODEL_UNAVAILABLE));
        assert!(res.output("document_classifier").unwrap().label.is_some());
        assert_eq!(res.output("text_recognition").unwrap().error_code, None);
    }

    // the CLI says so and exits non-zero
    let yaml = format!(
        "models:\n  metadata: {}\n  serve: {{table_detection: '1.0.0', document_classifier: '1.0.0'}}\n",
        dir.path().join("model_metadata.json").display()
    );
    let cfg_path = dir.path().join("pipeline.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream")).args(["models", "verify", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("sha256 mismatch"), "{stdout}");
    assert!(stderr.contains("1 model version(s) refused"), "{stderr}");
}

/// Whether the loaded ONNX Runtime build has the CUDA provider (the GPU wheel); the provider tests
/// take the branch the host offers and assert what must hold on it.
fn cuda_in_build() -> bool {
    let cfg = repo_config();
    runtime::environment(&cfg.inference).unwrap();
    runtime::provider_available(Provider::Cuda).unwrap()
}

#[test]
fn a_gpu_provider_that_cannot_run_falls_back_to_the_cpu_and_says_why() {
    let cfg = repo_config();
    // on a GPU build, an invalid device id is the seam: CUDA is in the build, registered, and fails
    let cuda = CudaConfig { device_id: 99, ..CudaConfig::default() };
    let inf = InferenceConfig { providers: vec![Provider::Cuda, Provider::Cpu], cuda, shapes: cfg.inference.shapes, ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &inf, &[]).unwrap();
    let why = if cuda_in_build() { "CUDAExecutionProvider: registered but failed" } else { "CUDAExecutionProvider: not included in this ONNX Runtime build" };
    let status = reg.status();
    assert_eq!(status.len(), 3);
    for s in &status {
        assert_eq!(s.state, "loaded");
        assert_eq!(s.provider.as_deref(), Some("CPUExecutionProvider"));
        assert_eq!(s.registered_providers, vec!["CPUExecutionProvider".to_string()]);
        // observed: the profiled warm-up ran every node on the CPU
        assert_eq!(s.placement.len(), 1, "{:?}", s.placement);
        assert_eq!((s.placement[0].provider.as_str(), s.placement[0].node_share), ("CPUExecutionProvider", 1.0));
        assert!(s.placement[0].nodes >= 1 && s.warm_up_ms.is_some());
        assert!(s.skipped_providers.iter().any(|p| p.starts_with(why)), "{:?}", s.skipped_providers);
    }
    assert_eq!(reg.provider(), "CPUExecutionProvider");
}

#[test]
fn fail_and_require_gpu_refuse_a_model_without_a_gpu_provider_and_say_why() {
    let cfg = repo_config();
    let broken = CudaConfig { device_id: 99, ..CudaConfig::default() };
    // on_provider_failure: fail means "fail unless a GPU provider loaded"
    let strict = InferenceConfig { providers: vec![Provider::Cuda, Provider::Cpu], on_provider_failure: ProviderFailure::Fail, cuda: broken.clone(), shapes: cfg.inference.shapes, ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &strict, &[]).unwrap();
    for s in reg.status() {
        assert_eq!(s.state, "refused");
        let reason = s.reason.unwrap();
        assert!(reason.contains("on_provider_failure is fail and no GPU provider registered") && reason.contains("CUDAExecutionProvider"), "{reason}");
        assert!(s.provider.is_none());
    }
    // require_gpu: the same without a GPU provider
    let gpu_only = InferenceConfig { providers: vec![Provider::Cuda, Provider::Cpu], require_gpu: true, cuda: broken, shapes: cfg.inference.shapes, ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &gpu_only, &[]).unwrap();
    for s in reg.status() {
        assert_eq!(s.state, "refused");
        assert!(s.reason.as_deref().unwrap().contains("require_gpu is true and no GPU provider registered"), "{:?}", s.reason);
    }
    // and the stage: a required model that is refused stops it before it reads anything (models verify exits non-zero)
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0'}}\ninference:\n  providers: [cuda, cpu]\n  require_gpu: true\n  cuda: {{device_id: 99}}\n",
        repo().join("models/model_metadata.json").display()
    );
    let cfg_path = dir.path().join("pipeline.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream")).args(["models", "verify", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("require_gpu is true"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn on_a_gpu_build_the_session_holds_every_provider_and_the_warm_up_says_where_nodes_ran() {
    let gpus = payslip_stream::inference::gpu::gpu_memory().unwrap_or_default();
    if !cuda_in_build() || gpus.is_empty() {
        // a CPU build, or a GPU build on a host without an NVIDIA GPU: the tests above cover those
        eprintln!("no GPU build of ONNX Runtime with a visible GPU here: the GPU branch of the provider tests does not apply");
        return;
    }
    let cfg = repo_config();
    let inf = InferenceConfig { providers: vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu], shapes: cfg.inference.shapes, ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &inf, &[]).unwrap();
    for s in reg.status() {
        assert_eq!(s.state, "loaded", "{:?}", s.reason);
        assert!(s.registered_providers.contains(&"CUDAExecutionProvider".to_string()), "{:?}", s.registered_providers);
        let shares: f64 = s.placement.iter().map(|p| p.node_share).sum();
        assert!((shares - 1.0).abs() < 1e-9, "{:?}", s.placement);
        assert!(payslip_stream::inference::runtime::is_gpu_provider(s.provider.as_deref().unwrap()), "{:?}", s.placement);
    }
}

#[test]
fn sessions_of_the_same_models_built_at_once_in_one_process_all_load() {
    // a health check beside a rebuild, a candidate loading beside a restart: each session's
    // profiled warm-up must read its own profile
    let cfg = repo_config();
    let loads: Vec<_> = (0..4).map(|_| {
        let cfg = cfg.clone();
        std::thread::spawn(move || ModelRegistry::load(&cfg.models, &cfg.inference, &[]).unwrap().status())
    }).collect();
    for l in loads {
        let status = l.join().unwrap();
        assert_eq!(status.len(), 3);
        assert!(status.iter().all(|s| s.state == "loaded" && !s.placement.is_empty()), "{status:?}");
    }
}

/// Publishes a decision as the controller would.
async fn publish_decision(cfg: &payslip_stream::config::PipelineConfig, d: &payslip_stream::rollout::records::RolloutDecision) {
    let payload = payslip_stream::codec::encode(d, WireFormat::Json).unwrap();
    let p: rdkafka::producer::FutureProducer = payslip_stream::kafka::producer_config(&brokers(), &Default::default()).create().unwrap();
    let hs = payslip_stream::kafka::headers::HeaderSet::new().with("content-type", "application/json").build();
    p.send(rdkafka::producer::FutureRecord::to(&cfg.topics.decisions).key(&d.rollout_id).payload(&payload).headers(hs), Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_is_warm_before_it_takes_traffic_and_unloaded_once_nothing_routes_to_it() {
    use payslip_stream::rollout::{action, routing::Follower, Action, Controller, RolloutCommand};
    let mut cfg = isolated_config("unload").await;
    cfg.models.unload_after_ms = 300;
    let registry = load_registry(&cfg);
    assert_eq!(registry.loaded_count(), 3);
    let mut controller = Controller::default();
    let cmd = |a: Action| RolloutCommand { command_id: unique("cmd"), rollout_id: "unload".into(), action: a.into(), operator: "test".into(), reason: None, model: Some("document_classifier".into()), version: Some("1.1.0".into()), issued_at: 0 };
    publish_decision(&cfg, &controller.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::START))).await;

    // the follower reads the decisions to their end before the stage takes documents: the
    // candidate is loaded and warmed up before any document is routed to it
    let follower = {
        let (cfg, registry) = (cfg.clone(), registry.clone());
        tokio::task::spawn_blocking(move || Follower::start(&cfg, &brokers(), registry)).await.unwrap()
    };
    assert_eq!(registry.loaded_count(), 4);
    let candidate = registry.status().into_iter().find(|s| s.version == "1.1.0").unwrap();
    assert_eq!(candidate.state, "loaded");
    assert!(candidate.warm_up_ms.is_some() && !candidate.placement.is_empty(), "{candidate:?}");
    let routing = follower.routing();
    let canary_user = (0..10_000).map(|i| format!("user-{i}")).find(|u| routing.read().unwrap().route(registry.served_versions(), u).cohort == "canary").unwrap();

    // a rollback: nothing routes to 1.1.0 any more, and after unload_after_ms its session is gone
    publish_decision(&cfg, &controller.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::EMERGENCY_ROLLBACK))).await;
    let started = std::time::Instant::now();
    while registry.loaded_count() != 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "the rolled-back candidate is still loaded: {:?}", registry.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!registry.is_loaded("document_classifier", "1.1.0"));
    let candidate = registry.status().into_iter().find(|s| s.version == "1.1.0").unwrap();
    assert_eq!(candidate.state, "unloaded", "{candidate:?}");
    assert_eq!(routing.read().unwrap().route(registry.served_versions(), &canary_user).versions["document_classifier"], "1.0.0");
    // the baselines stay
    assert!(["document_classifier", "table_detection", "text_recognition"].iter().all(|m| registry.is_loaded(m, "1.0.0")));
    drop(follower);
}

#[test]
fn models_backup_and_restore_verify_every_sha256_and_a_bad_backup_changes_nothing() {
    let bin = env!("CARGO_BIN_EXE_payslip-stream");
    let work = tempfile::tempdir().unwrap();
    let live = work.path().join("models");
    std::fs::create_dir_all(&live).unwrap();
    copy_models(&live);
    let cfg_path = work.path().join("pipeline.yaml");
    std::fs::write(&cfg_path, format!("models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0'}}\n", live.join("model_metadata.json").display())).unwrap();
    let backups = work.path().join("backups");
    let run = |args: &[&str]| Command::new(bin).args(args).arg("--config").arg(&cfg_path).output().unwrap();

    let out = run(&["models", "backup", "--to", backups.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dated = std::path::PathBuf::from(made["backup"].as_str().unwrap());
    assert_eq!(dated.parent().unwrap(), backups);
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(live.join("model_metadata.json")).unwrap()).unwrap();
    let files: std::collections::BTreeSet<&str> = meta["models"].as_array().unwrap().iter().map(|m| m["file"].as_str().unwrap()).collect();
    assert_eq!(made["files"].as_array().unwrap().len(), files.len(), "every listed file is in the backup: {made}");

    // a live file is damaged and another deleted: the restore (latest backup) puts both back
    let first = *files.iter().next().unwrap();
    let last = *files.iter().last().unwrap();
    std::fs::write(live.join(first), b"not a model").unwrap();
    std::fs::remove_file(live.join(last)).unwrap();
    let date = dated.file_name().unwrap().to_str().unwrap();
    let check = run(&["models", "restore", "--from", backups.to_str().unwrap(), "--date", date, "--check"]);
    assert!(check.status.success());
    let would: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(would["replaced"].as_array().unwrap().len(), 2, "{would}");
    assert_eq!(std::fs::read(live.join(first)).unwrap(), b"not a model", "--check writes nothing");
    let out = run(&["models", "restore", "--from", backups.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let verify = run(&["models", "verify", "--all"]);
    assert!(verify.status.success(), "restored models verify: {}", String::from_utf8_lossy(&verify.stdout));

    // a backup whose file was tampered with is refused whole, and the live repository is untouched
    std::fs::write(dated.join(first), b"tampered").unwrap();
    std::fs::remove_file(live.join(last)).unwrap();
    let out = run(&["models", "restore", "--from", dated.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restore refused, nothing was changed") && err.contains(first), "{err}");
    assert!(!live.join(last).exists(), "a refused restore writes nothing");
    // and a tampered live file is never backed up
    std::fs::write(live.join(first), b"tampered too").unwrap();
    let out = run(&["models", "backup", "--to", backups.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("backup refused"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dated.join(first)).unwrap(), b"tampered", "a refused backup leaves the earlier one alone");
}

#[test]
fn models_optimize_quantizes_a_version_measures_it_against_its_source_and_adds_it_as_a_candidate() {
    let work = tempfile::tempdir().unwrap();
    let live = work.path().join("models");
    std::fs::create_dir_all(&live).unwrap();
    copy_models(&live);
    std::fs::copy(repo().join("models/optimize.py"), live.join("optimize.py")).unwrap();
    std::fs::copy(repo().join("models/train.py"), live.join("train.py")).unwrap();
    let meta_path = live.join("model_metadata.json");
    let cfg_path = work.path().join("pipeline.yaml");
    std::fs::write(&cfg_path, format!("models:\n  metadata: {}\n  serve: {{text_recognition: '1.0.0'}}\n", meta_path.display())).unwrap();
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_payslip-stream")).args(args).arg("--config").arg(&cfg_path).output().unwrap();

    let prefix = format!("{}.", unique("optimize"));
    let out = run(&["models", "optimize", "--model", "text_recognition", "--version", "1.0.0", "--method", "int8", "--brokers", &brokers(), "--topic-prefix", &prefix]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // announced on the registry topic with the comparison against its source
    let announced = read_all(&format!("{prefix}litert.models.v1"));
    assert_eq!(announced.len(), 1);
    let a: payslip_stream::inference::announce::ModelAnnouncement = payslip_stream::codec::decode(&announced[0].payload, announced[0].header("content-type")).unwrap();
    assert_eq!((a.version.as_str(), a.sha256.as_str()), ("1.0.0-int8", entry["sha256"].as_str().unwrap()));
    let figures: serde_json::Value = serde_json::from_str(&a.heldout_json).unwrap();
    assert_eq!(figures["optimization"]["source_version"], "1.0.0", "{figures}");
    assert!(figures["optimization"]["size_bytes"].as_u64().is_some() && figures["line_exact"].as_f64().is_some(), "{figures}");
    assert_eq!((entry["version"].as_str(), entry["role"].as_str()), (Some("1.0.0-int8"), Some("candidate")));
    let o = &entry["optimization"];
    assert_eq!(o["source_version"], "1.0.0");
    assert!(o["size_bytes"].as_u64().unwrap() < o["source_size_bytes"].as_u64().unwrap(), "int8 weights are smaller: {o}");
    assert!(o["batch_ms_p50"].as_f64().unwrap() > 0.0 && o["source_batch_ms_p50"].as_f64().unwrap() > 0.0, "{o}");
    let (q, src) = (entry["heldout"]["char_accuracy"].as_f64().unwrap(), o["source_heldout"]["char_accuracy"].as_f64().unwrap());
    assert!(q > 0.5 && (q - src).abs() < 0.05, "held-out accuracy measured on both: {q} vs {src}");
    // it is in the metadata with its sha256, and it loads and answers like any version
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let listed = meta["models"].as_array().unwrap().iter().find(|m| m["version"] == "1.0.0-int8").unwrap();
    assert_eq!(listed["sha256"], entry["sha256"]);
    let verify = run(&["models", "verify", "--all"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(String::from_utf8_lossy(&verify.stdout).lines().any(|l| l.contains("\"1.0.0-int8\"") && l.contains("\"loaded\"")));
    // an existing version is never overwritten, and a tampered source is never optimized
    let before = std::fs::read(&meta_path).unwrap();
    assert!(!run(&["models", "optimize", "--model", "text_recognition", "--version", "1.0.0"]).status.success());
    std::fs::write(live.join("text_recognition/1.1.0.onnx"), b"tampered").unwrap();
    let out = run(&["models", "optimize", "--model", "text_recognition", "--version", "1.1.0"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("tampered"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&meta_path).unwrap(), before, "refused optimizations leave the metadata as it was");
}

/// Waits (at most 60 s) for an alert event on the alerts topic that `pred` accepts.
async fn wait_for_alert(cfg: &payslip_stream::config::PipelineConfig, what: &str, pred: impl Fn(&payslip_stream::alert::AlertEvent) -> bool) {
    let started = std::time::Instant::now();
    loop {
        let alerts = cfg.topics.alerts.clone();
        let events: Vec<payslip_stream::alert::AlertEvent> =
            tokio::task::spawn_blocking(move || read_all(&alerts)).await.unwrap().iter().map(|r| payslip_stream::codec::decode(&r.payload, r.header("content-type")).unwrap()).collect();
        if events.iter().any(&pred) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no {what}: {:?}", events.iter().map(|e| (&e.code, &e.version, &e.status, &e.metric)).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Publishes the controller's decisions that put `version` of the classifier at 50 % under rollout `id`.
async fn roll_out_at_half(cfg: &payslip_stream::config::PipelineConfig, id: &str, version: &str) -> payslip_stream::rollout::Controller {
    use payslip_stream::rollout::{action, Action, Controller, RolloutCommand};
    let mut c = Controller::default();
    let cmd = |a: Action| RolloutCommand { command_id: unique("cmd"), rollout_id: id.into(), action: a.into(), operator: "test".into(), reason: None, model: Some("document_classifier".into()), version: Some(version.into()), issued_at: 0 };
    let mut d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::START));
    while d.traffic_percent < 50.0 {
        d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::ADVANCE));
    }
    assert_eq!(d.traffic_percent, 50.0);
    publish_decision(cfg, &d).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_published_while_the_stage_runs_is_rolled_out_without_a_restart_a_refused_file_is_never_announced_and_a_tampered_one_raises_model_critical() {
    use payslip_stream::inference::announce::{publish, PublishError};
    let state = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("publish", state.path()).await;
    let repo_dir = tempfile::tempdir().unwrap();
    copy_models(repo_dir.path());
    cfg.models.metadata = repo_dir.path().join("model_metadata.json");
    let monitor = RunningMonitor::start(&cfg);
    let registry = load_registry(&cfg);
    let stage = RunningStage::start(&cfg, registry.clone());
    let uploads = tempfile::tempdir().unwrap();

    // refused: not a model, and a model whose graph does not take the classifier's input
    let garbage = uploads.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a model").unwrap();
    let wrong = uploads.path().join("tables.onnx");
    std::fs::copy(repo().join("models/table_detection/1.1.0.onnx"), &wrong).unwrap();
    for (file, why) in [(&garbage, "failed its checks"), (&wrong, "invalid dimensions for input: page")] {
        match publish(&cfg, &brokers(), "document_classifier", "1.2.0", file, "test").await {
            Err(PublishError::Refused(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("{} was not refused: {other:?}", file.display()),
        }
    }
    assert!(read_all(&cfg.topics.models).is_empty(), "a refused file is never announced");
    assert!(!repo_dir.path().join("document_classifier/1.2.0.onnx").exists());

    // a good file: checked, copied into the repository, announced with its held-out figures
    let good = uploads.path().join("classifier.onnx");
    std::fs::copy(repo().join("models/document_classifier/1.1.0.onnx"), &good).unwrap();
    let a = publish(&cfg, &brokers(), "document_classifier", "1.2.0", &good, "test").await.unwrap();
    let heldout: serde_json::Value = serde_json::from_str(&a.heldout_json).unwrap();
    assert!(heldout["accuracy"].as_f64().unwrap() > 0.9, "{heldout}");
    assert!(repo_dir.path().join("document_classifier/1.2.0.onnx").exists());
    // the monitor says an update is available, from the announcement
    wait_for_alert(&cfg, "MODEL_UPDATE_AVAILABLE for the published version", |e| e.code == "MODEL_UPDATE_AVAILABLE" && e.metric == "candidate 1.2.0" && e.model == "document_classifier").await;

    // rolled out at 50 % with the stage still running: canary documents run 1.2.0
    let mut controller = roll_out_at_half(&cfg, "publish-1.2.0", "1.2.0").await;
    let gen = Generator::new(GeneratorConfig { seed: 77, ..Default::default() });
    let docs: Vec<_> = (0..60).map(|i| gen.document(i).document).collect();
    // the decision reaches the stage within a second or two; documents sent after it are routed by it
    let started = std::time::Instant::now();
    while !registry.is_loaded("document_classifier", "1.2.0") {
        assert!(started.elapsed() < Duration::from_secs(30), "the stage never loaded the published version");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    produce::produce(&ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 }, Source::Documents(docs)).await.unwrap();
    let t = cfg.topics.inference.clone();
    let results: Vec<_> = tokio::task::spawn_blocking(move || read_topic(&t, 60, Duration::from_secs(60), Duration::from_secs(1))).await.unwrap().iter().map(|r| r.result()).collect();
    assert_eq!(results.len(), 60);
    let canary: Vec<_> = results.iter().filter(|r| r.cohort == "canary").collect();
    assert!(!canary.is_empty() && canary.len() < 60, "about half canary: {}", canary.len());
    assert!(canary.iter().all(|r| r.model_versions.get("document_classifier").map(String::as_str) == Some("1.2.0") && r.error_code.is_none()), "{canary:?}");
    assert!(results.iter().all(|r| r.error_code.is_none()));
    let status = registry.status().into_iter().find(|s| s.version == "1.2.0").unwrap();
    assert!(status.warm_up_ms.is_some(), "warmed up before it took traffic: {status:?}");

    // 1.2.0 rolled back; 1.3.0 published, then its file in the repository tampered with: the stage
    // refuses it at load with the reason, its canary documents say MODEL_UNAVAILABLE, the baseline
    // keeps serving, and the monitor raises MODEL_CRITICAL for it
    let stop = payslip_stream::rollout::RolloutCommand { command_id: unique("cmd"), rollout_id: "publish-1.2.0".into(), action: payslip_stream::rollout::action::EMERGENCY_ROLLBACK.into(), operator: "test".into(), reason: None, model: None, version: None, issued_at: 0 };
    publish_decision(&cfg, &controller.apply_command(&cfg.rollout, &cfg.models.serve, &stop)).await;
    publish(&cfg, &brokers(), "document_classifier", "1.3.0", &good, "test").await.unwrap();
    let stored = repo_dir.path().join("document_classifier/1.3.0.onnx");
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&stored, bytes).unwrap();
    roll_out_at_half(&cfg, "publish-1.3.0", "1.3.0").await;
    let started = std::time::Instant::now();
    let refused = loop {
        if let Some(s) = registry.status().into_iter().find(|s| s.version == "1.3.0") {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the stage never tried the tampered version");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.state, "refused");
    assert!(refused.reason.as_deref().unwrap_or_default().contains("sha256 mismatch"), "{refused:?}");
    let more: Vec<_> = (60..120).map(|i| gen.document(i).document).collect();
    produce::produce(&ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 }, Source::Documents(more)).await.unwrap();
    let t = cfg.topics.inference.clone();
    let results: Vec<_> = tokio::task::spawn_blocking(move || read_topic(&t, 120, Duration::from_secs(60), Duration::from_secs(1))).await.unwrap().iter().map(|r| r.result()).collect();
    let later: Vec<_> = results.iter().filter(|r| r.model_versions.get("document_classifier").map(String::as_str) == Some("1.3.0")).collect();
    assert!(!later.is_empty(), "some documents were routed to 1.3.0");
    assert!(later.iter().all(|r| r.output("document_classifier").unwrap().error_code.as_deref() == Some(codes::MODEL_UNAVAILABLE)));
    assert!(results.iter().filter(|r| r.cohort == "baseline").all(|r| r.error_code.is_none()), "the baseline keeps serving");
    // one document stamped past the window's end moves the watermark on, so the window closes
    let mut closer = gen.document(500).document;
    closer.submitted_at = chrono::Utc::now().timestamp_millis() + cfg.monitor.window_size_ms + 2_000;
    produce::produce(&ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 }, Source::Documents(vec![closer])).await.unwrap();
    wait_for_alert(&cfg, "MODEL_CRITICAL for the tampered version", |e| e.code == "MODEL_CRITICAL" && e.version == "1.3.0" && e.status == "FIRING").await;
    stage.stop().await;
    monitor.stop().await;
}

#[test]
fn models_bench_times_the_served_models_in_the_stages_batches_and_says_what_ran() {
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .current_dir(repo())
        .args(["models", "bench", "--config", "pipelines/payslip.yaml", "--docs", "40", "--rounds", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 + 3, "two rounds, then three status lines: {lines:?}");
    let status_provider = lines[2]["provider"].as_str().unwrap();
    for (i, r) in lines[..2].iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1);
        assert_eq!(r["documents"], 40, "every synthetic document is valid and timed: {r}");
        assert!(r["docs_per_s"].as_f64().unwrap() > 0.0 && r["session_run_share"].as_f64().unwrap() > 0.0 && r["session_run_share"].as_f64().unwrap() <= 1.0, "{r}");
        assert_eq!(r["provider"], status_provider, "{r}");
    }
    assert!(lines[2..].iter().all(|s| s["state"] == "loaded" && s["placement"][0]["provider"] == s["provider"]), "{lines:?}");
}

/// Runs `payslip-stream run --stage infer` and returns its exit status and stderr; fails the test if
/// it does not exit by itself within 90 s (it must refuse, not hang).
fn run_infer_expecting_exit(cfg_path: &Path, prefix: &str, group: &str, ort: Option<&str>) -> (std::process::ExitStatus, String) {
    let log = std::env::temp_dir().join(format!("{}.log", unique("refuse")));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payslip-stream"));
    cmd.current_dir(repo())
        .args(["run", "--stage", "infer", "--brokers", &brokers(), "--topic-prefix", prefix, "--group", group, "--config"])
        .arg(cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(p) = ort {
        cmd.env("ORT_DYLIB_PATH", p);
    }
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("the stage did not exit within 90 s; log: {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(&log).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_cannot_run_its_models_refuses_to_start_and_consumes_nothing() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let dir = tempfile::tempdir().unwrap();
    copy_models(dir.path());
    let tampered = dir.path().join("table_detection/1.0.0.onnx");
    let mut bytes = std::fs::read(&tampered).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&tampered, bytes).unwrap();
    let serve = "{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}";
    let tampered_cfg = dir.path().join("tampered.yaml");
    std::fs::write(&tampered_cfg, format!("models:\n  metadata: {}\n  serve: {serve}\n", dir.path().join("model_metadata.json").display())).unwrap();
    let good_cfg = dir.path().join("good.yaml");
    std::fs::write(&good_cfg, format!("models:\n  metadata: {}\n  serve: {serve}\n", repo().join("models/model_metadata.json").display())).unwrap();

    // documents are waiting: a stage that started would consume them
    let (cfg, prefix) = isolated_config_with_prefix("refuse").await;
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
    produce::produce(&opts, Source::Synthetic { seed: 3, start: 0, count: 5, golden_fraction: 1.0, pool: None }).await.unwrap();

    let group = format!("{prefix}refusing");
    let (status, log) = run_infer_expecting_exit(&tampered_cfg, &prefix, &group, None);
    assert!(!status.success(), "{log}");
    assert!(log.contains("table_detection 1.0.0") && log.contains("sha256 mismatch") && log.contains("models.allow_degraded"), "{log}");

    let (status, log) = run_infer_expecting_exit(&good_cfg, &prefix, &group, Some("/nonexistent/libonnxruntime.so"));
    assert!(!status.success(), "{log}");
    assert!(log.contains("ORT_DYLIB_PATH") && log.contains("/nonexistent/libonnxruntime.so"), "{log}");

    // nothing was consumed: the group has no committed offset on any partition
    let c: BaseConsumer = payslip_stream::kafka::client_config(&brokers(), &Default::default()).set("group.id", &group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..cfg.topics.partitions {
        tpl.add_partition(&cfg.topics.documents, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for e in committed.elements() {
        assert_eq!(e.offset(), rdkafka::Offset::Invalid, "partition {} has a committed offset", e.partition());
    }
    assert_eq!(read_all(&cfg.topics.inference).len(), 0, "no result was published");
}

/// Documents with headers, keyed by their id.
async fn produce_with_headers(topic: &str, docs: &[(payslip_stream::document::PayslipDocument, Vec<(&str, String)>)]) {
    let msgs = docs
        .iter()
        .map(|(d, hs)| {
            let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/avro")];
            headers.extend(hs.iter().map(|(k, v)| (*k, v.as_str())));
            (d.document_id.clone(), payslip_stream::codec::encode(d, WireFormat::Avro).unwrap(), headers)
        })
        .collect();
    produce_raw(topic, msgs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onnx_runtime_failure_is_retried_on_a_rebuilt_session_and_never_published_as_an_answer() {
    let mut cfg = isolated_config("ort-fault").await;
    cfg.faults.enabled = true;
    let registry = load_registry(&cfg);
    let gen = payslip_stream::synth::Generator::new(Default::default());
    let doc = |i: u64, id: &str| {
        let mut d = gen.document(i).document;
        d.document_id = id.into();
        d
    };

    // a batch whose first two model runs fail in ONNX Runtime: retried (3 tries by default), answered
    let stage = RunningStage::start(&cfg, registry.clone());
    let mut docs: Vec<_> = (0..5u64).map(|i| (doc(i, &format!("plain-{i}")), vec![])).collect();
    docs.push((doc(5, "flaky"), vec![("fault-ort-failures", "2".to_string())]));
    produce_with_headers(&cfg.topics.documents, &docs).await;
    let t = cfg.topics.inference.clone();
    let reads = tokio::task::spawn_blocking(move || read_topic(&t, 6, Duration::from_secs(60), Duration::from_secs(1))).await.unwrap();
    stage.stop().await;
    assert_eq!(reads.len(), 6);
    assert!(reads.iter().all(|r| r.result().error_code.is_none()), "no failed answer: {:?}", reads.iter().map(|r| r.result().error_code).collect::<Vec<_>>());
    assert_eq!(registry.run_retries(), 2, "the failed runs were tried again");

    // a batch ONNX Runtime fails on every try: the stage stops, nothing is published for it, and it
    // is answered once after the restart
    let stage = RunningStage::start(&cfg, registry.clone());
    produce_with_headers(&cfg.topics.documents, &[(doc(6, "poison"), vec![("fault-ort-failures", "3".to_string())])]).await;
    let err = stage.failure().await;
    assert!(matches!(err, payslip_stream::infer::StageError::Inference(_)) && err.retryable(), "{err}");
    assert!(err.to_string().contains("ONNX Runtime failed 3 tries"), "{err}");
    assert_eq!(read_all(&cfg.topics.inference).len(), 6, "nothing published for the failed batch");
    assert!(read_all(&cfg.topics.documents_dlq).is_empty());
    cfg.faults.enabled = false;
    let stage = RunningStage::start(&cfg, registry);
    let t = cfg.topics.inference.clone();
    let reads = tokio::task::spawn_blocking(move || read_topic(&t, 7, Duration::from_secs(60), Duration::from_secs(2))).await.unwrap();
    stage.stop().await;
    let poison: Vec<_> = reads.iter().map(|r| r.result()).filter(|r| r.document_id == "poison").collect();
    assert_eq!(poison.len(), 1, "answered once, after the restart");
    assert!(poison[0].error_code.is_none());
}

/// A document's answers do not depend on the batch it runs in: the text model runs a large batch's
/// lines in several runs on the CPU (`inference::CPU_TEXT_RUN_LINES` each), and every model must give each
/// document alone what it gives it among 31 others.
#[test]
fn a_documents_answers_are_the_same_alone_and_in_a_batch() {
    let cfg = repo_config();
    let registry = ModelRegistry::load(&cfg.models, &cfg.inference, &[]).unwrap();
    let versions = registry.served_versions().clone();
    let gen = Generator::new(GeneratorConfig { seed: 23, ..Default::default() });
    let docs: Vec<_> = (0..64u64).map(|i| gen.document(i).document).collect();
    let lines: usize = docs.iter().flat_map(|d| &d.pages).map(|p| p.lines.iter().filter(|l| l.raster.is_some()).count()).sum();
    assert!(lines > 2 * payslip_stream::inference::CPU_TEXT_RUN_LINES, "the batches hold more lines than one text run: {lines}");
    let answers = |out: Vec<payslip_stream::document::ModelOutput>| out.into_iter().map(|o| (o.model, o.error_code, o.label, o.confidence.map(f32::to_bits), o.regions, o.lines)).collect::<Vec<_>>();
    let mut compared = 0;
    for batch in docs.chunks(cfg.batching.max_batch) {
        let refs: Vec<_> = batch.iter().collect();
        let together = registry.infer(&refs, &versions).unwrap();
        for (doc, out) in batch.iter().zip(together) {
            let alone = registry.infer(&[doc], &versions).unwrap().remove(0);
            assert_eq!(answers(out), answers(alone), "document {}", doc.document_id);
            compared += 1;
        }
    }
    assert_eq!(compared, docs.len());
}

/// On the CPU each version holds a session per batch in flight, so two batches run the same model
/// at once (before, the second waited for the first: one core idled while the text model ran), and
/// both get exactly the answers one session gives. `inference.sessions_per_model: 1` keeps one.
#[test]
fn two_batches_run_the_same_model_at_once_on_sessions_of_their_own_with_the_same_answers() {
    let cfg = repo_config();
    let gen = Generator::new(GeneratorConfig { seed: 31, ..Default::default() });
    let docs: Vec<_> = (0..64u64).map(|i| gen.document(i).document).collect();
    let (first, second) = docs.split_at(32);
    let answers = |out: Vec<Vec<payslip_stream::document::ModelOutput>>| {
        out.into_iter().flatten().map(|o| (o.model, o.error_code, o.label, o.confidence.map(f32::to_bits), o.regions, o.lines)).collect::<Vec<_>>()
    };
    let text = ("text_recognition", "1.0.0");
    for (sessions, expected) in [(None, 2), (Some(1), 1)] {
        let inference = InferenceConfig { sessions_per_model: sessions, ..cfg.inference.clone() };
        let registry = std::sync::Arc::new(ModelRegistry::load(&cfg.models, &inference, &[]).unwrap());
        let versions = registry.served_versions().clone();
        assert!(registry.status().iter().all(|s| s.state == "loaded" && s.sessions == expected), "{:?}", registry.status());
        assert_eq!(registry.session_count(), 3 * expected);
        assert_eq!(registry.loaded_count(), 3);
        let reference = [first, second].map(|b| answers(registry.infer(&b.iter().collect::<Vec<_>>(), &versions).unwrap()));
        // two threads run their batch over and over, started together each time, until their text
        // runs were seen overlapping (one session: never, however often)
        let mut rounds = 0;
        while rounds < 40 && (rounds < 10 || registry.concurrent_runs_peak(text.0, text.1) < expected) {
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = [first, second]
                .into_iter()
                .map(|batch| {
                    let (registry, versions, start, batch) = (registry.clone(), versions.clone(), start.clone(), batch.to_vec());
                    std::thread::spawn(move || {
                        start.wait();
                        registry.infer(&batch.iter().collect::<Vec<_>>(), &versions).unwrap()
                    })
                })
                .collect();
            let outs: Vec<_> = threads.into_iter().map(|t| answers(t.join().unwrap())).collect();
            assert_eq!(outs, reference, "the same answers on either session");
            rounds += 1;
        }
        assert_eq!(registry.concurrent_runs_peak(text.0, text.1), expected, "runs of the text model at once with {expected} session(s), {rounds} rounds");
    }
}
