//! A JSON document produced with `kcat -P` gets a result that `kcat -C` can read, headers included.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{codec::WireFormat, document::InferenceResult, synth::{Generator, GeneratorConfig}};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_json_document_gets_a_result_kcat_can_read() {
    let mut cfg = isolated_config("kcat").await;
    cfg.topics.inference_format = WireFormat::Json;
    let doc = Generator::new(GeneratorConfig { seed: 4242, ..Default::default() }).document(0).document;
    let line = serde_json::to_string(&doc).unwrap();

    let mut kcat = Command::new("kcat")
        .args(["-P", "-b", &brokers(), "-t", &cfg.topics.documents, "-k", &doc.document_id, "-H", "content-type=application/json", "-H", "trace-id=kcat-trace-1"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat is installed (apt-get install kcat; scripts/setup does it)");
    kcat.stdin.take().unwrap().write_all(format!("{line}\n").as_bytes()).unwrap();
    assert!(kcat.wait().unwrap().success(), "kcat -P failed");

    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let started = Instant::now();
    let out = loop {
        let o = Command::new("kcat")
            .args(["-C", "-b", &brokers(), "-t", &cfg.topics.inference, "-o", "beginning", "-e", "-q", "-f", "%k\t%h\t%s\n"])
            .output()
            .expect("kcat -C");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        if !text.trim().is_empty() {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "no result readable by kcat after 90 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stage.stop().await;

    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one result: {out}");
    let mut parts = lines[0].splitn(3, '\t');
    let (key, headers, value) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(key, doc.document_id);
    for expected in ["content-type=application/json", "schema=payslip.v1.InferenceResult", "trace-id=kcat-trace-1", "provider="] {
        assert!(headers.contains(expected), "header {expected} missing in {headers}");
    }
    assert!(headers.contains(&format!("result-id={}", InferenceResult::id_for(&doc.document_id))), "{headers}");
    assert!(headers.contains("model-versions=document_classifier=1.0.0"), "{headers}");
    let result: InferenceResult = serde_json::from_str(value).expect("value is JSON");
    assert_eq!(result.document_id, doc.document_id);
    // the provider header and field say what ran the outputs
    let ran = result.outputs.iter().map(|o| o.provider.as_str()).collect::<Vec<_>>();
    assert_eq!(result.provider, payslip_stream::inference::provider_of(ran.iter().copied()), "{value}");
    assert!(headers.contains(&format!("provider={}", result.provider)) && result.provider.ends_with("ExecutionProvider"), "{headers}");
    assert_eq!(result.true_format, doc.labels.map(|l| l.format));
    assert!(result.output("document_classifier").unwrap().label.is_some());
}

/// The README's kcat block, one command per entry (backslash continuations joined, comments dropped).
fn readme_recipes() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme.split("<!-- kcat-recipes:begin -->").nth(1).and_then(|b| b.split("<!-- kcat-recipes:end -->").next()).expect("README has the kcat recipe block");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines().filter(|l| !l.starts_with("```")) {
        let l = line.trim_end();
        if cur.is_empty() && (l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        if let Some(x) = l.strip_suffix('\\') {
            cur.push_str(x);
            continue;
        }
        cur.push_str(l);
        out.push(std::mem::take(&mut cur));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_kcat_recipes_run_as_written() {
    use payslip_stream::rollout::{action, ops, RolloutCommand};
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, prefix) = isolated_config_with_prefix("recipes").await;
    cfg.monitor.state_dir = dir.path().join("state");
    cfg.monitor.window_size_ms = 1_000;
    cfg.monitor.allowed_lateness_ms = 0;
    cfg.monitor.idle_timeout_ms = 1_000;
    // something on every topic: documents (one broken), results, a dead letter, windows, alerts, a rollout
    let stage = RunningStage::start(&cfg, load_registry(&cfg));
    let monitor = RunningMonitor::start(&cfg);
    let gen = Generator::new(GeneratorConfig { seed: 77, rasters: false, ..Default::default() });
    // two rounds 2.5 s apart, so the first round's window closes
    for round in 0..2u64 {
        let docs: Vec<_> = (0..10).map(|i| {
            let mut d = gen.document(round * 10 + i).document;
            d.submitted_at = chrono::Utc::now().timestamp_millis();
            d
        }).collect();
        produce_records(&cfg.topics.documents, "k", &docs).await;
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
        }
    }
    produce_raw(&cfg.topics.documents, vec![("broken".into(), b"{\"pages\": 3}".to_vec(), vec![("content-type", "application/json")])]).await;
    let start = RolloutCommand { command_id: "recipes-1".into(), rollout_id: "document_classifier-1.1.0".into(), action: action::START.into(), operator: "test".into(), reason: None, model: None, version: None, issued_at: chrono::Utc::now().timestamp_millis() };
    ops::send_command(&cfg, &brokers(), &start).await.unwrap();
    assert!(ops::wait_for_decision(&cfg, &brokers(), "recipes-1", Duration::from_secs(60)).await.unwrap().is_some());
    read_topic(&cfg.topics.inference, 20, Duration::from_secs(60), Duration::ZERO);
    read_topic(&cfg.topics.documents_dlq, 1, Duration::from_secs(60), Duration::ZERO);
    read_topic(&cfg.topics.metrics, 1, Duration::from_secs(60), Duration::ZERO);

    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_payslip-stream")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let recipes = readme_recipes();
    assert!(recipes.len() >= 15, "{recipes:?}");
    let mut produced_topics = Vec::new();
    for r in &recipes {
        let cmd = r.replace("payslip.", &format!("{prefix}payslip.")).replace("litert.", &format!("{prefix}litert."));
        let out = Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {cmd}")])
            .current_dir(dir.path())
            .env("B", brokers())
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "recipe failed: {r}\n{}", String::from_utf8_lossy(&out.stderr));
        if r.contains("kcat -P") {
            produced_topics.push(r.split(" -t ").nth(1).unwrap().split_whitespace().next().unwrap().to_string());
        }
        // reads and listings show something: every topic has data by now
        if r.starts_with("kcat -C") || r.starts_with("kcat -b") {
            assert!(!stdout.trim().is_empty(), "recipe printed nothing: {r}");
        }
        if r.contains("-f '%k %h") && r.contains("inference") {
            assert!(stdout.contains("cohort=") && stdout.contains("model-versions=") && stdout.contains("source="), "{stdout}");
        }
        if r.contains("decisions") {
            assert!(stdout.contains("rollout-action=START"), "{stdout}");
        }
    }
    assert_eq!(produced_topics, vec!["payslip.documents.v1", "payslip.feedback.v1", "litert.rollout.commands.v1"]);
    assert!(ops::wait_for_decision(&cfg, &brokers(), "kcat-1", Duration::from_secs(60)).await.unwrap().is_some(), "the PAUSE produced with kcat was answered");
    // the recipe's JSON payslip is answered before the stage stops
    read_topic(&cfg.topics.inference, 21, Duration::from_secs(60), Duration::ZERO);
    stage.stop().await;
    monitor.stop().await;
    // the JSON payslip and the PAUSE command produced by the recipes were processed
    let results = read_all(&cfg.topics.inference);
    assert_eq!(results.len(), 21, "20 documents and the recipe's JSON payslip");
    let decisions: Vec<payslip_stream::rollout::RolloutDecision> =
        read_all(&cfg.topics.decisions).iter().map(|m| payslip_stream::codec::decode(&m.payload, m.header("content-type")).unwrap()).collect();
    assert!(decisions.iter().any(|d| d.action == action::PAUSE && d.operator.as_deref() == Some("alice")), "{decisions:?}");
}
