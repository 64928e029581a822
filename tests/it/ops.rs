//! The operations API of a running pipeline (started by the library's wiring, as `run` does) on
//! the real broker: every endpoint's fields, token roles on every mutating endpoint, and a real
//! Prometheus server (Debian's `prometheus`, installed by scripts/setup) scraping `/metrics`.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use payslip_stream::{
    codec::WireFormat,
    config::PipelineConfig,
    pipeline::{self, Brokers, RunOptions, RunSummary, Stages, Started},
    produce::{self, ProduceOptions, Source},
};
use serde_json::Value;
use tokio::sync::watch;

use crate::support::*;

const ALICE: &str = "alice-operate-token-0123456789";
const GRAFANA: &str = "grafana-read-token-0123456789";

/// A pipeline running in this process with its API on a free local port.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<RunSummary, pipeline::PipelineError>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(cfg: &mut PipelineConfig, dir: tempfile::TempDir, stages: Stages, read_requires_token: bool) -> Self {
        let tokens = dir.path().join("tokens.yaml");
        std::fs::write(&tokens, format!("tokens:\n  - {{name: alice, role: operate, token: {ALICE}}}\n  - {{name: grafana, role: read, token: {GRAFANA}}}\n")).unwrap();
        cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.api.tokens_file = Some(tokens);
        cfg.api.read_requires_token = read_requires_token;
        cfg.api.command_timeout_ms = 20_000;
        let (stop, rx) = watch::channel(false);
        let (tx, addr_rx) = std::sync::mpsc::channel();
        let (cfg2, brokers) = (cfg.clone(), brokers());
        // the pipeline's future is not Send (it may hold the embedded broker): it runs where `run`
        // runs it, on one thread, here a blocking thread of this runtime
        let rt = tokio::runtime::Handle::current();
        let handle = tokio::task::spawn_blocking(move || {
            rt.block_on(pipeline::run(cfg2, Brokers::Cluster(brokers), stages, RunOptions::default(), rx, move |s| {
                if let Started::Api(a) = s {
                    let _ = tx.send(a);
                }
            }))
        });
        let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(60)).expect("the API reports its address")).await.unwrap();
        let r = Running { addr, stop, handle, _dir: dir };
        // ready once every stage is
        let started = Instant::now();
        loop {
            let (status, body) = r.get("/readyz", None).await;
            if status == 200 {
                assert_eq!(body["ready"], true);
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert!(started.elapsed() < Duration::from_secs(60), "not ready after 60 s: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Status and body (JSON, or the text as a JSON string).
    async fn request(&self, method: &'static str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let (url, token, body) = (self.url(path), token.map(str::to_string), body.map(str::to_string));
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(method, &url).timeout(Duration::from_secs(60));
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let resp = match body {
                Some(b) => req.set("Content-Type", "application/json").send_string(&b),
                None => req.call(),
            };
            let resp = match resp {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {url}: {e}"),
            };
            let status = resp.status();
            let text = resp.into_string().unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        })
        .await
        .unwrap()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("GET", path, token, None).await
    }

    async fn stop(self) -> RunSummary {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.handle).await.expect("stops within 60 s").unwrap().expect("pipeline ok")
    }
}

async fn produce_documents(cfg: &PipelineConfig, n: u64) {
    let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: None, progress: None, passthrough: Default::default(), producers: 1 };
    let s = produce::produce(&opts, Source::Synthetic { seed: 11, start: 0, count: n, golden_fraction: 1.0, pool: None }).await.unwrap();
    assert_eq!(s.sent, n);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_and_a_real_prometheus_counts_the_documents_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("ops", dir.path()).await;
    // the stages run inside the test binary, whose memory and CPU are those of every test running
    // beside this one: the process rules would judge the harness, not the stage (the health check
    // below expects no alert)
    for r in cfg.monitor.alerts.iter_mut().filter(|r| r.name == "memory" || r.name == "cpu") {
        for t in r.warning.iter_mut().chain(r.critical.iter_mut()) {
            t.threshold = 1e12;
        }
        r.on_gpu = None;
    }
    let api = Running::start(&mut cfg, dir, Stages::All, false).await;
    let n = 60u64;
    produce_documents(&cfg, n).await;
    // and one message that is not a document (a dead letter, so that panel has data too)
    produce_raw(&cfg.topics.documents, vec![("broken".into(), b"not avro".to_vec(), vec![("content-type", "application/avro")])]).await;

    // the counters reach exactly the documents sent, in both stages
    let started = Instant::now();
    let text = loop {
        let (status, body) = api.get("/metrics", None).await;
        assert_eq!(status, 200);
        let text = body.as_str().expect("text").to_string();
        let s = samples(&text);
        if s.get("payslip_infer_results_produced_total") == Some(&(n as f64)) && s.get("payslip_monitor_results_applied_total") == Some(&(n as f64)) {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "metrics never reached {n}:\n{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let s = samples(&text);
    assert_eq!(s["payslip_infer_documents_consumed_total"], n as f64 + 1.0);
    assert_eq!(s["payslip_infer_producer_queue_messages"], 0.0, "everything delivered");
    // where the batch loop spent its time: every phase is exported, and documents were collected,
    // models waited for and (exactly once) transactions ended
    let phase = |p: &str| s.get(&format!("payslip_infer_loop_seconds_total{{phase=\"{p}\"}}")).copied();
    for p in ["collect", "models", "send", "commit_offsets", "commit_deliveries", "commit_end"] {
        assert!(phase(p).is_some_and(|v| v >= 0.0), "no loop phase {p}:\n{text}");
    }
    assert!(phase("collect").unwrap() > 0.0 && phase("commit_end").unwrap() > 0.0, "{text}");
    // the models' own time and CPU: some, and no more than the process's CPU in all
    let (run, run_cpu, process_cpu) = (s["payslip_inference_session_run_seconds_total"], s["payslip_inference_session_run_cpu_seconds_total"], s["payslip_process_cpu_seconds_total"]);
    assert!(run > 0.0 && run_cpu > 0.0 && run_cpu < process_cpu, "ONNX Runtime {run} s, {run_cpu} s of CPU, process {process_cpu} s");
    // the lag per partition (every 5 s) comes down to 0 once every document is consumed
    let started = Instant::now();
    loop {
        let (_, body) = api.get("/metrics", None).await;
        let k = samples(body.as_str().unwrap());
        let lags: Vec<f64> = k.iter().filter(|(name, _)| name.starts_with("payslip_infer_consumer_lag_messages{")).map(|(_, v)| *v).collect();
        if !lags.is_empty() && lags.iter().all(|l| *l == 0.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the consumer lag never showed as 0 after 30 s: {}", body.as_str().unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // librdkafka's statistics of both stages' producers (every 5 s): the broker connection is up
    // and the infer producer has sent at least the n results
    let started = Instant::now();
    loop {
        let (_, body) = api.get("/metrics", None).await;
        let k = samples(body.as_str().unwrap());
        let of = |prefix: &str| k.iter().filter(|(name, _)| name.starts_with(prefix)).map(|(_, v)| *v).collect::<Vec<f64>>();
        let (infer_up, monitor_up, sent) = (of("payslip_kafka_broker_up{client=\"infer\""), of("payslip_kafka_broker_up{client=\"monitor\""), of("payslip_kafka_sent_messages_total{client=\"infer\""));
        if infer_up.contains(&1.0) && monitor_up.contains(&1.0) && sent.first().is_some_and(|&v| v >= n as f64) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no librdkafka statistics after 60 s: {}", body.as_str().unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // the runbook's health check
    let (status, h) = api.get("/health/litert", None).await;
    assert_eq!(status, 200);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["models"]["document_classifier"], "v1.0.0");
    assert_eq!(h["models"].as_object().unwrap().len(), 3);
    assert!(h["metrics"]["avg_inference_time"].as_str().unwrap().ends_with("ms"), "{h}");
    assert_eq!(h["metrics"]["error_rate"], "0.0%", "{h}");
    assert!(h["metrics"]["uptime"].as_str().unwrap().ends_with('s'), "{h}");
    let (status, d) = api.get("/health/detailed", None).await;
    assert_eq!(status, 200);
    assert_eq!((d["ready"]["infer"].clone(), d["ready"]["monitor"].clone()), (Value::Bool(true), Value::Bool(true)));
    assert_eq!(d["infer"]["counters"]["results"], n);
    let lag = d["infer"]["consumer_lag"].as_object().unwrap();
    assert!(!lag.is_empty() && lag.len() <= 3, "an entry per assigned partition read so far: {d}");
    assert!(lag.values().all(|l| l == 0), "every document answered, nothing behind: {d}");
    assert_eq!(d["monitor"]["role"], "leader");
    assert_eq!(d["monitor"]["counters"]["results_applied"], n);
    assert!(d["monitor"]["state_bytes"].as_u64().is_some_and(|b| b > 0), "{d}");
    assert!(d["monitor"]["rollouts"].is_array(), "{d}");
    assert_eq!(d["models"].as_array().unwrap().len(), 3);
    assert_eq!(api.get("/livez", None).await.0, 200);
    assert!(s.get("payslip_inference_run_seconds_count{model=\"document_classifier\",version=\"1.0.0\"}").is_some_and(|c| *c >= 1.0), "{text}");

    // the OpenAPI document names every route, and every route it names is served
    let (status, doc) = api.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(doc, serde_json::from_str::<Value>(&std::fs::read_to_string(repo().join("docs/openapi.json")).unwrap()).unwrap(), "served = committed");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 22, "{:?}", paths.keys());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let m: &'static str = if method == "get" { "GET" } else { "POST" };
            let (status, body) = api.request(m, path, None, None).await;
            // a 404 of the API itself says why in JSON (e.g. no checkpoint yet); the router's has no body
            let routed = status != 405 && (status != 404 || body.get("error").is_some());
            assert!(routed, "{method} {path} is documented but answers {status} {body}");
        }
    }

    // models: every version re-verified and run once in isolation; one version test-loaded
    let (status, m) = api.request("POST", "/models/health-check", None, None).await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["status"], "healthy");
    let checks = m["models"].as_array().unwrap();
    assert_eq!(checks.len(), 3, "{m}");
    // the provider is the one the warm-up observed running most of the model (any host)
    assert!(checks.iter().all(|c| c["ok"] == true && c["provider"] == c["placement"][0]["provider"] && c["test_inference_ms"].as_f64().is_some()), "{m}");
    let (status, t) = api.request("POST", "/models/test-load", None, Some(r#"{"model_type": "document_classifier", "version": "1.1.0"}"#)).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!((t["model"].clone(), t["version"].clone(), t["ok"].clone()), (Value::from("document_classifier"), Value::from("1.1.0"), Value::from(true)));
    assert!(t["load_ms"].as_f64().unwrap() > 0.0 && t["result"].as_str().unwrap().starts_with("label "), "{t}");
    assert_eq!(api.request("POST", "/models/test-load", None, Some(r#"{"model_type": "no_such_model"}"#)).await.0, 400);
    let (status, slow) = api.get("/performance/slow-models?threshold_ms=0", None).await;
    assert_eq!(status, 200);
    let per_version = slow["models"].as_array().unwrap();
    assert_eq!(per_version.len(), 3, "{slow}");
    assert!(per_version.iter().all(|v| v["runs"].as_u64().unwrap() >= 1 && v["p95_run_ms"].as_f64().unwrap() > 0.0), "{slow}");
    assert_eq!(per_version.iter().map(|v| v["documents"].as_u64().unwrap()).max(), Some(n), "every document went through each model once: {slow}");
    assert_eq!(slow["slow"].as_array().unwrap().len(), 3, "with a 0 ms threshold every version is slow");
    let (status, p) = api.get("/rollout/phase-status", None).await;
    assert_eq!(status, 200);
    assert!(p["rollouts"].is_array(), "{p}");
    assert_eq!(api.get("/rollout/phase-status?rollout_id=none-such", None).await.0, 404);

    // a real Prometheus scrapes the API; its query API shows the same counts
    let pdir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        pdir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: payslip\n    static_configs:\n      - targets: ['{}']\n", api.addr),
    )
    .unwrap();
    std::fs::copy(repo().join("deploy/prometheus/rules.yml"), pdir.path().join("rules.yml")).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", pdir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", pdir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)
        .expect("prometheus (scripts/setup installs Debian's prometheus package)");
    let query = |q: &str| {
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        let q = q.to_string();
        async move {
            tokio::task::spawn_blocking(move || ureq::get(&url).query("query", &q).call().ok().and_then(|r| r.into_json::<Value>().ok())).await.unwrap()
        }
    };
    let started = Instant::now();
    let mut last = None;
    let scraped = loop {
        let v = query("payslip_infer_results_produced_total").await;
        let value = v.as_ref().and_then(|v| v["data"]["result"][0]["value"][1].as_str().map(str::to_string));
        if value.as_deref() == Some(&n.to_string()) {
            break true;
        }
        last = v;
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // every panel of the Grafana dashboard has data (recording rules included)
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/payslip-stream.json")).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string())).collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut empty: Vec<String> = exprs.clone();
    let started = Instant::now();
    while !empty.is_empty() && started.elapsed() < Duration::from_secs(60) {
        let mut still = Vec::new();
        for e in empty {
            let v = query(&e).await;
            if !v.as_ref().and_then(|v| v["data"]["result"].as_array().map(|r| !r.is_empty())).unwrap_or(false) {
                still.push(e);
            }
        }
        empty = still;
        if !empty.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let up = query("up{job=\"payslip\"}").await;
    let applied = query("payslip_monitor_results_applied_total").await;
    let _ = prom.kill();
    let _ = prom.wait();
    assert!(scraped, "Prometheus never showed {n} results: {last:?}");
    assert!(empty.is_empty(), "dashboard panels without data: {empty:?}");
    assert_eq!(up.unwrap()["data"]["result"][0]["value"][1], "1");
    assert_eq!(applied.unwrap()["data"]["result"][0]["value"][1], n.to_string());

    // a live checkpoint of the running monitor while documents flow, verified, restored elsewhere
    let more = 40u64;
    let feed = {
        let opts = ProduceOptions { brokers: brokers(), topic: cfg.topics.documents.clone(), format: WireFormat::Avro, rate: Some(40.0), progress: None, passthrough: Default::default(), producers: 1 };
        tokio::spawn(async move { produce::produce(&opts, Source::Synthetic { seed: 12, start: 0, count: more, golden_fraction: 1.0, pool: None }).await })
    };
    // checkpoint once the monitor is counting the new documents (while they flow)
    let started = Instant::now();
    loop {
        let (_, body) = api.get("/metrics", None).await;
        if samples(body.as_str().unwrap()).get("payslip_monitor_results_applied_total").is_some_and(|&v| v > n as f64) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the monitor never counted the new documents");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.request("POST", "/backup/checkpoint", Some(GRAFANA), None).await.0, 403, "a read token cannot checkpoint");
    let (status, c) = api.request("POST", "/backup/checkpoint", Some(ALICE), None).await;
    assert_eq!(status, 200, "{c}");
    let offsets: i64 = c["checkpoint"]["offsets"].as_object().unwrap().iter().filter(|(k, _)| k.starts_with(&cfg.topics.inference)).map(|(_, v)| v.as_i64().unwrap()).sum();
    // (offsets count transaction markers too, so only the lower bound is exact)
    assert!(offsets >= n as i64, "the checkpoint holds the monitor's position past the first {n} results: {offsets} ({c})");
    assert!(c["checkpoint"]["entries"]["predictions"].as_u64().unwrap() >= n, "{c}");
    let (status, v) = api.get("/backup/verify", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verified"], true);
    assert_eq!(v["checkpoint"]["offsets"], c["checkpoint"]["offsets"], "the latest checkpoint is the one just taken");
    let (status, r) = api.request("POST", "/backup/test-restore", Some(ALICE), None).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["identical"], true);
    assert_eq!(r["restored"]["offsets"], c["checkpoint"]["offsets"]);
    assert_eq!(r["restored"]["entries"], c["checkpoint"]["entries"]);
    assert_eq!(feed.await.unwrap().unwrap().sent, more);
    let t = cfg.topics.inference.clone();
    tokio::task::spawn_blocking(move || read_topic(&t, (n + more) as usize, Duration::from_secs(60), Duration::from_millis(500))).await.unwrap();

    let summary = api.stop().await;
    assert_eq!(summary.infer.unwrap().results, n + more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_mutating_endpoint_and_the_operate_token_names_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _) = monitor_config("ops-auth", dir.path()).await;
    // a monitor-only process answers commands; reads need a token too here
    let api = Running::start(&mut cfg, dir, Stages::Monitor, true).await;
    let paths = ["/features/rollout", "/features/advance-phase", "/features/rollback-phase", "/features/emergency-rollback", "/features/pause", "/features/resume", "/backup/checkpoint", "/backup/test-restore"];
    let body = Some(r#"{"rollout_id": "document_classifier-9.9.9"}"#);
    for path in paths {
        assert_eq!(api.request("POST", path, None, body).await.0, 401, "{path} without a token");
        assert_eq!(api.request("POST", path, Some("not-a-known-token-at-all"), body).await.0, 401, "{path} with an unknown token");
        let (status, b) = api.request("POST", path, Some(GRAFANA), body).await;
        assert_eq!(status, 403, "{path} with a read token: {b}");
    }
    assert!(read_all(&cfg.topics.commands).is_empty(), "a refused request publishes nothing");
    let mut backups = cfg.monitor.state_dir.clone().into_os_string();
    backups.push(".backups");
    assert!(!std::path::Path::new(&backups).exists(), "a refused request writes no checkpoint");
    // reads: open probes, token-guarded rest
    assert_eq!(api.get("/livez", None).await.0, 200);
    assert_eq!(api.get("/metrics", None).await.0, 401);
    assert_eq!(api.get("/health/litert", None).await.0, 401);
    assert_eq!(api.get("/metrics", Some(GRAFANA)).await.0, 200);
    assert_eq!(api.get("/health/litert", Some(ALICE)).await.0, 200);
    // a body over api.max_body_bytes is refused before anything is sent
    let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(cfg.api.max_body_bytes));
    assert_eq!(api.request("POST", "/features/pause", Some(ALICE), Some(&big)).await.0, 413);
    assert_eq!(api.request("POST", "/features/pause", Some(ALICE), Some("{not json")).await.0, 400);
    assert!(read_all(&cfg.topics.commands).is_empty());

    // the operate token's command is answered by the monitor; its name is the operator
    let (status, b) = api.request("POST", "/features/pause", Some(ALICE), Some(r#"{"rollout_id": "document_classifier-9.9.9", "reason": "night freeze"}"#)).await;
    assert_eq!(status, 409, "no such rollout: REJECTED, {b}");
    assert_eq!(b["decision"]["action"], "REJECTED");
    assert_eq!(b["decision"]["operator"], "alice");
    // the runbook's phase-1 call starts the configured candidate
    assert_eq!(api.request("POST", "/features/rollout", Some(ALICE), Some(r#"{"phase": 2, "percentage": 10}"#)).await.0, 400);
    assert_eq!(api.request("POST", "/features/rollout", Some(ALICE), Some(r#"{"phase": 1, "percentage": 7}"#)).await.0, 400);
    let (status, b) = api.request("POST", "/features/rollout", Some(ALICE), Some(r#"{"phase": 1, "percentage": 1}"#)).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!((b["decision"]["action"].clone(), b["decision"]["phase"].clone(), b["decision"]["operator"].clone()), (Value::from("START"), Value::from(1), Value::from("alice")), "{b}");
    let (status, p) = api.get("/rollout/phase-status", Some(GRAFANA)).await;
    assert_eq!(status, 200);
    assert_eq!(p["rollouts"][0]["current_phase"], 1, "{p}");
    assert_eq!(p["rollouts"][0]["last_operator"], "alice", "{p}");
    // the controller's rollout in /health/detailed and /metrics
    let started = Instant::now();
    loop {
        let (_, d) = api.get("/health/detailed", Some(GRAFANA)).await;
        let (_, m) = api.get("/metrics", Some(GRAFANA)).await;
        let m = samples(m.as_str().unwrap());
        let phase = m.iter().find(|(k, _)| k.starts_with("payslip_rollout_phase{rollout_id=\"document_classifier-1.1.0\"")).map(|(_, v)| *v);
        let traffic = m.iter().find(|(k, _)| k.starts_with("payslip_rollout_traffic_percent{rollout_id=\"document_classifier-1.1.0\"")).map(|(_, v)| *v);
        if d["monitor"]["rollouts"].as_array().is_some_and(|r| !r.is_empty()) && phase.is_some() {
            assert_eq!((d["monitor"]["rollouts"][0]["phase"].clone(), d["monitor"]["rollouts"][0]["status"].clone()), (Value::from(1), Value::from("RUNNING")), "{d}");
            assert_eq!((phase, traffic), (Some(1.0), Some(1.0)));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the rollout never showed in /health/detailed and /metrics: {d}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let commands = read_all(&cfg.topics.commands);
    assert_eq!(commands.len(), 2, "one command per accepted request");
    assert!(commands.iter().all(|c| c.header("operator") == Some("alice")));
    api.stop().await;
}

fn alert_event(status: &str, at: i64) -> payslip_stream::alert::AlertEvent {
    payslip_stream::alert::AlertEvent {
        alert_id: "0123456789abcdef0123456789abcdef".into(),
        code: "LITERT_HIGH_ERROR_RATE".into(),
        severity: "CRITICAL".into(),
        status: status.into(),
        rule: "error_rate".into(),
        metric: "error_rate".into(),
        model: "table_detection".into(),
        version: "1.0.0".into(),
        cohort: "baseline".into(),
        value: 0.12,
        threshold: 0.05,
        samples: 200,
        window_start: at - 60_000,
        window_end: at,
        episode_start: at - 60_000,
        action: "page the on-call; roll back the model version".into(),
        emitted_at: at,
        reason: None,
    }
}

/// Active alerts in Alertmanager's v2 API with our alert id.
fn alertmanager_alerts(port: u16) -> Option<Vec<Value>> {
    let v: Value = ureq::get(&format!("http://127.0.0.1:{port}/api/v2/alerts")).query("filter", "alert_id=\"0123456789abcdef0123456789abcdef\"").call().ok()?.into_json().ok()?;
    v.as_array().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_events_reach_a_real_alertmanager_firing_then_resolved_also_when_it_starts_late() {
    let mut cfg = isolated_config("alertmanager").await;
    let port = free_port();
    cfg.alerts.forward.alertmanager_url = Some(format!("http://127.0.0.1:{port}"));
    cfg.alerts.forward.resend_interval_ms = 1_000;
    // the bridge starts while Alertmanager is still down, with a FIRING event waiting on the topic
    let now = chrono::Utc::now().timestamp_millis();
    produce_records(&cfg.topics.alerts, "error_rate", &[alert_event("FIRING", now)]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let live = std::sync::Arc::new(std::sync::Mutex::new(payslip_stream::alert::forward::ForwardSummary::default()));
    let bridge = {
        let (cfg, stop, live) = (cfg.clone(), stop.clone(), live.clone());
        tokio::task::spawn_blocking(move || payslip_stream::alert::forward::run_observed(&cfg, &brokers(), stop, live))
    };
    // Alertmanager starts only once the bridge found it down and is retrying
    let started = Instant::now();
    while live.lock().unwrap().retries == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the bridge never tried to forward the waiting FIRING event");
        assert!(!bridge.is_finished(), "the bridge stopped: {:?}", bridge.await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("am.yml"), "route:\n  receiver: default\nreceivers:\n  - name: default\n").unwrap();
    let mut am = Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", dir.path().join("am.yml").display()))
        .arg(format!("--storage.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)
        .expect("prometheus-alertmanager (scripts/setup installs Debian's package)");

    let wait_for = |want_active: bool| async move {
        let started = Instant::now();
        loop {
            let got = tokio::task::spawn_blocking(move || alertmanager_alerts(port)).await.unwrap();
            if let Some(list) = &got {
                if want_active && list.len() == 1 || !want_active && list.is_empty() {
                    return list.clone();
                }
            }
            assert!(started.elapsed() < Duration::from_secs(60), "Alertmanager never showed the alert {}: {got:?}", if want_active { "firing" } else { "resolved" });
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let firing = wait_for(true).await;
    let a = &firing[0];
    assert_eq!(a["labels"]["alertname"], "LITERT_HIGH_ERROR_RATE");
    assert_eq!(a["labels"]["severity"], "critical", "critical routes to the pager, warnings to chat");
    assert_eq!(a["labels"]["model"], "table_detection");
    assert_eq!(a["labels"]["service"], "payslip-stream");
    assert_eq!(a["annotations"]["action"], "page the on-call; roll back the model version");
    assert_eq!(a["status"]["state"], "active");
    // the bridge sends it again while it fires: its endsAt moves on, past the first one, and it
    // is still active once the first endsAt has passed
    let first_ends = chrono::DateTime::parse_from_rfc3339(a["endsAt"].as_str().unwrap()).unwrap();
    let started = Instant::now();
    loop {
        let list = tokio::task::spawn_blocking(move || alertmanager_alerts(port)).await.unwrap().unwrap_or_default();
        assert_eq!(list.len(), 1, "the firing alert stays active: {list:?}");
        let ends = chrono::DateTime::parse_from_rfc3339(list[0]["endsAt"].as_str().unwrap()).unwrap();
        if ends > first_ends && chrono::Utc::now() > first_ends {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the alert's endsAt never moved past {first_ends}: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // RESOLVED resolves the same alert
    produce_records(&cfg.topics.alerts, "error_rate", &[alert_event("RESOLVED", chrono::Utc::now().timestamp_millis())]).await;
    wait_for(false).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let summary = bridge.await.unwrap().expect("bridge");
    let _ = am.kill();
    let _ = am.wait();
    assert_eq!(summary.forwarded, 2, "the FIRING and the RESOLVED event, each once");
    assert!(summary.retries >= 1, "Alertmanager was down at first: {summary:?}");
}

/// The deployment files are valid for the tools that load them, and the alerting rules fire at the
/// runbook's thresholds (promtool's rule unit tests in deploy/prometheus/rules.test.yml).
#[test]
fn the_prometheus_and_alertmanager_files_check_and_the_rule_unit_tests_pass() {
    let deploy = repo().join("deploy");
    let run = |cmd: &str, args: &[&str], dir: &std::path::Path| {
        let out = Command::new(cmd).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{cmd} (scripts/setup installs it): {e}"));
        assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let prom = deploy.join("prometheus");
    run("promtool", &["check", "config", "prometheus.yml"], &prom);
    run("promtool", &["check", "rules", "rules.yml"], &prom);
    let tested = run("promtool", &["test", "rules", "rules.test.yml"], &prom);
    assert!(tested.contains("SUCCESS"), "{tested}");
    run("amtool", &["check-config", "alertmanager.yml"], &deploy.join("alertmanager"));
}

/// The real binary at debug log level: tokens sent with requests (valid, read-only, unknown) never
/// appear in its log, while the operate token's name does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_, prefix) = isolated_config_with_prefix("ops-log").await;
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, format!("tokens:\n  - {{name: alice, role: operate, token: {ALICE}}}\n  - {{name: grafana, role: read, token: {GRAFANA}}}\n")).unwrap();
    let yaml = dir.path().join("pipeline.yaml");
    std::fs::write(
        &yaml,
        format!(
            "models:\n  metadata: {}\n  serve: {{document_classifier: '1.0.0', table_detection: '1.0.0', text_recognition: '1.0.0'}}\nmonitor:\n  state_dir: {}\napi:\n  tokens_file: {}\n  command_timeout_ms: 20000\n",
            repo().join("models/model_metadata.json").display(),
            dir.path().join("state").display(),
            tokens.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let log = dir.path().join("stage.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_payslip-stream"))
        .current_dir(repo())
        .args(["run", "--stage", "monitor", "--brokers", &brokers(), "--topic-prefix", &prefix, "--group", &format!("{prefix}infer"), "--api-listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&yaml)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Reaped)
        .unwrap();
    let call = |method: &'static str, path: &'static str, token: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(method, &format!("http://127.0.0.1:{port}{path}")).timeout(Duration::from_secs(30));
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            match if method == "POST" { req.send_string(r#"{"rollout_id": "document_classifier-9.9.9"}"#) } else { req.call() } {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(code, _)) => code,
                Err(_) => 0,
            }
        })
    };
    let started = Instant::now();
    while call("GET", "/readyz", None).await.unwrap() != 200 {
        assert!(started.elapsed() < Duration::from_secs(60), "not ready; log: {}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call("POST", "/features/pause", Some("an-unknown-token-value-123")).await.unwrap(), 401);
    assert_eq!(call("POST", "/features/pause", Some(GRAFANA)).await.unwrap(), 403);
    assert_eq!(call("GET", "/health/detailed", Some(GRAFANA)).await.unwrap(), 200);
    assert_eq!(call("POST", "/features/pause", Some(ALICE)).await.unwrap(), 409, "REJECTED: no such rollout");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [ALICE, GRAFANA, "an-unknown-token-value-123"] {
        assert!(!text.contains(secret), "a token value is in the log");
    }
    assert!(text.contains("alice"), "the operate token's name is logged with its command");
}
