//! Monitor stage against the real broker and a real RocksDB: injected conditions raise and resolve
//! the runbook's alerts; feedback joins predictions; kill -9 and checkpoint/restore keep totals exact.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    alert::AlertEvent,
    codec,
    document::{DocumentFeedback, InferenceResult, ModelOutput},
    inference::codes,
    kafka::headers as h,
    monitor::records::WindowMetrics,
};

use crate::support::*;

/// An hour ago (event times from outside must lie within limits.max_past_ms / max_future_ms of
/// now), aligned to the 10 s test windows.
static BASE: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| (chrono::Utc::now().timestamp_millis() - 3_600_000) / 60_000 * 60_000);
const W: i64 = 10_000;

fn output(model: &str, version: &str, latency_ms: f64, error: Option<&str>, label: Option<&str>) -> ModelOutput {
    ModelOutput {
        model: model.into(),
        version: version.into(),
        provider: "CPUExecutionProvider".into(),
        latency_ms,
        batch_size: 1,
        error_code: error.map(str::to_string),
        label: label.map(str::to_string),
        confidence: None,
        regions: vec![],
        lines: vec![],
        load_ms: Some(40.0),
    }
}

fn result(id: &str, ts: i64, cohort: &str, truth: Option<&str>, outputs: Vec<ModelOutput>) -> InferenceResult {
    let error_code = outputs.iter().find_map(|o| o.error_code.clone());
    InferenceResult {
        result_id: InferenceResult::id_for(id),
        document_id: id.into(),
        user_id: "u".into(),
        tenant: "t".into(),
        cohort: cohort.into(),
        submitted_at: ts,
        processed_at: ts + 60,
        provider: "CPUExecutionProvider".into(),
        model_versions: Default::default(),
        inference_ms: outputs.iter().map(|o| o.latency_ms).sum(),
        outputs,
        end_to_end_ms: 60.0,
        error_code,
        true_format: truth.map(str::to_string),
        source: "test".into(),
        process_rss_bytes: Some(100 * 1_048_576),
        process_cpu_percent: None,
    }
}

fn feedback(doc: &str, at: i64, rating: i32) -> DocumentFeedback {
    DocumentFeedback { document_id: doc.into(), user_id: "u".into(), given_at: at, corrected_format: None, corrected_net_pay: None, rating: Some(rating) }
}

fn alerts_of(reads: &[Read]) -> Vec<AlertEvent> {
    reads.iter().map(|r| codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).unwrap()).collect()
}

fn metrics_of(reads: &[Read]) -> Vec<WindowMetrics> {
    reads.iter().map(|r| codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).unwrap()).collect()
}

/// Waits until `topic` holds `n` messages (and a little longer), returns them.
async fn wait_for(topic: &str, n: usize, secs: u64) -> Vec<Read> {
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic(&t, n, Duration::from_secs(secs), Duration::from_secs(2))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_conditions_raise_and_resolve_the_right_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = monitor_config("alerts", dir.path()).await;
    let mut results = Vec::new();
    let mut ratings = Vec::new();
    for w in 0..7i64 {
        for i in 0..30i64 {
            let ts = *BASE + w * W + i * 300;
            let id = format!("doc-{w}-{i}");
            // classifier 1.0.0: slow in windows 2-3 (warning), very slow in 4 (critical)
            let lat = match w { 2 | 3 => 800.0, 4 => 3000.0, _ => 5.0 };
            // table_detection: 4/30 errors in window 1 (critical), 2/30 in window 2 (warning)
            let table_err = (w == 1 && i < 4) || (w == 2 && i < 2);
            // text_recognition: refused at load during window 3
            let text_err = if w == 3 { Some(codes::MODEL_UNAVAILABLE) } else { None };
            results.push(result(&id, ts, "baseline", None, vec![
                output("document_classifier", "1.0.0", lat, None, Some("ARMY")),
                output("table_detection", "1.0.0", 5.0, table_err.then_some(codes::INFERENCE_FAILED), None),
                output("text_recognition", "1.0.0", 5.0, text_err, None),
            ]));
            // the degraded candidate misreads half of the PCDA payslips in windows 1-2
            let wrong = (w == 1 || w == 2) && i % 2 == 0;
            results.push(result(&format!("canary-{w}-{i}"), ts, "canary", Some("PCDA"), vec![
                output("document_classifier", "1.1.1-degraded", 5.0, None, Some(if wrong { "ARMY" } else { "PCDA" })),
            ]));
            // unhappy users in window 2, happy in window 3
            if (w == 2 || w == 3) && i < 20 {
                ratings.push(feedback(&id, ts + 100, if w == 2 && i % 2 == 0 { 1 } else { 5 }));
            }
        }
    }
    let n_results = results.len();
    results.push(result("flush", *BASE + 10 * W, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("ARMY"))]));
    produce_records(&cfg.topics.inference, "k", &results).await;
    produce_records(&cfg.topics.feedback, "k", &ratings).await;

    let monitor = RunningMonitor::start(&cfg);
    let expected: Vec<(&str, &str, &str, i64)> = vec![
        ("document_classifier/1.0.0/baseline", "PERFORMANCE_WARNING", "FIRING", 2),
        ("document_classifier/1.0.0/baseline", "PERFORMANCE_WARNING", "RESOLVED", 4),
        ("document_classifier/1.0.0/baseline", "PERFORMANCE_CRITICAL", "FIRING", 4),
        ("document_classifier/1.0.0/baseline", "PERFORMANCE_CRITICAL", "RESOLVED", 5),
        ("document_classifier/1.0.0/baseline", "USER_SATISFACTION_CRITICAL", "FIRING", 2),
        ("document_classifier/1.0.0/baseline", "USER_SATISFACTION_CRITICAL", "RESOLVED", 3),
        ("document_classifier/1.1.1-degraded/canary", "PCDA_ACCURACY_WARNING", "FIRING", 1),
        ("document_classifier/1.1.1-degraded/canary", "PCDA_ACCURACY_WARNING", "RESOLVED", 3),
        ("table_detection/1.0.0/baseline", "ERROR_RATE_CRITICAL", "FIRING", 1),
        ("table_detection/1.0.0/baseline", "ERROR_RATE_CRITICAL", "RESOLVED", 2),
        ("table_detection/1.0.0/baseline", "ERROR_RATE_WARNING", "FIRING", 2),
        ("table_detection/1.0.0/baseline", "ERROR_RATE_WARNING", "RESOLVED", 3),
        ("text_recognition/1.0.0/baseline", "MODEL_CRITICAL", "FIRING", 3),
        ("text_recognition/1.0.0/baseline", "MODEL_CRITICAL", "RESOLVED", 4),
    ];
    // + 3 MODEL_UPDATE_AVAILABLE (1.1.0 candidates) + USER_FEEDBACK for windows 2 and 3
    let events = alerts_of(&wait_for(&cfg.topics.alerts, expected.len() + 5, 90).await);
    let metrics = metrics_of(&wait_for(&cfg.topics.metrics, 1, 30).await);
    let summary = monitor.stop().await;
    let (infos, alerts): (Vec<AlertEvent>, Vec<AlertEvent>) = events.into_iter().partition(|a| a.status == "INFO");
    let mut info: Vec<(String, String, i64)> = infos.iter().map(|a| (a.code.clone(), a.model.clone(), if a.code == "USER_FEEDBACK" { (a.window_start - *BASE) / W } else { -1 })).collect();
    info.sort();
    assert_eq!(
        info,
        vec![
            ("MODEL_UPDATE_AVAILABLE".into(), "document_classifier".into(), -1),
            ("MODEL_UPDATE_AVAILABLE".into(), "table_detection".into(), -1),
            ("MODEL_UPDATE_AVAILABLE".into(), "text_recognition".into(), -1),
            ("USER_FEEDBACK".into(), "document_classifier".into(), 2),
            ("USER_FEEDBACK".into(), "document_classifier".into(), 3),
        ]
    );

    let mut got: Vec<(String, String, String, i64)> =
        alerts.iter().map(|a| (format!("{}/{}/{}", a.model, a.version, a.cohort), a.code.clone(), a.status.clone(), (a.window_start - *BASE) / W)).collect();
    got.sort();
    let mut want: Vec<(String, String, String, i64)> = expected.iter().map(|(s, c, st, w)| (s.to_string(), c.to_string(), st.to_string(), *w)).collect();
    want.sort();
    assert_eq!(got, want);
    // each episode: FIRING and RESOLVED share an id, ids differ between episodes
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in &alerts {
        by_id.entry(&a.alert_id).or_default().push(&a.status);
        assert!(!a.action.is_empty() && a.samples > 0 && a.value.is_finite());
    }
    assert_eq!(by_id.len(), expected.len() / 2);
    assert!(by_id.values().all(|v| v.len() == 2));
    // windows 0-6 closed for the pipeline, with every result counted once
    let pipeline: Vec<&WindowMetrics> = metrics.iter().filter(|m| m.model == "pipeline").collect();
    assert_eq!(pipeline.iter().map(|m| m.count).sum::<i64>() as usize, n_results);
    assert_eq!(pipeline.len(), 7);
    let w2 = metrics.iter().find(|m| m.model == "document_classifier" && m.version == "1.0.0" && m.window_start == *BASE + 2 * W).unwrap();
    assert_eq!((w2.count, w2.ratings, w2.satisfaction), (30, 20, Some(0.5)));
    assert!((w2.latency_p95_ms.unwrap() - 800.0).abs() < 1.0, "{:?}", w2.latency_p95_ms);
    // the counters by code and state (what /metrics shows) agree with the events published
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    for a in alerts.iter().chain(&infos) {
        *by_code.entry(format!("{}|{}", a.code, a.status)).or_default() += 1;
    }
    assert_eq!(summary.alert_events, by_code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_joins_its_prediction_and_late_or_orphan_feedback_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("feedback", dir.path()).await;
    cfg.monitor.prediction_retention_ms = 35_000;
    let (monitor, view) = RunningMonitor::start_with_view(&cfg);
    let mk = |id: &str, ts: i64| result(id, ts, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    produce_records(&cfg.topics.inference, "k", &[mk("a", *BASE + 1_000), mk("b", *BASE + 2_000), mk("tick", *BASE + 3 * W)]).await;
    let mut fa = feedback("a", *BASE + W + 500, 5);
    fa.corrected_format = Some("PCDA".into());
    let mut fb = feedback("b", *BASE + W + 600, 2);
    fb.corrected_format = Some("NAVY".into());
    produce_records(&cfg.topics.feedback, "k", &[fa, fb, feedback("nobody", *BASE + W + 700, 5)]).await;
    // windows 0-2 close (after the idle timeout lets the feedback partition go):
    // pipeline w0, classifier w0, classifier w1 (opened by feedback)
    wait_for(&cfg.topics.metrics, 3, 60).await;
    // late: window 0 has closed
    produce_records(&cfg.topics.feedback, "k", &[feedback("a", *BASE + 900, 1)]).await;
    // the late feedback is counted before the next window closes, so that window's running total shows it
    wait_view(&view, "the late feedback was not counted", |v| v.counters.dropped_late == 1).await;
    produce_records(&cfg.topics.inference, "k", &[mk("tick2", *BASE + 5 * W)]).await;
    let metrics = metrics_of(&wait_for(&cfg.topics.metrics, 5, 60).await);
    let summary = monitor.stop().await;
    // the view shares the state store; the store is opened again below
    drop(view);

    let w1 = metrics.iter().find(|m| m.model == "document_classifier" && m.window_start == *BASE + W).expect("feedback opened window 1 of the predicting model");
    assert_eq!((w1.count, w1.ratings, w1.labelled), (0, 2, 2));
    assert_eq!(w1.satisfaction, Some(0.5));
    assert_eq!(w1.accuracy, Some(0.5), "a was PCDA (right), b was NAVY (predicted PCDA)");
    assert_eq!(summary.feedback_orphans, 1);
    assert_eq!(summary.dropped_late, 1);
    assert_eq!(summary.feedback_applied, 2);
    let last = metrics.iter().filter(|m| m.model == "pipeline").max_by_key(|m| m.window_start).unwrap();
    assert_eq!((last.feedback_orphan_total, last.dropped_late_total), (1, 1));
    // retention 35 s of event time, watermark at 50 s: a and b (1-2 s) are gone, tick and tick2 stay
    let store = payslip_stream::state::RocksStateStore::open(dir.path()).unwrap();
    let kept: Vec<String> = store.scan_raw(payslip_stream::state::CF_PREDICTIONS).unwrap().into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect();
    assert_eq!(kept, vec!["tick", "tick2"]);
    assert_eq!(store.scan_raw(payslip_stream::state::CF_PREDICTION_EXPIRY).unwrap().len(), 2);
}

fn write_monitor_yaml(dir: &std::path::Path, state: &std::path::Path) -> std::path::PathBuf {
    let yaml = format!(
        "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0'}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 1000\n  allowed_lateness_ms: 0\n  idle_timeout_ms: 3000\n  max_batch: 50\n",
        repo().join("models/model_metadata.json").display(),
        state.display()
    );
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// Waits until the pipeline snapshots on `topic` count at least `n` results. Snapshots of one
/// batch land on several partitions, so a late window can be visible before an earlier one.
/// Results counted in the pipeline's windows on the metrics topic `topic`.
fn pipeline_total(topic: &str) -> i64 {
    metrics_of(&read_all(topic)).iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum()
}

async fn wait_for_pipeline_total(topic: &str, n: i64) {
    let started = Instant::now();
    loop {
        let total = pipeline_total(topic);
        if total >= n {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(150), "window totals reached only {total} of {n}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Produces `results` 100 at a time every 200 ms, so a process can be killed mid-stream.
async fn trickle(topic: String, results: Vec<InferenceResult>) {
    for chunk in results.chunks(100) {
        produce_records(&topic, "k", chunk).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A result 200 s after the streams' base time: it closes every window of [`stream`] (up to 200
/// windows of a second) while its own stays open.
fn tick() -> InferenceResult {
    let mut tick = stream(1, 1).remove(0);
    tick.document_id = "tick".into();
    tick.submitted_at = *BASE + 200_000;
    tick
}

/// Results over 80 one-second windows; every fifth window has 20 % errors (alerts fire and resolve).
fn stream(n_windows: i64, per_window: i64) -> Vec<InferenceResult> {
    let mut v = Vec::new();
    for w in 0..n_windows {
        for i in 0..per_window {
            let err = w % 5 == 2 && i < per_window / 5;
            v.push(result(&format!("d-{w}-{i}"), *BASE + w * 1000 + i, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, err.then_some(codes::INFERENCE_FAILED), Some("ARMY"))]));
        }
    }
    v
}

/// Waits until `f` holds for the view, or fails with `what`.
async fn wait_view(view: &payslip_stream::monitor::view::ViewHandle, what: &str, f: impl Fn(&payslip_stream::monitor::view::MonitorView) -> bool) -> payslip_stream::monitor::view::MonitorView {
    let started = Instant::now();
    loop {
        let v = view.get();
        if f(&v) {
            return v;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "{what}: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Results `from..from+n` (100 ms apart from `t0`) and a tick `far` ahead that closes their windows.
fn phase(tag: &str, n: i64, t0: i64, tick_at: i64) -> Vec<InferenceResult> {
    let mut v: Vec<InferenceResult> = (0..n).map(|i| result(&format!("{tag}-{i}"), t0 + i * 100, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("ARMY"))])).collect();
    v.push(result(&format!("{tag}-tick"), tick_at, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("ARMY"))]));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_tails_the_changelog_and_takes_over_replaying_nothing_while_a_cold_one_replays_everything() {
    use payslip_stream::monitor::view::Role;
    let (dir_a, dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cfg, _) = monitor_config("warm", dir_a.path()).await;
    let at = |dir: &tempfile::TempDir, replicas: u32| {
        let mut c = cfg.clone();
        c.monitor.state_dir = dir.path().to_path_buf();
        c.monitor.standby_replicas = replicas;
        c
    };
    let (a, view_a) = RunningMonitor::start_with_view(&at(&dir_a, 1));
    let v = wait_view(&view_a, "the first monitor did not lead", |v| v.role == Role::Leader).await;
    assert_eq!(v.leads_partitions, vec![0], "the one closing partition: {v:?}");
    let (b, view_b) = RunningMonitor::start_with_view(&at(&dir_b, 1));
    wait_view(&view_b, "the second monitor did not wait as a standby", |v| v.role == Role::Standby).await;

    // phase 1: two 10 s windows closed by a tick in a later one, all while b tails
    let w = 10_000;
    let p1 = phase("one", 150, *BASE, *BASE + 5 * w);
    produce_records(&cfg.topics.inference, "k", &p1).await;
    wait_for_pipeline_total(&cfg.topics.metrics, 150).await;
    // the leader has written everything (its last write, the outbox cleanup, follows the
    // publication) and the standby has applied all of it
    let mut last = None;
    let settling = Instant::now();
    let settled = loop {
        assert!(settling.elapsed() < Duration::from_secs(90), "the leader's changelog did not settle with the standby level with it");
        let (pa, pb) = (view_a.get().changelog.unwrap(), view_b.get().changelog.unwrap());
        if pa.applied_offset == pb.applied_offset && last == Some(pa.applied_offset) {
            break pb;
        }
        last = (pa.applied_offset == pb.applied_offset).then_some(pa.applied_offset);
        wait_view(&view_b, "the standby did not catch up", |v| v.changelog.is_some_and(|p| p.applied_offset >= pa.applied_offset)).await;
        // the next look, half a second on, must see the same offset on both sides
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(settled.warm && settled.records_applied > 0, "the standby applied the changelog while waiting: {settled:?}");
    assert_eq!(settled.lag(), Some(0), "{settled:?}");
    let summary_a = a.stop().await;
    assert_eq!(summary_a.results_applied, 151);

    let v = wait_view(&view_b, "the warm standby did not take over", |v| v.role == Role::Leader && v.changelog.is_some_and(|p| p.last_takeover_ms.is_some())).await;
    let p = v.changelog.unwrap();
    assert_eq!(p.last_takeover_records, Some(0), "a caught-up warm standby replays nothing: {p:?}");
    assert!(v.changelog.unwrap().warm);
    wait_view(&view_b, "the standby's state did not hold the leader's counters", |v| v.counters.results_applied == 151).await;

    // phase 2 on b; then c joins cold and reads nothing while it waits
    let p2 = phase("two", 100, *BASE + 5 * w + 100, *BASE + 9 * w);
    produce_records(&cfg.topics.inference, "k", &p2).await;
    wait_for_pipeline_total(&cfg.topics.metrics, 150 + 1 + 100).await;
    let (c, view_c) = RunningMonitor::start_with_view(&at(&dir_c, 0));
    let waiting = wait_view(&view_c, "the third monitor did not wait as a standby", |v| v.role == Role::Standby).await;
    let written = view_b.get().changelog.unwrap().applied_offset;
    assert!(!waiting.changelog.unwrap().warm);
    let summary_b = b.stop().await;
    assert_eq!(summary_b.results_applied, 151 + 101);
    // the changelog carries the predictions, not their expiry index: each copy derives it
    let index_of = |dir: &tempfile::TempDir| {
        let store = payslip_stream::state::RocksStateStore::open(dir.path()).unwrap();
        let count = |cf| store.scan_raw(cf).unwrap().len();
        (count(payslip_stream::state::CF_PREDICTIONS), count(payslip_stream::state::CF_PREDICTION_EXPIRY))
    };
    // (the view holds the store open for live checkpoints)
    let b_view = view_b.get();
    drop(view_b);
    assert_eq!(index_of(&dir_b), (252, 252), "the warm copy's predictions and their expiry index: {b_view:?}");

    let v = wait_view(&view_c, "the cold standby did not take over", |v| v.role == Role::Leader && v.changelog.is_some_and(|p| p.last_takeover_ms.is_some())).await;
    let p = v.changelog.unwrap();
    let replayed = p.last_takeover_records.unwrap();
    assert!(replayed > 0 && replayed == p.records_applied, "a cold standby replays the changelog when it takes over: {p:?}");
    assert!(p.applied_offset >= written, "{p:?} (b wrote up to {written})");

    // phase 3 on c: the totals over all three leaders are exact, and nothing was published twice
    let p3 = phase("three", 50, *BASE + 9 * w + 100, *BASE + 14 * w);
    produce_records(&cfg.topics.inference, "k", &p3).await;
    wait_for_pipeline_total(&cfg.topics.metrics, 150 + 1 + 100 + 1 + 50).await;
    let summary_c = c.stop().await;
    assert_eq!(summary_c.results_applied, 151 + 101 + 51);
    drop(view_c);
    assert_eq!(index_of(&dir_c), (303, 303), "the cold copy's predictions and their expiry index");
    let metrics = metrics_of(&read_all(&cfg.topics.metrics));
    let ids: BTreeSet<&String> = metrics.iter().map(|m| &m.metrics_id).collect();
    assert_eq!(ids.len(), metrics.len(), "a window snapshot was published twice");
    let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
    assert_eq!(total, 150 + 1 + 100 + 1 + 50, "every window closed exactly once across two takeovers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keeps_window_totals_exact_without_duplicate_events() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, prefix) = monitor_config("monitor-crash", &dir.path().join("state")).await;
    let yaml = write_monitor_yaml(dir.path(), &dir.path().join("state"));
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
            .args(["run", "--stage", "monitor", "--config"])
            .arg(&yaml)
            .args(["--brokers", &brokers(), "--topic-prefix", &prefix])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Reaped)
            .unwrap()
    };
    let mut results = stream(80, 40);
    let n = results.len() as i64;
    results.push(stream(1, 1).remove(0));
    results.last_mut().unwrap().submitted_at = *BASE + 200_000; // closes window 79; its own stays open
    let mut child = spawn();
    let producer = tokio::spawn(trickle(cfg.topics.inference.clone(), results));
    let started = Instant::now();
    loop {
        let c = read_all(&cfg.topics.metrics).len();
        if c >= 10 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "monitor published only {c} window snapshots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    producer.await.unwrap();
    let mut child = spawn();
    // the last window closes once the input is idle
    wait_for_pipeline_total(&cfg.topics.metrics, n).await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(child.wait().unwrap().success());
    // everything published, read once more after the process stopped
    let metrics = metrics_of(&read_all(&cfg.topics.metrics));

    let ids: Vec<&String> = metrics.iter().map(|m| &m.metrics_id).collect();
    let unique: BTreeSet<&String> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "a window snapshot was published twice");
    let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
    assert_eq!(total, n, "window totals equal the input exactly");
    let alerts = alerts_of(&read_all(&cfg.topics.alerts));
    let keys: Vec<(String, String)> = alerts.iter().map(|a| (a.alert_id.clone(), a.status.clone())).collect();
    let ukeys: BTreeSet<&(String, String)> = keys.iter().collect();
    assert_eq!(keys.len(), ukeys.len(), "an alert event was published twice");
    // 16 error windows: each fires and resolves one ERROR_RATE_CRITICAL episode
    assert_eq!(alerts.iter().filter(|a| a.code == "ERROR_RATE_CRITICAL").count(), 32);
    // announced once, although the process started twice
    assert_eq!(alerts.iter().filter(|a| a.code == "MODEL_UPDATE_AVAILABLE").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_wipe_restore_then_continue_with_identical_totals() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut cfg, _) = monitor_config("checkpoint", &state).await;
    cfg.monitor.window_size_ms = 1000;
    let mut all = stream(20, 30);
    let mut second = all.split_off(300); // windows 0-9 | 10-19
    let mut flush = stream(1, 1).remove(0);
    flush.submitted_at = *BASE + 100_000; // closes window 19; its own stays open
    flush.document_id = "flush".into();
    let first_n = all.len();
    let monitor = RunningMonitor::start(&cfg);
    produce_records(&cfg.topics.inference, "k", &all).await;
    // windows 0..8 close while 9 stays open (its successor has not been seen)
    wait_for(&cfg.topics.metrics, 9, 60).await;
    monitor.stop().await;

    let cp = dir.path().join("checkpoint");
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["state", "checkpoint", "--config"])
        .arg(write_monitor_yaml(dir.path(), &state))
        .arg("--to")
        .arg(&cp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream")).args(["state", "verify"]).arg(&cp).output().unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["offsets"].as_object().unwrap().values().filter_map(|v| v.as_i64()).sum::<i64>(), first_n as i64);
    std::fs::remove_dir_all(&state).unwrap();
    payslip_stream::state::restore(&cp, &state).unwrap();

    let monitor = RunningMonitor::start(&cfg);
    let second_n = second.len();
    second.push(flush);
    produce_records(&cfg.topics.inference, "k", &second).await;
    // 20 windows x (pipeline + classifier)
    let metrics = metrics_of(&wait_for(&cfg.topics.metrics, 40, 60).await);
    let summary = monitor.stop().await;
    assert_eq!(metrics.len(), 40);
    let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
    assert_eq!(total as usize, first_n + second_n);
    assert_eq!(summary.results_applied as usize, first_n + second_n + 1);
    let ids: BTreeSet<&String> = metrics.iter().map(|m| &m.metrics_id).collect();
    assert_eq!(ids.len(), metrics.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cfg, prefix) = monitor_config("takeover", &dir_a.path().join("state")).await;
    let spawn = |dir: &std::path::Path| spawn_logged(dir, &write_monitor_yaml(dir, &dir.join("state")), &["--topic-prefix", &prefix]);
    let mut a = spawn(dir_a.path());
    let mut b = spawn(dir_b.path());
    let leads = |dir: &std::path::Path| std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default().contains("monitor leads");
    let started = Instant::now();
    while !leads(dir_a.path()) && !leads(dir_b.path()) {
        assert!(started.elapsed() < Duration::from_secs(60), "no monitor became leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_leads = leads(dir_a.path());
    let (leader, standby, standby_dir) = if a_leads { (&mut a, &mut b, dir_b.path()) } else { (&mut b, &mut a, dir_a.path()) };

    // every result also carries a table-detection output, so that each of three closing partitions
    // has a model's windows to close (table detection: 0, pipeline: 1, classifier: 2)
    let mut results = stream(60, 40);
    for r in &mut results {
        r.outputs.push(output("table_detection", "1.0.0", 3.0, None, None));
    }
    let n = results.len() as i64;
    results.push(stream(1, 1).remove(0));
    results.last_mut().unwrap().submitted_at = *BASE + 200_000;
    let producer = tokio::spawn(trickle(cfg.topics.inference.clone(), results));
    let started = Instant::now();
    while read_all(&cfg.topics.metrics).len() < 10 {
        assert!(started.elapsed() < Duration::from_secs(90), "the leader published no window snapshots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leader.kill().unwrap();
    leader.wait().unwrap();
    producer.await.unwrap();

    wait_for_pipeline_total(&cfg.topics.metrics, n).await;
    let log = std::fs::read_to_string(standby_dir.join("monitor.log")).unwrap();
    assert!(log.contains("restored from the changelog"), "the standby rebuilt its state from the changelog:\n{log}");
    assert!(log.contains("keeping a warm copy of the state") && log.contains("monitor takeover complete"), "the standby tailed the changelog while it waited and logged its takeover:\n{log}");
    let pid = standby.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(standby.wait().unwrap().success());
    let metrics = metrics_of(&read_all(&cfg.topics.metrics));

    let ids: BTreeSet<&String> = metrics.iter().map(|m| &m.metrics_id).collect();
    assert_eq!(ids.len(), metrics.len(), "a window snapshot was published twice");
    let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
    assert_eq!(total, n, "window totals equal the input exactly across the takeover");
    let alerts = alerts_of(&read_all(&cfg.topics.alerts));
    let keys: BTreeSet<(String, String)> = alerts.iter().map(|a| (a.alert_id.clone(), a.status.clone())).collect();
    assert_eq!(keys.len(), alerts.len(), "an alert event was published twice");
    assert_eq!(alerts.iter().filter(|a| a.code == "ERROR_RATE_CRITICAL").count(), 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_results_feedback_and_commands_go_to_the_monitor_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = monitor_config("monitor-dlq", dir.path()).await;
    let monitor = RunningMonitor::start(&cfg);
    let json = ("content-type", "application/json");
    produce_raw(&cfg.topics.inference, vec![("bad-result".into(), b"{\"result_id\": 7".to_vec(), vec![json])]).await;
    produce_raw(&cfg.topics.feedback, vec![("bad-feedback".into(), vec![0xff; 16], vec![("content-type", "application/avro")])]).await;
    produce_raw(&cfg.topics.commands, vec![("bad-command".into(), b"{\"action\": \"START\"}".to_vec(), vec![json])]).await;
    // a good result after them is still applied
    let good = result("ok-1", *BASE + 1_000, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    produce_records(&cfg.topics.inference, "k", &[good]).await;
    let dead = wait_for(&cfg.topics.monitor_dlq, 3, 60).await;
    // the published windows count them too
    let tick = result("tick", *BASE + 2 * W, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    produce_records(&cfg.topics.inference, "k", &[tick]).await;
    let metrics = metrics_of(&wait_for(&cfg.topics.metrics, 2, 60).await);
    let summary = monitor.stop().await;

    let w0 = metrics.iter().find(|m| m.model == "pipeline" && m.window_start == *BASE).expect("window 0 closed");
    assert_eq!((w0.count, w0.dead_lettered_total), (1, 3));
    assert_eq!(dead.len(), 3, "one dead letter per undecodable message, none twice");
    let by_key: BTreeMap<String, &Read> = dead.iter().map(|r| (r.key.clone().unwrap(), r)).collect();
    for (key, topic, payload) in [
        ("bad-result", &cfg.topics.inference, b"{\"result_id\": 7".to_vec()),
        ("bad-feedback", &cfg.topics.feedback, vec![0xff; 16]),
        ("bad-command", &cfg.topics.commands, b"{\"action\": \"START\"}".to_vec()),
    ] {
        let r = by_key.get(key).unwrap_or_else(|| panic!("no dead letter for {key}"));
        assert_eq!(r.header(h::SOURCE_TOPIC), Some(topic.as_str()), "{key}");
        assert!(r.header(h::ERROR_CLASS).is_some_and(|c| !c.is_empty()) && r.header(h::ERROR_MESSAGE).is_some_and(|m| !m.is_empty()), "{key}: reason");
        assert_eq!(r.payload, payload, "{key}: original bytes kept");
    }
    assert_eq!(summary.undecodable, 3);
    assert_eq!(summary.results_applied, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_added_to_the_results_topic_is_read_without_a_restart() {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewPartitions},
        client::DefaultClientContext,
        producer::{FutureProducer, FutureRecord, Producer},
    };

    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = monitor_config("grow", dir.path()).await;
    let monitor = RunningMonitor::start(&cfg);
    let mk = |id: &str, ts: i64| result(id, ts, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    produce_records(&cfg.topics.inference, "k", &[mk("before", *BASE + 1_000)]).await;

    let admin: AdminClient<DefaultClientContext> = payslip_stream::kafka::client_config(&brokers(), &Default::default()).create().unwrap();
    let grown = admin.create_partitions(&[NewPartitions::new(&cfg.topics.inference, 4)], &AdminOptions::new().request_timeout(Some(Duration::from_secs(30)))).await.unwrap();
    for r in grown {
        r.expect("partition added");
    }
    // five results in window 0 and a tick in window 3, all on the new partition
    let p: FutureProducer = payslip_stream::kafka::producer_config(&brokers(), &Default::default()).create().unwrap();
    // the broker answers CreatePartitions before every metadata response carries the new partition; a
    // producer that still sees one partition fails a send to partition 3 at once (UnknownPartition)
    let started = Instant::now();
    loop {
        let (producer, topic) = (p.clone(), cfg.topics.inference.clone());
        let seen = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&topic), Duration::from_secs(10)).map(|m| m.topics().first().map_or(0, |t| t.partitions().iter().filter(|p| p.leader() >= 0).count())))
            .await
            .unwrap()
            .unwrap_or(0);
        if seen == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the producer saw {seen} partitions with a leader 30 s after the topic grew to 4");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut on_new: Vec<InferenceResult> = (0..5).map(|i| mk(&format!("new-{i}"), *BASE + 2_000 + i)).collect();
    on_new.push(mk("tick", *BASE + 3 * W));
    for r in &on_new {
        let payload = codec::encode(r, codec::WireFormat::Avro).unwrap();
        let hs = payslip_stream::kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
        p.send(FutureRecord::to(&cfg.topics.inference).partition(3).key(&r.document_id).payload(&payload).headers(hs), Duration::from_secs(30)).await.expect("delivered");
    }

    let started = Instant::now();
    let window0 = loop {
        let metrics = metrics_of(&read_all(&cfg.topics.metrics));
        if let Some(m) = metrics.into_iter().find(|m| m.model == "pipeline" && m.window_start == *BASE) {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "window 0 did not close in 90 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let summary = monitor.stop().await;
    assert_eq!(window0.count, 6, "the result before and the five on the new partition");
    assert_eq!(summary.results_applied, 7);
    assert_eq!(summary.dropped_late, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_times_outside_the_limits_cannot_move_the_watermark_or_poison_the_monitor() {
    use payslip_stream::rollout::{action, RolloutCommand};

    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = monitor_config("monitor-time", dir.path()).await;
    let monitor = RunningMonitor::start(&cfg);
    let now = chrono::Utc::now().timestamp_millis();
    let t0 = now / W * W - 5 * W;
    let mk = |id: &str, ts: i64| result(id, ts, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    // the poison comes first: a far-future and an i64::MAX result would end every later window
    let stamped = |id: &str, ts: i64| InferenceResult { submitted_at: ts, ..mk(id, t0) };
    produce_records(&cfg.topics.inference, "k", &[stamped("max", i64::MAX), stamped("next-year", now + 365 * 24 * 3_600_000), mk("a", t0 + 1_000), mk("b", t0 + 2_000), mk("tick", t0 + 3 * W)]).await;
    produce_records(&cfg.topics.feedback, "k", &[feedback("a", i64::MIN, 5)]).await;
    // a command stamped in seconds instead of milliseconds
    let cmd = RolloutCommand { command_id: "secs".into(), rollout_id: "document_classifier-1.1.0".into(), action: action::START.into(), operator: "alice".into(), reason: None, model: None, version: None, issued_at: now / 1000 };
    produce_records(&cfg.topics.commands, "k", &[cmd]).await;

    let dead = wait_for(&cfg.topics.monitor_dlq, 4, 60).await;
    let started = Instant::now();
    let window0 = loop {
        if let Some(m) = metrics_of(&read_all(&cfg.topics.metrics)).into_iter().find(|m| m.model == "pipeline" && m.window_start == t0) {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the window of a and b did not close");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let summary = monitor.stop().await;

    assert_eq!(dead.len(), 4, "the two results, the feedback and the command, once each");
    assert!(dead.iter().all(|d| d.header(h::ERROR_CLASS) == Some("bad_timestamp")));
    let keys: BTreeSet<&str> = dead.iter().filter_map(|d| d.header(h::SOURCE_TOPIC)).collect();
    assert_eq!(keys.len(), 3, "from results, feedback and commands");
    assert_eq!(window0.count, 2, "a and b counted, nothing dropped as late");
    assert_eq!(summary.dropped_late, 0);
    assert_eq!(summary.undecodable, 4);
    assert!(read_all(&cfg.topics.decisions).is_empty(), "the command in seconds started nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_of_a_subject_without_traffic_resolves_as_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("no-data", dir.path()).await;
    cfg.monitor.resolve_silent_after_windows = 3;
    let monitor = RunningMonitor::start(&cfg);
    let mut results = Vec::new();
    // window 0: the candidate fails every document (ERROR_RATE_CRITICAL); then it is rolled back and
    // gets no traffic while the baseline goes on in windows 1-5
    for i in 0..30i64 {
        results.push(result(&format!("cand-{i}"), *BASE + i * 100, "canary", None, vec![output("document_classifier", "1.1.0", 5.0, Some(codes::INFERENCE_FAILED), None)]));
    }
    for w in 0..6i64 {
        for i in 0..5i64 {
            results.push(result(&format!("base-{w}-{i}"), *BASE + w * W + 5_000 + i, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]));
        }
    }
    results.push(result("flush", *BASE + 8 * W, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]));
    produce_records(&cfg.topics.inference, "k", &results).await;
    let started = Instant::now();
    let alerts = loop {
        let alerts = alerts_of(&read_all(&cfg.topics.alerts));
        if alerts.iter().any(|a| a.status == "RESOLVED" && a.version == "1.1.0") {
            break alerts;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no RESOLVED for the candidate in 60 s: {alerts:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    monitor.stop().await;

    let candidate: Vec<&AlertEvent> = alerts.iter().filter(|a| a.version == "1.1.0" && a.code == "ERROR_RATE_CRITICAL").collect();
    assert_eq!(candidate.iter().map(|a| a.status.as_str()).collect::<Vec<_>>(), vec!["FIRING", "RESOLVED"], "{alerts:?}");
    let (firing, resolved) = (candidate[0], candidate[1]);
    assert_eq!(resolved.alert_id, firing.alert_id, "the same episode resolves");
    assert!(resolved.reason.as_deref().is_some_and(|r| r.starts_with("no data")), "{:?}", resolved.reason);
    assert_eq!(resolved.window_start, *BASE + 3 * W, "after windows 1, 2 and 3 without the candidate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_pending_feedbacks_are_held_one_key_each_and_resolve_as_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("pending", dir.path()).await;
    cfg.monitor.max_pending_feedback = 50_000;
    // feedback for 50,001 documents none of which has a result: with no result at all the results
    // are complete up to no time, so they wait; the one past the cap is an orphan at once
    let n = 50_001usize;
    let fbs: Vec<DocumentFeedback> = (0..n as i64).map(|i| feedback(&format!("doc-{i}"), *BASE + 1_000 + i % 5_000, 5)).collect();
    produce_many(&cfg.topics.feedback, "k", &fbs).await;
    let monitor = RunningMonitor::start(&cfg);
    let pending_prefix = format!("{}\u{0}", payslip_stream::state::CF_PENDING_FEEDBACK);
    let pending_records = |reads: &[Read]| reads.iter().filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with(&pending_prefix))).cloned().collect::<Vec<Read>>();
    // the changelog shows them held: one small record per pending feedback
    let started = Instant::now();
    let held = loop {
        let held = pending_records(&read_all(&cfg.topics.monitor_changelog));
        if held.len() >= n - 1 {
            break held;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{} of {} pending feedbacks in the changelog after 120 s", held.len(), n - 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let keys: BTreeSet<&str> = held.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(keys.len(), n - 1, "one key per pending feedback, the one past the cap is not held");
    let largest = held.iter().map(|r| r.payload.len()).max().unwrap();
    assert!(largest < 1_024, "a pending feedback's record is small ({largest} bytes)");
    // the monitor keeps working: results after the feedback close their windows, and every pending
    // feedback resolves as an orphan (no prediction), counted exactly once
    let mk = |id: &str, ts: i64| result(id, ts, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("PCDA"))]);
    produce_records(&cfg.topics.inference, "r", &[mk("after", *BASE + 2 * W), mk("tick", *BASE + 4 * W)]).await;
    let started = Instant::now();
    let metrics = loop {
        let metrics = metrics_of(&read_all(&cfg.topics.metrics));
        if metrics.iter().any(|m| m.model == "pipeline" && m.window_start == *BASE + 2 * W) {
            break metrics;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the window after the feedback did not close in 60 s: {metrics:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let summary = monitor.stop().await;
    let w2 = metrics.iter().find(|m| m.model == "pipeline" && m.window_start == *BASE + 2 * W).unwrap();
    assert_eq!(w2.count, 1);
    assert_eq!(w2.feedback_orphan_total, n as i64, "every feedback an orphan, once");
    assert_eq!((summary.feedback_orphans, summary.feedback_overflow, summary.feedback_applied), (n as u64, 1, 0));
    // and nothing is held any more: a tombstone for every pending key
    let store = payslip_stream::state::RocksStateStore::open(dir.path()).unwrap();
    assert_eq!(store.scan_raw(payslip_stream::state::CF_PENDING_FEEDBACK).unwrap().len(), 0);
}

/// A monitor that rebuilds its rollouts from the decisions topic reads commands from a minute
/// before the last answered one. A decision stamped near the epoch made that a negative time, which
/// librdkafka refuses: the stage did not start. A time before the epoch now means "from the start".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_before_the_epoch_positions_a_reader_at_the_start_of_each_partition() {
    use rdkafka::consumer::BaseConsumer;
    let cfg = isolated_config("epoch-offsets").await;
    let topic = &cfg.topics.commands;
    produce_raw(topic, (0..6).map(|i| (format!("k{i}"), b"{}".to_vec(), vec![])).collect()).await;
    let c: BaseConsumer = payslip_stream::kafka::reader_config(&brokers(), &unique("epoch-reader"), &Default::default()).create().unwrap();
    let marks = payslip_stream::kafka::read::watermarks(&c, topic, Duration::from_secs(10)).unwrap();
    assert_eq!(marks.values().map(|(lo, hi)| hi - lo).sum::<i64>(), 6);
    for (&p, &(lo, _)) in &marks {
        assert_eq!(payslip_stream::kafka::read::offset_at(&c, topic, p, -60_000).unwrap(), lo, "partition {p}");
    }
}

/// Produces records keyed by document id (spread over the partitions as the infer stage spreads
/// results): all queued first, the deliveries awaited together.
async fn produce_by_document<T: payslip_stream::codec::Record>(topic: &str, records: &[(String, T)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = payslip_stream::kafka::producer_config(&brokers(), &Default::default()).create().expect("producer");
    let hs = payslip_stream::kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
    let mut pending = Vec::with_capacity(records.len());
    for (key, r) in records {
        let payload = codec::encode(r, codec::WireFormat::Avro).unwrap();
        pending.push(payslip_stream::kafka::enqueue(&p, FutureRecord::to(topic).key(key).payload(&payload).headers(hs.clone())).await.expect("queued"));
    }
    for f in pending {
        payslip_stream::kafka::delivered(f, topic).await.expect("delivered");
    }
}

/// A monitor process of a scaled-out deployment (`monitor.scale_out`) with `closing` closing
/// partitions, logging to `dir/monitor.log` (appending: a restarted member keeps its earlier log).
fn spawn_scaled(dir: &std::path::Path, prefix: &str, member: &str, closing: u32) -> Reaped {
    spawn_scaled_in(dir, prefix, &format!("{prefix}infer"), member, closing)
}

/// [`spawn_scaled`] with the infer group `group` (the pre-aggregation group is derived from it).
fn spawn_scaled_in(dir: &std::path::Path, prefix: &str, group: &str, member: &str, closing: u32) -> Reaped {
    let yaml = format!(
        "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0'}}\nmonitor:\n  state_dir: {}\n  window_size_ms: 1000\n  allowed_lateness_ms: 0\n  idle_timeout_ms: 3000\n  max_batch: 200\n  scale_out: true\n  closing_partitions: {closing}\n",
        repo().join("models/model_metadata.json").display(),
        dir.join("state").display()
    );
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    // the operations API on a port of its own choosing, logged ([`api_address`])
    spawn_logged(dir, &dir.join("pipeline.yaml"), &["--topic-prefix", prefix, "--group", group, "--instance-id", member, "--api-listen", "127.0.0.1:0"])
}

/// The address the operations API of the member logging to `dir` listens on (its last start's).
fn api_address(dir: &std::path::Path) -> String {
    let log = log_of(dir);
    let line = log.lines().rfind(|l| l.contains("operations API listening")).unwrap_or_else(|| panic!("no API address in:\n{log}"));
    let rest = &line[line.find("local=").expect("local=") + "local=".len()..];
    rest.split_whitespace().next().unwrap().to_string()
}

/// `payslip-stream run --stage monitor` with `yaml` and `args`, logging at info to `dir/monitor.log`.
fn spawn_logged(dir: &std::path::Path, yaml: &std::path::Path, args: &[&str]) -> Reaped {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("monitor.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["run", "--stage", "monitor", "--config"])
        .arg(yaml)
        .args(["--brokers", &brokers()])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Reaped)
        .unwrap()
}

/// Waits until `ready` holds, looking again every 100 ms, and fails naming `what` after 90 s.
async fn until(what: &str, ready: impl Fn() -> bool) {
    until_explained(what, ready, String::new).await
}

/// [`until`], failing with what `explain` says about the state it stopped in.
async fn until_explained(what: &str, ready: impl Fn() -> bool, explain: impl Fn() -> String) {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() >= Duration::from_secs(90) {
            panic!("not within 90 s: {what}\n{}", explain());
        }
        // the interval between looks, not a wait for the outcome
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_of(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default()
}

/// Results this member aggregated, from the summary it logs when it stops (its last run's).
fn member_results(log: &str) -> u64 {
    let line = log.lines().rfind(|l| l.contains("monitor pre-aggregation stopped")).unwrap_or_else(|| panic!("no pre-aggregation summary in:\n{log}"));
    counter(line, "results: ")
}

/// The number after `name` in a log line.
fn counter(line: &str, name: &str) -> u64 {
    let rest = &line[line.find(name).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap()].parse().unwrap()
}

/// The closing partitions a member started to lead, in order (from its log).
fn led_partitions(log: &str) -> Vec<u64> {
    log.lines().filter(|l| l.contains("monitor leads")).map(|l| counter(l, "partition=")).collect()
}

/// Windows each closing partition closed in this member's log (the summary each logs when it stops).
fn closed_by_partition(log: &str) -> BTreeMap<u64, u64> {
    log.lines().filter(|l| l.contains("monitor closing partition stopped")).map(|l| (counter(l, "partition="), counter(l, "windows_closed: "))).collect()
}

/// What happens to one member while the results flow.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// kill -9 of the process leading the pipeline's closing partition
    KillLeader,
    /// kill -9 of a member, restarted at once with the same instance id and state
    Restart,
}

/// `members` monitor processes scaled out over one results topic (3 partitions), with `closing`
/// closing partitions: results keyed by document id, feedback for every tenth document, errors
/// that fire and resolve alerts; `fault` happens to one member while results flow.
async fn scaled_out_run(members: usize, closing: u32, fault: Fault) {
    let dirs: Vec<tempfile::TempDir> = (0..members).map(|_| tempfile::tempdir().unwrap()).collect();
    let (cfg, prefix) = isolated_config_prepared(&format!("scaled-{members}"), |c| {
        c.monitor.scale_out = true;
        c.monitor.closing_partitions = closing;
    })
    .await;
    let mut children: Vec<Option<Reaped>> = dirs.iter().enumerate().map(|(i, d)| Some(spawn_scaled(d.path(), &prefix, &format!("m{i}"), closing))).collect();
    // every member holds input partitions (the group has them all) and every closing partition is
    // led before the input starts
    let led = |dirs: &[tempfile::TempDir]| dirs.iter().flat_map(|d| led_partitions(&log_of(d.path()))).collect::<BTreeSet<u64>>();
    until("every member holds partitions and every closing partition is led", || dirs.iter().all(|d| log_of(d.path()).contains("partitions assigned")) && led(&dirs).len() == closing as usize).await;

    // every result also carries a table-detection output, so that each of three closing partitions
    // has a model's windows to close (table detection: 0, pipeline: 1, classifier: 2)
    let mut results = stream(60, 40);
    for r in &mut results {
        r.outputs.push(output("table_detection", "1.0.0", 3.0, None, None));
    }
    let n = results.len() as i64;
    results.push(tick()); // closes window 59
    // feedback for every tenth document, given 10 s (ten windows, two chunks) after its result, so
    // that its window is still open when it arrives right after its result's chunk
    let feedback_of = |r: &InferenceResult| (r.document_id.clone(), feedback(&r.document_id, r.submitted_at + 10_000, 5));
    let n_feedback = results.iter().take(n as usize).step_by(10).count();
    let keyed: Vec<(String, InferenceResult)> = results.into_iter().map(|r| (r.document_id.clone(), r)).collect();
    let (topic, feedback_topic) = (cfg.topics.inference.clone(), cfg.topics.feedback.clone());
    let producer = tokio::spawn(async move {
        // results keep coming while a member is killed: one chunk per 200 ms tick
        let mut pace = tokio::time::interval(Duration::from_millis(200));
        for (k, chunk) in keyed.chunks(200).enumerate() {
            pace.tick().await;
            produce_by_document(&topic, chunk).await;
            let fb: Vec<(String, DocumentFeedback)> = chunk.iter().enumerate().filter(|(i, (id, _))| (k * 200 + i) % 10 == 0 && id != "tick").map(|(_, (_, r))| feedback_of(r)).collect();
            produce_by_document(&feedback_topic, &fb).await;
        }
    });
    // the pipeline's closing partition (with 3, partition 1; the classifier's is 2, table detection's 0)
    let home = payslip_stream::monitor::shard::pipeline_partition(closing) as u64;
    let mut victim = None;
    if fault != Fault::None {
        until("ten window snapshots from the scaled-out monitor", || read_all(&cfg.topics.metrics).len() >= 10).await;
        let i = dirs.iter().position(|d| led_partitions(&log_of(d.path())).contains(&home)).unwrap();
        let mut child = children[i].take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        victim = Some((i, led_partitions(&log_of(dirs[i].path()))));
        if fault == Fault::Restart {
            // the same instance id and state: static membership gives it its partitions back
            children[i] = Some(spawn_scaled(dirs[i].path(), &prefix, &format!("m{i}"), closing));
        }
    }
    producer.await.unwrap();

    // commands, each answered once by the closing partition of its rollout's model: a START naming
    // the classifier, then a PAUSE of it that names no model (its rollout id tells it), and a PAUSE
    // of an unknown rollout (answered by its id's partition)
    use payslip_stream::rollout::{action, ops, RolloutCommand};
    let command = |id: &str, act: payslip_stream::rollout::Action, model: Option<&str>| RolloutCommand {
        command_id: unique(&act.to_string()),
        rollout_id: id.into(),
        action: act.to_string(),
        operator: "test".into(),
        reason: None,
        model: model.map(Into::into),
        version: model.map(|_| "1.1.0".into()),
        issued_at: chrono::Utc::now().timestamp_millis(),
    };
    let commands = [command("document_classifier-1.1.0", action::START, Some("document_classifier")), command("document_classifier-1.1.0", action::PAUSE, None), command("no-such-rollout", action::PAUSE, None)];
    for c in &commands {
        ops::send_command(&cfg, &brokers(), c).await.unwrap();
        assert!(ops::wait_for_decision(&cfg, &brokers(), &c.command_id, Duration::from_secs(90)).await.unwrap().is_some(), "{} answered", c.command_id);
    }

    wait_for_pipeline_total(&cfg.topics.metrics, n).await;
    // the feedback lands in the windows of its predictions, joined on the member owning its partition
    let counted_feedback = || metrics_of(&read_all(&cfg.topics.metrics)).iter().map(|m| m.ratings).sum::<i64>();
    // on failure, what the next engineer needs to find out why: the windows' feedback figures and
    // the members' pre-aggregation and takeover log lines
    let explain = || {
        let metrics = metrics_of(&read_all(&cfg.topics.metrics));
        let figures = |m: &WindowMetrics| format!("{}@{}: ratings {} orphans {} late {}", m.model, m.window_start, m.ratings, m.feedback_orphan_total, m.dropped_late_total);
        let windows: Vec<String> = metrics.iter().filter(|m| m.ratings > 0 || m.feedback_orphan_total > 0 || m.dropped_late_total > 0).map(figures).collect();
        let logs: Vec<String> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let log = log_of(d.path());
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("pre-aggregation") || l.contains("takeover") || l.contains("assigned") || l.contains("WARN") || l.contains("ERROR")).collect();
                format!("member {i}:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
            })
            .collect();
        format!("{} of {n_feedback} counted; killed: {victim:?}\n{}\n{}", counted_feedback(), windows.join("\n"), logs.join("\n"))
    };
    until_explained("every feedback counted in a window", || counted_feedback() >= n_feedback as i64, explain).await;
    if fault == Fault::None {
        pre_metrics_add_up(&dirs, &cfg, n as u64 + 1, n_feedback as u64).await;
    }
    let mut counted = Vec::new();
    let mut closed = Vec::new();
    for (i, c) in children.iter_mut().enumerate() {
        if let Some(mut child) = c.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            assert!(child.wait().unwrap().success(), "member {i} stops cleanly:\n{}", log_of(dirs[i].path()));
            counted.push((i, member_results(&log_of(dirs[i].path()))));
            closed.push((i, closed_by_partition(&log_of(dirs[i].path()))));
        }
    }
    eprintln!("results aggregated per member still running: {counted:?}; windows closed per member and closing partition: {closed:?}");
    let metrics = metrics_of(&read_all(&cfg.topics.metrics));
    let ids: BTreeSet<&String> = metrics.iter().map(|m| &m.metrics_id).collect();
    assert_eq!(ids.len(), metrics.len(), "a window snapshot was published twice");
    let total: i64 = metrics.iter().filter(|m| m.model == "pipeline").map(|m| m.count).sum();
    assert_eq!(total, n, "window totals equal the input exactly");
    assert_eq!(metrics.iter().map(|m| m.ratings).sum::<i64>(), n_feedback as i64, "each feedback counted once");
    assert!(metrics.iter().all(|m| m.feedback_orphan_total == 0 && m.dropped_late_total == 0), "nothing orphaned or late");
    let alerts = alerts_of(&read_all(&cfg.topics.alerts));
    let keys: BTreeSet<(String, String)> = alerts.iter().map(|a| (a.alert_id.clone(), a.status.clone())).collect();
    assert_eq!(keys.len(), alerts.len(), "an alert event was published twice");
    // 12 error windows: each fires and resolves one ERROR_RATE_CRITICAL episode
    assert_eq!(alerts.iter().filter(|a| a.code == "ERROR_RATE_CRITICAL").count(), 24);
    // the load was split: every member still running aggregated a share
    for (i, c) in &counted {
        assert!(*c > 0, "member {i} aggregated no results:\n{}", log_of(dirs[*i].path()));
    }
    let decisions: Vec<payslip_stream::rollout::RolloutDecision> = read_all(&cfg.topics.decisions).iter().map(|m| codec::decode(&m.payload, m.header("content-type")).unwrap()).collect();
    let decision_ids: BTreeSet<&String> = decisions.iter().map(|d| &d.decision_id).collect();
    assert_eq!(decision_ids.len(), decisions.len(), "a decision was published twice: {decisions:?}");
    for (c, expected) in commands.iter().zip([action::START, action::PAUSE, action::REJECTED]) {
        let answers: Vec<_> = decisions.iter().filter(|d| d.command_id.as_ref() == Some(&c.command_id)).collect();
        assert_eq!(answers.len(), 1, "{} answered once: {answers:?}", c.command_id);
        assert_eq!(answers[0].action, expected, "{answers:?}");
    }
    // with as many members as closing partitions and no fault, the group gives each member one
    if fault == Fault::None && members == closing as usize {
        assert!(closed.iter().all(|(_, c)| c.len() == 1), "each member leads one closing partition at the end: {closed:?}");
    }
    // the closing stage was split too: more than one member closed windows
    assert!(closed.iter().filter(|(_, c)| c.values().sum::<u64>() > 0).count() >= 2.min(closed.len()), "the closing partitions' windows were closed by one member only: {closed:?}");
    if fault == Fault::KillLeader {
        let (killed, _) = victim.unwrap();
        for (i, _) in &counted {
            let log = log_of(dirs[*i].path());
            assert!(log.matches("partitions assigned").count() >= 2 && log.contains("restore_ms="), "member {i} took over partitions of the killed one and logged how long:\n{log}");
        }
        let took_over = dirs.iter().enumerate().filter(|(i, _)| *i != killed).any(|(_, d)| led_partitions(&log_of(d.path())).contains(&home) && log_of(d.path()).contains("monitor takeover complete"));
        assert!(took_over, "a survivor took over the pipeline's closing partition and logged the takeover");
    } else if fault == Fault::Restart {
        let (i, before) = victim.unwrap();
        let log = log_of(dirs[i].path());
        let after = led_partitions(&log);
        assert!(after.len() > before.len(), "the restarted member leads again:\n{log}");
        assert!(member_results(&log) > 0, "the restarted member aggregated a share after its restart:\n{log}");
    } else {
        // no member failed: every result was aggregated by exactly one of them (the tick too)
        assert_eq!(counted.iter().map(|(_, c)| c).sum::<u64>(), n as u64 + 1, "{counted:?}");
        // a replay of the same input by one process publishes the same bytes for every window the
        // live run closed (the replay also closes the tick's window at the end of its input)
        let mut rcfg = payslip_stream::config::PipelineConfig::load(&dirs[0].path().join("pipeline.yaml")).unwrap();
        rcfg.topics = rcfg.topics.clone().with_prefix(&prefix);
        let opts = payslip_stream::replay::ReplayOptions { brokers: brokers(), from: payslip_stream::kafka::range::Bound::Beginning, to: None, group: None, progress: None };
        let m = payslip_stream::replay::MonitorReplayOptions { output_suffix: ".replay".into(), dry_run: false, allow_production: false };
        tokio::task::spawn_blocking(move || payslip_stream::replay::monitor_replay(&rcfg, &opts, &m).unwrap()).await.unwrap();
        let by_id = |t: &str| -> BTreeMap<String, Vec<u8>> { read_all(t).into_iter().map(|r| (metrics_of(std::slice::from_ref(&r))[0].metrics_id.clone(), r.payload)).collect() };
        let live = by_id(&cfg.topics.metrics);
        let replayed: BTreeMap<String, Vec<u8>> = by_id(&format!("{}.replay", cfg.topics.metrics)).into_iter().filter(|(k, _)| live.contains_key(k)).collect();
        assert_eq!(live.len(), metrics.len());
        assert!(live == replayed, "the replay's window snapshots are byte-identical to the scaled-out run's ({} live, {} replayed)", live.len(), replayed.len());
        let rule_alerts = |t: &str| -> BTreeSet<Vec<u8>> {
            read_all(t).into_iter().filter(|r| alerts_of(std::slice::from_ref(r))[0].window_end <= *BASE + 60_000 && alerts_of(std::slice::from_ref(r))[0].code == "ERROR_RATE_CRITICAL").map(|r| r.payload).collect()
        };
        let (a, b) = (rule_alerts(&cfg.topics.alerts), rule_alerts(&format!("{}.replay", cfg.topics.alerts)));
        assert_eq!(a.len(), 24);
        assert!(a == b, "the replay's alert events are byte-identical to the scaled-out run's");
    }
}

/// The members' `/metrics`, summed, count what went in exactly: `results` aggregated, `feedback`
/// joined, none orphaned or held, and each results and feedback partition owned by one member.
async fn pre_metrics_add_up(dirs: &[tempfile::TempDir], cfg: &payslip_stream::config::PipelineConfig, results: u64, feedback: u64) {
    let names = ["payslip_monitor_pre_results_total", "payslip_monitor_pre_feedback_joined_total", "payslip_monitor_pre_feedback_orphans_total", "payslip_monitor_pre_feedback_held", "payslip_monitor_pre_partitions"];
    let consumer = reader();
    let partitions = [&cfg.topics.inference, &cfg.topics.feedback].iter().map(|t| payslip_stream::kafka::partitions_of(&consumer, t, Duration::from_secs(30)).unwrap().len()).sum::<usize>() as f64;
    let want = [results as f64, feedback as f64, 0.0, 0.0, partitions];
    // each name summed over the members, and each member's committed batches
    let scraped = || {
        let mut sums = [0.0; 5];
        let mut batches = Vec::new();
        for d in dirs {
            let m = scrape(&api_address(d.path()));
            for (sum, name) in sums.iter_mut().zip(names) {
                *sum += m.get(name).unwrap_or_else(|| panic!("{name} missing from /metrics: {m:?}"));
            }
            batches.push(m["payslip_monitor_pre_batches_total"]);
        }
        (sums, batches)
    };
    // a member's counters show a batch once it has committed; the windows may be out first
    until_explained("the members' /metrics add up to the input", || scraped().0 == want, || format!("summed: {:?}, want {want:?} for {names:?}", scraped().0)).await;
    let batches = scraped().1;
    assert!(batches.iter().all(|b| *b > 0.0), "every member committed pre-aggregation batches: {batches:?}");
}

/// Closing partitions that the existing topics do not have stop start-up with what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_partitions_the_topics_do_not_have_stop_start_up_saying_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    // the topics exist with one closing partition; the process is configured with two
    let (_, prefix) = isolated_config_with_prefix("closing-mismatch").await;
    let mut child = spawn_scaled(dir.path(), &prefix, "m0", 2);
    let pid = child.id();
    // waits for the process's exit itself (a blocking wait on its own thread), for 90 s at most
    let exited = tokio::time::timeout(Duration::from_secs(90), tokio::task::spawn_blocking(move || child.wait())).await;
    let Ok(status) = exited else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the monitor did not stop:\n{}", log_of(dir.path()));
    };
    let status = status.unwrap().unwrap();
    let log = log_of(dir.path());
    assert!(!status.success(), "{log}");
    assert!(log.contains("monitor.closing_partitions is 2 but") && log.contains("has 1 partitions"), "the reason and the fix are logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scaled_out_monitor_processes_split_the_results_and_count_each_exactly_once() {
    scaled_out_run(2, 2, Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scaled_out_monitor_processes_share_the_closing_partitions_and_count_each_result_once() {
    scaled_out_run(3, 3, Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_and_restarted_with_the_same_instance_id_rejoins_without_losing_or_doubling_anything() {
    scaled_out_run(3, 3, Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_among_three_scaled_out_monitor_processes_keeps_totals_exact_without_duplicate_events() {
    scaled_out_run(3, 3, Fault::KillLeader).await;
}

/// 24 MB of a transaction aborted on partition `p` of `topic`, uncompressed: a read_committed
/// consumer fetches them (over many fetches) and skips them, delivering nothing meanwhile.
async fn abort_in_front(topic: &str, p: i32) {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let txn: FutureProducer = payslip_stream::kafka::producer_config(&brokers(), &Default::default())
        .set("compression.type", "none")
        .set("transactional.id", unique("aborted-in-front"))
        .set("transaction.timeout.ms", "60000")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    txn.init_transactions(Duration::from_secs(30)).unwrap();
    txn.begin_transaction().unwrap();
    let filler: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut pending = Vec::new();
    for i in 0..240 {
        pending.push(payslip_stream::kafka::enqueue(&txn, FutureRecord::to(topic).partition(p).key(&format!("aborted-{i}")).payload(&filler)).await.unwrap());
    }
    for f in pending {
        payslip_stream::kafka::delivered(f, topic).await.unwrap();
    }
    txn.abort_transaction(Duration::from_secs(30)).unwrap();
}

/// One record (Avro) to partition `p` of `topic`.
async fn send_to<T: payslip_stream::codec::Record>(topic: &str, p: i32, record: &T) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = payslip_stream::kafka::producer_config(&brokers(), &Default::default()).create().unwrap();
    let hs = payslip_stream::kafka::headers::HeaderSet::new().with("content-type", "application/avro").build();
    let payload = codec::encode(record, codec::WireFormat::Avro).unwrap();
    producer.send(FutureRecord::to(topic).partition(p).key("k").payload(&payload).headers(hs), Duration::from_secs(30)).await.expect("delivered");
}

/// The monitor (one process) takes an input partition as idle only once the broker has confirmed
/// it is read to its end: here 24 MB of an aborted transaction lie in front of a result on results
/// partition 0 while a result far ahead on partition 1 moves the watermark. With an idle timeout
/// of 1 ms, the silent partition 0 would let window 0 close before its result is read, and the
/// result would be late: it is counted in window 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_closes_no_window_past_an_input_partition_it_has_not_read_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("unread-single", dir.path()).await;
    cfg.monitor.idle_timeout_ms = 1;
    let results = cfg.topics.inference.clone();
    abort_in_front(&results, 0).await;
    let mk = |id: &str, ts: i64| result(id, ts, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("ARMY"))]);
    send_to(&results, 0, &mk("behind-the-aborted", *BASE + 1_000)).await;
    send_to(&results, 1, &mk("tick", *BASE + 5 * W)).await;
    let (monitor, view) = RunningMonitor::start_with_view(&cfg);
    let v = wait_view(&view, "both results applied or dropped", |v| v.counters.results_applied + v.counters.dropped_late >= 2).await;
    assert_eq!((v.counters.results_applied, v.counters.dropped_late), (2, 0), "the result behind the aborted records is not late: {:?}", v.counters);
    // window 0 closes once partition 0 is read and idle
    let metrics = metrics_of(&wait_for(&cfg.topics.metrics, 2, 60).await);
    let summary = monitor.stop().await;
    assert_eq!((summary.results_applied, summary.dropped_late), (2, 0));
    let w0 = metrics.iter().find(|m| m.model == "pipeline" && m.window_start == *BASE).expect("window 0 of the pipeline");
    assert_eq!(w0.count, 1);
}

/// A results partition that is silent only because its member has not read it yet (here 24 MB of
/// an aborted transaction lie in front of a prediction: a read_committed consumer fetches and skips
/// them, delivering nothing, as a partition just assigned, sought back or out of reach is silent)
/// is neither complete nor caught up. With an idle timeout of 1 ms, the feedback for that
/// prediction (an hour old) would be an orphan at once, and the member's heartbeats would let the
/// closing stage close windows the prediction is still to count in, if silence were enough: the
/// feedback waits until the broker confirms the partition is read to its end, and joins; the
/// partition is reported caught up only after its result. Feedback for a document without a
/// result, on a partition read to its (empty) end, is an orphan as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_partition_the_member_has_not_read_yet_holds_its_feedback_and_is_not_reported_caught_up() {
    let state = tempfile::tempdir().unwrap();
    let (cfg, _) = isolated_config_prepared("pre-unread", |c| {
        c.monitor.scale_out = true;
        c.monitor.idle_timeout_ms = 1;
        c.monitor.state_dir = state.path().join("monitor");
    })
    .await;
    let (results, feedback_topic) = (cfg.topics.inference.clone(), cfg.topics.feedback.clone());
    abort_in_front(&results, 0).await;
    // then the prediction on results partition 0, its feedback on feedback partition 0, and
    // feedback for a document that has no result on feedback partition 1
    let r = result("d-unread", *BASE, "baseline", None, vec![output("document_classifier", "1.0.0", 5.0, None, Some("ARMY"))]);
    send_to(&results, 0, &r).await;
    send_to(&feedback_topic, 0, &feedback("d-unread", *BASE + 1_000, 4)).await;
    send_to(&feedback_topic, 1, &feedback("d-no-result", *BASE + 1_000, 2)).await;

    let cell = payslip_stream::monitor::pre::PreCell::default();
    let member = payslip_stream::monitor::pre::PreAggregator::open(cfg.clone(), brokers(), cell.clone()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = {
        let stop = stop.clone();
        std::thread::spawn(move || member.run(stop))
    };
    // what the member told the closing stage about results partition 0, in order
    let source = format!("{results}/0");
    let reports = || -> Vec<payslip_stream::monitor::partial::PartialBatch> { read_all(&cfg.topics.monitor_partials).iter().map(|m| serde_json::from_slice::<payslip_stream::monitor::partial::PartialBatch>(&m.payload).unwrap()).filter(|p| p.source == source).collect() };
    let with_result = |v: &[payslip_stream::monitor::partial::PartialBatch]| v.iter().position(|p| p.max_event_ms.is_some());
    let counters = || cell.lock().unwrap().clone().unwrap_or_default();
    until_explained("both feedbacks resolved", || counters().feedback_joined + counters().feedback_orphans >= 2, || format!("{:?}", counters())).await;
    until_explained("results partition 0 reported caught up after its result", || { let v = reports(); with_result(&v).is_some_and(|i| v[i..].iter().any(|p| p.caught_up)) }, || format!("{:?}", reports())).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = running.join().unwrap().expect("the member stops cleanly");
    assert_eq!((last.results, last.feedback_joined, last.feedback_orphans, last.feedback_held), (1, 1, 1, 0), "the feedback joined its prediction, the one without a result is the only orphan: {last:?}");
    let v = reports();
    let i = with_result(&v).unwrap();
    assert!(v[..i].iter().all(|p| !p.caught_up), "no report of caught up before the result was read: {:?}", &v[..=i]);
}

/// A scaled-out monitor member restarted with the same group and instance id on another results
/// topic (a new `--topic-prefix` with the same `--group`) counts the new topic's results, each once,
/// and nothing of the old topic. Kafka's classic protocol hands the rejoining static member its old
/// partitions without a rebalance (KAFKA-12759); the pre-aggregation consumer leaves them out, logs
/// them and joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_out_member_restarted_on_another_results_topic_with_the_same_static_identity_counts_the_new_topic() {
    let scaled = |c: &mut payslip_stream::config::PipelineConfig| {
        c.monitor.scale_out = true;
        c.monitor.closing_partitions = 1;
    };
    let (old, old_prefix) = isolated_config_prepared("pre-stale-old", scaled).await;
    let (new, new_prefix) = isolated_config_prepared("pre-stale-new", scaled).await;
    let group = format!("{old_prefix}infer");
    let (dir_old, dir_new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_tick = |mut v: Vec<InferenceResult>| {
        v.push(tick());
        v
    };
    let listening = |dir: &std::path::Path| {
        let log = log_of(dir);
        log.contains("partitions assigned") && led_partitions(&log).len() == 1
    };

    let mut first = spawn_scaled_in(dir_old.path(), &old_prefix, &group, "m0", 1);
    until("the first member holds its partitions and leads", || listening(dir_old.path())).await;
    produce_records(&old.topics.inference, "k", &with_tick(stream(3, 10))).await;
    wait_for_pipeline_total(&old.topics.metrics, 30).await;

    // the same static identity on the new prefix; the first member is killed only once the second
    // has subscribed, so the second's join replaces a member the group still has (not one it
    // dropped after the session timeout, which a slow start could let pass)
    let _second = spawn_scaled_in(dir_new.path(), &new_prefix, &group, "m0", 1);
    until("the second member subscribed", || log_of(dir_new.path()).contains("monitor pre-aggregation started")).await;
    first.kill().unwrap();
    first.wait().unwrap();
    // the old topic gets more results too, which a member on its stale partitions would count
    let later: Vec<InferenceResult> = stream(2, 10).into_iter().map(|mut r| {
        r.document_id = format!("later-{}", r.document_id);
        r
    }).collect();
    produce_records(&old.topics.inference, "k", &later).await;
    produce_records(&new.topics.inference, "k", &with_tick(stream(4, 10))).await;
    until_explained("the restarted member's windows count the new topic's 40 results", || pipeline_total(&new.topics.metrics) >= 40, || log_of(dir_new.path())).await;
    assert_eq!(pipeline_total(&new.topics.metrics), 40, "the new topic's results, each once, and none of the old topic's");
    let log = log_of(dir_new.path());
    assert!(log.contains("the group assigned partitions of a topic this consumer does not subscribe to"), "the stale assignment was offered and refused (else the test did not reach the case):\n{log}");
}
