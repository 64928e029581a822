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
    for expected in ["content-type=application/json", "schema=payslip.v1.InferenceResult", "trace-id=kcat-trace-1", "provider=CPUExecutionProvider"] {
        assert!(headers.contains(expected), "header {expected} missing in {headers}");
    }
    assert!(headers.contains(&format!("result-id={}", InferenceResult::id_for(&doc.document_id))), "{headers}");
    assert!(headers.contains("model-versions=document_classifier=1.0.0"), "{headers}");
    let result: InferenceResult = serde_json::from_str(value).expect("value is JSON");
    assert_eq!(result.document_id, doc.document_id);
    assert_eq!(result.true_format, doc.labels.map(|l| l.format));
    assert!(result.output("document_classifier").unwrap().label.is_some());
}
