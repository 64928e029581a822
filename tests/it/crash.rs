//! Kill the infer process mid-stream with SIGKILL three times, restarting it each time, while the
//! monitor counts: every document has a result. Exactly once (the default), there is exactly one
//! result per document on the results topic; at least once, redelivered documents have two, and the
//! monitor's windows count every document once either way. Ends with SIGTERM, which must drain
//! and exit cleanly.

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

fn spawn_stage(config: &std::path::Path, prefix: &str, group: &str, instance: &str, log: &std::path::Path) -> Reaped {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Reaped(
        Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
            .current_dir(repo())
            .args(["run", "--stage", "infer", "--brokers", &brokers(), "--topic-prefix", prefix, "--group", group, "--instance-id", instance, "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn payslip-stream"),
    )
}

fn messages_on(topic: &str) -> i64 {
    let c: BaseConsumer = kafka::client_config(&brokers(), &Default::default()).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    md.topics()[0].partitions().iter().map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(5)).map(|(lo, hi)| hi - lo).unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_exactly_once_gives_one_result_per_document_and_exact_windows() {
    sigkill_three_times("exactly_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_at_least_once_duplicates_results_but_never_window_counts() {
    sigkill_three_times("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_killed_at_least_once_keeps_window_counts_exact() {
    kill_one_of_two("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_killed_exactly_once_gives_one_result_per_document() {
    kill_one_of_two("exactly_once").await;
}

/// Two infer processes share the group (instance ids a and b); a is killed for good mid-stream,
/// b takes its partitions over once the group drops it (the session timeout). Exactly once, the
/// transaction a left open holds read_committed readers until the broker aborts it after
/// kafka.transaction_timeout_ms, set to 10 s here (the default is the outage tolerance; see
/// src/infer/txn.rs); b then answers a's batch again.
async fn kill_one_of_two(guarantee: &str) {
    let run = Run::start(&format!("pair-{guarantee}"), guarantee, 2_000).await;
    let mut a = spawn_stage(&run.yaml, &run.prefix, &run.group, "a", &run.log);
    let mut b = spawn_stage(&run.yaml, &run.prefix, &run.group, "b", &run.log);
    run.wait_for_results(run.n as i64 / 3).await;
    a.kill().expect("SIGKILL");
    a.wait().unwrap();
    run.finish(&mut b, guarantee).await;
}

async fn sigkill_three_times(guarantee: &str) {
    let run = Run::start(&format!("crash-{guarantee}"), guarantee, 3_000).await;
    let mut child = spawn_stage(&run.yaml, &run.prefix, &run.group, "a", &run.log);
    // three kills, each once another quarter of the stream has results
    for k in 1..=3i64 {
        run.wait_for_results(k * run.n as i64 / 4).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        child = spawn_stage(&run.yaml, &run.prefix, &run.group, "a", &run.log);
    }
    run.finish(&mut child, guarantee).await;
}

/// For a failure message: each document without a result, where it is on the documents topic
/// (or that the broker does not have it) and whether it was dead-lettered.
fn where_are(ids: &BTreeSet<String>, counts: &BTreeMap<String, usize>, documents: &str, dlq: &str) -> String {
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let on_topic: BTreeMap<String, (i32, i64)> = read_all(documents)
        .iter()
        .filter_map(|r| payslip_stream::codec::decode::<payslip_stream::document::PayslipDocument>(&r.payload, r.header("content-type")).ok().map(|d| (d.document_id, (r.partition, r.offset))))
        .collect();
    let dead: BTreeSet<String> = read_all(dlq).iter().filter_map(|r| r.key.clone()).collect();
    let described: Vec<String> = missing
        .iter()
        .take(20)
        .map(|id| match on_topic.get(*id) {
            Some((p, o)) => format!("{id} at {documents}[{p}]@{o}{}", if dead.contains(*id) { " (dead-lettered)" } else { "" }),
            None => format!("{id} not on {documents}"),
        })
        .collect();
    format!("{} documents on {documents}; missing: {}", on_topic.len(), described.join(", "))
}

/// A stream of `n` documents at 300/s with the monitor counting, for infer processes the test starts.
struct Run {
    _dir: tempfile::TempDir,
    cfg: payslip_stream::config::PipelineConfig,
    prefix: String,
    group: String,
    yaml: std::path::PathBuf,
    log: std::path::PathBuf,
    n: u64,
    monitor: Option<RunningMonitor>,
    producer: Option<tokio::task::JoinHandle<Result<payslip_stream::produce::ProduceSummary, payslip_stream::produce::ProduceError>>>,
}

impl Run {
    async fn start(name: &str, guarantee: &str, n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, prefix) = monitor_config(name, dir.path()).await;
        // partitions stay active across a restart, so no result of a killed stage's partitions is
        // late: with one process killed for good, its partitions wait for the session timeout (10 s)
        // and, exactly once, for the broker to abort its open transaction (10 s) before the
        // survivor answers them, so 40 s leaves room for a loaded machine
        cfg.monitor.idle_timeout_ms = 40_000;
        let group = cfg.kafka.infer_group.clone();
        let yaml = dir.path().join("pipeline.yaml");
        std::fs::write(
            &yaml,
            format!(
                "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nkafka:\n  processing_guarantee: {guarantee}\n  transaction_timeout_ms: 10000\n",
                repo().join("models/model_metadata.json").display()
            ),
        )
        .unwrap();
        let log = std::env::temp_dir().join(format!("{}.log", unique("crash-stage")));
        let monitor = RunningMonitor::start(&cfg);
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(300.0), progress: None, passthrough: Default::default(), producers: 1 };
        let producer = tokio::spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 99, start: 0, count: n, golden_fraction: 1.0, pool: None }).await });
        Run { _dir: dir, cfg, prefix, group, yaml, log, n, monitor: Some(monitor), producer: Some(producer) }
    }

    async fn wait_for_results(&self, at_least: i64) {
        let started = Instant::now();
        loop {
            let c = messages_on(&self.cfg.topics.inference);
            if c >= at_least {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "only {c} results in 120 s; log: {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for every result and every window, checks the counts, and stops `last` with SIGTERM.
    async fn finish(mut self, last: &mut Child, guarantee: &str) {
        let (cfg, n, log) = (&self.cfg, self.n, &self.log);
        let gen = Generator::new(GeneratorConfig { seed: 99, ..Default::default() });
        let mut ids: BTreeSet<String> = (0..n).map(|i| gen.document(i).document.document_id).collect();
        let sent = self.producer.take().expect("producer").await.unwrap().expect("produce");
        assert_eq!(sent.sent, n);
        // a document well after the others closes every window of the stream
        let mut flush = gen.document(n + 1).document;
        flush.document_id = "flush".into();
        flush.submitted_at = chrono::Utc::now().timestamp_millis() + 60_000;
        ids.insert(flush.document_id.clone());
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
        produce::produce(&opts, Source::Documents(vec![flush])).await.unwrap();

        // every document has a result (read_committed, as every reader of the project)
        let topic = cfg.topics.inference.clone();
        let (documents, dlq) = (cfg.topics.documents.clone(), cfg.topics.documents_dlq.clone());
        let ids2 = ids.clone();
        let counts = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            loop {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for r in read_all(&topic) {
                    *counts.entry(r.result().document_id).or_default() += 1;
                }
                if ids2.iter().all(|id| counts.contains_key(id)) {
                    return counts;
                }
                if start.elapsed() > Duration::from_secs(240) {
                    panic!("after 240 s only {} of {} documents have results; {}", counts.len(), ids2.len(), where_are(&ids2, &counts, &documents, &dlq));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .await
        .unwrap();
        let got: BTreeSet<String> = counts.keys().cloned().collect();
        assert_eq!(got, ids, "every document has a result and no result names an unknown document");
        let total: usize = counts.values().sum();
        let duplicates = (total - ids.len()) as u64;
        println!("{guarantee}: {} documents, {total} results after the kills", ids.len());
        if guarantee == "exactly_once" {
            assert_eq!(duplicates, 0, "exactly once: one result per document");
        }

        // the windows count each document once
        let started = Instant::now();
        loop {
            let metrics: Vec<payslip_stream::monitor::records::WindowMetrics> =
                read_all(&cfg.topics.metrics).iter().filter_map(|r| payslip_stream::codec::decode(&r.payload, r.header("content-type")).ok()).collect();
            let counted: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
            let late = metrics.iter().map(|m| m.dropped_late_total).max().unwrap_or(0);
            // every window but the flush document's has closed
            if counted + late >= n as i64 {
                assert_eq!((counted, late), (n as i64, 0), "every document counted once, none late");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "windows hold {counted} (+{late} late) of {n} documents");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let summary = self.monitor.take().expect("monitor").stop().await;
        assert_eq!(summary.duplicates_ignored, duplicates, "every duplicate result recognised by its id");

        // graceful stop: SIGTERM drains and exits 0
        let pid = last.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = last.wait().unwrap();
        assert!(status.success(), "SIGTERM must drain and exit cleanly, got {status}; log: {}", log.display());
    }
}

/// Exactly once, an aborted transaction is read and answered again: documents marked
/// `fault-txn-abort` abort the first transaction that holds them (after its records and offsets
/// were sent, before the commit). Every document has exactly one result, every bad message exactly
/// one dead letter, although their batches were processed twice; some documents are already in the
/// consumer's queue when the abort comes, others arrive afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_processed_again_with_one_answer_per_message() {
    aborted_transactions("txn-abort", 0).await;
}

/// The same with `kafka.commit_interval_ms`: a busy stage commits several batches in one
/// transaction, so an abort rolls back and re-reads every batch of it; still every document has
/// exactly one result and every bad message one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_commit_interval_aborted_transactions_of_several_batches_are_processed_again_with_one_answer_per_message() {
    aborted_transactions("txn-abort-interval", 2_000).await;
}

/// With `kafka.commit_interval_ms`, a backlog (fetched ahead, so the stage stays busy) is committed
/// in a few transactions of several batches each, with exactly one result per document. The
/// interval is long so that this holds however slowly the machine runs the batches: with 5 s, a run
/// beside the kill -9 tests took longer than that for three batches, and all 10 of its batches were
/// full (so the queue never ran dry) yet went in 4 transactions. The test does not wait for the
/// interval: the stage commits the last transaction as soon as it is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_interval_commits_a_backlog_in_few_transactions_with_one_result_per_document() {
    let mut cfg = isolated_config("txn-interval").await;
    cfg.kafka.commit_interval_ms = 60_000;
    // the backlog (7 MB) comes in one fetch, so the stage never finds its queue empty between
    // fetches: with librdkafka's 1 MB per partition and fetch, a loaded CI machine saw the queue run
    // dry between rounds, the stage commit as idle, and 10 batches go in 4 transactions
    cfg.kafka.librdkafka.insert("max.partition.fetch.bytes".into(), "16777216".into());
    let registry = load_registry(&cfg);
    let gen = Generator::new(GeneratorConfig { seed: 8, ..Default::default() });
    let n = 320u64;
    let ct = [("content-type", "application/avro")];
    produce_raw(&cfg.topics.documents, (0..n).map(|i| (format!("k{}", i % 7), payslip_stream::codec::encode(&gen.document(i).document, WireFormat::Avro).unwrap(), ct.to_vec())).collect()).await;
    let stage = RunningStage::start(&cfg, registry);
    let t = cfg.topics.inference.clone();
    let results = tokio::task::spawn_blocking(move || read_topic(&t, n as usize, Duration::from_secs(120), Duration::from_secs(2))).await.unwrap();
    let summary = stage.stop().await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        *counts.entry(r.result().document_id).or_default() += 1;
    }
    let expected: BTreeSet<String> = (0..n).map(|i| gen.document(i).document.document_id).collect();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), expected, "every document answered");
    assert!(counts.values().all(|&c| c == 1), "one result per document");
    assert_eq!(summary.results, n);
    assert!(summary.batches >= n / cfg.batching.max_batch as u64, "{summary:?}");
    assert!(summary.transactions_committed >= 1 && summary.transactions_committed * 3 <= summary.batches, "at least three batches per transaction on average: {summary:?}");
}

/// A batch that finishes while the one before it is still being published does not end the
/// collection of the next batch early: the stage takes the documents already fetched and keeps its
/// transaction open. Three batches of a one-partition backlog take 300 ms each (`fault-delay-ms`),
/// so the batch after each is done before the slow one is published. Before the fix, collection then
/// ended with nothing and the stage committed "as if idle" after each slow batch: four transactions
/// or more for this backlog instead of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_done_during_the_previous_publish_does_not_commit_as_if_idle() {
    let (mut cfg, _) = isolated_config_prepared("txn-not-idle", |c| c.topics.partitions = 1).await;
    cfg.kafka.commit_interval_ms = 60_000;
    cfg.kafka.librdkafka.insert("max.partition.fetch.bytes".into(), "16777216".into());
    cfg.faults.enabled = true;
    let registry = load_registry(&cfg);
    let gen = Generator::new(GeneratorConfig { seed: 9, ..Default::default() });
    let n = 320u64;
    // one partition: batches of 32 in offset order, the marked documents in batches 2, 4 and 7
    let slow = [40u64, 120, 200];
    produce_raw(
        &cfg.topics.documents,
        (0..n)
            .map(|i| {
                let mut headers = vec![("content-type", "application/avro")];
                if slow.contains(&i) {
                    headers.push(("fault-delay-ms", "300"));
                }
                (format!("k{i}"), payslip_stream::codec::encode(&gen.document(i).document, WireFormat::Avro).unwrap(), headers)
            })
            .collect(),
    )
    .await;
    let stage = RunningStage::start(&cfg, registry);
    let t = cfg.topics.inference.clone();
    let results = tokio::task::spawn_blocking(move || read_topic(&t, n as usize, Duration::from_secs(120), Duration::from_secs(2))).await.unwrap();
    let summary = stage.stop().await;
    let ids: BTreeSet<String> = results.iter().map(|r| r.result().document_id).collect();
    assert_eq!((results.len(), ids.len(), summary.results), (n as usize, n as usize, n), "one result per document: {summary:?}");
    assert!(summary.batches >= n / cfg.batching.max_batch as u64, "{summary:?}");
    assert!(summary.transactions_committed <= 2, "a backlog fetched at once goes in one transaction (two if the queue ran dry once), not one per slow batch: {summary:?}");
}

async fn aborted_transactions(name: &str, commit_interval_ms: u64) {
    let mut cfg = isolated_config(name).await;
    cfg.kafka.commit_interval_ms = commit_interval_ms;
    cfg.faults.enabled = true;
    let registry = load_registry(&cfg);
    let gen = Generator::new(GeneratorConfig { seed: 7, ..Default::default() });
    let (n, every) = (240u64, 40u64);
    let message = |i: u64| {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/avro")];
        if i % every == every / 2 {
            headers.push(("fault-txn-abort", "1"));
        }
        // two of the marked messages are not documents: their dead letters are aborted too
        let payload = if i == every / 2 || i == 4 * every + every / 2 { b"not avro".to_vec() } else { payslip_stream::codec::encode(&gen.document(i).document, WireFormat::Avro).unwrap() };
        (format!("k{}", i % 5), payload, headers)
    };
    // half waits in the topic before the stage starts (whole batches in the consumer's queue),
    // half arrives while it runs
    produce_raw(&cfg.topics.documents, (0..n / 2).map(message).collect()).await;
    let stage = RunningStage::start(&cfg, registry);
    produce_raw(&cfg.topics.documents, (n / 2..n).map(message).collect()).await;

    let (t, dlq) = (cfg.topics.inference.clone(), cfg.topics.documents_dlq.clone());
    let results = tokio::task::spawn_blocking(move || read_topic(&t, n as usize - 2, Duration::from_secs(120), Duration::from_secs(2))).await.unwrap();
    let summary = stage.stop().await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        *counts.entry(r.result().document_id).or_default() += 1;
    }
    let expected: BTreeSet<String> = (0..n).filter(|&i| i != every / 2 && i != 4 * every + every / 2).map(|i| gen.document(i).document.document_id).collect();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), expected, "every document answered");
    assert!(counts.values().all(|&c| c == 1), "one result per document: {:?}", counts.iter().filter(|(_, &c)| c > 1).collect::<Vec<_>>());
    assert_eq!(read_all(&dlq).len(), 2, "one dead letter per bad message");
    let marked = n / every;
    assert!((1..=marked).contains(&summary.transactions_aborted), "{} transactions aborted for {marked} marked messages", summary.transactions_aborted);
    assert_eq!(summary.results, n - 2, "the stage counts committed results only");
    assert_eq!(summary.dead_letters, 2, "and committed dead letters only, each once (their aborted attempts are not counted)");
}
