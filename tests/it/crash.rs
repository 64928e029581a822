//! Kill the process mid-stream with SIGKILL, restart it: every document has a result. Duplicates are
//! allowed (at-least-once) and recognisable by result id; the test reports how many there were.
//! Ends with SIGTERM, which must drain and exit cleanly.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::WireFormat,
    kafka,
    produce::{self, ProduceOptions, Source},
    synth::{Generator, GeneratorConfig},
};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::support::*;

fn spawn_stage(prefix: &str, group: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .current_dir(repo())
        .args(["run", "--stage", "infer", "--config", "pipelines/payslip.yaml", "--brokers", &brokers(), "--topic-prefix", prefix, "--group", group])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn payslip-stream")
}

fn messages_on(topic: &str) -> i64 {
    let c: BaseConsumer = kafka::client_config(&brokers(), &Default::default()).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    md.topics()[0].partitions().iter().map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(5)).map(|(lo, hi)| hi - lo).unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let (cfg, prefix) = isolated_config_with_prefix("crash").await;
    let group = cfg.kafka.infer_group.clone();
    let log = std::env::temp_dir().join(format!("{}.log", unique("crash-stage")));
    let n = 1500u64;
    let gen = Generator::new(GeneratorConfig { seed: 99, ..Default::default() });
    let ids: BTreeSet<String> = (0..n).map(|i| gen.document(i).document.document_id).collect();

    let mut child = spawn_stage(&prefix, &group, &log);
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(250.0), progress: None, passthrough: Default::default() };
    let producer = tokio::spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 99, start: 0, count: n, golden_fraction: 1.0 }).await });

    // kill once a part of the stream is done
    let started = Instant::now();
    let before_kill = loop {
        let c = messages_on(&cfg.topics.inference);
        if c >= 200 {
            break c;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "stage produced only {c} results in 120 s; log: {}", log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert!(before_kill < n as i64, "the kill must land mid-stream ({before_kill} results already)");
    println!("killed after {before_kill} results");

    let mut child = spawn_stage(&prefix, &group, &log);
    let sent = producer.await.unwrap().expect("produce");
    assert_eq!(sent.sent, n);

    // read until every document has a result
    let topic = cfg.topics.inference.clone();
    let ids2 = ids.clone();
    let counts = tokio::task::spawn_blocking(move || {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let start = Instant::now();
        loop {
            let reads = read_all(&topic);
            counts.clear();
            for r in &reads {
                *counts.entry(r.result().result_id).or_default() += 1;
            }
            if ids2.iter().all(|id| counts.contains_key(&payslip_stream::document::InferenceResult::id_for(id))) {
                return counts;
            }
            assert!(start.elapsed() < Duration::from_secs(240), "after 240 s only {} of {} documents have results", counts.len(), ids2.len());
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .await
    .unwrap();

    // graceful stop: SIGTERM drains and exits 0
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM must drain and exit cleanly, got {status}; log: {}", log.display());

    let expected: BTreeSet<String> = ids.iter().map(|id| payslip_stream::document::InferenceResult::id_for(id)).collect();
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, expected, "every document has a result and no result names an unknown document");
    let total: usize = counts.values().sum();
    let duplicates = total - expected.len();
    println!("{} documents, {total} results, {duplicates} duplicates (same result id) after SIGKILL + restart", expected.len());
}
