//! Operator side of rollouts: sending commands to `litert.rollout.commands.v1`, waiting for the
//! decision that answers them, and the phase status (the runbook's `GET /rollout/phase-status`)
//! computed from the decisions topic.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::{routing, Action, RolloutCommand, RolloutDecision, RolloutError, Status};
use crate::{
    codec::{self, Record, WireFormat},
    config::PipelineConfig,
    kafka::{self, headers as h, headers::HeaderSet, KafkaError},
};

/// Publishes a command (JSON, so kcat shows it as is) and waits for its delivery.
pub async fn send_command(cfg: &PipelineConfig, brokers: &str, cmd: &RolloutCommand) -> Result<(), RolloutError> {
    let p: FutureProducer = kafka::producer_config(brokers, &cfg.kafka.librdkafka).create().map_err(KafkaError::client("the command producer"))?;
    let payload = codec::encode(cmd, WireFormat::Json)?;
    let hs = HeaderSet::new()
        .with(h::CONTENT_TYPE, WireFormat::Json.content_type())
        .with(h::SCHEMA, RolloutCommand::SCHEMA_NAME)
        .with("operator", &cmd.operator)
        .with("rollout-action", &cmd.action)
        .build();
    let topic = &cfg.topics.commands;
    let future = kafka::enqueue(&p, FutureRecord::to(topic).key(&cmd.rollout_id).payload(&payload).headers(hs)).await?;
    kafka::delivered(future, topic).await?;
    Ok(())
}

/// Polls the decisions topic until the decision answering `command_id` appears.
pub async fn wait_for_decision(cfg: &PipelineConfig, brokers: &str, command_id: &str, timeout: Duration) -> Result<Option<RolloutDecision>, RolloutError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (cfg2, brokers2) = (cfg.clone(), brokers.to_string());
        let all = tokio::task::spawn_blocking(move || routing::read_decisions(&cfg2, &brokers2)).await.map_err(|e| RolloutError::Internal(e.to_string()))??;
        if let Some(d) = all.into_iter().find(|d| d.command_id.as_deref() == Some(command_id)) {
            return Ok(Some(d));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Where a rollout stands, in the runbook's phase-status shape plus what an operator needs.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseStatus {
    pub rollout_id: String,
    pub model: String,
    pub candidate_version: String,
    pub baseline_version: String,
    pub status: Status,
    pub current_phase: i32,
    pub phase_name: String,
    pub traffic_percent: f64,
    /// Share of the latest evaluation's criteria that hold (PASS, or NOT_EVALUABLE and not blocking).
    pub success_rate: Option<f64>,
    /// Criterion → whether it holds.
    pub criteria_met: BTreeMap<String, bool>,
    pub criteria: Vec<super::CriterionResult>,
    pub phase_started_at: i64,
    pub soak_elapsed_ms: i64,
    pub soak_ms: i64,
    pub last_action: Action,
    pub last_reason: String,
    pub last_operator: Option<String>,
    pub decided_at: i64,
    pub seq: i64,
    /// `model@version` → why it was rolled back.
    pub quarantined: BTreeMap<String, String>,
}

impl PhaseStatus {
    pub fn of(d: &RolloutDecision) -> Self {
        let criteria_met: BTreeMap<String, bool> = d.criteria.iter().map(|c| (c.name.clone(), c.holds())).collect();
        let success_rate = (!criteria_met.is_empty()).then(|| criteria_met.values().filter(|v| **v).count() as f64 / criteria_met.len() as f64);
        PhaseStatus {
            rollout_id: d.rollout_id.clone(),
            model: d.model.clone(),
            candidate_version: d.candidate_version.clone(),
            baseline_version: d.baseline_version.clone(),
            status: d.status,
            current_phase: d.phase,
            phase_name: d.phase_name.clone(),
            traffic_percent: d.traffic_percent,
            success_rate,
            criteria_met,
            criteria: d.criteria.clone(),
            phase_started_at: d.phase_started_at,
            soak_elapsed_ms: d.soak_elapsed_ms,
            soak_ms: d.soak_ms,
            last_action: d.action,
            last_reason: d.reason.clone(),
            last_operator: d.operator.clone(),
            decided_at: d.decided_at,
            seq: d.seq,
            quarantined: d.quarantined.clone(),
        }
    }
}

/// The status of every rollout (latest decision each), or of one.
pub fn phase_status(decisions: Vec<RolloutDecision>, rollout_id: Option<&str>) -> Vec<PhaseStatus> {
    let mut latest: BTreeMap<String, RolloutDecision> = BTreeMap::new();
    for d in decisions.into_iter().filter(|d| d.seq > 0) {
        if latest.get(&d.rollout_id).is_none_or(|l| l.seq < d.seq) {
            latest.insert(d.rollout_id.clone(), d);
        }
    }
    latest.values().filter(|d| rollout_id.is_none_or(|id| id == d.rollout_id)).map(PhaseStatus::of).collect()
}
