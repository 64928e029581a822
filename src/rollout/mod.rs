//! Phased rollout of a candidate model version (the runbook's Rollout Management) as an
//! event-sourced controller: operator commands and closed windows in, decision events out.
//!
//! ```text
//! litert.rollout.commands.v1 ─► apply_command ─┐
//!                                              ├─► RolloutDecision ─► litert.rollout.decisions.v1 (compacted)
//! closed windows + alerts ──► on_window ───────┘                              │
//!                                                    every infer process ◄────┘ follows it (routing)
//! ```
//!
//! The controller runs inside the monitor stage, so its state is written in the same RocksDB batch as
//! the windows and input offsets it reflects, and its decisions leave through the monitor's outbox:
//! a decision is published exactly once even across a crash (see `monitor`). Decisions are pure
//! functions of the input: automatic ones are stamped with the event time of the window that caused
//! them, operator ones with the command's `issued_at`, and ids are `rollout_id:seq`.
//!
//! Invariants:
//! - the latest decision of a rollout carries its whole state (phase, traffic, soak clock,
//!   quarantine), so the compacted topic alone rebuilds routing and, for an empty state store, the
//!   controller ([`Controller::restore`]);
//! - a phase's soak clock runs in event time from `phase_started_at`; windows starting before it do
//!   not count toward the phase;
//! - a criterion fails only on anytime-valid evidence (its confidence sequence wholly on the wrong
//!   side) and passes only on the same kind of evidence for the other side, so neither noise nor
//!   looking at every window close advances or rolls back a candidate (see [`stats`], [`criteria`]);
//!   the rollout's false-rollback probability is at most `alpha`, measured by [`simulate`];
//! - a rolled-back version is quarantined and never started again unless a START command names it.
//!
//! Files: [`config`] (the `rollout` section), [`records`] (decisions and commands on the wire),
//! [`controller`] (the state machine), [`criteria`] and [`stats`] (verdicts), [`simulate`] (their
//! error rates over synthetic rollouts), [`routing`] (the
//! canary split in the infer stage), [`ops`] (operator commands and phase status).

pub mod config;
pub mod controller;
pub mod criteria;
pub mod ops;
pub mod records;
pub mod routing;
pub mod simulate;
pub mod stats;

pub use config::{default_phases, default_rollout_id, CandidateSpec, EmergencyConfig, PhaseSpec, RolloutConfig};
pub use controller::{fmt_dur, Controller, ControllerBook, PhaseAggregate, RolloutState, ANSWERED_KEPT};
pub use criteria::{Criterion, CriterionMetric, CriterionResult, PhaseMetric, Verdict};
pub use records::{action, Action, RolloutCommand, RolloutDecision, Status, COHORT_BASELINE, COHORT_CANARY};

/// Why a rollout operation (reading decisions, sending a command) failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error(transparent)]
    Encode(#[from] crate::codec::EncodeError),
    /// A blocking task died (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl RolloutError {
    /// Whether trying again may succeed (the broker was unreachable, a read timed out).
    pub fn retryable(&self) -> bool {
        match self {
            RolloutError::Kafka(e) => e.retryable(),
            RolloutError::Encode(_) | RolloutError::Internal(_) => false,
        }
    }
}
