//! Alert rules and their lifecycle, evaluated on each closed window.
//!
//! Each rule has up to two tiers (warning, critical). Per (rule, tier, subject) an instance moves
//! `inactive → pending → FIRING → inactive`, as in Prometheus: the condition must hold for
//! `for_windows` closed windows before FIRING is emitted once; when it stops holding (against the
//! `clear` threshold, for hysteresis) for more than `keep_firing_for_windows` windows, RESOLVED is
//! emitted once. Critical inhibits warning: the warning condition is "beyond the warning threshold
//! and not beyond the critical one", so an escalation resolves the warning and fires the critical.
//! A window with fewer than `min_samples` samples is *no data*: it neither fires nor resolves.
//!
//! Everything here is a pure function of the rules, the stored instance state and the window, so a
//! replay of the same input yields the same events with the same ids.

pub mod forward;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::window::{
    aggregate::{Metric, Subject, WindowAggregate},
    WindowRange,
};

/// Which side of the threshold is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Above,
    Below,
}

/// One tier of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Alert code, e.g. `ERROR_RATE_WARNING`.
    pub code: String,
    /// The condition holds beyond this value.
    pub threshold: f64,
    /// A firing alert resolves only when the value is back beyond this one (default: `threshold`).
    #[serde(default)]
    pub clear: Option<f64>,
}

/// An alert rule from `monitor.alerts` in the pipeline config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Unique name, part of alert ids.
    pub name: String,
    pub metric: Metric,
    pub direction: Direction,
    #[serde(default)]
    pub warning: Option<Tier>,
    #[serde(default)]
    pub critical: Option<Tier>,
    /// Fewer samples in a window than this: no data.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Closed windows the condition must hold before FIRING.
    #[serde(default = "one")]
    pub for_windows: u32,
    /// Windows a firing alert stays firing after its condition cleared.
    #[serde(default)]
    pub keep_firing_for_windows: u32,
    /// Only these models (empty: all models; ignored for pipeline metrics).
    #[serde(default)]
    pub models: Vec<String>,
    /// What the runbook says to do.
    pub action: String,
    /// Thresholds used instead of the tiers' for a window whose results ran on a GPU provider
    /// (pipeline rules): a process holding a CUDA context and its libraries is far larger than a
    /// CPU one, so the memory rule has GPU-sized limits.
    #[serde(default)]
    pub on_gpu: Option<GpuThresholds>,
}

/// A rule's thresholds on a GPU host (each replaces its tier's threshold; its `clear` is then the
/// threshold itself).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuThresholds {
    #[serde(default)]
    pub warning: Option<f64>,
    #[serde(default)]
    pub critical: Option<f64>,
}

fn default_min_samples() -> u64 {
    10
}
fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl AlertRule {
    pub fn applies_to(&self, s: &Subject) -> bool {
        if self.metric.on_pipeline() {
            return s.is_pipeline();
        }
        !s.is_pipeline() && (self.models.is_empty() || self.models.contains(&s.model))
    }

    fn beyond(&self, value: f64, limit: f64) -> bool {
        match self.direction {
            Direction::Above => value > limit,
            Direction::Below => value < limit,
        }
    }

    /// The rule as it applies to `agg`: with its `on_gpu` thresholds when the window's results
    /// ran on a GPU provider.
    pub fn for_window(&self, agg: &WindowAggregate) -> std::borrow::Cow<'_, AlertRule> {
        match (&self.on_gpu, agg.gpu_results > 0) {
            (Some(g), true) => {
                let mut r = self.clone();
                for (tier, threshold) in [(&mut r.warning, g.warning), (&mut r.critical, g.critical)] {
                    if let (Some(t), Some(v)) = (tier.as_mut(), threshold) {
                        t.threshold = v;
                        t.clear = None;
                    }
                }
                std::borrow::Cow::Owned(r)
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    pub fn tier(&self, sev: Severity) -> Option<&Tier> {
        match sev {
            Severity::Warning => self.warning.as_ref(),
            Severity::Critical => self.critical.as_ref(),
        }
    }

    /// Checks the rule; `key` is where the rules sit in the config (named in the error).
    pub fn validate(&self, key: &str) -> Result<(), crate::config::ConfigError> {
        let bad = |m: String| Err(crate::config::invalid(key, m));
        if self.warning.is_none() && self.critical.is_none() {
            return bad(format!("alert rule {}: needs a warning or a critical tier", self.name));
        }
        if let (Some(w), Some(c)) = (&self.warning, &self.critical) {
            if self.beyond(w.threshold, c.threshold) {
                return bad(format!("alert rule {}: the warning threshold {} is beyond the critical one {}", self.name, w.threshold, c.threshold));
            }
        }
        for t in self.warning.iter().chain(&self.critical) {
            if let Some(c) = t.clear {
                if self.beyond(c, t.threshold) {
                    return bad(format!("alert rule {}: clear {} of {} is beyond its threshold {}", self.name, c, t.code, t.threshold));
                }
            }
        }
        if self.for_windows == 0 {
            return bad(format!("alert rule {}: for_windows must be at least 1", self.name));
        }
        if let Some(g) = &self.on_gpu {
            if !self.metric.on_pipeline() {
                return bad(format!("alert rule {}: on_gpu applies to pipeline metrics (memory_mb, cpu_percent, processing_p95_ms), not {}", self.name, self.metric.name()));
            }
            if let (Some(w), Some(c)) = (g.warning, g.critical) {
                if self.beyond(w, c) {
                    return bad(format!("alert rule {}: on_gpu warning {w} is beyond on_gpu critical {c}", self.name));
                }
            }
        }
        Ok(())
    }
}

/// Lifecycle state of one (rule, tier, subject).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertInstance {
    pub state: InstanceState,
    /// Consecutive windows the condition held (pending) or has not held (firing).
    pub streak: u32,
    /// Start of the first window of the current episode.
    pub episode_start_ms: Option<i64>,
    /// Window ranges closed, while firing, without a window of this subject (it gets no traffic).
    #[serde(default)]
    pub silent_windows: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    #[default]
    Inactive,
    Pending,
    Firing,
    /// Not firing, and the last window had too few samples to say anything.
    NoData,
}

/// A FIRING or RESOLVED event, as published on `litert.alerts.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Deterministic: sha256 of rule, tier, subject and episode start.
    pub alert_id: String,
    pub code: String,
    pub severity: String,
    /// `FIRING` or `RESOLVED`.
    pub status: String,
    pub rule: String,
    pub metric: String,
    pub model: String,
    pub version: String,
    pub cohort: String,
    pub value: f64,
    pub threshold: f64,
    pub samples: i64,
    pub window_start: i64,
    pub window_end: i64,
    pub episode_start: i64,
    pub action: String,
    /// Event time of the decision: the end of the window that caused it.
    pub emitted_at: i64,
    /// Why a RESOLVED event resolved, when not because the condition cleared (`no data: ...`).
    #[serde(default)]
    pub reason: Option<String>,
}

pub fn alert_id(rule: &str, sev: Severity, subject: &Subject, episode_start_ms: i64) -> String {
    let mut h = Sha256::new();
    h.update(format!("{rule}|{sev:?}|{}|{episode_start_ms}", subject.key()));
    hex::encode(&h.finalize()[..16])
}

/// Key of an instance in the state store.
pub fn instance_key(rule: &str, sev: Severity, subject: &Subject) -> String {
    format!("{rule}|{sev:?}|{}", subject.key())
}

/// Evaluates `rule` for `subject` on a closed window, updating both tiers' instances; returns the
/// events to publish (RESOLVED before FIRING, warning before critical).
pub fn evaluate(
    rule: &AlertRule,
    subject: &Subject,
    window: WindowRange,
    agg: &WindowAggregate,
    warning: &mut AlertInstance,
    critical: &mut AlertInstance,
) -> Vec<AlertEvent> {
    let rule = &*rule.for_window(agg);
    let reading = agg.metric(rule.metric).filter(|(_, n)| *n >= rule.min_samples);
    let crit_holds = |inst: &AlertInstance, v: f64| {
        rule.critical.as_ref().is_some_and(|t| {
            let limit = if inst.state == InstanceState::Firing { t.clear.unwrap_or(t.threshold) } else { t.threshold };
            rule.beyond(v, limit)
        })
    };
    let crit_cond = reading.map(|(v, _)| crit_holds(critical, v));
    let warn_cond = reading.map(|(v, _)| {
        let crossed = rule.warning.as_ref().is_some_and(|t| {
            let limit = if warning.state == InstanceState::Firing { t.clear.unwrap_or(t.threshold) } else { t.threshold };
            rule.beyond(v, limit)
        });
        // critical inhibits warning
        crossed && !rule.critical.as_ref().is_some_and(|t| rule.beyond(v, t.threshold))
    });
    let mut events = Vec::new();
    let (value, samples) = reading.map(|(v, n)| (v, n as i64)).unwrap_or((f64::NAN, 0));
    let step = |sev: Severity, inst: &mut AlertInstance, cond: Option<bool>, events: &mut Vec<AlertEvent>| {
        let Some(tier) = rule.tier(sev) else { return };
        let make = |status: &str, episode: i64| AlertEvent {
            alert_id: alert_id(&rule.name, sev, subject, episode),
            code: tier.code.clone(),
            severity: match sev { Severity::Warning => "warning", Severity::Critical => "critical" }.into(),
            status: status.into(),
            rule: rule.name.clone(),
            metric: rule.metric.name().into(),
            model: subject.model.clone(),
            version: subject.version.clone(),
            cohort: subject.cohort.clone(),
            value,
            threshold: tier.threshold,
            samples,
            window_start: window.start_ms,
            window_end: window.end_ms,
            episode_start: episode,
            action: rule.action.clone(),
            emitted_at: window.end_ms,
            reason: None,
        };
        // a window of the subject closed: it is not silent
        inst.silent_windows = 0;
        match (inst.state, cond) {
            (InstanceState::Firing, None) => {} // no data never resolves
            (_, None) => {
                *inst = AlertInstance { state: InstanceState::NoData, ..AlertInstance::default() };
            }
            (InstanceState::Firing, Some(true)) => inst.streak = 0,
            (InstanceState::Firing, Some(false)) => {
                inst.streak += 1;
                if inst.streak > rule.keep_firing_for_windows {
                    let episode = inst.episode_start_ms.unwrap_or(window.start_ms);
                    events.push(make("RESOLVED", episode));
                    *inst = AlertInstance::default();
                }
            }
            (_, Some(true)) => {
                let episode = if inst.state == InstanceState::Pending { inst.episode_start_ms.unwrap_or(window.start_ms) } else { window.start_ms };
                let streak = if inst.state == InstanceState::Pending { inst.streak + 1 } else { 1 };
                if streak >= rule.for_windows {
                    events.push(make("FIRING", episode));
                    *inst = AlertInstance { state: InstanceState::Firing, episode_start_ms: Some(episode), ..AlertInstance::default() };
                } else {
                    *inst = AlertInstance { state: InstanceState::Pending, streak, episode_start_ms: Some(episode), ..AlertInstance::default() };
                }
            }
            (_, Some(false)) => *inst = AlertInstance::default(),
        }
    };
    // the critical tier first, so that a firing critical inhibits the warning in the same window
    let mut crit_events = Vec::new();
    step(Severity::Critical, critical, crit_cond, &mut crit_events);
    let warn_cond = warn_cond.map(|c| c && critical.state != InstanceState::Firing);
    step(Severity::Warning, warning, warn_cond, &mut events);
    events.extend(crit_events);
    events.sort_by_key(|e| (e.status != "RESOLVED", e.severity != "warning"));
    events
}

/// Counts one closed window range without a window of the subject of `inst` (key `rule|sev|subject`);
/// after `after_windows` of them a FIRING alert resolves with the reason "no data" (a rolled-back
/// candidate or a retired version gets no traffic, and its alert would otherwise fire forever).
pub fn resolve_silent(rule: &AlertRule, sev: Severity, subject: &Subject, window: WindowRange, inst: &mut AlertInstance, after_windows: u32) -> Option<AlertEvent> {
    if inst.state != InstanceState::Firing || after_windows == 0 {
        return None;
    }
    inst.silent_windows += 1;
    if inst.silent_windows < after_windows {
        return None;
    }
    let tier = rule.tier(sev)?;
    let episode = inst.episode_start_ms.unwrap_or(window.start_ms);
    *inst = AlertInstance::default();
    Some(AlertEvent {
        alert_id: alert_id(&rule.name, sev, subject, episode),
        code: tier.code.clone(),
        severity: match sev { Severity::Warning => "warning", Severity::Critical => "critical" }.into(),
        status: "RESOLVED".into(),
        rule: rule.name.clone(),
        metric: rule.metric.name().into(),
        model: subject.model.clone(),
        version: subject.version.clone(),
        cohort: subject.cohort.clone(),
        value: f64::NAN,
        threshold: tier.threshold,
        samples: 0,
        window_start: window.start_ms,
        window_end: window.end_ms,
        episode_start: episode,
        action: rule.action.clone(),
        emitted_at: window.end_ms,
        reason: Some(format!("no data: no window of {} for {after_windows} windows", subject.key())),
    })
}

fn tier(code: &str, threshold: f64) -> Option<Tier> {
    Some(Tier { code: code.into(), threshold, clear: None })
}

/// The runbook's info events. They carry status `INFO`, severity `info`, and are emitted once per
/// cause (their ids are deterministic like those of alerts):
/// - `USER_FEEDBACK`: a closed window of a model subject received ratings (value: satisfaction).
/// - `PERFORMANCE_OPTIMIZATION`: a closed window's p95 model latency is above half the
///   `inference_time` warning threshold but not beyond it: the headroom is going.
/// - `MODEL_UPDATE_AVAILABLE`: model_metadata.json lists a candidate version newer than the one served
///   (emitted once per model and version, see [`update_available`]).
pub fn info_events(rules: &[AlertRule], subject: &Subject, window: WindowRange, agg: &WindowAggregate) -> Vec<AlertEvent> {
    let mut out = Vec::new();
    if subject.is_pipeline() {
        return out;
    }
    let info = |code: &str, metric: Metric, value: f64, threshold: f64, samples: u64, action: &str| AlertEvent {
        alert_id: alert_id(code, Severity::Warning, subject, window.start_ms),
        code: code.into(),
        severity: "info".into(),
        status: "INFO".into(),
        rule: code.to_ascii_lowercase(),
        metric: metric.name().into(),
        model: subject.model.clone(),
        version: subject.version.clone(),
        cohort: subject.cohort.clone(),
        value,
        threshold,
        samples: samples as i64,
        window_start: window.start_ms,
        window_end: window.end_ms,
        episode_start: window.start_ms,
        action: action.into(),
        emitted_at: window.end_ms,
        reason: None,
    };
    if let Some((v, n)) = agg.metric(Metric::Satisfaction) {
        out.push(info("USER_FEEDBACK", Metric::Satisfaction, v, 0.0, n, "Review the ratings and corrections of this window"));
    }
    let warn = rules.iter().find(|r| r.metric == Metric::LatencyP95Ms && r.direction == Direction::Above).and_then(|r| r.warning.as_ref().map(|t| (t.threshold, r.min_samples)));
    if let (Some((limit, min)), Some((v, n))) = (warn, agg.metric(Metric::LatencyP95Ms)) {
        if n >= min && v > limit / 2.0 && v <= limit {
            out.push(info("PERFORMANCE_OPTIMIZATION", Metric::LatencyP95Ms, v, limit / 2.0, n, "Latency is past half its warning threshold: consider quantization, a GPU provider or larger batches"));
        }
    }
    out
}

/// MODEL_UPDATE_AVAILABLE for a model whose metadata lists `candidate` while `served` runs.
pub fn update_available(model: &str, served: &str, candidate: &str, at_ms: i64) -> AlertEvent {
    let subject = Subject { model: model.into(), version: served.into(), cohort: "baseline".into() };
    AlertEvent {
        alert_id: alert_id(&format!("model_update_available:{candidate}"), Severity::Warning, &subject, 0),
        code: "MODEL_UPDATE_AVAILABLE".into(),
        severity: "info".into(),
        status: "INFO".into(),
        rule: "model_update_available".into(),
        metric: format!("candidate {candidate}"),
        model: model.into(),
        version: served.into(),
        cohort: "baseline".into(),
        value: 0.0,
        threshold: 0.0,
        samples: 0,
        window_start: at_ms,
        window_end: at_ms,
        episode_start: at_ms,
        reason: None,
        action: format!("Candidate {candidate} is available: plan a phased rollout"),
        emitted_at: at_ms,
    }
}

/// The runbook's thresholds, reconciled as in the design's table.
pub fn default_rules() -> Vec<AlertRule> {
    let rule = |name: &str, metric, direction, warning, critical, min_samples, action: &str| AlertRule {
        name: name.into(),
        metric,
        direction,
        warning,
        critical,
        min_samples,
        for_windows: 1,
        keep_firing_for_windows: 0,
        models: vec![],
        action: action.into(),
        on_gpu: None,
    };
    let mut pcda = rule("pcda_accuracy", Metric::PcdaAccuracy, Direction::Below, tier("PCDA_ACCURACY_WARNING", 0.85), None, 20, "Review model performance");
    pcda.models = vec!["document_classifier".into()];
    vec![
        rule("inference_time", Metric::LatencyP95Ms, Direction::Above, tier("PERFORMANCE_WARNING", 500.0), tier("PERFORMANCE_CRITICAL", 2000.0), 10, "Check hardware acceleration"),
        rule("error_rate", Metric::ErrorRate, Direction::Above, tier("ERROR_RATE_WARNING", 0.05), tier("ERROR_RATE_CRITICAL", 0.10), 20, "Roll back to the previous model version"),
        rule("model_health", Metric::ModelUnavailableRate, Direction::Above, tier("MODEL_DEGRADED", 0.0), tier("MODEL_CRITICAL", 0.5), 1, "Check model files and load errors (models verify); roll back"),
        AlertRule {
            // CUDA, cuDNN and cuBLAS alone map a few GB into a process that holds a CUDA context
            on_gpu: Some(GpuThresholds { warning: Some(4096.0), critical: Some(8192.0) }),
            ..rule("memory", Metric::MemoryMb, Direction::Above, tier("MEMORY_WARNING", 200.0), tier("MEMORY_CRITICAL", 300.0), 1, "Reduce batch size")
        },
        rule("cpu", Metric::CpuPercent, Direction::Above, tier("CPU_WARNING", 80.0), None, 1, "Optimize model quantization"),
        rule("model_load_time", Metric::ModelLoadMs, Direction::Above, tier("MODEL_LOAD_TIME_WARNING", 5000.0), None, 1, "Investigate model caching"),
        pcda,
        rule("processing_speed", Metric::ProcessingP95Ms, Direction::Above, tier("PROCESSING_SPEED_WARNING", 3000.0), None, 10, "Optimize inference pipeline"),
        rule("user_satisfaction", Metric::Satisfaction, Direction::Below, None, tier("USER_SATISFACTION_CRITICAL", 0.90), 10, "Immediate investigation"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(i: i64) -> WindowRange {
        WindowRange { start_ms: i * 1000, end_ms: (i + 1) * 1000 }
    }

    fn agg(errors: u64, count: u64) -> WindowAggregate {
        WindowAggregate { count, errors, ..Default::default() }
    }

    fn run(rule: &AlertRule, seq: &[(u64, u64)]) -> Vec<(i64, String, String)> {
        let s = Subject { model: "m".into(), version: "1".into(), cohort: "baseline".into() };
        let (mut w, mut c) = (AlertInstance::default(), AlertInstance::default());
        let mut out = vec![];
        for (i, (e, n)) in seq.iter().enumerate() {
            for ev in evaluate(rule, &s, window(i as i64), &agg(*e, *n), &mut w, &mut c) {
                out.push((i as i64, ev.code, ev.status));
            }
        }
        out
    }

    fn error_rule() -> AlertRule {
        default_rules().into_iter().find(|r| r.name == "error_rate").unwrap()
    }

    #[test]
    fn fires_once_and_resolves_once() {
        let ev = run(&error_rule(), &[(0, 100), (7, 100), (7, 100), (8, 100), (1, 100), (1, 100)]);
        assert_eq!(ev, vec![(1, "ERROR_RATE_WARNING".into(), "FIRING".into()), (4, "ERROR_RATE_WARNING".into(), "RESOLVED".into())]);
    }

    #[test]
    fn critical_inhibits_warning_and_escalation_resolves_it() {
        let ev = run(&error_rule(), &[(7, 100), (20, 100), (20, 100), (7, 100), (0, 100)]);
        assert_eq!(
            ev,
            vec![
                (0, "ERROR_RATE_WARNING".into(), "FIRING".into()),
                (1, "ERROR_RATE_WARNING".into(), "RESOLVED".into()),
                (1, "ERROR_RATE_CRITICAL".into(), "FIRING".into()),
                (3, "ERROR_RATE_CRITICAL".into(), "RESOLVED".into()),
                (3, "ERROR_RATE_WARNING".into(), "FIRING".into()),
                (4, "ERROR_RATE_WARNING".into(), "RESOLVED".into()),
            ]
        );
    }

    #[test]
    fn no_data_neither_fires_nor_resolves() {
        // 3 samples < min 20: no data
        let ev = run(&error_rule(), &[(3, 3), (20, 100), (0, 3), (0, 3), (0, 100)]);
        assert_eq!(ev, vec![(1, "ERROR_RATE_CRITICAL".into(), "FIRING".into()), (4, "ERROR_RATE_CRITICAL".into(), "RESOLVED".into())]);
    }

    #[test]
    fn for_and_keep_firing_for_and_hysteresis() {
        let mut r = error_rule();
        r.critical = None;
        r.for_windows = 2;
        r.keep_firing_for_windows = 1;
        r.warning.as_mut().unwrap().clear = Some(0.02);
        // 6%: pending, then firing; 4% is below 5% but above the 2% clear level: still firing;
        // 1%: cleared once (kept firing), cleared twice: resolved
        let ev = run(&r, &[(6, 100), (6, 100), (4, 100), (1, 100), (1, 100)]);
        assert_eq!(ev, vec![(1, "ERROR_RATE_WARNING".into(), "FIRING".into()), (4, "ERROR_RATE_WARNING".into(), "RESOLVED".into())]);
    }

    #[test]
    fn ids_are_deterministic_per_episode() {
        let s = Subject::pipeline();
        assert_eq!(alert_id("r", Severity::Warning, &s, 5), alert_id("r", Severity::Warning, &s, 5));
        assert_ne!(alert_id("r", Severity::Warning, &s, 5), alert_id("r", Severity::Warning, &s, 6));
        assert_ne!(alert_id("r", Severity::Warning, &s, 5), alert_id("r", Severity::Critical, &s, 5));
    }

    #[test]
    fn info_events_for_feedback_and_shrinking_headroom() {
        let rules = default_rules();
        let s = Subject { model: "m".into(), version: "1".into(), cohort: "baseline".into() };
        let mut a = WindowAggregate { count: 20, ratings: 4, ratings_positive: 3, ..Default::default() };
        for _ in 0..20 {
            a.latency.record_ms(300.0);
        }
        let codes: Vec<String> = info_events(&rules, &s, window(0), &a).into_iter().map(|e| e.code).collect();
        assert_eq!(codes, vec!["USER_FEEDBACK", "PERFORMANCE_OPTIMIZATION"]);
        let fast = WindowAggregate { count: 20, ..Default::default() };
        assert!(info_events(&rules, &s, window(0), &fast).is_empty());
        assert!(info_events(&rules, &Subject::pipeline(), window(0), &a).is_empty());
    }

    #[test]
    fn the_memory_rule_has_gpu_sized_limits_for_windows_that_ran_on_a_gpu() {
        let rule = default_rules().into_iter().find(|r| r.name == "memory").unwrap();
        let s = Subject::pipeline();
        let window_of = |mb: u64, gpu: u64| WindowAggregate { count: 10, gpu_results: gpu, max_rss_bytes: mb << 20, cpu_samples: 10, ..Default::default() };
        let fired = |a: &WindowAggregate| {
            let (mut w, mut c) = (AlertInstance::default(), AlertInstance::default());
            evaluate(&rule, &s, window(0), a, &mut w, &mut c).into_iter().map(|e| e.code).collect::<Vec<_>>()
        };
        // 2.5 GB: critical on a CPU host, nothing on a GPU host; 5 GB on a GPU host: a warning
        assert_eq!(fired(&window_of(2500, 0)), vec!["MEMORY_CRITICAL"]);
        assert!(fired(&window_of(2500, 10)).is_empty());
        assert_eq!(fired(&window_of(5000, 3)), vec!["MEMORY_WARNING"]);
        let mut bad = rule.clone();
        bad.metric = Metric::ErrorRate;
        assert!(bad.validate("monitor.alerts").is_err());
    }

    #[test]
    fn default_rules_are_valid() {
        for r in default_rules() {
            r.validate("monitor.alerts").unwrap();
        }
    }
}
