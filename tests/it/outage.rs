//! A broker outage longer than every session timeout: the broker of this test (its own, on its own
//! port, so the other tests keep theirs) is stopped for 30 s while documents flow and then started
//! again. Both stages, in one `run --stage all` process, must wait it out without a restart of their
//! own, and afterwards every document has a result and the windows count exactly what was published.

use std::{
    collections::BTreeSet,
    sync::atomic::AtomicBool,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::WireFormat,
    config::PipelineConfig,
    kafka,
    monitor::records::WindowMetrics,
    produce::{self, ProduceOptions, Source},
};

use crate::support::*;

/// This test's own broker.
struct Broker {
    port: u16,
}

impl Broker {
    fn cmd(&self, what: &str) {
        let out = Command::new(repo().join("scripts/kafka")).arg(what).env("KAFKA_PORT", self.port.to_string()).output().expect("scripts/kafka");
        assert!(out.status.success(), "scripts/kafka {what}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    /// Wipes the broker's data, except after a failure: then it is only stopped, so its log and
    /// data (`.kafka/*-PORT*`) can be read.
    fn drop(&mut self) {
        let what = if std::thread::panicking() { "stop" } else { "wipe" };
        let _ = Command::new(repo().join("scripts/kafka")).arg(what).env("KAFKA_PORT", self.port.to_string()).output();
    }
}

struct Stages(Child);

impl Drop for Stages {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_all_on(brokers: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = kafka::reader_config(brokers, &unique("outage-reader"), &Default::default()).create().unwrap();
    let cursor = kafka::RangeCursor::to_end(consumer, topic, |_, lo, _| lo, "test read").unwrap();
    let mut out = Vec::new();
    cursor
        .for_each(Duration::from_secs(30), |m| {
            out.push(m.detach());
            Ok::<(), kafka::KafkaError>(())
        })
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_for_30_s_is_waited_out_by_both_stages() {
    // a port of this process's own, away from the shared broker's
    let broker = Broker { port: 19_400 + (std::process::id() % 200) as u16 * 2 };
    broker.cmd("wipe");
    broker.cmd("start");
    let brokers = broker.address();

    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("{}.", unique("outage"));
    let mut cfg: PipelineConfig = repo_config();
    cfg.topics = cfg.topics.clone().with_prefix(&prefix);
    cfg.topics.partitions = 3;
    kafka::admin::ensure_topics(&brokers, &cfg).await.unwrap();
    let yaml = dir.path().join("pipeline.yaml");
    std::fs::write(
        &yaml,
        format!(
            "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 5000\n  allowed_lateness_ms: 0\n  idle_timeout_ms: 15000\n",
            repo().join("models/model_metadata.json").display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let log = std::env::temp_dir().join(format!("{}.log", unique("outage-stages")));
    let mut stages = Stages(
        Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
            .current_dir(repo())
            .args(["run", "--stage", "all", "--brokers", &brokers, "--topic-prefix", &prefix, "--group", &format!("{prefix}infer"), "--config"])
            .arg(&yaml)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let alive = |s: &mut Stages, when: &str| {
        if let Some(status) = s.0.try_wait().unwrap() {
            panic!("the stages exited {when} ({status}); log: {}", log.display());
        }
    };

    let n = 300u64;
    let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(20.0), progress: None, passthrough: Default::default(), producers: 1 };
    let producer = tokio::spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 404, start: 0, count: n, golden_fraction: 1.0, pool: None }).await });
    // both stages are at work before the outage: results are flowing and the monitor leads and has
    // closed a window
    let started = Instant::now();
    while read_all_on(&brokers, &cfg.topics.inference).len() < 40 || read_all_on(&brokers, &cfg.topics.metrics).is_empty() {
        alive(&mut stages, "before the outage");
        assert!(started.elapsed() < Duration::from_secs(120), "no results before the outage; log: {}", log.display());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    broker.cmd("stop");
    // the outage: 30 s, longer than the infer group's (10 s) and the monitor leadership's (6 s)
    // session timeouts; both stages must still be running all along
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        alive(&mut stages, "during the outage");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    broker.cmd("start");

    let summary = producer.await.unwrap().unwrap();
    assert_eq!((summary.sent, summary.failed), (n, 0), "the producer waited the outage out too");
    // every document the topic holds gets a result. What the topic holds is counted rather than
    // assumed: twice in about twenty runs the single test broker, stopped while the producer had
    // records in flight, acknowledged three records (idempotent producer, acks=all) that were not in
    // the partition after its restart; the stages cannot answer what the broker does not have.
    let keys = |msgs: &[rdkafka::message::OwnedMessage]| msgs.iter().filter_map(|m| rdkafka::message::Message::key(m).map(<[u8]>::to_vec)).collect::<BTreeSet<Vec<u8>>>();
    let documents = keys(&read_all_on(&brokers, &cfg.topics.documents));
    if documents.len() as u64 != n {
        eprintln!("the broker holds {} of the {n} documents it acknowledged (see the comment above)", documents.len());
    }
    let started = Instant::now();
    let results = loop {
        alive(&mut stages, "after the outage");
        let results = read_all_on(&brokers, &cfg.topics.inference);
        let answered = keys(&results);
        if answered.is_superset(&documents) {
            assert_eq!(answered, documents, "no result for a document the topic does not hold");
            break results;
        }
        let missing = documents.difference(&answered).count();
        assert!(started.elapsed() < Duration::from_secs(180), "{missing} of {} documents on the topic have no result 180 s after the outage; log: {}", documents.len(), log.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // a document well after the others closes their windows
    let opts = ProduceOptions { brokers: brokers.clone(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
    let gen = payslip_stream::synth::Generator::new(Default::default());
    let mut flush = gen.document(9_999).document;
    flush.document_id = "flush".into();
    flush.submitted_at = chrono::Utc::now().timestamp_millis() + 30_000;
    produce::produce(&opts, Source::Documents(vec![flush])).await.unwrap();
    let expected = results.len() as i64;
    let started = Instant::now();
    loop {
        alive(&mut stages, "while the windows close");
        let metrics: Vec<WindowMetrics> = read_all_on(&brokers, &cfg.topics.metrics)
            .iter()
            .filter_map(|m| payslip_stream::codec::decode(rdkafka::message::Message::payload(m)?, Some("application/avro")).ok())
            .collect();
        // a result whose window had closed (its partition went quiet during the recovery) is dropped
        // as late and counted: every published result is in exactly one of the two
        let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
        let late = metrics.iter().map(|m| m.dropped_late_total).max().unwrap_or(0);
        if total + late >= expected {
            assert_eq!(total + late, expected, "every published result counted once: {total} in windows, {late} too late");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "windows hold {total} (+{late} late) of {expected} results; log: {}", log.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(stages);
}

/// Start-up against an address where no broker listens fails, after the patience it is given, with
/// librdkafka's own reason and the settings to fix, instead of waiting silently for an admin request
/// to time out; where the broker runs it answers at once.
#[test]
fn an_address_without_a_broker_fails_start_up_with_the_reason_and_the_settings_to_fix() {
    // a port nothing listens on
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let e = kafka::admin::reach(&addr, &Default::default(), Duration::from_secs(2), &AtomicBool::new(false)).unwrap_err();
    let message = e.to_string();
    assert!(matches!(e, kafka::KafkaError::Unreachable { .. }), "{message}");
    assert!(message.contains(&format!("no broker at {addr} answered within 2 s")), "{message}");
    assert!(message.contains("Connection refused"), "the reason is librdkafka's: {message}");
    assert!(message.contains("--brokers, PAYSLIP_BROKERS or kafka.brokers"), "{message}");
    assert!(kafka::admin::reach(&brokers(), &Default::default(), Duration::from_secs(30), &AtomicBool::new(false)).expect("the test broker answers"));
}

/// SIGTERM to a process still waiting for its brokers ends it at once, cleanly and with nothing
/// started, instead of after the 30 s it would otherwise wait before failing. The process is
/// signalled once it has said that no broker answers (librdkafka's refusal, logged at once), and
/// must then exit 0 with the shutdown logged: giving up on the brokers instead would exit 1 and say
/// "answered within 30 s". Meanwhile the operations API answers: `/livez` 200, `/readyz` 503
/// saying what start-up waits for, `/health/litert` degraded with the same reason. Run twice: with
/// the plain log (no colour codes, since stderr is not a terminal) and with `PAYSLIP_LOG_FORMAT=json`
/// (one JSON object per line).
#[test]
fn sigterm_while_no_broker_answers_ends_start_up_cleanly() {
    use std::io::{BufRead, BufReader};
    for json in [false, true] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_payslip-stream"));
        cmd.current_dir(repo()).args(["run", "--stage", "infer", "--brokers", &addr, "--api-listen", "127.0.0.1:0"]).env("RUST_LOG", "info").env_remove("NO_COLOR").stdout(Stdio::null()).stderr(Stdio::piped());
        if json {
            cmd.env("PAYSLIP_LOG_FORMAT", "json");
        }
        let mut child = cmd.spawn().expect("spawn payslip-stream");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let waiting = line.contains("no broker answers yet");
            log.push(line);
            if waiting {
                break;
            }
        }
        assert!(log.last().is_some_and(|l| l.contains("no broker answers yet") && l.contains("Connection refused")), "the wait says why: {log:#?}");
        // the API printed its address before the wait began
        let api = log.iter().find_map(|l| l.split("operations API on http://").nth(1)).and_then(|rest| rest.split_whitespace().next()).unwrap_or_else(|| panic!("no API address: {log:#?}")).to_string();
        let get = |path: &str| match ureq::get(&format!("http://{api}{path}")).timeout(Duration::from_secs(10)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        };
        assert_eq!(get("/livez"), (200, "ok\n".to_string()));
        let (code, body) = get("/readyz");
        let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((code, &ready["ready"]), (503, &serde_json::Value::Bool(false)), "{body}");
        assert!(ready["waiting_for"].as_str().is_some_and(|w| w.contains(&addr) && w.contains("kafka.startup_wait_s")), "{body}");
        let (code, body) = get("/health/litert");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((code, health["status"].as_str()), (200, Some("degraded")), "{body}");
        assert!(health["reasons"].to_string().contains("waiting for a broker"), "{body}");
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        log.extend(lines.map(|l| l.unwrap()));
        let status = child.wait().unwrap();
        let text = log.join("\n");
        assert!(status.success(), "SIGTERM while waiting for the brokers exits 0, got {status}: {text}");
        assert!(text.contains("shutdown requested before the brokers answered"), "{text}");
        assert!(!text.contains("answered within"), "it stopped on the signal, not on giving up: {text}");
        assert!(!text.contains('\x1b'), "a log that is not on a terminal has no colour codes: {text:?}");
        if json {
            // the lines this test waited for among them: every line is one object with its message
            let messages: Vec<String> = log
                .iter()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"));
                    v["fields"]["message"].as_str().unwrap_or_else(|| panic!("no fields.message: {l}")).to_string()
                })
                .collect();
            assert!(messages.iter().any(|m| m == "no broker answers yet; waiting"), "{messages:?}");
        }
    }
}

/// A command given an address where no broker listens (`produce` here; `inspect`, `replay`,
/// `report` and `rollout` go through the same wait) exits with the reason and the settings to fix
/// after `kafka.startup_wait_s`, instead of hanging in its producer's retries while librdkafka logs
/// every refused connection.
#[test]
fn produce_to_an_address_without_a_broker_exits_with_the_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join("pipelines/payslip.yaml")).unwrap()).unwrap();
    cfg["kafka"]["startup_wait_s"] = 2.into();
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream")).current_dir(repo()).args(["produce", "--brokers", &addr, "--count", "5", "--config"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("no broker at {addr} answered within 2 s")) && err.contains("Connection refused") && err.contains("kafka.brokers"), "{err}");
    assert!(out.stdout.is_empty(), "no summary: nothing was produced");
}
