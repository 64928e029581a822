//! What the monitor stage shows the operations API while it runs: its role in the monitor group,
//! its counters and the alerts that fire. The monitor thread publishes a fresh copy at most every
//! [`PUBLISH_EVERY`] and whenever its role changes; readers never touch the stage's own state.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::state::{MonitorCounters, MonitorState};
use crate::alert::InstanceState;

pub const PUBLISH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Opening the state, restoring it, or reading the inputs' positions.
    #[default]
    Starting,
    /// Another process leads the monitor group; this one waits to take over.
    Standby,
    /// Consuming and closing windows.
    Leader,
}

/// An alert instance that fires now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FiringAlert {
    pub rule: String,
    /// `critical` or `warning`.
    pub severity: String,
    /// `model@version`, `pipeline`, …
    pub subject: String,
    pub since_ms: Option<i64>,
}

/// A rollout as the controller holds it now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub rollout_id: String,
    pub model: String,
    pub candidate_version: String,
    pub baseline_version: String,
    pub status: String,
    /// 1-based, as the runbook and the decisions count phases.
    pub phase: usize,
    pub traffic_percent: f64,
    pub phase_started_at: i64,
    pub last_reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MonitorView {
    pub role: Role,
    pub counters: MonitorCounters,
    pub firing: Vec<FiringAlert>,
    /// Windows open in the state (not closed yet).
    pub open_windows: usize,
    /// Event time up to which every input partition has been read (the windows' watermark), ms.
    pub watermark_ms: Option<i64>,
    /// End of the latest window closed (event time, ms).
    pub last_closed_window_end_ms: Option<i64>,
    /// RocksDB's estimate of the state's live data, bytes.
    pub state_bytes: Option<u64>,
    pub rollouts: Vec<RolloutView>,
    /// This process's copy of the changelog (None without `monitor.changelog`).
    pub changelog: Option<super::changelog::Progress>,
    /// This process's pre-aggregation member (None without `monitor.scale_out`).
    pub pre: Option<super::pre::PreCounters>,
    pub updated_at_ms: i64,
}

/// The shared copy, and when it was last refreshed; also the handle that checkpoints the
/// monitor's open state (live backups).
#[derive(Debug, Clone, Default)]
pub struct ViewHandle {
    inner: Arc<RwLock<MonitorView>>,
    store: Arc<RwLock<Option<crate::state::Checkpointer>>>,
    /// librdkafka's latest statistics of the monitor's producer.
    producer_stats: crate::kafka::stats::StatsCell,
    /// The changelog's progress, written by the changelog as it tails and restores.
    changelog: super::changelog::ProgressCell,
    /// The pre-aggregation member's counters.
    pre: super::pre::PreCell,
}

impl ViewHandle {
    /// Where the monitor producer's statistics are kept.
    pub fn producer_stats(&self) -> crate::kafka::stats::StatsCell {
        self.producer_stats.clone()
    }

    pub fn get(&self) -> MonitorView {
        let mut v = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        v.changelog = *self.changelog.lock().unwrap_or_else(|p| p.into_inner());
        v.pre = self.pre.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v
    }

    /// Where this process's pre-aggregation member keeps its counters.
    pub fn pre_cell(&self) -> super::pre::PreCell {
        self.pre.clone()
    }

    /// Checkpoints of the running monitor's state (None before the stage opened it).
    pub fn checkpointer(&self) -> Option<crate::state::Checkpointer> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn set_checkpointer(&self, c: crate::state::Checkpointer) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    pub(super) fn set_role(&self, role: Role) {
        let mut v = self.inner.write().unwrap_or_else(|p| p.into_inner());
        v.role = role;
        v.updated_at_ms = chrono::Utc::now().timestamp_millis();
    }

    /// Where the changelog keeps this process's [`super::changelog::Progress`].
    pub(super) fn changelog_cell(&self) -> super::changelog::ProgressCell {
        self.changelog.clone()
    }

    /// Notes the windows that just closed (before the next refresh publishes them).
    pub(super) fn note_closed(&self, emitted: &[super::state::Emitted]) {
        let end = emitted.iter().filter_map(|e| if let super::state::Emitted::Metrics(m) = e { Some(m.window_end) } else { None }).max();
        if let Some(end) = end {
            let mut v = self.inner.write().unwrap_or_else(|p| p.into_inner());
            v.last_closed_window_end_ms = Some(v.last_closed_window_end_ms.map_or(end, |e| e.max(end)));
        }
    }

    /// Publishes the state's figures if the last copy is older than [`PUBLISH_EVERY`].
    pub(super) fn refresh(&self, last: &mut Instant, state: &MonitorState, watermark_ms: Option<i64>) {
        if last.elapsed() < PUBLISH_EVERY {
            return;
        }
        *last = Instant::now();
        let firing = state
            .alerts
            .iter()
            .filter(|(_, a)| a.state == InstanceState::Firing)
            .map(|(key, a)| {
                // instance keys are `rule|Severity|subject`
                let mut parts = key.splitn(3, '|');
                let (rule, sev, subject) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                FiringAlert { rule: rule.into(), severity: sev.to_ascii_lowercase(), subject: subject.into(), since_ms: a.episode_start_ms }
            })
            .collect();
        let rollouts = state
            .rollout
            .rollouts
            .values()
            .map(|r| RolloutView {
                rollout_id: r.rollout_id.clone(),
                model: r.model.clone(),
                candidate_version: r.candidate_version.clone(),
                baseline_version: r.baseline_version.clone(),
                status: r.status.to_string(),
                phase: r.phase,
                traffic_percent: r.traffic_percent,
                phase_started_at: r.phase_started_at,
                last_reason: r.last_reason.clone(),
            })
            .collect();
        let state_bytes = self.checkpointer().and_then(|c| c.live_bytes());
        let mut v = self.inner.write().unwrap_or_else(|p| p.into_inner());
        v.rollouts = rollouts;
        v.state_bytes = state_bytes;
        v.counters = state.counters.clone();
        v.firing = firing;
        v.open_windows = state.windows.len();
        v.watermark_ms = watermark_ms;
        v.updated_at_ms = chrono::Utc::now().timestamp_millis();
    }
}
