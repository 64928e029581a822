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
    /// The closing partition this view is of (None: the process's own, or no partitions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// The closing partitions this process leads ([`super::shard`]); empty while it leads none.
    pub leads_partitions: Vec<u32>,
}

/// The process's view from its closing partitions' views: it leads when it leads any; counters,
/// windows, firing alerts and rollouts are the sum of those it leads; the changelog's progress is
/// summed over every copy it holds.
fn merge(parts: Vec<MonitorView>) -> MonitorView {
    let mut v = MonitorView::default();
    let leading: Vec<&MonitorView> = parts.iter().filter(|p| p.role == Role::Leader).collect();
    v.role = if !leading.is_empty() {
        Role::Leader
    } else if parts.iter().any(|p| p.role == Role::Starting) {
        Role::Starting
    } else {
        Role::Standby
    };
    v.leads_partitions = leading.iter().filter_map(|p| p.partition).collect();
    for p in &leading {
        v.counters.add(&p.counters);
        v.firing.extend(p.firing.iter().cloned());
        v.open_windows += p.open_windows;
        v.rollouts.extend(p.rollouts.iter().cloned());
        v.state_bytes = match (v.state_bytes, p.state_bytes) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        v.last_closed_window_end_ms = v.last_closed_window_end_ms.max(p.last_closed_window_end_ms);
        // the process's watermark is the least advanced of its partitions'
        v.watermark_ms = match (v.watermark_ms, p.watermark_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    for c in parts.iter().filter_map(|p| p.changelog) {
        let m = v.changelog.get_or_insert(super::changelog::Progress { warm: c.warm, ..Default::default() });
        m.applied_offset += c.applied_offset;
        m.end_offset = match (m.end_offset, c.end_offset) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        m.lag_records = match (m.lag_records, c.lag_records) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        m.records_applied += c.records_applied;
        m.last_takeover_ms = m.last_takeover_ms.max(c.last_takeover_ms);
        m.last_takeover_records = m.last_takeover_records.max(c.last_takeover_records);
    }
    v.updated_at_ms = parts.iter().map(|p| p.updated_at_ms).max().unwrap_or_default();
    v
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
    /// With the closing stage in partitions ([`super::shard`]): one view per closing partition,
    /// which [`Self::get`] merges into the process's.
    partitions: Arc<RwLock<Vec<ViewHandle>>>,
}

impl ViewHandle {
    /// Where the monitor producer's statistics are kept.
    pub fn producer_stats(&self) -> crate::kafka::stats::StatsCell {
        self.producer_stats.clone()
    }

    pub fn get(&self) -> MonitorView {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut v = if parts.is_empty() {
            let mut v = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
            v.changelog = *self.changelog.lock().unwrap_or_else(|p| p.into_inner());
            if v.role == Role::Leader {
                v.leads_partitions = vec![v.partition.unwrap_or(0)];
            }
            v
        } else {
            merge(parts.iter().map(ViewHandle::get).collect())
        };
        v.pre = self.pre.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v
    }

    /// The view of closing partition `p` (created on first use; the process's view merges them).
    /// It shares the producer statistics and the pre-aggregation counters with this one.
    pub fn partition(&self, p: u32) -> ViewHandle {
        let mut parts = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        while parts.len() <= p as usize {
            let child = ViewHandle { producer_stats: self.producer_stats.clone(), pre: self.pre.clone(), ..ViewHandle::default() };
            child.inner.write().unwrap_or_else(|p| p.into_inner()).partition = Some(parts.len() as u32);
            parts.push(child);
        }
        parts[p as usize].clone()
    }

    /// Where this process's pre-aggregation member keeps its counters.
    pub fn pre_cell(&self) -> super::pre::PreCell {
        self.pre.clone()
    }

    /// Checkpoints of the running monitor's state (None before the stage opened it). With the
    /// closing stage in partitions: the state of the lowest partition this process leads.
    pub fn checkpointer(&self) -> Option<crate::state::Checkpointer> {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = parts.iter().filter(|v| v.get().role == Role::Leader).find_map(ViewHandle::checkpointer) {
            return Some(c);
        }
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Lets go of the state a stage that ended held open (so another can open it).
    pub(super) fn clear_checkpointer(&self) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = None;
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
