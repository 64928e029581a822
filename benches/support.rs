//! What the benchmark harnesses share (included by each with `#[path]`; not a harness itself).

use std::time::Duration;

use payslip_stream::{
    codec::{self, WireFormat},
    config::PipelineConfig,
    kafka,
};

/// Publishes a running rollout of document_classifier 1.1.0 at `pct` % (as the controller would), so
/// the stage loads the candidate too and splits each batch by version.
pub async fn publish_split(cfg: &PipelineConfig, brokers: &str, pct: f64) {
    use payslip_stream::rollout::{action, Action, Controller, RolloutCommand};
    let mut c = Controller::default();
    let cmd = |a: Action| RolloutCommand { command_id: a.to_string(), rollout_id: "bench".into(), action: a.into(), operator: "bench".into(), reason: None, model: Some("document_classifier".into()), version: Some("1.1.0".into()), issued_at: 0 };
    let mut d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::START));
    while d.traffic_percent < pct {
        d = c.apply_command(&cfg.rollout, &cfg.models.serve, &cmd(action::ADVANCE));
    }
    assert_eq!(d.traffic_percent, pct, "a phase at exactly {pct} %");
    let payload = codec::encode(&d, WireFormat::Json).expect("decision encodes");
    let p: rdkafka::producer::FutureProducer = kafka::producer_config(brokers, &Default::default()).create().expect("producer");
    let hs = kafka::headers::HeaderSet::new().with("content-type", "application/json").build();
    p.send(rdkafka::producer::FutureRecord::to(&cfg.topics.decisions).key("bench").payload(&payload).headers(hs), Duration::from_secs(10)).await.expect("decision published");
}
