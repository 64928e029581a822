//! The `rollout` section of the pipeline config: the candidate, the significance level, the
//! emergency rule and the phases with their criteria (default: the runbook's five phases).
//! Validated once at start; an error names the key to fix.

use serde::{Deserialize, Serialize};

use super::criteria::Criterion;
use crate::{
    codec::WireFormat,
    config::{invalid, ConfigError},
};

/// The `rollout` section of the pipeline config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// The candidate this deployment rolls out: used by `auto_start` and by `rollout start` without
    /// `--version`.
    #[serde(default)]
    pub candidate: Option<CandidateSpec>,
    /// Start the candidate's rollout when the monitor starts and no decision exists for it yet.
    /// A quarantined version is never started this way.
    #[serde(default)]
    pub auto_start: bool,
    /// The probability that a rollout of a candidate no worse than its baseline is rolled back by
    /// chance, over all its phases and every look (sequential), divided equally among the
    /// statistical criteria of all phases ([`RolloutConfig::criterion_alpha`]). With `fixed_alpha`
    /// it is each test's level at each look instead.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// How verdicts are reached: `sequential` (anytime-valid confidence sequences, the default) or
    /// `fixed_alpha` (fixed-horizon tests read at every look; for comparison).
    #[serde(default)]
    pub method: super::criteria::Method,
    /// When to return all traffic to the baseline at once.
    #[serde(default)]
    pub emergency: EmergencyConfig,
    /// Phases in order; the candidate is promoted after the last one (default: the runbook's five).
    #[serde(default = "default_phases")]
    pub phases: Vec<PhaseSpec>,
    /// Wire format of decision events: avro or json.
    #[serde(default = "default_format")]
    pub decisions_format: WireFormat,
}

fn default_alpha() -> f64 { 0.01 }

impl RolloutConfig {
    /// The level of each criterion: sequentially `alpha` over the number of statistical criteria in
    /// all phases plus one emergency (user impact) test per phase (Bonferroni: the rollout's
    /// false-rollback probability stays at most `alpha`).
    pub fn criterion_alpha(&self) -> f64 {
        match self.method {
            super::criteria::Method::FixedAlpha => self.alpha,
            super::criteria::Method::Sequential => {
                let k = self.phases.iter().flat_map(|p| &p.criteria).filter(|c| super::criteria::is_statistical(c)).count() + self.phases.len();
                self.alpha / k.max(1) as f64
            }
        }
    }
}
fn default_format() -> WireFormat { WireFormat::Avro }

impl Default for RolloutConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all rollout fields have defaults")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateSpec {
    pub model: String,
    pub version: String,
    /// Rollout id (the decisions' key); default `<model>-<version>`.
    #[serde(default)]
    pub id: Option<String>,
}

impl CandidateSpec {
    pub fn rollout_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| default_rollout_id(&self.model, &self.version))
    }
}

pub fn default_rollout_id(model: &str, version: &str) -> String {
    format!("{model}-{version}")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyConfig {
    /// Share of canary documents whose candidate output failed (in one window or over the phase)
    /// above which all traffic returns to the baseline (runbook: user impact > 10 %).
    #[serde(default = "default_impact")]
    pub user_impact_above: f64,
    /// Canary outputs needed before user impact is judged.
    #[serde(default = "default_impact_samples")]
    pub min_samples: u64,
    /// A critical alert firing on the candidate triggers an emergency rollback.
    #[serde(default = "yes")]
    pub on_critical_alert: bool,
}

fn default_impact() -> f64 { 0.10 }
fn default_impact_samples() -> u64 { 20 }
fn yes() -> bool { true }

impl Default for EmergencyConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all emergency fields have defaults")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    /// Share of users routed to the candidate, 0 < x <= 100.
    pub traffic_percent: f64,
    /// Event time the phase must run with all criteria holding before it advances, ms.
    pub soak_ms: i64,
    #[serde(default)]
    pub criteria: Vec<Criterion>,
}

/// One hour in milliseconds.
pub(crate) const HOUR: i64 = 3_600_000;

/// The runbook's phases and criteria (design.md, Rollout phases).
pub fn default_phases() -> Vec<PhaseSpec> {
    use crate::window::aggregate::Metric as W;
    use super::criteria::{CriterionMetric::*, PhaseMetric as P};
    let c = |name: &str, metric, min: Option<f64>, max: Option<f64>, margin: Option<f64>, min_samples: u64, blocking: bool| Criterion {
        name: name.into(),
        metric,
        min,
        max,
        vs_baseline_margin: margin,
        min_samples,
        blocking,
        effect: None,
    };
    vec![
        PhaseSpec {
            name: "alpha".into(),
            traffic_percent: 1.0,
            soak_ms: 24 * HOUR,
            criteria: vec![
                c("candidate_loads", Window(W::ModelUnavailableRate), None, Some(0.0), None, 1, true),
                c("no_crashes", Window(W::ErrorRate), None, None, Some(0.0), 30, true),
                c("latency_within_10pct_of_baseline", Window(W::LatencyP95Ms), None, None, Some(0.10), 30, true),
            ],
        },
        PhaseSpec {
            name: "beta".into(),
            traffic_percent: 10.0,
            soak_ms: 48 * HOUR,
            criteria: vec![
                c("pcda_accuracy", Window(W::PcdaAccuracy), Some(0.80), None, None, 20, true),
                c("pcda_accuracy_vs_baseline", Window(W::PcdaAccuracy), None, None, Some(0.02), 20, true),
                c("error_rate_vs_baseline", Window(W::ErrorRate), None, None, Some(0.005), 30, true),
                c("memory_vs_before_rollout", Window(W::MemoryMb), None, None, Some(0.25), 5, false),
                c("feedback_positive", Window(W::Satisfaction), None, None, Some(0.05), 20, false),
            ],
        },
        PhaseSpec {
            name: "limited".into(),
            traffic_percent: 25.0,
            soak_ms: 72 * HOUR,
            criteria: vec![
                c("pcda_accuracy", Window(W::PcdaAccuracy), Some(0.85), None, None, 20, true),
                c("no_latency_degradation", Window(W::LatencyP95Ms), None, None, Some(0.0), 30, true),
                c("error_rate", Window(W::ErrorRate), None, Some(0.05), None, 30, true),
            ],
        },
        PhaseSpec {
            name: "extended".into(),
            traffic_percent: 50.0,
            soak_ms: 96 * HOUR,
            criteria: vec![
                c("all_models_healthy", Phase(P::AlertsFired), None, Some(0.0), None, 1, true),
                c("battery_impact", Phase(P::BatteryImpact), None, Some(0.10), None, 1, false),
                c("engagement_held", Phase(P::Engagement), None, None, Some(0.0), 1, false),
            ],
        },
        PhaseSpec {
            name: "full".into(),
            traffic_percent: 100.0,
            soak_ms: 24 * HOUR,
            criteria: vec![
                c("metrics_stable", Window(W::ErrorRate), None, Some(0.05), None, 30, true),
                c("satisfaction", Window(W::Satisfaction), Some(0.95), None, None, 20, false),
                c("zero_critical_incidents", Phase(P::CriticalAlerts), None, Some(0.0), None, 1, true),
            ],
        },
    ]
}

impl RolloutConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |k: &str, m: String| Err(invalid(&format!("rollout.{k}"), m));
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return bad("alpha", format!("is {}; use a significance level between 0 and 0.5, e.g. 0.01", self.alpha));
        }
        if self.phases.is_empty() {
            return bad("phases", "is empty; list at least one phase (or leave it out for the runbook's five)".into());
        }
        let mut last = 0.0;
        for (i, p) in self.phases.iter().enumerate() {
            let key = format!("phases[{i}] ({})", p.name);
            if !(p.traffic_percent > 0.0 && p.traffic_percent <= 100.0) {
                return bad(&key, format!("traffic_percent is {}; use more than 0 and at most 100", p.traffic_percent));
            }
            if p.traffic_percent < last {
                return bad(&key, format!("traffic_percent {} is below the previous phase's {last}; phases must not shrink traffic", p.traffic_percent));
            }
            last = p.traffic_percent;
            if p.soak_ms < 0 {
                return bad(&key, "soak_ms must not be negative".into());
            }
            for c in &p.criteria {
                c.validate(&format!("rollout.{key}.criteria.{}", c.name))?;
            }
        }
        if let Some(c) = &self.candidate {
            if !crate::inference::MODEL_NAMES.contains(&c.model.as_str()) {
                return bad("candidate.model", format!("{} is not a known model; use one of {:?}", c.model, crate::inference::MODEL_NAMES));
            }
        }
        if self.auto_start && self.candidate.is_none() {
            return bad("auto_start", "is true but rollout.candidate is not set; name the model and version to roll out".into());
        }
        Ok(())
    }
}

/// Sizes every statistical criterion for an effect `factor` times its default, and the latency
/// criteria for `latency_effect` and non-blocking (at a few hundred documents a second a 1 % canary
/// runs batches of one and the baseline larger ones, so run times at equal batch size may never
/// meet within seconds): for runs that compress hours of soak into seconds (the demo, the
/// integration tests) and with them the evidence a phase can gather. Production keeps the
/// defaults, whose error rates `payslip-stream rollout simulate` measures.
pub fn scale_effects(phases: &mut [PhaseSpec], factor: f64, latency_effect: f64) {
    use super::criteria::{default_effect, is_statistical, CriterionMetric};
    for p in phases {
        for c in &mut p.criteria {
            if c.metric == CriterionMetric::Window(crate::window::aggregate::Metric::LatencyP95Ms) {
                c.effect = Some(latency_effect);
                c.blocking = false;
            } else if is_statistical(c) {
                c.effect = Some(factor * default_effect(c.metric));
            }
        }
    }
}
