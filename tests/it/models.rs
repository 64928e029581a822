//! Model integrity and execution providers: a model file whose sha256 does not match is refused
//! with a clear error while the other models keep serving; provider fallback says what ran.

use std::{path::Path, process::Command, time::Duration};

use payslip_stream::{
    codec::WireFormat,
    config::{InferenceConfig, Provider, ProviderFailure},
    inference::{codes, ModelRegistry},
    produce::{self, ProduceOptions, Source},
};

use crate::support::*;

fn copy_models(to: &Path) {
    let from = repo().join("models");
    for entry in std::fs::read_dir(&from).unwrap() {
        let e = entry.unwrap();
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(to.join(e.file_name())).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(e.file_name()).join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

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

    // the stage still answers every document; the refused model's output carries the error code
    let stage = RunningStage::start(&cfg, registry);
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: false, passthrough: Default::default() };
    produce::produce(&opts, Source::Synthetic { seed: 8, start: 0, count: 20, golden_fraction: 1.0 }).await.unwrap();
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

#[test]
fn unavailable_gpu_provider_falls_back_to_cpu_and_says_so() {
    let cfg = repo_config();
    let inf = InferenceConfig { providers: vec![Provider::Cuda, Provider::Cpu], ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &inf, &[]).unwrap();
    for s in reg.status() {
        assert_eq!(s.state, "loaded");
        assert_eq!(s.provider.as_deref(), Some("CPUExecutionProvider"));
        assert!(s.skipped_providers.iter().any(|p| p.starts_with("CUDAExecutionProvider")), "{:?}", s.skipped_providers);
    }
    assert_eq!(reg.provider(), "CPUExecutionProvider");

    // on_provider_failure: fail refuses instead of silently running on CPU
    let strict = InferenceConfig { providers: vec![Provider::Cuda, Provider::Cpu], on_provider_failure: ProviderFailure::Fail, ..InferenceConfig::default() };
    let reg = ModelRegistry::load(&cfg.models, &strict, &[]).unwrap();
    for s in reg.status() {
        assert_eq!(s.state, "refused");
        assert!(s.reason.as_deref().unwrap().contains("CUDAExecutionProvider"), "{:?}", s.reason);
    }
}
