//! `run --demo`: the whole pipeline on one machine for a new user. Produces synthetic payslips (a
//! few broken, a stretch slowed down and a stretch failing, through the fault-injection headers),
//! runs the infer and monitor stages with a phased rollout of a candidate classifier, and prints
//! results, dead letters, closing windows, alerts and rollout decisions as they happen. Windows,
//! soaks and minimum samples are shortened so alerts fire and resolve and the candidate goes through
//! the five phases (or is rolled back) within a minute.

use std::{
    ops::Range,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    message::Message,
    producer::{FutureProducer, FutureRecord},
};
use tokio::sync::watch;

use crate::{
    alert::AlertEvent,
    codec::{self, Record, WireFormat},
    config::PipelineConfig,
    document::{InferenceResult, PayslipDocument},
    inference::ModelRegistry,
    kafka::{self, headers as h, headers::HeaderSet},
    monitor::records::WindowMetrics,
    rollout::{action, CandidateSpec, RolloutDecision},
    infer::{InferStage, StageError},
    kafka::KafkaError,
    monitor::MonitorError,
    synth::{Generator, GeneratorConfig},
};

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Encode(#[from] crate::codec::EncodeError),
    #[error("infer stage: {0}")]
    Infer(#[from] StageError),
    #[error("monitor stage: {0}")]
    Monitor(#[from] MonitorError),
    /// A task of the demo died (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl DemoError {
    /// Whether running the demo again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            DemoError::Kafka(e) => e.retryable(),
            DemoError::Infer(e) => e.retryable(),
            DemoError::Monitor(e) => e.retryable(),
            DemoError::Encode(_) | DemoError::Internal(_) => false,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> DemoError {
    DemoError::Internal(e.to_string())
}

/// What `run --demo` asks for.
#[derive(Debug, Clone)]
pub struct DemoRun {
    pub count: u64,
    pub rate: f64,
    /// Candidate classifier version to roll out (1.1.1-degraded shows a rollback).
    pub candidate: Option<String>,
}

impl DemoRun {
    pub fn options(&self) -> DemoOptions {
        DemoOptions::for_count(self.count, self.rate)
    }
}

pub struct DemoOptions {
    pub count: u64,
    pub rate: f64,
    /// Documents (by index) whose batches are delayed by `slow_delay_ms`.
    pub slow: Range<u64>,
    pub slow_delay_ms: u64,
    /// Documents whose table detection is made to fail.
    pub failing: Range<u64>,
    /// One broken message after every this many documents.
    pub bad_every: u64,
    /// Print every n-th result (all dead letters, windows and alerts are printed).
    pub print_every: u64,
}

impl DemoOptions {
    pub fn for_count(count: u64, rate: f64) -> Self {
        let at = |f: f64| (count as f64 * f) as u64;
        // the faults come early, while the candidate is at 1 %: both cohorts see them alike
        Self { count, rate, slow: at(0.04)..at(0.08), slow_delay_ms: 700, failing: at(0.10)..at(0.14), bad_every: 100, print_every: 100 }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct DemoSummary {
    pub produced: u64,
    pub broken: u64,
    pub results: u64,
    pub dead_letters: u64,
    pub windows_closed: u64,
    pub alerts_firing: u64,
    pub alerts_resolved: u64,
    pub classifier_accuracy: f64,
    pub canary_results: u64,
    pub decisions: u64,
    /// The rollout's last action and status, e.g. `PROMOTE/PROMOTED`.
    pub rollout: String,
}

/// Distinct documents the demo renders before it starts sending.
const DEMO_POOL: u64 = 500;

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}ms")).unwrap_or_else(|| "-".into())
}

/// Adjusts a config for the demo: short windows, faults on, a fresh state directory, and a rollout of
/// `candidate` (default: the configured one, else document_classifier 1.1.0) started at once, with
/// soaks of 6 s and minimum samples of at most 10.
pub fn demo_config(mut cfg: PipelineConfig, state_dir: PathBuf, candidate: Option<String>) -> PipelineConfig {
    let mut c = cfg.rollout.candidate.clone().unwrap_or(CandidateSpec { model: "document_classifier".into(), version: "1.1.0".into(), id: None });
    if let Some(v) = candidate {
        c.version = v;
        c.id = None;
    }
    cfg.rollout.candidate = Some(c);
    cfg.rollout.auto_start = true;
    for p in &mut cfg.rollout.phases {
        p.soak_ms = 6_000;
        for k in &mut p.criteria {
            k.min_samples = k.min_samples.min(10);
        }
    }
    // the soaks are seconds, so the evidence is too: criteria sized for effects 10 times the
    // production ones (latency for a 50-fold slowdown)
    crate::rollout::config::scale_effects(&mut cfg.rollout.phases, 10.0, 50.0);
    cfg.faults.enabled = true;
    // one monitor, and the embedded broker is not relied on for transactions
    cfg.monitor.changelog = false;
    cfg.monitor.state_dir = state_dir;
    cfg.monitor.window_size_ms = 3_000;
    cfg.monitor.allowed_lateness_ms = 500;
    cfg.monitor.idle_timeout_ms = 3_000;
    cfg
}

pub async fn run(cfg: PipelineConfig, brokers: String, registry: Arc<ModelRegistry>, opts: DemoOptions, mut interrupt: watch::Receiver<bool>) -> Result<DemoSummary, DemoError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let infer = tokio::spawn(InferStage::new(cfg.clone(), brokers.clone(), registry).run(stop_rx));
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (cfg, brokers, stop) = (cfg.clone(), brokers.clone(), monitor_stop.clone());
        tokio::task::spawn_blocking(move || crate::monitor::run(cfg, brokers, Default::default(), stop))
    };

    let mut printer_cfg = kafka::consumer_config(&brokers, &format!("payslip-demo-printer-{}", std::process::id()), &cfg.kafka.librdkafka);
    printer_cfg.set("enable.auto.offset.store", "true");
    let printer: StreamConsumer<kafka::rebalance::KnownProtocol> = printer_cfg.create_with_context(kafka::rebalance::KnownProtocol::of(&printer_cfg)).map_err(KafkaError::client("the demo printer"))?;
    printer
        .subscribe(&[&cfg.topics.inference, &cfg.topics.documents_dlq, &cfg.topics.metrics, &cfg.topics.alerts, &cfg.topics.decisions])
        .map_err(KafkaError::broker("the demo printer: subscribe"))?;

    let producer_task = {
        let (brokers, topic, passthrough) = (brokers.clone(), cfg.topics.documents.clone(), cfg.kafka.librdkafka.clone());
        let (slow, failing, delay, bad_every, count, rate) = (opts.slow.clone(), opts.failing.clone(), opts.slow_delay_ms, opts.bad_every, opts.count, opts.rate);
        tokio::spawn(async move {
            let p: FutureProducer = kafka::producer_config(&brokers, &passthrough).create().map_err(KafkaError::client("the demo producer"))?;
            // Rendering rasters costs more than running the models on them: render a pool once and
            // send its documents round-robin, each with its own id, user and time.
            let gen = Generator::new(GeneratorConfig { seed: 2026, ..Default::default() });
            let users = gen.config().users as u64;
            let pool = tokio::task::spawn_blocking(move || (0..DEMO_POOL.min(count)).map(|i| gen.document(i).document).collect::<Vec<_>>()).await.map_err(internal)?;
            let started = Instant::now();
            let mut broken = 0;
            for i in 0..count {
                tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
                let mut doc = pool[(i % pool.len() as u64) as usize].clone();
                doc.document_id = format!("doc-demo-{i:08}");
                doc.user_id = format!("user-{:05}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % users);
                doc.submitted_at = chrono::Utc::now().timestamp_millis();
                let payload = codec::encode(&doc, WireFormat::Avro)?;
                let mut hs = HeaderSet::new().with(h::CONTENT_TYPE, WireFormat::Avro.content_type()).with(h::SCHEMA, PayslipDocument::SCHEMA_NAME);
                if slow.contains(&i) {
                    hs = hs.with("fault-delay-ms", delay.to_string());
                }
                if failing.contains(&i) {
                    hs = hs.with("fault-error", "table_detection");
                }
                let rec = FutureRecord::to(&topic).key(&doc.document_id).payload(&payload).headers(hs.build());
                kafka::delivered(kafka::enqueue(&p, rec).await?, &topic).await?;
                if (i + 1) % bad_every == 0 {
                    let body = format!("{{\"document_id\": \"broken-{i}\", \"pages\": \"not a list\"}}");
                    let hs = HeaderSet::new().with(h::CONTENT_TYPE, "application/json").build();
                    kafka::delivered(kafka::enqueue(&p, FutureRecord::to(&topic).key("broken").payload(&body).headers(hs)).await?, &topic).await?;
                    broken += 1;
                }
            }
            Ok::<u64, DemoError>(broken)
        })
    };

    println!(
        "demo: {} payslips at {}/s; documents {:?} are slowed by {} ms, {:?} fail table detection; windows of {} s",
        opts.count, opts.rate, opts.slow, opts.slow_delay_ms, opts.failing, cfg.monitor.window_size_ms / 1000
    );
    if let Some(c) = &cfg.rollout.candidate {
        println!(
            "demo: rolling out {} {} against {} in {} phases ({}), soaks of 6 s, then as long as the evidence takes",
            c.model,
            c.version,
            cfg.models.serve.get(&c.model).cloned().unwrap_or_default(),
            cfg.rollout.phases.len(),
            cfg.rollout.phases.iter().map(|p| format!("{} %", p.traffic_percent)).collect::<Vec<_>>().join(" → ")
        );
    }
    let mut s = DemoSummary::default();
    let (mut correct, mut labelled) = (0u64, 0u64);
    let expected_broken = opts.count / opts.bad_every;
    let mut last_event = Instant::now();
    loop {
        let done = s.results >= opts.count && s.dead_letters >= expected_broken;
        let quiet = if done { Duration::from_secs(8) } else { Duration::from_secs(60) };
        let m = tokio::select! {
            _ = interrupt.changed() => break,
            _ = tokio::time::sleep(quiet.saturating_sub(last_event.elapsed())) => break,
            m = printer.recv() => m.map_err(KafkaError::broker("the demo printer"))?,
        };
        last_event = Instant::now();
        let ct = h::get(m.headers(), h::CONTENT_TYPE);
        let payload = m.payload().unwrap_or_default();
        if m.topic() == cfg.topics.decisions {
            let Ok(d) = codec::decode::<RolloutDecision>(payload, ct.as_deref()) else { continue };
            s.decisions += 1;
            s.rollout = format!("{}/{}", d.action, d.status);
            let mark = if d.action == action::HOLD { "ROLLOUT " } else { "ROLLOUT*" };
            println!("{mark} {:<18} phase {} {:>5.1}% {}", d.action, d.phase, d.traffic_percent, d.reason);
            if d.action != action::HOLD && d.action != action::START {
                for c in &d.criteria {
                    println!("           {:<13} {:<34} {}", c.verdict, c.name, c.detail);
                }
            }
        } else if m.topic() == cfg.topics.documents_dlq {
            s.dead_letters += 1;
            println!("DLQ     key={} class={} reason={}", String::from_utf8_lossy(m.key().unwrap_or_default()), h::get(m.headers(), h::ERROR_CLASS).unwrap_or_default(), h::get(m.headers(), h::ERROR_MESSAGE).unwrap_or_default());
        } else if m.topic() == cfg.topics.inference {
            let Ok(r) = codec::decode::<InferenceResult>(payload, ct.as_deref()) else { continue };
            s.results += 1;
            s.canary_results += (r.cohort == "canary") as u64;
            let cls = r.output("document_classifier");
            let label = cls.and_then(|o| o.label.clone()).unwrap_or_else(|| "-".into());
            if let Some(t) = &r.true_format {
                labelled += 1;
                correct += (t == &label) as u64;
            }
            if s.results % opts.print_every == 1 || r.error_code.is_some() && s.results % 10 == 0 {
                let tables = r.output("table_detection").map(|o| o.regions.len()).unwrap_or(0);
                let line = r.output("text_recognition").and_then(|o| o.lines.first().cloned()).unwrap_or_default();
                println!(
                    "RESULT  {} {:<8} format={label:<9} truth={:<9} tables={tables} text={line:?} provider={} infer={:.0}ms e2e={:.0}ms{}",
                    r.document_id,
                    r.cohort,
                    r.true_format.clone().unwrap_or_default(),
                    r.provider,
                    r.inference_ms,
                    r.end_to_end_ms,
                    r.error_code.map(|c| format!(" error={c}")).unwrap_or_default()
                );
            }
        } else if m.topic() == cfg.topics.metrics {
            let Ok(w) = codec::decode::<WindowMetrics>(payload, ct.as_deref()) else { continue };
            s.windows_closed += 1;
            if w.model == "pipeline" {
                let t = chrono::DateTime::from_timestamp_millis(w.window_start).map(|t| t.format("%H:%M:%S").to_string()).unwrap_or_default();
                println!(
                    "WINDOW  {t} +{}s {:<22} n={:<4} errors={:<3} p50={} p95={} p99={}{}",
                    (w.window_end - w.window_start) / 1000,
                    format!("{}/{}", w.model, w.version),
                    w.count,
                    w.errors,
                    fmt_ms(w.latency_p50_ms),
                    fmt_ms(w.latency_p95_ms),
                    fmt_ms(w.latency_p99_ms),
                    w.max_rss_mb.map(|m| format!(" rss={m:.0}MB")).unwrap_or_default()
                );
            }
        } else if m.topic() == cfg.topics.alerts {
            let Ok(a) = codec::decode::<AlertEvent>(payload, ct.as_deref()) else { continue };
            if a.status == "INFO" {
                println!("INFO    {:<35} {}/{}/{} -> {}", a.code, a.model, a.version, a.cohort, a.action);
                continue;
            }
            if a.status == "FIRING" { s.alerts_firing += 1 } else { s.alerts_resolved += 1 }
            println!("ALERT   {:<8} {:<26} {}/{}/{} {}={:.3} threshold={} -> {}", a.status, a.code, a.model, a.version, a.cohort, a.metric, a.value, a.threshold, a.action);
        }
    }
    let _ = stop_tx.send(true);
    s.broken = producer_task.await.map_err(internal)??;
    s.produced = opts.count;
    infer.await.map_err(internal)??;
    monitor_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    monitor.await.map_err(internal)??;
    s.classifier_accuracy = if labelled > 0 { correct as f64 / labelled as f64 } else { 0.0 };
    Ok(s)
}
