//! The rollout controller: an event-sourced state machine. Operator commands and closed windows go
//! in ([`Controller::apply_command`], [`Controller::on_window`]); decisions come out, each carrying
//! the rollout's whole state so that the compacted decisions topic alone rebuilds it
//! ([`Controller::restore`]). Pure: no I/O, time is the event time it is given.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{
    action,
    config::HOUR,
    criteria::{Judge, Method},
    stats, Action, CriterionResult, RolloutCommand, RolloutConfig, RolloutDecision, Status, Verdict, COHORT_BASELINE, COHORT_CANARY,
};
use crate::{
    alert::AlertEvent,
    window::{
        aggregate::{Moments, Subject, WindowAggregate},
        WindowRange,
    },
};

/// What a phase has seen so far: its windows merged, per side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseAggregate {
    /// The candidate version in the canary cohort.
    pub candidate: WindowAggregate,
    /// The baseline version in the baseline cohort (same windows).
    pub baseline: WindowAggregate,
    /// The pipeline subject (process memory, CPU, end-to-end time).
    pub pipeline: WindowAggregate,
    pub windows: u64,
    pub first_window_start: Option<i64>,
    pub critical_alerts: u64,
    pub alerts_fired: u64,
    /// ln(peak RSS in MB) of the infer process, one sample per window of the phase.
    #[serde(default)]
    pub memory: Moments,
}

/// One rollout's state, as the controller keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutState {
    pub rollout_id: String,
    pub model: String,
    pub candidate_version: String,
    pub baseline_version: String,
    pub status: Status,
    /// 1-based; 0 once rolled back.
    pub phase: usize,
    pub traffic_percent: f64,
    pub phase_started_at: i64,
    pub seq: i64,
    pub agg: PhaseAggregate,
    /// Criteria of the latest evaluation (for status queries).
    #[serde(default)]
    pub last_criteria: Vec<CriterionResult>,
    #[serde(default)]
    pub last_reason: String,
    /// Traffic share after the previous decision (reported as `previous_traffic_percent`).
    #[serde(default)]
    pub traffic_before: f64,
    /// ln(peak RSS in MB) per window of the infer process over the windows before the rollout
    /// started: what the memory criterion compares the phases with.
    #[serde(default)]
    pub memory_reference: Moments,
}

impl RolloutState {
    fn candidate_subject(&self) -> Subject {
        Subject { model: self.model.clone(), version: self.candidate_version.clone(), cohort: COHORT_CANARY.into() }
    }

    fn baseline_subject(&self) -> Subject {
        Subject { model: self.model.clone(), version: self.baseline_version.clone(), cohort: COHORT_BASELINE.into() }
    }

    fn quarantine_key(&self) -> String {
        format!("{}@{}", self.model, self.candidate_version)
    }
}

/// Every rollout this deployment has run, the quarantine, and promotions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Controller {
    pub rollouts: BTreeMap<String, RolloutState>,
    /// `model@version` → why it was rolled back.
    pub quarantine: BTreeMap<String, String>,
    /// Model → version promoted to baseline by a finished rollout.
    pub promoted: BTreeMap<String, String>,
    /// Ids of the latest commands answered (at most [`ANSWERED_KEPT`]), so a command read twice
    /// (after state was rebuilt from the decisions topic) is not applied twice.
    #[serde(default)]
    pub answered: VecDeque<String>,
    /// ln(peak RSS in MB) of the infer process in the latest windows without an active rollout (at
    /// most [`MEMORY_REFERENCE_WINDOWS`]): a starting rollout's memory reference.
    #[serde(default)]
    pub memory_recent: VecDeque<f64>,
}

pub const ANSWERED_KEPT: usize = 1000;
/// Windows kept as the memory reference of the next rollout.
pub const MEMORY_REFERENCE_WINDOWS: usize = 120;

/// The controller without its rollouts. The monitor stores it as one value and each rollout as a
/// value of its own, so no stored value grows with the number of rollouts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerBook {
    pub quarantine: BTreeMap<String, String>,
    pub promoted: BTreeMap<String, String>,
    pub answered: VecDeque<String>,
    #[serde(default)]
    pub memory_recent: VecDeque<f64>,
}

impl Controller {
    pub fn book(&self) -> ControllerBook {
        ControllerBook { quarantine: self.quarantine.clone(), promoted: self.promoted.clone(), answered: self.answered.clone(), memory_recent: self.memory_recent.clone() }
    }

    pub fn from_parts(rollouts: impl IntoIterator<Item = RolloutState>, book: ControllerBook) -> Self {
        Controller {
            rollouts: rollouts.into_iter().map(|r| (r.rollout_id.clone(), r)).collect(),
            quarantine: book.quarantine,
            promoted: book.promoted,
            answered: book.answered,
            memory_recent: book.memory_recent,
        }
    }
}

/// Why a command was refused (answered with a REJECTED decision). Never retryable: the same
/// command against the same state is refused again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Refused {
    pub fn retryable(&self) -> bool {
        false
    }
}

/// What a decision does to a rollout.
struct Change {
    action: Action,
    reason: String,
    operator: Option<String>,
    command_id: Option<String>,
    criteria: Vec<CriterionResult>,
    window: Option<WindowRange>,
    at: i64,
}

impl Controller {
    /// Baseline version of `model` for a new rollout: the last promoted one, else the served one.
    fn baseline_of(&self, model: &str, serve: &BTreeMap<String, String>) -> Option<String> {
        self.promoted.get(model).or_else(|| serve.get(model)).cloned()
    }

    /// Applies an operator command; every command yields exactly one decision (REJECTED when refused).
    pub fn apply_command(&mut self, cfg: &RolloutConfig, serve: &BTreeMap<String, String>, cmd: &RolloutCommand) -> RolloutDecision {
        self.remember(&cmd.command_id);
        let op = Some(cmd.operator.clone());
        let cid = Some(cmd.command_id.clone());
        let change = |action: Action, reason: String| Change { action, reason, operator: op.clone(), command_id: cid.clone(), criteria: vec![], window: None, at: cmd.issued_at };
        let why = cmd.reason.clone().map(|r| format!(": {r}")).unwrap_or_default();
        let act = match cmd.action.parse::<Action>() {
            Ok(a) if action::COMMANDS.contains(&a) => a,
            _ => return self.reject(cfg, cmd, format!("unknown action {}; use one of {:?}", cmd.action, action::COMMANDS.map(Action::as_str))),
        };
        if act == action::START {
            return match self.start(cfg, serve, cmd) {
                Ok(()) => {
                    let r = self.rollouts.get(&cmd.rollout_id).expect("just started");
                    let reason = format!("started by {} at {} % ({}){why}", cmd.operator, r.traffic_percent, cfg.phases[0].name);
                    self.decide(cfg, &cmd.rollout_id, change(action::START, reason))
                }
                Err(Refused(reason)) => self.reject(cfg, cmd, reason),
            };
        }
        let Some(r) = self.rollouts.get(&cmd.rollout_id) else {
            return self.reject(cfg, cmd, format!("no rollout {} exists; start it first", cmd.rollout_id));
        };
        let (status, phase) = (r.status, r.phase);
        if !status.is_active() {
            return self.reject(cfg, cmd, format!("rollout {} is {}; nothing to {}", cmd.rollout_id, status.as_str(), cmd.action.to_lowercase()));
        }
        match act {
            action::ADVANCE => {
                if phase >= cfg.phases.len() {
                    self.promote(cfg, &cmd.rollout_id, change(action::PROMOTE, format!("promoted by {} (advance past the last phase){why}", cmd.operator)))
                } else {
                    self.enter_phase(cfg, &cmd.rollout_id, phase + 1, cmd.issued_at);
                    self.decide(cfg, &cmd.rollout_id, change(action::ADVANCE, format!("advanced by {} to phase {}{why}", cmd.operator, phase + 1)))
                }
            }
            action::ROLLBACK_PHASE => {
                if phase <= 1 {
                    self.roll_back(cfg, &cmd.rollout_id, change(action::ROLLBACK_PHASE, format!("rolled back by {} from phase 1: candidate removed{why}", cmd.operator)))
                } else {
                    // a config with fewer phases than the rollout has reached: back to its last one
                    self.enter_phase(cfg, &cmd.rollout_id, (phase - 1).min(cfg.phases.len()), cmd.issued_at);
                    self.decide(cfg, &cmd.rollout_id, change(action::ROLLBACK_PHASE, format!("rolled back by {} to phase {}{why}", cmd.operator, phase - 1)))
                }
            }
            action::EMERGENCY_ROLLBACK => {
                self.roll_back(cfg, &cmd.rollout_id, change(action::EMERGENCY_ROLLBACK, format!("emergency rollback by {}: all traffic to baseline{why}", cmd.operator)))
            }
            action::PAUSE => {
                if status == Status::Paused {
                    return self.reject(cfg, cmd, "already paused".into());
                }
                self.rollouts.get_mut(&cmd.rollout_id).expect("exists").status = Status::Paused;
                self.decide(cfg, &cmd.rollout_id, change(action::PAUSE, format!("paused by {}: no automatic advance or phase rollback until resumed (emergency rollback stays armed){why}", cmd.operator)))
            }
            action::RESUME => {
                if status == Status::Running {
                    return self.reject(cfg, cmd, "not paused".into());
                }
                self.rollouts.get_mut(&cmd.rollout_id).expect("exists").status = Status::Running;
                self.decide(cfg, &cmd.rollout_id, change(action::RESUME, format!("resumed by {}{why}", cmd.operator)))
            }
            // START is handled above; the others are not in `action::COMMANDS`
            Action::Start | Action::Hold | Action::Promote | Action::Rejected => self.reject(cfg, cmd, format!("{} is not an operator action", cmd.action)),
        }
    }

    /// Whether a command with this id was answered already.
    pub fn answered(&self, command_id: &str) -> bool {
        self.answered.iter().any(|a| a == command_id)
    }

    fn remember(&mut self, command_id: &str) {
        self.answered.push_back(command_id.to_string());
        while self.answered.len() > ANSWERED_KEPT {
            self.answered.pop_front();
        }
    }

    fn start(&mut self, cfg: &RolloutConfig, serve: &BTreeMap<String, String>, cmd: &RolloutCommand) -> Result<(), Refused> {
        let configured = cfg.candidate.as_ref();
        let model = cmd.model.clone().or_else(|| configured.map(|c| c.model.clone())).ok_or_else(|| Refused("START names no model and rollout.candidate is not configured".into()))?;
        let explicit = cmd.version.is_some();
        let version = cmd
            .version
            .clone()
            .or_else(|| configured.filter(|c| c.model == model).map(|c| c.version.clone()))
            .ok_or_else(|| Refused(format!("START names no version and rollout.candidate is not a version of {model}")))?;
        let key = format!("{model}@{version}");
        if let Some(why) = self.quarantine.get(&key) {
            if !explicit {
                return Err(Refused(format!("{key} is quarantined ({why}); a START command naming the version explicitly lifts the quarantine")));
            }
        }
        if let Some(active) = self.rollouts.values().find(|r| r.model == model && r.status.is_active() && r.rollout_id != cmd.rollout_id) {
            return Err(Refused(format!("rollout {} of {model} is still {}; finish or roll it back first", active.rollout_id, active.status.as_str())));
        }
        if self.rollouts.get(&cmd.rollout_id).is_some_and(|r| r.status.is_active()) {
            return Err(Refused(format!("rollout {} is already running", cmd.rollout_id)));
        }
        let baseline = self.baseline_of(&model, serve).ok_or_else(|| Refused(format!("{model} is not served (models.serve)")))?;
        if baseline == version {
            return Err(Refused(format!("{model} {version} is already the baseline")));
        }
        self.quarantine.remove(&key);
        let seq = self.rollouts.get(&cmd.rollout_id).map(|r| r.seq).unwrap_or(0);
        let mut memory_reference = Moments::default();
        for x in &self.memory_recent {
            memory_reference.add(*x, 1.0);
        }
        self.rollouts.insert(
            cmd.rollout_id.clone(),
            RolloutState {
                rollout_id: cmd.rollout_id.clone(),
                model,
                candidate_version: version,
                baseline_version: baseline,
                status: Status::Running,
                phase: 0,
                traffic_percent: 0.0,
                phase_started_at: cmd.issued_at,
                seq,
                agg: PhaseAggregate::default(),
                last_criteria: vec![],
                last_reason: String::new(),
                traffic_before: 0.0,
                memory_reference,
            },
        );
        self.enter_phase(cfg, &cmd.rollout_id, 1, cmd.issued_at);
        Ok(())
    }

    fn reject(&mut self, cfg: &RolloutConfig, cmd: &RolloutCommand, reason: String) -> RolloutDecision {
        tracing::warn!(rollout = %cmd.rollout_id, action = %cmd.action, operator = %cmd.operator, %reason, "rollout command refused");
        let change = Change { action: action::REJECTED, reason: format!("{} by {} refused: {reason}", cmd.action, cmd.operator), operator: Some(cmd.operator.clone()), command_id: Some(cmd.command_id.clone()), criteria: vec![], window: None, at: cmd.issued_at };
        if self.rollouts.contains_key(&cmd.rollout_id) {
            return self.decide(cfg, &cmd.rollout_id, change);
        }
        // no state to carry: a stand-alone decision so the operator still sees the answer
        let model = cmd.model.clone().unwrap_or_default();
        let version = cmd.version.clone().unwrap_or_default();
        RolloutDecision {
            decision_id: format!("{}:rejected:{}", cmd.rollout_id, cmd.command_id),
            rollout_id: cmd.rollout_id.clone(),
            seq: 0,
            action: action::REJECTED,
            status: Status::None,
            model,
            candidate_version: version,
            baseline_version: String::new(),
            phase: 0,
            phase_name: String::new(),
            traffic_percent: 0.0,
            previous_traffic_percent: 0.0,
            reason: change.reason,
            operator: change.operator,
            command_id: change.command_id,
            criteria: vec![],
            window_start: None,
            window_end: None,
            phase_started_at: cmd.issued_at,
            soak_ms: 0,
            soak_elapsed_ms: 0,
            quarantined: self.quarantine.clone(),
            decided_at: cmd.issued_at,
        }
    }

    fn enter_phase(&mut self, cfg: &RolloutConfig, id: &str, phase: usize, at: i64) {
        let r = self.rollouts.get_mut(id).expect("rollout exists");
        r.phase = phase;
        r.traffic_percent = cfg.phases[phase - 1].traffic_percent;
        r.phase_started_at = at;
        r.agg = PhaseAggregate::default();
        r.last_criteria.clear();
    }

    fn roll_back(&mut self, cfg: &RolloutConfig, id: &str, change: Change) -> RolloutDecision {
        let r = self.rollouts.get_mut(id).expect("rollout exists");
        r.status = Status::RolledBack;
        r.traffic_percent = 0.0;
        let key = r.quarantine_key();
        self.quarantine.insert(key, change.reason.clone());
        self.decide(cfg, id, change)
    }

    fn promote(&mut self, cfg: &RolloutConfig, id: &str, change: Change) -> RolloutDecision {
        let r = self.rollouts.get_mut(id).expect("rollout exists");
        r.status = Status::Promoted;
        r.traffic_percent = 100.0;
        self.promoted.insert(r.model.clone(), r.candidate_version.clone());
        self.decide(cfg, id, change)
    }

    /// Records a decision: bumps the rollout's sequence and renders its full state.
    fn decide(&mut self, cfg: &RolloutConfig, id: &str, c: Change) -> RolloutDecision {
        let quarantined = self.quarantine.clone();
        let r = self.rollouts.get_mut(id).expect("rollout exists");
        let previous = r.last_traffic();
        r.seq += 1;
        r.last_reason = c.reason.clone();
        // operator decisions repeat the latest evaluation of the phase they leave the rollout in
        let criteria = if c.criteria.is_empty() { r.last_criteria.clone() } else { c.criteria };
        if c.action == action::HOLD {
            r.last_criteria = criteria.clone();
        }
        let spec = r.phase.checked_sub(1).and_then(|i| cfg.phases.get(i));
        let at = c.at;
        let d = RolloutDecision {
            decision_id: format!("{}:{}", r.rollout_id, r.seq),
            rollout_id: r.rollout_id.clone(),
            seq: r.seq,
            action: c.action,
            status: r.status,
            model: r.model.clone(),
            candidate_version: r.candidate_version.clone(),
            baseline_version: r.baseline_version.clone(),
            phase: if r.status == Status::RolledBack { 0 } else { r.phase as i32 },
            phase_name: spec.map(|p| p.name.clone()).unwrap_or_default(),
            traffic_percent: r.traffic_percent,
            previous_traffic_percent: previous,
            reason: c.reason,
            operator: c.operator,
            command_id: c.command_id,
            criteria,
            window_start: r.agg.first_window_start,
            window_end: c.window.map(|w| w.end_ms),
            phase_started_at: r.phase_started_at,
            soak_ms: spec.map(|p| p.soak_ms).unwrap_or(0),
            soak_elapsed_ms: (at - r.phase_started_at).max(0),
            quarantined,
            decided_at: at,
        };
        r.traffic_before = d.traffic_percent;
        d
    }

    /// Evaluates every running rollout on the windows that closed for `range` and the alerts their
    /// closing raised. Returns the decisions, in rollout id order.
    pub fn on_window(&mut self, cfg: &RolloutConfig, range: WindowRange, closed: &[(&Subject, &WindowAggregate)], alerts: &[AlertEvent]) -> Vec<RolloutDecision> {
        let ids: Vec<String> = self.rollouts.iter().filter(|(_, r)| r.status.is_active()).map(|(k, _)| k.clone()).collect();
        let mut out = Vec::new();
        let window_memory = closed.iter().find(|(s, _)| s.is_pipeline()).map(|(_, a)| a.max_rss_bytes).filter(|&b| b > 0).map(|b| (b as f64 / 1_048_576.0).ln());
        if ids.is_empty() {
            if let Some(m) = window_memory {
                self.memory_recent.push_back(m);
                while self.memory_recent.len() > MEMORY_REFERENCE_WINDOWS {
                    self.memory_recent.pop_front();
                }
            }
        }
        let alpha = cfg.criterion_alpha();
        for id in ids {
            let r = self.rollouts.get_mut(&id).expect("listed");
            if range.start_ms < r.phase_started_at {
                continue; // a window from before the phase: not evidence for it
            }
            let (cand_s, base_s) = (r.candidate_subject(), r.baseline_subject());
            let mut window_cand = WindowAggregate::default();
            for (s, a) in closed {
                if **s == cand_s {
                    r.agg.candidate.merge(a);
                    window_cand.merge(a);
                } else if **s == base_s {
                    r.agg.baseline.merge(a);
                } else if s.is_pipeline() {
                    r.agg.pipeline.merge(a);
                }
            }
            r.agg.windows += 1;
            r.agg.first_window_start.get_or_insert(range.start_ms);
            if let Some(m) = window_memory {
                r.agg.memory.add(m, 1.0);
            }
            let mut critical = None;
            for a in alerts.iter().filter(|a| a.status == "FIRING" && a.model == cand_s.model && a.version == cand_s.version && a.cohort == cand_s.cohort) {
                r.agg.alerts_fired += 1;
                if a.severity == "critical" {
                    r.agg.critical_alerts += 1;
                    critical.get_or_insert_with(|| a.code.clone());
                }
            }
            let auto = |action, reason: String, criteria| Change { action, reason, operator: None, command_id: None, criteria, window: Some(range), at: range.end_ms };
            // emergency first: it does not wait for soak, samples of a phase, or a resume
            if let Some(code) = critical.filter(|_| cfg.emergency.on_critical_alert) {
                let reason = format!("critical alert {code} on the candidate {}/{} in window {}..{}: all traffic to baseline", cand_s.model, cand_s.version, range.start_ms, range.end_ms);
                out.push(self.roll_back(cfg, &id, auto(action::EMERGENCY_ROLLBACK, reason, vec![])));
                continue;
            }
            if let Some(reason) = user_impact(cfg, alpha, &window_cand, &r.agg.candidate) {
                out.push(self.roll_back(cfg, &id, auto(action::EMERGENCY_ROLLBACK, reason, vec![])));
                continue;
            }
            // a rollout past the configured phases (the config shrank since) is judged by the last one
            let phase = &cfg.phases[r.phase.min(cfg.phases.len()) - 1];
            let elapsed = range.end_ms - r.phase_started_at;
            let soaked = elapsed >= phase.soak_ms;
            let judge = Judge { method: cfg.method, alpha, soaked, memory_reference: &r.memory_reference };
            let results: Vec<CriterionResult> = phase.criteria.iter().map(|c| c.evaluate(&r.agg, &judge)).collect();
            if r.status == Status::Paused {
                let reason = format!("paused by operator; phase {} ({}) soak {} of {}", r.phase, phase.name, fmt_dur(elapsed), fmt_dur(phase.soak_ms));
                out.push(self.decide(cfg, &id, auto(action::HOLD, reason, results)));
                continue;
            }
            if let Some(failed) = results.iter().find(|c| c.verdict == Verdict::Fail) {
                let reason = format!("phase {} ({}) failed criterion {}: {}; candidate removed and quarantined", r.phase, phase.name, failed.name, failed.detail);
                let change = auto(action::ROLLBACK_PHASE, reason, results);
                out.push(self.roll_back(cfg, &id, change));
                continue;
            }
            let missing: Vec<String> = results.iter().filter(|c| !c.holds()).map(|c| format!("{} ({})", c.name, c.detail)).collect();
            if soaked && missing.is_empty() {
                let not_eval: Vec<&str> = results.iter().filter(|c| c.verdict == Verdict::NotEvaluable).map(|c| c.name.as_str()).collect();
                let note = if not_eval.is_empty() { String::new() } else { format!("; not evaluable, not blocking: {}", not_eval.join(", ")) };
                if r.phase >= cfg.phases.len() {
                    let reason = format!("phase {} ({}) held every criterion for {}: candidate {} becomes baseline{note}", r.phase, phase.name, fmt_dur(phase.soak_ms), r.candidate_version);
                    out.push(self.promote(cfg, &id, auto(action::PROMOTE, reason, results)));
                } else {
                    let reason = format!("phase {} ({}) held every criterion for {}: to phase {} at {} %{note}", r.phase, phase.name, fmt_dur(phase.soak_ms), r.phase + 1, cfg.phases[r.phase].traffic_percent);
                    let next = r.phase + 1;
                    self.enter_phase(cfg, &id, next, range.end_ms);
                    out.push(self.decide(cfg, &id, auto(action::ADVANCE, reason, results)));
                }
                continue;
            }
            let mut waiting = Vec::new();
            if !soaked {
                waiting.push(format!("soak {} of {}", fmt_dur(elapsed), fmt_dur(phase.soak_ms)));
            }
            waiting.extend(missing);
            let reason = format!("phase {} ({}) evaluating; waiting for: {}", r.phase, phase.name, waiting.join("; "));
            out.push(self.decide(cfg, &id, auto(action::HOLD, reason, results)));
        }
        out
    }

    /// Rebuilds the controller from the latest decision of each rollout (the compacted topic), for a
    /// monitor that starts without state. Phase aggregates start empty; the soak clock is kept.
    pub fn restore(decisions: impl IntoIterator<Item = RolloutDecision>) -> Self {
        let mut c = Controller::default();
        for d in decisions {
            if let Some(id) = &d.command_id {
                c.remember(id);
            }
            if d.seq == 0 {
                continue; // a refused command without a rollout
            }
            let status = d.status;
            if status == Status::None {
                continue;
            }
            if c.rollouts.get(&d.rollout_id).is_some_and(|r| r.seq >= d.seq) {
                continue;
            }
            if status == Status::Promoted {
                c.promoted.insert(d.model.clone(), d.candidate_version.clone());
            }
            c.quarantine = d.quarantined.clone();
            let phase = if status == Status::RolledBack { 0 } else { d.phase.max(0) as usize };
            c.rollouts.insert(
                d.rollout_id.clone(),
                RolloutState {
                    rollout_id: d.rollout_id.clone(),
                    model: d.model.clone(),
                    candidate_version: d.candidate_version.clone(),
                    baseline_version: d.baseline_version.clone(),
                    status,
                    phase,
                    traffic_percent: d.traffic_percent,
                    phase_started_at: d.phase_started_at,
                    seq: d.seq,
                    agg: PhaseAggregate::default(),
                    last_criteria: d.criteria.clone(),
                    last_reason: d.reason.clone(),
                    traffic_before: d.traffic_percent,
                    memory_reference: Moments::default(),
                },
            );
        }
        c
    }
}

impl RolloutState {
    fn last_traffic(&self) -> f64 {
        self.traffic_before
    }
}

/// EMERGENCY_ROLLBACK reason when the candidate's failures in this window or over the phase exceed
/// the user-impact threshold.
/// The emergency rule: the share of canary outputs that failed, in the last window or over the
/// phase, above `emergency.user_impact_above`. Sequentially, "above" needs evidence: the lower bound
/// of the share's confidence sequence above the threshold, over the phase at the criteria's level
/// and in a single window at a level 10,000 times smaller (a union bound over up to 10,000 windows
/// of a rollout), so a rare error burst of a healthy candidate does not trigger it while a broken
/// one does within a window. With `fixed_alpha` the observed share itself is compared.
fn user_impact(cfg: &RolloutConfig, alpha: f64, window: &WindowAggregate, phase: &WindowAggregate) -> Option<String> {
    let e = &cfg.emergency;
    for (what, a, level) in [("in the last window", window, alpha / 10_000.0), ("over the phase", phase, alpha)] {
        if a.count >= e.min_samples.max(1) {
            let impact = a.errors as f64 / a.count as f64;
            let evidence = match cfg.method {
                Method::FixedAlpha => impact,
                Method::Sequential => {
                    let (p, var) = stats::proportion(a.errors, a.count);
                    stats::sequence(p, var, 0.10, level).lower
                }
            };
            if evidence > e.user_impact_above {
                return Some(format!(
                    "user impact {:.1} % {what} ({} of {} canary documents failed on the candidate; lower bound {:.1} %) exceeds {:.1} %: all traffic to baseline",
                    impact * 100.0,
                    a.errors,
                    a.count,
                    evidence * 100.0,
                    e.user_impact_above * 100.0
                ));
            }
        }
    }
    None
}

pub fn fmt_dur(ms: i64) -> String {
    let ms = ms.max(0);
    if ms >= HOUR {
        format!("{:.1} h", ms as f64 / HOUR as f64)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        codec::{decode, encode, WireFormat},
        rollout::CandidateSpec,
    };

    const MODEL: &str = "document_classifier";

    fn cfg(soak_ms: i64) -> RolloutConfig {
        let mut c = RolloutConfig { candidate: Some(CandidateSpec { model: MODEL.into(), version: "1.1.0".into(), id: None }), ..Default::default() };
        for p in &mut c.phases {
            p.soak_ms = soak_ms;
        }
        c
    }

    fn serve() -> BTreeMap<String, String> {
        [(MODEL.to_string(), "1.0.0".to_string())].into()
    }

    fn cmd(action: Action, version: Option<&str>, at: i64) -> RolloutCommand {
        RolloutCommand { command_id: format!("c{at}"), rollout_id: "document_classifier-1.1.0".into(), action: action.into(), operator: "ops".into(), reason: None, model: Some(MODEL.into()), version: version.map(Into::into), issued_at: at }
    }

    /// A window of `n` outputs, every fourth a PCDA document; `pcda_right` of those classified right.
    fn agg(n: u64, latency_ms: f64, errors: u64, pcda_right: f64) -> WindowAggregate {
        let mut a = WindowAggregate { count: n, errors, ..Default::default() };
        for i in 0..n {
            a.latency.record_ms(latency_ms + (i % 7) as f64 * 0.1);
            a.record_run(latency_ms + (i % 7) as f64 * 0.1, 1);
            if i % 4 == 0 {
                // spreads exactly `pcda_right` of the PCDA documents as right
                let k = (i / 4) as f64;
                let right = ((k + 1.0) * pcda_right).floor() > (k * pcda_right).floor();
                a.score("PCDA", if right { "PCDA" } else { "ARMY" });
            } else {
                a.score("ARMY", "ARMY");
            }
        }
        a
    }

    fn subjects() -> (Subject, Subject, Subject) {
        (
            Subject { model: MODEL.into(), version: "1.1.0".into(), cohort: COHORT_CANARY.into() },
            Subject { model: MODEL.into(), version: "1.0.0".into(), cohort: COHORT_BASELINE.into() },
            Subject::pipeline(),
        )
    }

    fn window(c: &mut Controller, cfg: &RolloutConfig, i: i64, cand: &WindowAggregate, alerts: &[AlertEvent]) -> Vec<RolloutDecision> {
        let (cs, bs, ps) = subjects();
        let base = agg(200, 5.0, 0, 1.0);
        let mut pipe = WindowAggregate { count: 200, max_rss_bytes: 90 * 1_048_576, cpu_samples: 1, ..Default::default() };
        pipe.latency.record_ms(20.0);
        let range = WindowRange { start_ms: i * 1000, end_ms: (i + 1) * 1000 };
        c.on_window(cfg, range, &[(&cs, cand), (&bs, &base), (&ps, &pipe)], alerts)
    }

    #[test]
    fn a_good_candidate_advances_through_every_phase_and_is_promoted() {
        let cfg = cfg(3000);
        let mut c = Controller::default();
        let d = c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        assert_eq!((d.action, d.traffic_percent, d.phase), (action::START, 1.0, 1));
        let mut actions = vec![];
        for i in 0..200 {
            for d in window(&mut c, &cfg, i, &agg(40, 5.0, 0, 1.0), &[]) {
                if d.action != action::HOLD {
                    actions.push((d.action, d.traffic_percent, d.decided_at));
                }
            }
        }
        let got: Vec<(Action, f64)> = actions.iter().map(|(a, t, _)| (*a, *t)).collect();
        assert_eq!(got, vec![(action::ADVANCE, 10.0), (action::ADVANCE, 25.0), (action::ADVANCE, 50.0), (action::ADVANCE, 100.0), (action::PROMOTE, 100.0)]);
        // each phase soaked at least 3 s of event time (and as long as its evidence took)
        assert!(actions[0].2 >= 3000, "{actions:?}");
        assert!(actions.windows(2).all(|w| w[1].2 - w[0].2 >= 3000), "{actions:?}");
        assert_eq!(c.promoted.get(MODEL).map(String::as_str), Some("1.1.0"));
    }

    #[test]
    fn too_few_samples_hold_and_never_advance_or_roll_back() {
        let cfg = cfg(1000);
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        for i in 0..50 {
            // two canary outputs per window: 30 samples need 15 windows; make half of them slow
            let a = agg(1, if i % 2 == 0 { 5.0 } else { 50.0 }, 0, 1.0);
            for d in window(&mut c, &cfg, i, &a, &[]) {
                if i < 29 {
                    assert_eq!(d.action, action::HOLD, "window {i}: {}", d.reason);
                    assert!(d.reason.contains("samples"), "{}", d.reason);
                }
            }
        }
    }

    #[test]
    fn a_failing_criterion_rolls_back_in_its_phase_and_quarantines_the_version() {
        let cfg = cfg(2000);
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        let mut rollback = None;
        for i in 0..200 {
            for d in window(&mut c, &cfg, i, &agg(40, 5.0, 0, 0.5), &[]) {
                if d.action == action::ROLLBACK_PHASE {
                    rollback = Some(d);
                }
            }
        }
        let d = rollback.expect("rolled back");
        assert_eq!((d.status.as_str(), d.traffic_percent, d.phase_name.as_str()), ("ROLLED_BACK", 0.0, "beta"));
        assert!(d.reason.contains("pcda_accuracy"), "{}", d.reason);
        let failed: Vec<&str> = d.criteria.iter().filter(|c| c.verdict == "FAIL").map(|c| c.name.as_str()).collect();
        assert!(!failed.is_empty() && failed.iter().all(|f| f.starts_with("pcda_accuracy")), "{failed:?}");
        assert!(d.quarantined.contains_key("document_classifier@1.1.0"));
        // quarantine: a START that does not name the version is refused; naming it lifts it
        let r = c.apply_command(&cfg, &serve(), &RolloutCommand { version: None, ..cmd(action::START, None, 99_000) });
        assert_eq!(r.action, action::REJECTED, "{}", r.reason);
        assert!(r.reason.contains("quarantined"));
        let r = c.apply_command(&cfg, &serve(), &cmd(action::START, Some("1.1.0"), 100_000));
        assert_eq!((r.action, r.traffic_percent), (action::START, 1.0));
        assert!(r.quarantined.is_empty());
    }

    #[test]
    fn a_critical_alert_or_user_impact_on_the_candidate_is_an_emergency() {
        let cfg = cfg(60_000);
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        let alert = AlertEvent {
            alert_id: "a".into(),
            code: "ERROR_RATE_CRITICAL".into(),
            severity: "critical".into(),
            status: "FIRING".into(),
            rule: "error_rate".into(),
            metric: "error_rate".into(),
            model: MODEL.into(),
            version: "1.1.0".into(),
            cohort: COHORT_CANARY.into(),
            value: 0.5,
            threshold: 0.1,
            samples: 40,
            window_start: 0,
            window_end: 1000,
            episode_start: 0,
            action: String::new(),
            emitted_at: 1000,
            reason: None,
        };
        let d = window(&mut c, &cfg, 0, &agg(40, 5.0, 0, 1.0), &[alert]);
        assert_eq!(d[0].action, action::EMERGENCY_ROLLBACK);
        assert!(d[0].reason.contains("ERROR_RATE_CRITICAL"));
        assert_eq!(d[0].traffic_percent, 0.0);
        // user impact: every canary output failing is an emergency within its first window
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        let d = window(&mut c, &cfg, 0, &agg(40, 5.0, 40, 1.0), &[]);
        assert_eq!(d[0].action, action::EMERGENCY_ROLLBACK, "{}", d[0].reason);
        assert!(d[0].reason.contains("user impact 100.0 % in the last window"), "{}", d[0].reason);
        // 30 % failing: once the phase's evidence shows more than 10 % (a few windows), not on one
        // window's noise
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        let mut at = None;
        for i in 0..20 {
            let d = window(&mut c, &cfg, i, &agg(40, 5.0, 12, 1.0), &[]);
            if d[0].action == action::EMERGENCY_ROLLBACK {
                assert!(d[0].reason.contains("user impact 30.0 % over the phase"), "{}", d[0].reason);
                at = Some(i);
                break;
            }
        }
        assert!(at.is_some_and(|i| (1..=6).contains(&i)), "emergency after window {at:?}");
        // 4 of 40 failing (10 %) is not evidence of more than 10 %
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        for i in 0..50 {
            // (its error rate against the baseline's 0 fails no_crashes instead: a phase rollback)
            assert!(window(&mut c, &cfg, i, &agg(40, 5.0, 4, 1.0), &[]).iter().all(|d| d.action != action::EMERGENCY_ROLLBACK), "window {i}");
        }
    }

    #[test]
    fn operator_commands_follow_the_runbook() {
        let cfg = cfg(60_000);
        let mut c = Controller::default();
        let s = serve();
        assert_eq!(c.apply_command(&cfg, &s, &cmd(action::ADVANCE, None, 1)).action, action::REJECTED, "no rollout yet");
        c.apply_command(&cfg, &s, &cmd(action::START, None, 2));
        let d = c.apply_command(&cfg, &s, &cmd(action::ADVANCE, None, 3));
        assert_eq!((d.phase, d.traffic_percent, d.operator.as_deref()), (2, 10.0, Some("ops")));
        let d = c.apply_command(&cfg, &s, &cmd(action::PAUSE, None, 4));
        assert_eq!(d.status, "PAUSED");
        assert_eq!(window(&mut c, &cfg, 1, &agg(40, 5.0, 0, 1.0), &[])[0].action, action::HOLD);
        c.apply_command(&cfg, &s, &cmd(action::RESUME, None, 5));
        let d = c.apply_command(&cfg, &s, &cmd(action::ROLLBACK_PHASE, None, 6));
        assert_eq!((d.phase, d.traffic_percent, d.action), (1, 1.0, action::ROLLBACK_PHASE));
        let d = c.apply_command(&cfg, &s, &cmd(action::EMERGENCY_ROLLBACK, None, 7));
        assert_eq!((d.status.as_str(), d.traffic_percent, d.phase), ("ROLLED_BACK", 0.0, 0));
        assert_eq!(d.seq, 7, "START, ADVANCE, PAUSE, HOLD, RESUME, ROLLBACK_PHASE, EMERGENCY_ROLLBACK");
        assert_eq!(c.apply_command(&cfg, &s, &cmd(action::RESUME, None, 8)).action, action::REJECTED);
    }

    #[test]
    fn restore_from_decisions_keeps_phase_soak_clock_and_quarantine() {
        let cfg = cfg(5000);
        let mut c = Controller::default();
        let mut log = vec![c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0))];
        for i in 0..200 {
            log.extend(window(&mut c, &cfg, i, &agg(40, 5.0, 0, 1.0), &[]));
            if c.rollouts.values().next().unwrap().phase == 3 {
                break;
            }
        }
        let before = c.rollouts.values().next().unwrap().clone();
        assert_eq!(before.phase, 3);
        let r = Controller::restore(log);
        let after = r.rollouts.values().next().unwrap();
        assert_eq!((after.phase, after.phase_started_at, after.seq, after.traffic_percent), (before.phase, before.phase_started_at, before.seq, before.traffic_percent));
        assert_eq!(after.status, Status::Running);
        assert!(r.answered("c0"), "the START's command id is known, so reading it again does nothing");
    }

    #[test]
    fn decisions_and_commands_round_trip_through_avro_and_json() {
        let cfg = cfg(1000);
        let mut c = Controller::default();
        c.apply_command(&cfg, &serve(), &cmd(action::START, None, 0));
        let d = window(&mut c, &cfg, 0, &agg(40, 5.0, 0, 1.0), &[]).remove(0);
        assert!(!d.criteria.is_empty());
        let mut d = d;
        d.quarantined.insert("m@1".into(), "why".into());
        for f in [WireFormat::Avro, WireFormat::Json] {
            assert_eq!(decode::<RolloutDecision>(&encode(&d, f).unwrap(), Some(f.content_type())).unwrap(), d);
            let k = cmd(action::START, Some("1.1.0"), 5);
            assert_eq!(decode::<RolloutCommand>(&encode(&k, f).unwrap(), Some(f.content_type())).unwrap(), k);
        }
    }

    #[test]
    fn a_config_with_fewer_phases_than_the_rollout_reached_does_not_break_it() {
        let cfg5 = cfg(1000);
        let mut c = Controller::default();
        c.apply_command(&cfg5, &serve(), &cmd(action::START, None, 0));
        for at in 1..5 {
            c.apply_command(&cfg5, &serve(), &cmd(action::ADVANCE, None, at));
        }
        assert_eq!(c.rollouts.values().next().unwrap().phase, 5);
        let mut cfg2 = cfg(1000);
        cfg2.phases.truncate(2);
        let d = window(&mut c, &cfg2, 1, &agg(40, 5.0, 0, 1.0), &[]);
        assert_eq!(d.len(), 1, "judged by the last configured phase");
        let d = c.apply_command(&cfg2, &serve(), &cmd(action::ROLLBACK_PHASE, None, 9_000));
        assert_eq!((d.phase, d.traffic_percent), (2, 10.0));
    }

    #[test]
    fn default_config_is_the_runbook_and_validates() {
        let c = RolloutConfig::default();
        c.validate().unwrap();
        let t: Vec<(f64, i64)> = c.phases.iter().map(|p| (p.traffic_percent, p.soak_ms / HOUR)).collect();
        assert_eq!(t, vec![(1.0, 24), (10.0, 48), (25.0, 72), (50.0, 96), (100.0, 24)]);
    }
}
