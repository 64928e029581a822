//! `GET /metrics`: the process's figures in the Prometheus/OpenMetrics text format, through the
//! official Rust client (`prometheus-client`). Everything is read at scrape time from the stages'
//! own counters (atomics of the infer stage, the monitor's published view, the model registry), so
//! a scrape never blocks a stage and a counter shown here is the one the stage keeps.
//!
//! Names follow `payslip_<name>_<unit>[_total]`; counters get `_total` from the encoder.

use std::sync::{atomic::Ordering, Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use super::OpsState;
use crate::inference::LoadState;

#[derive(Debug)]
struct Figures(Arc<OpsState>);

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.0;
        gauge(&mut enc, "payslip_uptime_seconds", "Seconds since this process started its stages.", s.started.elapsed().as_secs_f64())?;
        if let Some(rss) = crate::telemetry::rss_bytes_of_self() {
            gauge(&mut enc, "payslip_process_resident_memory_bytes", "Resident memory of this process.", rss as f64)?;
        }
        if let Some(devices) = crate::inference::gpu::gpu_memory() {
            let mut used = enc.encode_descriptor("payslip_gpu_memory_used_bytes", "Memory in use on the GPU (all processes), from NVML.", None, MetricType::Gauge)?;
            for d in &devices {
                ConstGauge::new(d.used_bytes as f64).encode(used.encode_family(&[("device", d.index.to_string().as_str()), ("name", d.name.as_str())])?)?;
            }
            let mut total = enc.encode_descriptor("payslip_gpu_memory_total_bytes", "Memory of the GPU, from NVML.", None, MetricType::Gauge)?;
            for d in &devices {
                ConstGauge::new(d.total_bytes as f64).encode(total.encode_family(&[("device", d.index.to_string().as_str()), ("name", d.name.as_str())])?)?;
            }
            let mut mine = enc.encode_descriptor("payslip_gpu_process_memory_bytes", "GPU memory this process holds, from NVML (absent where the driver does not list the process).", None, MetricType::Gauge)?;
            for d in devices.iter().filter(|d| d.process_bytes.is_some()) {
                ConstGauge::new(d.process_bytes.unwrap_or_default() as f64).encode(mine.encode_family(&[("device", d.index.to_string().as_str())])?)?;
            }
        }
        if let Some(ticks) = crate::telemetry::clock_ticks_of_self() {
            let m = enc.encode_descriptor("payslip_process_cpu_seconds", "CPU time (user and system) of this process.", None, MetricType::Counter)?;
            ConstCounter::new(ticks as f64 / 100.0).encode(m)?;
        }
        {
            let mut fam = enc.encode_descriptor("payslip_stage_ready", "1 when the stage is ready (see /readyz), else 0.", None, MetricType::Gauge)?;
            for (stage, ready) in s.readiness() {
                ConstGauge::new(ready as i64).encode(fam.encode_family(&[("stage", stage)])?)?;
            }
        }
        if let Some(registry) = s.registry() {
            let status = registry.status();
            {
                let mut fam = enc.encode_descriptor("payslip_model_loaded", "1 for a loaded model version (label provider: the execution provider it runs on), 0 for a refused one.", None, MetricType::Gauge)?;
                for m in &status {
                    let provider = m.provider.clone().unwrap_or_default();
                    let loaded = (m.state == LoadState::Loaded) as i64;
                    ConstGauge::new(loaded).encode(fam.encode_family(&[("model", m.model.as_str()), ("version", m.version.as_str()), ("provider", provider.as_str())])?)?;
                }
            }
            {
                let mut fam = enc.encode_descriptor(
                    "payslip_model_node_share",
                    "Share of a loaded version's graph nodes its profiled warm-up ran on each execution provider (1 on one provider; below 1 when ONNX Runtime placed some nodes elsewhere).",
                    None,
                    MetricType::Gauge,
                )?;
                for m in &status {
                    for p in &m.placement {
                        ConstGauge::new(p.node_share).encode(fam.encode_family(&[("model", m.model.as_str()), ("version", m.version.as_str()), ("provider", p.provider.as_str())])?)?;
                    }
                }
            }
            gauge(&mut enc, "payslip_model_versions_loaded", "Model versions loaded (versions nothing routes to are unloaded).", registry.loaded_count() as f64)?;
            gauge(&mut enc, "payslip_model_sessions", "ONNX Runtime sessions held, over every loaded model version (inference.sessions_per_model each).", registry.session_count() as f64)?;
            {
                let mut fam = enc.encode_descriptor("payslip_model_load_seconds", "Time it took to load the model version.", None, MetricType::Gauge)?;
                for m in &status {
                    ConstGauge::new(m.load_ms / 1000.0).encode(fam.encode_family(&[("model", m.model.as_str()), ("version", m.version.as_str())])?)?;
                }
            }
            {
                let (wall, cpu) = crate::inference::process_session_run_seconds();
                let m = enc.encode_descriptor("payslip_inference_session_run_seconds", "Time inside ONNX Runtime's Session::run, every run of the process together (the models alone: no preprocessing, no Kafka).", None, MetricType::Counter)?;
                ConstCounter::new(wall).encode(m)?;
                let m = enc.encode_descriptor("payslip_inference_session_run_cpu_seconds", "CPU time inside ONNX Runtime's Session::run (all of ONNX Runtime's work with inference.intra_threads 1); against payslip_process_cpu_seconds_total, the models' share of the process.", None, MetricType::Counter)?;
                ConstCounter::new(cpu).encode(m)?;
            }
            let runs = registry.run_stats();
            runs.run_seconds.encode(enc.encode_descriptor("payslip_inference_run_seconds", "Wall time of one ONNX Runtime run (one batch of one model version).", None, MetricType::Histogram)?)?;
            runs.batch_sizes.encode(enc.encode_descriptor("payslip_inference_batch_documents", "Documents per ONNX Runtime run.", None, MetricType::Histogram)?)?;
        }
        if let Some(c) = s.infer_counters() {
            let snap = c.snapshot();
            counter(&mut enc, "payslip_infer_documents_consumed", "Documents read from the documents topic (a batch read again after an abort counts again).", snap.consumed)?;
            counter(&mut enc, "payslip_infer_results_produced", "Results committed (exactly once) or delivered (at least once).", snap.results)?;
            counter(&mut enc, "payslip_infer_results_with_error", "Results whose error_code is set.", snap.results_with_error)?;
            counter(&mut enc, "payslip_infer_batches", "Batches processed.", snap.batches)?;
            counter(&mut enc, "payslip_infer_transactions_aborted", "Exactly once: batch transactions aborted and read again.", snap.transactions_aborted)?;
            counter(&mut enc, "payslip_infer_transactions_committed", "Exactly once: transactions committed (one per batch, or per commit interval while busy).", snap.transactions_committed)?;
            {
                let m = enc.encode_descriptor("payslip_infer_inference_seconds", "Model time of the documents answered (sum over each document's model outputs).", None, MetricType::Counter)?;
                ConstCounter::new(c.inference_us.load(Ordering::Relaxed) as f64 / 1e6).encode(m)?;
            }
            {
                let mut fam = enc.encode_descriptor("payslip_infer_loop_seconds", "Where the infer stage's batch loop spent its time, by phase (collect, models, send, commit_offsets, commit_deliveries, commit_end).", None, MetricType::Counter)?;
                for (phase, secs) in c.loop_seconds() {
                    ConstCounter::new(secs).encode(fam.encode_family(&[("phase", phase)])?)?;
                }
            }
            counter(&mut enc, "payslip_infer_documents_inferred", "Documents that went through the models (the denominator of payslip_infer_inference_seconds_total).", c.inferred_documents.load(Ordering::Relaxed))?;
            counter(&mut enc, "payslip_infer_offsets_committed", "Batches whose input offsets were committed or stored.", c.offsets_stored.load(Ordering::Relaxed))?;
            {
                let mut fam = enc.encode_descriptor("payslip_infer_consumer_lag_messages", "Documents between the infer consumer's position and the end of each assigned partition (every 5 s).", None, MetricType::Gauge)?;
                let lag = c.consumer_lag.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (p, l) in lag {
                    ConstGauge::new(l).encode(fam.encode_family(&[("partition", p.to_string().as_str())])?)?;
                }
            }
            gauge(&mut enc, "payslip_infer_producer_queue_messages", "Records queued in the infer producer and not yet delivered.", c.producer_queue.load(Ordering::Relaxed) as f64)?;
            gauge(&mut enc, "payslip_infer_ack_queue_batches", "At least once: batches waiting for their delivery reports (at most 8).", c.ack_queue.load(Ordering::Relaxed) as f64)?;
            let mut fam = enc.encode_descriptor("payslip_infer_dead_letters", "Messages sent to the documents dead-letter topic, by class.", None, MetricType::Counter)?;
            for (class, n) in &snap.dead_letters_by_class {
                ConstCounter::new(*n).encode(fam.encode_family(&[("class", class.as_str())])?)?;
            }
        }
        if let Some(v) = s.monitor_view() {
            let c = &v.counters;
            counter(&mut enc, "payslip_monitor_results_applied", "Results counted into windows.", c.results_applied)?;
            counter(&mut enc, "payslip_monitor_duplicates_ignored", "Results not counted because the same result id was counted before.", c.duplicates_ignored)?;
            counter(&mut enc, "payslip_monitor_feedback_applied", "Feedback joined to its prediction.", c.feedback_applied)?;
            counter(&mut enc, "payslip_monitor_feedback_orphans", "Feedback whose prediction never arrived.", c.feedback_orphans)?;
            counter(&mut enc, "payslip_monitor_late_dropped", "Results later than the allowed lateness of their window.", c.dropped_late)?;
            counter(&mut enc, "payslip_monitor_dead_letters", "Monitor inputs sent to the monitor dead-letter topic.", c.undecodable)?;
            counter(&mut enc, "payslip_monitor_windows_closed", "Windows closed and published.", c.windows_closed)?;
            {
                let mut fam = enc.encode_descriptor("payslip_monitor_alert_events", "Alert events published, by code and state (FIRING, RESOLVED, INFO).", None, MetricType::Counter)?;
                for (key, n) in &c.alert_events {
                    let (code, state) = key.split_once('|').unwrap_or((key.as_str(), ""));
                    ConstCounter::new(*n).encode(fam.encode_family(&[("code", code), ("state", state)])?)?;
                }
            }
            gauge(&mut enc, "payslip_monitor_open_windows", "Windows open in the monitor's state.", v.open_windows as f64)?;
            {
                let mut fam = enc.encode_descriptor("payslip_monitor_leader", "1 when this process leads the monitor group, 0 on standby or while starting.", None, MetricType::Gauge)?;
                ConstGauge::new((v.role == crate::monitor::view::Role::Leader) as i64).encode(fam.encode_family(&[("role", format!("{:?}", v.role).to_ascii_lowercase().as_str())])?)?;
            }
            gauge(&mut enc, "payslip_monitor_closing_partitions_led", "Closing partitions of the monitor (monitor.closing_partitions) this process leads.", v.leads_partitions.len() as f64)?;
            if let Some(b) = v.state_bytes {
                gauge(&mut enc, "payslip_monitor_state_bytes", "RocksDB's estimate of the monitor state's live data.", b as f64)?;
            }
            if let Some(p) = &v.pre {
                counter(&mut enc, "payslip_monitor_pre_results", "Results this process's pre-aggregation member aggregated into partial windows (monitor.scale_out).", p.results)?;
                counter(&mut enc, "payslip_monitor_pre_feedback_joined", "Feedback this process's pre-aggregation member joined with its prediction.", p.feedback_joined)?;
                counter(&mut enc, "payslip_monitor_pre_feedback_orphans", "Feedback this process's pre-aggregation member counted as orphan: no prediction in its results partition, read to its end, up to the feedback's time.", p.feedback_orphans)?;
                gauge(&mut enc, "payslip_monitor_pre_feedback_held", "Feedback this process's pre-aggregation member holds: its prediction not read yet, its results partition not complete up to its time.", p.feedback_held as f64)?;
                counter(&mut enc, "payslip_monitor_pre_batches", "Pre-aggregation transactions committed by this process.", p.batches)?;
                counter(&mut enc, "payslip_monitor_pre_batches_discarded", "Pre-aggregation batches discarded by a rebalance or an aborted transaction, then read again.", p.batches_discarded)?;
                gauge(&mut enc, "payslip_monitor_pre_partitions", "Results and feedback partitions this process's pre-aggregation member owns.", p.partitions as f64)?;
                if let Some(ms) = p.last_assignment_ms {
                    gauge(&mut enc, "payslip_monitor_pre_last_assignment_seconds", "The last assignment: restoring the predictions of the partitions taken.", ms as f64 / 1e3)?;
                }
            }
            if let Some(p) = &v.changelog {
                gauge(&mut enc, "payslip_monitor_standby_warm", "1 when a waiting monitor process keeps a warm copy of the state (monitor.standby_replicas >= 1).", p.warm as i64 as f64)?;
                gauge(&mut enc, "payslip_monitor_changelog_applied_offset", "Next changelog offset this process's state has applied.", p.applied_offset as f64)?;
                if let Some(lag) = p.lag() {
                    gauge(&mut enc, "payslip_monitor_changelog_lag_records", "Changelog records (transaction markers included) between this process's state and the changelog's end, as last seen while tailing or restoring.", lag as f64)?;
                }
                counter(&mut enc, "payslip_monitor_changelog_records_applied", "Changelog records applied to this process's state (warm tailing and restores).", p.records_applied)?;
                if let Some(ms) = p.last_takeover_ms {
                    gauge(&mut enc, "payslip_monitor_last_takeover_seconds", "The last takeover: from being handed the leadership to reading the inputs (restore, state load, outbox recovery).", ms as f64 / 1e3)?;
                }
                if let Some(n) = p.last_takeover_records {
                    gauge(&mut enc, "payslip_monitor_last_takeover_replayed_records", "Changelog records the last takeover replayed before resuming.", n as f64)?;
                }
            }
            {
                let mut fam = enc.encode_descriptor("payslip_rollout_phase", "Current phase (1-based) of each rollout the controller holds.", None, MetricType::Gauge)?;
                for r in &v.rollouts {
                    ConstGauge::new(r.phase as i64).encode(fam.encode_family(&[("rollout_id", r.rollout_id.as_str()), ("model", r.model.as_str()), ("candidate", r.candidate_version.as_str()), ("status", r.status.as_str())])?)?;
                }
            }
            {
                let mut fam = enc.encode_descriptor("payslip_rollout_traffic_percent", "Share of users routed to each rollout's candidate.", None, MetricType::Gauge)?;
                for r in &v.rollouts {
                    ConstGauge::new(r.traffic_percent).encode(fam.encode_family(&[("rollout_id", r.rollout_id.as_str()), ("model", r.model.as_str()), ("candidate", r.candidate_version.as_str()), ("status", r.status.as_str())])?)?;
                }
            }
            let mut fam = enc.encode_descriptor("payslip_alerts_firing", "1 per alert instance firing now.", None, MetricType::Gauge)?;
            for a in &v.firing {
                ConstGauge::new(1).encode(fam.encode_family(&[("rule", a.rule.as_str()), ("severity", a.severity.as_str()), ("subject", a.subject.as_str())])?)?;
            }
        }
        encode_kafka(&mut enc, &s.kafka_stats())
    }
}

/// librdkafka's statistics of the stages' producers, as `payslip_kafka_*` with a `client` label.
fn encode_kafka(enc: &mut DescriptorEncoder<'_>, clients: &[(&'static str, crate::kafka::stats::ClientStats)]) -> std::fmt::Result {
    if clients.is_empty() {
        return Ok(());
    }
    type Of = fn(&crate::kafka::stats::ClientStats) -> f64;
    let client_gauges: [(&str, &str, Of); 3] = [
        ("payslip_kafka_producer_queue_messages", "librdkafka: messages in the producer's queues (msg_cnt).", |k| k.msg_cnt as f64),
        ("payslip_kafka_producer_queue_bytes", "librdkafka: bytes of the messages in the producer's queues (msg_size).", |k| k.msg_size as f64),
        ("payslip_kafka_reply_queue_operations", "librdkafka: operations waiting in the reply queue (replyq).", |k| k.replyq as f64),
    ];
    for (name, help, of) in client_gauges {
        let mut fam = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (client, k) in clients {
            ConstGauge::new(of(k)).encode(fam.encode_family(&[("client", *client)])?)?;
        }
    }
    let client_counters: [(&str, &str, fn(&crate::kafka::stats::ClientStats) -> u64); 2] = [
        ("payslip_kafka_sent_messages", "librdkafka: messages sent to brokers (txmsgs).", |k| k.txmsgs.max(0) as u64),
        ("payslip_kafka_sent_message_bytes", "librdkafka: message bytes sent to brokers (txmsg_bytes).", |k| k.txmsg_bytes.max(0) as u64),
    ];
    for (name, help, of) in client_counters {
        let mut fam = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (client, k) in clients {
            ConstCounter::new(of(k)).encode(fam.encode_family(&[("client", *client)])?)?;
        }
    }
    type BrokerOf = fn(&crate::kafka::stats::BrokerStats) -> Option<f64>;
    let broker_gauges: [(&str, &str, BrokerOf); 4] = [
        ("payslip_kafka_broker_up", "librdkafka: 1 when the client's connection to the broker is UP.", |b| Some((b.state == "UP") as i64 as f64)),
        ("payslip_kafka_broker_rtt_seconds", "librdkafka: average request round-trip time to the broker over the last interval.", |b| b.rtt_avg_us.map(|us| us as f64 / 1e6)),
        ("payslip_kafka_broker_outbuf_requests", "librdkafka: requests waiting to be sent to the broker.", |b| Some(b.outbuf_cnt as f64)),
        ("payslip_kafka_broker_waitresp_requests", "librdkafka: requests sent to the broker and waiting for its response.", |b| Some(b.waitresp_cnt as f64)),
    ];
    for (name, help, of) in broker_gauges {
        let mut fam = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (client, k) in clients {
            for (broker, b) in &k.brokers {
                if let Some(v) = of(b) {
                    ConstGauge::new(v).encode(fam.encode_family(&[("client", *client), ("broker", broker.as_str())])?)?;
                }
            }
        }
    }
    let broker_counters: [(&str, &str, fn(&crate::kafka::stats::BrokerStats) -> u64); 4] = [
        ("payslip_kafka_broker_sent_bytes", "librdkafka: bytes sent to the broker.", |b| b.tx_bytes),
        ("payslip_kafka_broker_send_errors", "librdkafka: transmission errors to the broker.", |b| b.tx_errors),
        ("payslip_kafka_broker_retries", "librdkafka: requests to the broker sent again.", |b| b.tx_retries),
        ("payslip_kafka_broker_request_timeouts", "librdkafka: requests to the broker that timed out.", |b| b.request_timeouts),
    ];
    for (name, help, of) in broker_counters {
        let mut fam = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (client, k) in clients {
            for (broker, b) in &k.brokers {
                ConstCounter::new(of(b)).encode(fam.encode_family(&[("client", *client), ("broker", broker.as_str())])?)?;
            }
        }
    }
    Ok(())
}

/// The registry `/metrics` encodes.
pub fn registry(state: Arc<OpsState>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Figures(state)));
    r
}

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text of one scrape: OpenMetrics when the scraper accepts it (Prometheus does), else the
/// Prometheus text format 0.0.4 (curl, promtool, older scrapers), as the Go client negotiates.
pub fn render(registry: &Registry, accept: Option<&str>) -> Result<(&'static str, String), std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        return Ok((OPENMETRICS, out));
    }
    Ok((PROMETHEUS_TEXT, to_prometheus_text(&out)))
}

/// OpenMetrics → Prometheus text 0.0.4: a counter family is named after its samples (`…_total`),
/// and `# UNIT` and `# EOF` lines go (0.0.4 has neither).
fn to_prometheus_text(open: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = open.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_named_after_their_samples_in_the_prometheus_format() {
        let open = "# HELP a_docs Docs.\n# TYPE a_docs counter\na_docs_total 5\n# HELP b Bytes.\n# TYPE b gauge\n# UNIT b bytes\nb{x=\"1\"} 2\n# EOF\n";
        assert_eq!(super::to_prometheus_text(open), "# HELP a_docs_total Docs.\n# TYPE a_docs_total counter\na_docs_total 5\n# HELP b Bytes.\n# TYPE b gauge\nb{x=\"1\"} 2\n");
    }
}
