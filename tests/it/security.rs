//! Kafka security: the pipeline runs end to end against a broker that demands SASL/SCRAM-SHA-512
//! and enforces ACLs (this test's own broker, `KAFKA_SASL=1 scripts/kafka start`), with its
//! credentials read from a file; a principal without WRITE on the commands topic cannot change a
//! rollout (the broker refuses it); no log or output contains a password.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::WireFormat,
    config::PipelineConfig,
    kafka,
    produce::{self, ProduceOptions, Source},
};
use rdkafka::consumer::BaseConsumer;

use crate::support::*;

/// This test's own SASL broker.
struct SaslBroker {
    port: u16,
}

impl SaslBroker {
    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new(repo().join("scripts/kafka")).args(args).env("KAFKA_PORT", self.port.to_string()).env("KAFKA_SASL", "1").output().expect("scripts/kafka");
        assert!(out.status.success(), "scripts/kafka {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn acl(&self, principal: &str, args: &[&str]) {
        let mut all = vec!["acl", "--add", "--allow-principal", principal];
        all.extend_from_slice(args);
        self.cmd(&all);
    }
}

impl Drop for SaslBroker {
    fn drop(&mut self) {
        let what = if std::thread::panicking() { "stop" } else { "wipe" };
        let _ = Command::new(repo().join("scripts/kafka")).arg(what).env("KAFKA_PORT", self.port.to_string()).output();
    }
}

fn client_props(user: &str, password: &str) -> BTreeMap<String, String> {
    [("security.protocol", "SASL_PLAINTEXT"), ("sasl.mechanisms", "SCRAM-SHA-512"), ("sasl.username", user), ("sasl.password", password)].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn count(brokers: &str, topic: &str, props: &BTreeMap<String, String>) -> usize {
    let c: BaseConsumer = kafka::reader_config(brokers, &unique("sasl-reader"), props).create().unwrap();
    let cursor = kafka::RangeCursor::to_end(c, topic, |_, lo, _| lo, "test read").unwrap();
    cursor.for_each(Duration::from_secs(30), |_| Ok::<(), kafka::KafkaError>(())).unwrap() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_with_sasl_scram_and_acls_and_an_unauthorised_principal_cannot_command_a_rollout() {
    let broker = SaslBroker { port: 19_600 + (std::process::id() % 200) as u16 * 2 };
    broker.cmd(&["wipe"]);
    broker.cmd(&["start"]);
    let brokers = format!("127.0.0.1:{}", broker.port);
    let prefix = format!("{}.", unique("sasl"));
    // the pipeline's principal may do everything on its topics, groups and transactional ids;
    // the intruder may read the commands topic but not write to it
    let pipeline_pw_file = broker.cmd(&["user", "pipeline"]);
    let intruder_pw_file = broker.cmd(&["user", "intruder"]);
    for resource in [vec!["--topic", &prefix], vec!["--group", &prefix], vec!["--transactional-id", &prefix]] {
        let mut args = vec!["--operation", "All", "--resource-pattern-type", "prefixed"];
        args.extend(resource);
        broker.acl("User:pipeline", &args);
    }
    broker.acl("User:pipeline", &["--operation", "IdempotentWrite", "--cluster"]);
    // the decisions follower and readers use groups of their own names
    broker.acl("User:pipeline", &["--operation", "Read", "--group", "*"]);
    let pipeline_pw = std::fs::read_to_string(&pipeline_pw_file).unwrap().trim().to_string();
    let intruder_pw = std::fs::read_to_string(&intruder_pw_file).unwrap().trim().to_string();

    let dir = tempfile::tempdir().unwrap();
    let write_yaml = |name: &str, user: &str, pw_file: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nkafka:\n  infer_group: {prefix}infer\n  sasl: {{username: {user}, password_file: {pw_file}}}\ntopics: {{partitions: 3}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 2000\n  allowed_lateness_ms: 0\n  idle_timeout_ms: 3000\n",
                repo().join("models/model_metadata.json").display(),
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        path
    };
    let pipeline_yaml = write_yaml("pipeline.yaml", "pipeline", &pipeline_pw_file);
    let intruder_yaml = write_yaml("intruder.yaml", "intruder", &intruder_pw_file);
    let mut cfg = PipelineConfig::load(&pipeline_yaml).expect("the SASL configuration loads");
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    assert!(!format!("{cfg:?}").contains(&pipeline_pw), "the configuration's Debug output hides the password");
    kafka::admin::ensure_topics(&brokers, &cfg).await.expect("the pipeline's principal creates its topics");

    let log = dir.path().join("stages.log");
    let mut stages = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .current_dir(repo())
        .args(["run", "--stage", "all", "--brokers", &brokers, "--topic-prefix", &prefix, "--config"])
        .arg(&pipeline_yaml)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let props = client_props("pipeline", &pipeline_pw);
    let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: props.clone(), producers: 1 };
    let sent = produce::produce(&opts, Source::Synthetic { seed: 3, start: 0, count: 20, golden_fraction: 1.0, pool: None }).await.expect("produce as the pipeline's principal");
    assert_eq!(sent.sent, 20);
    let started = Instant::now();
    loop {
        if let Some(status) = stages.try_wait().unwrap() {
            panic!("the stages exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(20).collect::<Vec<_>>().join("\n"));
        }
        if count(&brokers, &cfg.topics.inference, &props) >= 20 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no 20 results in 120 s; log: {}", log.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&brokers, &cfg.topics.inference, &props), 20, "one result per document");

    // the intruder can authenticate but has no WRITE on the commands topic: the broker refuses
    broker.acl("User:intruder", &["--operation", "Read", "--operation", "Describe", "--topic", &prefix, "--resource-pattern-type", "prefixed"]);
    broker.acl("User:intruder", &["--operation", "Read", "--group", "*"]);
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["rollout", "start", "--model", "document_classifier", "--version", "1.1.0", "--config"])
        .arg(&intruder_yaml)
        .args(["--brokers", &brokers, "--topic-prefix", &prefix, "--operator", "intruder", "--timeout", "20"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the intruder's command was accepted: {said}");
    assert!(said.to_lowercase().contains("authoriz"), "the refusal names the authorisation failure: {said}");
    assert_eq!(count(&brokers, &cfg.topics.commands, &props), 0, "no command reached the topic");
    assert_eq!(count(&brokers, &cfg.topics.decisions, &props), 0, "no rollout started");

    let _ = stages.kill();
    let _ = stages.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("infer stage started"), "the log is the stages' log");
    for (who, pw) in [("pipeline", &pipeline_pw), ("intruder", &intruder_pw)] {
        assert!(!logged.contains(pw.as_str()) && !said.contains(pw.as_str()), "the {who} password appears in a log or output");
    }
}
