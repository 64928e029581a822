//! Reports for a generated period: window metrics, alert events and a rollout decision written to
//! their topics for yesterday (UTC; and some just outside it), then `payslip-stream report` (the real
//! CLI) and the API's `/reports/daily-performance`: expected totals, and charts that are valid PNG
//! and SVG images.

use std::process::Command;

use payslip_stream::{alert::AlertEvent, monitor::records::WindowMetrics, rollout::RolloutDecision};
use serde_json::{json, Value};

use crate::support::*;


fn window(id: &str, model: &str, version: &str, cohort: &str, start: i64, count: i64, errors: i64, p95: f64) -> WindowMetrics {
    serde_json::from_value(json!({
        "metrics_id": id, "model": model, "version": version, "cohort": cohort, "window_start": start, "window_end": start + 3_600_000,
        "count": count, "errors": errors, "error_rate": errors as f64 / count as f64, "unavailable": 0,
        "latency_p50_ms": p95 / 2.0, "latency_p95_ms": p95, "latency_p99_ms": p95 * 1.5, "latency_max_ms": p95 * 2.0,
        "labelled": count / 10, "accuracy": 0.9, "pcda_labelled": 0, "ratings": 0,
        "dropped_late_total": 0, "feedback_orphan_total": 0, "dead_lettered_total": 0, "emitted_at": start + 3_600_000
    }))
    .expect("window metrics")
}

fn alert(status: &str, at: i64) -> AlertEvent {
    serde_json::from_value(json!({
        "alert_id": "a1", "code": "LITERT_HIGH_LATENCY", "severity": "WARNING", "status": status, "rule": "latency_p95", "metric": "latency_p95_ms",
        "model": "table_detection", "version": "1.0.0", "cohort": "baseline", "value": 700.0, "threshold": 500.0, "samples": 120,
        "window_start": at - 3_600_000, "window_end": at, "episode_start": at - 3_600_000, "action": "Check hardware acceleration", "emitted_at": at
    }))
    .expect("alert")
}

fn decision(at: i64) -> RolloutDecision {
    serde_json::from_value(json!({
        "decision_id": "d1", "rollout_id": "document_classifier-1.1.0", "seq": 1, "action": "START", "status": "RUNNING",
        "model": "document_classifier", "candidate_version": "1.1.0", "baseline_version": "1.0.0", "phase": 1, "phase_name": "alpha",
        "traffic_percent": 1.0, "previous_traffic_percent": 0.0, "reason": "started by alice", "operator": "alice", "command_id": "c1",
        "criteria": [], "window_start": null, "window_end": null, "phase_started_at": at, "soak_ms": 86_400_000, "soak_elapsed_ms": 0,
        "quarantined": {}, "decided_at": at
    }))
    .expect("decision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_report_has_the_periods_totals_and_valid_chart_images() {
    let (cfg, prefix) = isolated_config_with_prefix("report").await;
    // yesterday (UTC), so the records are well within the topics' retention
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let at = yesterday.format("%Y-%m-%d").to_string();
    let day = yesterday.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
    let h = 3_600_000;
    let windows = vec![
        window("b1", "document_classifier", "1.0.0", "baseline", day + 8 * h, 100, 1, 40.0),
        window("b2", "document_classifier", "1.0.0", "baseline", day + 9 * h, 200, 2, 60.0),
        window("b3", "document_classifier", "1.0.0", "baseline", day + 10 * h, 300, 3, 50.0),
        window("c1", "document_classifier", "1.1.0", "canary", day + 9 * h, 10, 0, 30.0),
        window("c2", "document_classifier", "1.1.0", "canary", day + 10 * h, 20, 1, 35.0),
        window("p1", "pipeline", "-", "all", day + 8 * h, 100, 1, 90.0),
        window("p2", "pipeline", "-", "all", day + 9 * h, 210, 2, 95.0),
        window("p3", "pipeline", "-", "all", day + 10 * h, 320, 4, 99.0),
        window("n1", "document_classifier", "1.0.0", "baseline", day + 24 * h, 999, 0, 1.0), // the next day
        window("b2", "document_classifier", "1.0.0", "baseline", day + 9 * h, 200, 2, 60.0),  // published again
    ];
    produce_records(&cfg.topics.metrics, "m", &windows).await;
    produce_records(&cfg.topics.alerts, "a", &[alert("FIRING", day + 9 * h), alert("RESOLVED", day + 11 * h), alert("FIRING", day - h)]).await;
    produce_records(&cfg.topics.decisions, "document_classifier-1.1.0", &[decision(day + 9 * h + 1_800_000)]).await;

    // the CLI
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .current_dir(repo())
        .args(["report", "--brokers", &brokers(), "--topic-prefix", &prefix, "--period", "day", "--at", &at, "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(r["documents"], 630, "the pipeline's windows of the day");
    let version = |v: &str| r["versions"].as_array().unwrap().iter().find(|x| x["model"] == "document_classifier" && x["version"] == v).cloned().unwrap();
    let base = version("1.0.0");
    assert_eq!((base["windows"].clone(), base["documents"].clone(), base["errors"].clone()), (json!(3), json!(600), json!(6)), "{base}");
    assert_eq!(base["error_rate"], 0.01);
    assert_eq!(base["latency_p95_ms"], (40.0 * 100.0 + 60.0 * 200.0 + 50.0 * 300.0) / 600.0);
    assert_eq!(base["latency_max_ms"], 120.0);
    assert_eq!(base["series"].as_array().unwrap().len(), 3);
    assert_eq!(version("1.1.0")["documents"], 30);
    assert_eq!(r["alerts"].as_array().unwrap().len(), 2, "the FIRING and RESOLVED of the day");
    assert_eq!(r["decisions"].as_array().unwrap().len(), 1);
    for chart in ["volume", "error_rate", "latency_p95", "accuracy"] {
        let svg = std::fs::read_to_string(out.path().join(format!("{chart}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("<polyline"), "{chart}.svg is an SVG with lines");
        let png = png::Decoder::new(std::fs::File::open(out.path().join(format!("{chart}.png"))).unwrap());
        let mut reader = png.read_info().expect("a valid PNG");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("PNG pixels decode");
        assert_eq!((info.width, info.height), (960, 420));
        assert!(buf.iter().any(|b| *b < 200), "{chart}.png has something drawn on it");
    }
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert_eq!(html.matches("<img ").count(), 4);
    assert!(html.contains("document_classifier") && html.contains("LITERT_HIGH_LATENCY") && html.contains("alice"));

    // the API answers the same report, and as HTML with the charts inline
    let (port, dir) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(), tempfile::tempdir().unwrap());
    let mut cfg2 = cfg.clone();
    cfg2.monitor.state_dir = dir.path().join("state");
    cfg2.api.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let rt = tokio::runtime::Handle::current();
    let handle = tokio::task::spawn_blocking(move || rt.block_on(payslip_stream::pipeline::run(cfg2, payslip_stream::pipeline::Brokers::Cluster(brokers()), payslip_stream::pipeline::Stages::Monitor, Default::default(), rx, |_| {})));
    let get = |q: &'static str| {
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            loop {
                match ureq::get(&format!("http://127.0.0.1:{port}/reports/daily-performance{q}")).call() {
                    Ok(r) => return r.into_string().unwrap(),
                    Err(e) => assert!(started.elapsed() < std::time::Duration::from_secs(60), "{e}"),
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let q: &'static str = Box::leak(format!("?at={at}").into_boxed_str());
    let api: Value = serde_json::from_str(&get(q).await.unwrap()).unwrap();
    assert_eq!(api["documents"], r["documents"]);
    assert_eq!(api["versions"], r["versions"]);
    let q: &'static str = Box::leak(format!("?at={at}&format=html").into_boxed_str());
    let page = get(q).await.unwrap();
    assert_eq!(page.matches("src=\"data:image/svg+xml;base64,").count(), 4);
    let _ = stop.send(true);
    handle.await.unwrap().expect("monitor stops cleanly");
}
