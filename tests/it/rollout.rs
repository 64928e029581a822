//! Phased rollout end to end against the real broker: infer and monitor stages as child processes
//! (so the memory criterion sees one infer process), documents produced at a steady rate, operator
//! commands through the CLI and the commands topic, decisions read back from the compacted topic.
//! Soaks are compressed to seconds; thresholds and minimum samples are the runbook defaults, the
//! effects the criteria are sized for larger (`widen_effects`: evidence is compressed with time).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::{self, Record, WireFormat},
    config::PipelineConfig,
    document::{InferenceResult, PayslipDocument},
    kafka::{self, headers as h, headers::HeaderSet},
    rollout::{action, default_phases, ops, Action, RolloutCommand, RolloutDecision},
    synth::{Generator, GeneratorConfig},
};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::support::*;

const CLASSIFIER: &str = "document_classifier";

/// A child process killed when dropped (its log stays in the test's directory).
struct Proc(Child, PathBuf);

impl Proc {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.1).unwrap_or_default();
        s.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    cfg: PipelineConfig,
    prefix: String,
    yaml: PathBuf,
}

impl Setup {
    async fn new(name: &str, candidate: &str, soak_ms: i64) -> Self {
        Self::with_changelog(name, candidate, soak_ms, true).await
    }

    /// Without the changelog a monitor that lost its state rebuilds the rollout from the decisions topic.
    async fn with_changelog(name: &str, candidate: &str, soak_ms: i64, changelog: bool) -> Self {
        Self::build(name, CLASSIFIER, candidate, soak_ms, changelog, None).await
    }

    /// A rollout of `model` `candidate`; `metadata`: a model repository other than the project's.
    async fn build(name: &str, model: &str, candidate: &str, soak_ms: i64, changelog: bool, metadata: Option<&std::path::Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, prefix) = isolated_config_with_prefix(name).await;
        let mut phases = default_phases();
        for p in &mut phases {
            p.soak_ms = soak_ms;
        }
        widen_effects(&mut phases);
        let yaml = format!(
            "models:\n  metadata: {meta}\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\n\
             kafka:\n  infer_group: {prefix}infer\n\
             topics:\n  partitions: 3\n\
             faults:\n  enabled: true\n\
             monitor:\n  changelog: {changelog}\n  state_dir: {state}\n  window_size_ms: 1000\n  allowed_lateness_ms: 300\n  idle_timeout_ms: 2000\n  max_batch: 500\n\
             rollout:\n  candidate: {{model: {model}, version: '{candidate}'}}\n  phases: {phases}\n",
            meta = metadata.map(std::path::Path::to_path_buf).unwrap_or_else(|| repo().join("models/model_metadata.json")).display(),
            state = dir.path().join("state").display(),
            phases = serde_json::to_string(&phases).unwrap(),
        );
        let path = dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        let loaded = PipelineConfig::load(&path).expect("test pipeline config is valid");
        cfg.rollout = loaded.rollout;
        cfg.faults = loaded.faults;
        cfg.monitor = loaded.monitor;
        Self { dir, cfg, prefix, yaml: path }
    }

    fn spawn(&self, stage: &str, n: usize) -> Proc {
        let log = self.dir.path().join(format!("{stage}-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
            .args(["run", "--stage", stage, "--config"])
            .arg(&self.yaml)
            .args(["--brokers", &brokers(), "--topic-prefix", &self.prefix])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc(child, log)
    }

    /// `payslip-stream rollout ...` as an operator would run it; returns the decision it printed.
    fn cli(&self, args: &[&str]) -> RolloutDecision {
        let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
            .arg("rollout")
            .args(args)
            .arg("--config")
            .arg(&self.yaml)
            .args(["--brokers", &brokers(), "--topic-prefix", &self.prefix, "--operator", "alice", "--timeout", "60"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("rollout {args:?}: {e}\nstdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    fn decisions(&self) -> Vec<RolloutDecision> {
        read_all(&self.cfg.topics.decisions).iter().map(|r| codec::decode(&r.payload, r.header(h::CONTENT_TYPE)).expect("decision decodes")).collect()
    }

    /// Waits for a decision matching `f`; panics with the decisions so far and the logs after `secs`.
    async fn wait_for(&self, what: &str, secs: u64, procs: &[&Proc], f: impl Fn(&RolloutDecision) -> bool) -> RolloutDecision {
        let started = Instant::now();
        loop {
            let ds = self.decisions();
            if let Some(d) = ds.iter().find(|d| f(d)) {
                return d.clone();
            }
            if started.elapsed() > Duration::from_secs(secs) {
                let summary: Vec<String> = ds.iter().map(|d| format!("{} {} p{} {}% {}", d.seq, d.action, d.phase, d.traffic_percent, d.reason)).collect();
                let logs: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
                panic!("no decision {what} after {secs} s; decisions:\n{}\nlogs:\n{}", summary.join("\n"), logs.join("\n---\n"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn results(&self) -> Vec<(InferenceResult, Option<String>)> {
        read_all(&self.cfg.topics.inference).into_iter().map(|r| (r.result(), r.header(h::ROLLOUT).map(str::to_string))).collect()
    }
}

/// Documents at a steady rate until stopped; `faulty` adds `fault-error: document_classifier@VERSION`.
struct Feed {
    stop: Arc<AtomicBool>,
    faulty: Arc<std::sync::Mutex<Option<String>>>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    fn start(topic: &str, rate: f64, seed: u64) -> Self {
        Self::start_with(topic, rate, seed, false)
    }

    /// `rasters`: documents with page and line rasters (what the table and text models read).
    fn start_with(topic: &str, rate: f64, seed: u64, rasters: bool) -> Self {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let faulty: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let task = {
            let (stop, sent, faulty, topic) = (stop.clone(), sent.clone(), faulty.clone(), topic.to_string());
            tokio::spawn(async move {
                let p: FutureProducer = kafka::producer_config(&brokers(), &Default::default()).create().unwrap();
                let g = Generator::new(GeneratorConfig { seed, users: 20_000, rasters, ..Default::default() });
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = (started.elapsed().as_secs_f64() * rate) as u64;
                    let mut pending = Vec::new();
                    while i < due {
                        let mut doc: PayslipDocument = g.document(i).document;
                        doc.submitted_at = chrono::Utc::now().timestamp_millis();
                        let mut hs = HeaderSet::new().with(h::CONTENT_TYPE, WireFormat::Avro.content_type()).with(h::SCHEMA, PayslipDocument::SCHEMA_NAME);
                        if let Some(v) = faulty.lock().unwrap().as_ref() {
                            hs = hs.with("fault-error", format!("{CLASSIFIER}@{v}"));
                        }
                        let payload = codec::encode(&doc, WireFormat::Avro).unwrap();
                        let rec = FutureRecord::to(&topic).key(&doc.document_id).payload(&payload).headers(hs.build());
                        pending.push(p.send_result(rec).map_err(|(e, _)| e).expect("queued"));
                        i += 1;
                    }
                    for f in pending {
                        f.await.expect("delivery report").expect("document delivered");
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        };
        Self { stop, faulty, sent, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

/// `rollout_id@seq:traffic` entries of a result's `rollout` header.
fn stamps(header: &Option<String>) -> Vec<(String, i64, f64)> {
    header
        .iter()
        .flat_map(|h| h.split(','))
        .filter_map(|s| {
            let (id, rest) = s.split_once('@')?;
            let (seq, t) = rest.split_once(':')?;
            Some((id.to_string(), seq.parse().ok()?, t.parse().ok()?))
        })
        .collect()
}

/// Waits until the results topic holds one result per document sent.
async fn wait_for_results(s: &Setup, sent: u64) -> Vec<(InferenceResult, Option<String>)> {
    let started = Instant::now();
    loop {
        let r = s.results();
        let ids: BTreeSet<&str> = r.iter().map(|(x, _)| x.document_id.as_str()).collect();
        if ids.len() as u64 >= sent {
            return r;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{} of {sent} documents have results", ids.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_text_model_made_by_models_optimize_while_the_stages_run_is_announced_and_its_rollout_runs_to_a_decision() {
    let models = tempfile::tempdir().unwrap();
    copy_models(models.path());
    for f in ["optimize.py", "train.py"] {
        std::fs::copy(repo().join("models").join(f), models.path().join(f)).unwrap();
    }
    let s = Setup::build("rollout-int8", "text_recognition", "1.0.0-int8", 2_000, true, Some(&models.path().join("model_metadata.json"))).await;
    let infer = s.spawn("infer", 0);
    let monitor = s.spawn("monitor", 0);
    let feed = Feed::start_with(&s.cfg.topics.documents, 60.0, 31, true);
    let out = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .args(["models", "optimize", "--model", "text_recognition", "--version", "1.0.0", "--method", "int8", "--config"])
        .arg(&s.yaml)
        .args(["--brokers", &brokers(), "--topic-prefix", &s.prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = s.cli(&["start", "--model", "text_recognition", "--version", "1.0.0-int8"]);
    assert_eq!((start.action, start.candidate_version.as_str()), (action::START, "1.0.0-int8"), "{}", start.reason);
    // the controller judges the candidate on its windows: any verdict after START is a decision
    let d = s.wait_for("after START", 180, &[&infer, &monitor], |d| d.rollout_id == start.rollout_id && d.seq > start.seq && d.action != action::REJECTED).await;
    assert!([action::ADVANCE, action::HOLD, action::ROLLBACK_PHASE, action::PROMOTE, action::EMERGENCY_ROLLBACK].contains(&d.action), "{} {}", d.action, d.reason);
    assert!(!d.criteria.is_empty(), "decided on criteria: {}", d.reason);
    let sent = feed.stop().await;
    let results = wait_for_results(&s, sent).await;
    drop((infer, monitor));
    // the running infer process served the announced version without a restart, and it read text
    let int8: Vec<&InferenceResult> = results.iter().map(|(r, _)| r).filter(|r| r.model_versions.get("text_recognition").map(String::as_str) == Some("1.0.0-int8")).collect();
    assert!(!int8.is_empty(), "no document was routed to the int8 version");
    assert!(int8.iter().all(|r| r.output("text_recognition").is_some_and(|o| o.error_code.is_none() && !o.lines.is_empty())), "the int8 version answered every routed document");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_moves_through_every_phase_with_the_configured_split_and_is_promoted() {
    let s = Setup::new("rollout-good", "1.1.0", 2_500).await;
    let infer = s.spawn("infer", 0);
    let monitor = s.spawn("monitor", 0);
    let feed = Feed::start(&s.cfg.topics.documents, 200.0, 11);
    let start = s.cli(&["start"]);
    assert_eq!((start.action, start.traffic_percent, start.operator.as_deref()), (action::START, 1.0, Some("alice")));
    let promoted = s.wait_for("PROMOTE", 240, &[&infer, &monitor], |d| d.action == action::PROMOTE).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a few documents under the promoted version
    let sent = feed.stop().await;
    let results = wait_for_results(&s, sent).await;
    drop((infer, monitor));

    // 1 → 10 → 25 → 50 → 100 %, each advance explained by passing criteria, then promotion
    let decisions = s.decisions();
    let moves: Vec<(Action, f64)> = decisions.iter().filter(|d| d.action != action::HOLD).map(|d| (d.action, d.traffic_percent)).collect();
    assert_eq!(moves, vec![(action::START, 1.0), (action::ADVANCE, 10.0), (action::ADVANCE, 25.0), (action::ADVANCE, 50.0), (action::ADVANCE, 100.0), (action::PROMOTE, 100.0)]);
    let mut phase_start = start.phase_started_at;
    for d in decisions.iter().filter(|d| d.action == action::ADVANCE || d.action == action::PROMOTE) {
        assert!(!d.criteria.is_empty() && d.criteria.iter().all(|c| c.holds()), "{}: {:?}", d.reason, d.criteria);
        assert!(d.decided_at - phase_start >= 2_500, "left its phase before the soak: {}", d.reason);
        phase_start = d.phase_started_at;
    }
    assert_eq!(promoted.status, "PROMOTED");
    let seqs: Vec<i64> = decisions.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (1..=decisions.len() as i64).collect::<Vec<_>>(), "each decision once, in order");

    // observed canary share per routed traffic level, within 4 standard errors + 0.5 points
    let mut by_traffic: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut canary_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut baseline_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (r, hdr) in &results {
        let Some((_, _, t)) = stamps(hdr).into_iter().next() else { continue };
        let key = format!("{t:05.1}");
        let e = by_traffic.entry(key.clone()).or_default();
        e.0 += 1;
        let canary = r.cohort == "canary";
        e.1 += canary as u64;
        let v = &r.outputs.iter().find(|o| o.model == CLASSIFIER).unwrap().version;
        assert_eq!(v, if canary { "1.1.0" } else { "1.0.0" }, "cohort and version agree");
        if canary { &mut canary_users } else { &mut baseline_users }.entry(key).or_default().insert(r.user_id.clone());
    }
    assert_eq!(by_traffic.keys().cloned().collect::<Vec<_>>(), vec!["001.0", "010.0", "025.0", "050.0", "100.0"]);
    for (t, (n, c)) in &by_traffic {
        let p: f64 = t.parse::<f64>().unwrap() / 100.0;
        let share = *c as f64 / *n as f64;
        let tol = 4.0 * (p * (1.0 - p) / *n as f64).sqrt() + 0.005;
        assert!((share - p).abs() <= tol, "{t} %: {c} of {n} documents canary ({share:.4}), tolerance {tol:.4}");
    }
    // stickiness: a user canary at a lower share is never baseline at a higher one
    let levels: Vec<String> = by_traffic.keys().cloned().collect();
    let none = BTreeSet::new();
    for (i, lo) in levels.iter().enumerate() {
        for hi in &levels[i + 1..] {
            let moved: Vec<&String> = canary_users[lo].intersection(baseline_users.get(hi).unwrap_or(&none)).collect();
            assert!(moved.is_empty(), "canary at {lo} % but baseline at {hi} %: {moved:?}");
        }
    }
    // after promotion the candidate is the baseline for everyone
    let after: Vec<&InferenceResult> = results.iter().filter(|(_, hdr)| hdr.is_none()).map(|(r, _)| r).filter(|r| r.processed_at > promoted.decided_at + 1_000).collect();
    assert!(!after.is_empty(), "documents were served after the promotion");
    for r in after {
        assert!(r.cohort == "baseline" && r.model_versions.get(CLASSIFIER).map(String::as_str) == Some("1.1.0"), "after the promotion: {} {} {:?}", r.document_id, r.cohort, r.model_versions);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_degraded_candidate_is_rolled_back_in_the_phase_whose_criterion_it_fails_and_quarantined() {
    let s = Setup::new("rollout-degraded", "1.1.1-degraded", 2_000).await;
    let infer = s.spawn("infer", 0);
    let monitor = s.spawn("monitor", 0);
    let feed = Feed::start(&s.cfg.topics.documents, 200.0, 12);
    s.cli(&["start"]);
    let rb = s.wait_for("ROLLBACK_PHASE", 180, &[&infer, &monitor], |d| d.action == action::ROLLBACK_PHASE).await;
    assert_eq!((rb.phase_name.as_str(), rb.status.as_str(), rb.traffic_percent, rb.previous_traffic_percent), ("beta", "ROLLED_BACK", 0.0, 10.0), "{}", rb.reason);
    let failed: Vec<&str> = rb.criteria.iter().filter(|c| c.verdict == "FAIL").map(|c| c.name.as_str()).collect();
    assert!(!failed.is_empty() && failed.iter().all(|f| f.starts_with("pcda_accuracy")), "{failed:?}: {}", rb.reason);
    assert!(rb.reason.contains("pcda_accuracy"), "{}", rb.reason);
    let seen_rollback = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // quarantine: START without a version is refused and says why; status shows it
    let cmd = RolloutCommand { command_id: unique("cmd"), rollout_id: rb.rollout_id.clone(), action: action::START.into(), operator: "bob".into(), reason: None, model: None, version: None, issued_at: chrono::Utc::now().timestamp_millis() };
    ops::send_command(&s.cfg, &brokers(), &cmd).await.unwrap();
    let refused = ops::wait_for_decision(&s.cfg, &brokers(), &cmd.command_id, Duration::from_secs(60)).await.unwrap().expect("answered");
    assert_eq!(refused.action, action::REJECTED);
    assert!(refused.reason.contains("quarantined"), "{}", refused.reason);
    let status = ops::phase_status(s.decisions(), Some(&rb.rollout_id));
    assert!(status[0].quarantined.get("document_classifier@1.1.1-degraded").is_some_and(|why| why.contains("pcda_accuracy")), "{:?}", status[0].quarantined);
    assert_eq!(status[0].status, "ROLLED_BACK");

    let sent = feed.stop().await;
    let results = wait_for_results(&s, sent).await;
    drop((infer, monitor));
    // no document is routed to the candidate under the rollback or later
    for (r, hdr) in &results {
        if r.cohort == "canary" {
            assert!(stamps(hdr).iter().all(|(_, seq, _)| *seq < rb.seq), "{} routed to the candidate after the rollback", r.document_id);
        }
        if r.processed_at > seen_rollback {
            assert_eq!(r.cohort, "baseline");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_spike_on_the_candidate_triggers_emergency_rollback_and_stops_routing_to_it() {
    let s = Setup::new("rollout-emergency", "1.1.0", 600_000).await;
    let infer = s.spawn("infer", 0);
    let monitor = s.spawn("monitor", 0);
    let feed = Feed::start(&s.cfg.topics.documents, 200.0, 13);
    s.cli(&["start"]);
    s.cli(&["advance"]);
    let d = s.cli(&["advance", "--reason", "widen before the spike"]);
    assert_eq!((d.phase, d.traffic_percent, d.operator.as_deref()), (3, 25.0, Some("alice")));
    *feed.faulty.lock().unwrap() = Some("1.1.0".into());
    let em = s.wait_for("EMERGENCY_ROLLBACK", 120, &[&infer, &monitor], |d| d.action == action::EMERGENCY_ROLLBACK).await;
    assert_eq!((em.status.as_str(), em.traffic_percent, em.operator.as_deref()), ("ROLLED_BACK", 0.0, None));
    let seen = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = feed.stop().await;
    let results = wait_for_results(&s, sent).await;
    drop((infer, monitor));
    let mut canary_before = 0;
    for (r, hdr) in &results {
        if r.cohort == "canary" {
            canary_before += 1;
            assert!(stamps(hdr).iter().all(|(_, seq, _)| *seq < em.seq), "{} routed to the candidate under the emergency decision", r.document_id);
            assert!(r.processed_at <= seen + 1_000, "{} routed to the candidate {} ms after the decision was visible", r.document_id, r.processed_at - seen);
        }
    }
    assert!(canary_before > 0);
    let late: Vec<_> = results.iter().filter(|(r, _)| r.processed_at > seen).collect();
    assert!(!late.is_empty() && late.iter().all(|(r, _)| r.cohort == "baseline" && r.error_code.is_none()), "after the rollback every document is served by the baseline without errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_samples_hold_and_never_advance_or_roll_back() {
    let s = Setup::new("rollout-few", "1.1.0", 1_000).await;
    let infer = s.spawn("infer", 0);
    let monitor = s.spawn("monitor", 0);
    let feed = Feed::start(&s.cfg.topics.documents, 6.0, 14);
    s.cli(&["start"]);
    s.wait_for("a fifth HOLD", 90, &[&infer, &monitor], |d| d.action == action::HOLD && d.seq >= 6).await;
    feed.stop().await;
    drop((infer, monitor));
    let decisions = s.decisions();
    assert_eq!(decisions[0].action, action::START);
    for d in &decisions[1..] {
        assert_eq!(d.action, action::HOLD, "{}", d.reason);
        assert!(d.soak_elapsed_ms < 1_000 || d.reason.contains("samples"), "a soaked phase holds for samples: {}", d.reason);
        assert!(d.criteria.iter().all(|c| c.verdict != "FAIL" && c.verdict != "PASS" || c.name == "candidate_loads"), "{:?}", d.criteria);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_rollout_resumes_in_the_same_phase_with_the_same_soak_clock() {
    restart_mid_rollout("rollout-restart", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_lost_its_state_rebuilds_the_rollout_from_the_decisions_topic() {
    restart_mid_rollout("rollout-rebuild", false).await;
}

/// Kill -9 the monitor in phase 2; restart it with its state (`keep_state`) or with none, then the
/// decisions topic is all it has.
async fn restart_mid_rollout(name: &str, keep_state: bool) {
    let s = Setup::with_changelog(name, "1.1.0", 6_000, keep_state).await;
    let infer = s.spawn("infer", 0);
    let mut monitor = s.spawn("monitor", 0);
    let feed = Feed::start(&s.cfg.topics.documents, 200.0, 15);
    s.cli(&["start"]);
    let p2 = s.wait_for("ADVANCE to phase 2", 180, &[&infer, &monitor], |d| d.action == action::ADVANCE && d.phase == 2).await;
    s.wait_for("a HOLD in phase 2", 60, &[&infer, &monitor], |d| d.action == action::HOLD && d.phase == 2 && d.seq > p2.seq + 1).await;
    monitor.kill9();
    if !keep_state {
        std::fs::remove_dir_all(s.dir.path().join("state")).unwrap();
    }
    let before = s.decisions();
    let last = before.last().unwrap().clone();
    assert_eq!((last.phase, last.phase_started_at), (2, p2.phase_started_at));
    let monitor = s.spawn("monitor", 1);
    let p3 = s.wait_for("ADVANCE to phase 3", 180, &[&infer, &monitor], |d| d.action == action::ADVANCE && d.phase == 3).await;
    feed.stop().await;
    drop((infer, monitor));
    let all = s.decisions();
    let next = all.iter().find(|d| d.seq == last.seq + 1).expect("the restarted controller decided");
    assert!(next.phase == 2 && next.phase_started_at == p2.phase_started_at || next.seq == p3.seq, "resumed in phase 2 on the same clock: {next:?}");
    // phase 2 ran on one soak clock across the crash, and advanced only once it had soaked
    for d in all.iter().filter(|d| d.phase == 2 && d.action == action::HOLD) {
        assert_eq!(d.phase_started_at, p2.phase_started_at, "decision {} restarted the soak clock", d.seq);
    }
    assert!(p3.decided_at - p2.phase_started_at >= 6_000);
    assert!(!all.iter().any(|d| d.action == action::REJECTED), "an answered command is not applied again: {:?}", all.iter().map(|d| &d.reason).collect::<Vec<_>>());
    let ids: Vec<&str> = all.iter().map(|d| d.decision_id.as_str()).collect();
    let unique_ids: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique_ids.len(), "no decision published twice across the crash");
    assert_eq!(all.iter().map(|d| d.seq).collect::<Vec<_>>(), (1..=all.len() as i64).collect::<Vec<_>>());
    // the rollout is stored as a value of its own, not inside one value holding every rollout
    let store = payslip_stream::state::RocksStateStore::open(&s.dir.path().join("state")).unwrap();
    let stored: Vec<String> = store.scan_raw(payslip_stream::state::CF_ROLLOUTS).unwrap().into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect();
    assert_eq!(stored, vec![p3.rollout_id.clone()]);
    assert!(store.get_raw(payslip_stream::state::CF_META, b"rollout").unwrap().is_none());
}
