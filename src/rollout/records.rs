//! The records of a rollout on the wire: decisions (`litert.rollout.decisions.v1`, compacted,
//! the truth about every rollout) and operator commands (`litert.rollout.commands.v1`), with the
//! typed actions and statuses they carry (Avro and JSON strings, as before they were typed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CriterionResult;
use crate::codec::{text_enum::text_enum, Record};

pub const COHORT_CANARY: &str = "canary";
pub const COHORT_BASELINE: &str = "baseline";

text_enum! {
    /// Where a rollout stands (`NONE`: a refused command that names no rollout).
    pub enum Status {
        Running = "RUNNING",
        Paused = "PAUSED",
        Promoted = "PROMOTED",
        RolledBack = "ROLLED_BACK",
        None = "NONE",
    }
}

impl Status {
    /// Whether the candidate receives traffic.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }
}

text_enum! {
    /// Decision actions (design.md's list plus PAUSE, RESUME and REJECTED for refused commands).
    pub enum Action {
        Start = "START",
        Advance = "ADVANCE",
        Hold = "HOLD",
        RollbackPhase = "ROLLBACK_PHASE",
        EmergencyRollback = "EMERGENCY_ROLLBACK",
        Promote = "PROMOTE",
        Pause = "PAUSE",
        Resume = "RESUME",
        Rejected = "REJECTED",
    }
}

/// The actions by short name, as commands and tests write them.
pub mod action {
    use super::Action;
    pub const START: Action = Action::Start;
    pub const ADVANCE: Action = Action::Advance;
    pub const HOLD: Action = Action::Hold;
    pub const ROLLBACK_PHASE: Action = Action::RollbackPhase;
    pub const EMERGENCY_ROLLBACK: Action = Action::EmergencyRollback;
    pub const PROMOTE: Action = Action::Promote;
    pub const PAUSE: Action = Action::Pause;
    pub const RESUME: Action = Action::Resume;
    pub const REJECTED: Action = Action::Rejected;
    /// Actions an operator may command.
    pub const COMMANDS: [Action; 6] = [START, ADVANCE, ROLLBACK_PHASE, EMERGENCY_ROLLBACK, PAUSE, RESUME];
}

/// A decision event on `litert.rollout.decisions.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDecision {
    pub decision_id: String,
    pub rollout_id: String,
    pub seq: i64,
    pub action: Action,
    pub status: Status,
    pub model: String,
    pub candidate_version: String,
    pub baseline_version: String,
    pub phase: i32,
    pub phase_name: String,
    pub traffic_percent: f64,
    pub previous_traffic_percent: f64,
    pub reason: String,
    #[serde(default)]
    pub operator: Option<String>,
    #[serde(default)]
    pub command_id: Option<String>,
    #[serde(default)]
    pub criteria: Vec<CriterionResult>,
    #[serde(default)]
    pub window_start: Option<i64>,
    #[serde(default)]
    pub window_end: Option<i64>,
    pub phase_started_at: i64,
    pub soak_ms: i64,
    pub soak_elapsed_ms: i64,
    #[serde(default)]
    pub quarantined: BTreeMap<String, String>,
    pub decided_at: i64,
}

impl Record for RolloutDecision {
    const SCHEMA_NAME: &'static str = "litert.v1.RolloutDecision";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/rollout_decision.avsc");
}

/// An operator command on `litert.rollout.commands.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutCommand {
    pub command_id: String,
    pub rollout_id: String,
    /// One of [`action::COMMANDS`]; kept as text so an unknown action is answered with a REJECTED
    /// decision rather than lost as undecodable.
    pub action: String,
    pub operator: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    pub issued_at: i64,
}

impl RolloutCommand {
    /// A command issued now by `operator` (the SASL principal, an API token's name, or what the
    /// CLI was told). The id is unique per operator, time and process.
    pub fn new(rollout_id: String, action: Action, operator: String, reason: Option<String>, model: Option<String>, version: Option<String>) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let issued_at = chrono::Utc::now().timestamp_millis();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let who: String = operator.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
        RolloutCommand { command_id: format!("{who}-{issued_at}-{}-{seq}", std::process::id()), rollout_id, action: action.to_string(), operator, reason, model, version, issued_at }
    }
}

impl Record for RolloutCommand {
    const SCHEMA_NAME: &'static str = "litert.v1.RolloutCommand";
    const SCHEMA_TEXT: &'static str = include_str!("../../schemas/rollout_command.avsc");
}
