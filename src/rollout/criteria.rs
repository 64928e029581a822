//! Rollout criteria: what each phase checks, and how a verdict is reached from a phase's windows.
//!
//! A criterion reads one metric of the candidate (or of the pipeline, for process metrics) and
//! either compares it with a fixed bound (`min` / `max`) or with the baseline in the same windows
//! (`vs_baseline_margin`). Verdicts:
//! - `PASS` / `FAIL`: proportions against a bound use one-sided Wilson bounds (PASS when the whole
//!   interval is on the right side, FAIL when it is wholly on the wrong side); comparisons with the
//!   baseline FAIL only when a one-sided test says the candidate is worse by more than the margin
//!   (two-proportion z-test for rates, Mann-Whitney U on the latency histograms) and PASS once both
//!   sides have their minimum sample without that evidence;
//! - `INSUFFICIENT`: below the minimum sample, or not conclusive yet (HOLD);
//! - `NOT_EVALUABLE`: the metric has no source here (battery, engagement), or no sample at all arrived
//!   by the end of the soak; `blocking` says whether that stops the phase from advancing.

use serde::{Deserialize, Serialize};

use super::{stats, PhaseAggregate};
use crate::{
    codec::text_enum::text_enum,
    config::{invalid, ConfigError},
};
use crate::window::aggregate::{Metric, WindowAggregate};

/// What a criterion reads: a window metric of the candidate (or of the pipeline, for process
/// metrics), or something only a phase has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriterionMetric {
    /// Any window metric (`window::aggregate::Metric`); latency is compared as a whole
    /// distribution against the baseline, as p95 against a bound.
    Window(Metric),
    Phase(PhaseMetric),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseMetric {
    /// Critical alerts that fired on the candidate during the phase.
    CriticalAlerts,
    /// Alerts of any severity that fired on the candidate during the phase.
    AlertsFired,
    /// No source in this deployment (no device telemetry): always NOT_EVALUABLE.
    BatteryImpact,
    /// No source in this deployment (no engagement events): always NOT_EVALUABLE.
    Engagement,
}

const METRIC_NAMES: &str = "latency_p95_ms, error_rate, model_unavailable_rate, accuracy, pcda_accuracy, satisfaction, model_load_ms, memory_mb, cpu_percent, processing_p95_ms, critical_alerts, alerts_fired, battery_impact, engagement";

impl Serialize for CriterionMetric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for CriterionMetric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{value::StrDeserializer, Error, IntoDeserializer};
        let name = String::deserialize(d)?;
        let de = || -> StrDeserializer<'_, serde::de::value::Error> { name.as_str().into_deserializer() };
        Metric::deserialize(de())
            .map(CriterionMetric::Window)
            .or_else(|_| PhaseMetric::deserialize(de()).map(CriterionMetric::Phase))
            .map_err(|_: serde::de::value::Error| D::Error::custom(format!("unknown metric `{name}`; use one of {METRIC_NAMES}")))
    }
}

impl CriterionMetric {
    pub fn name(self) -> &'static str {
        match self {
            Self::Window(m) => m.name(),
            Self::Phase(PhaseMetric::CriticalAlerts) => "critical_alerts",
            Self::Phase(PhaseMetric::AlertsFired) => "alerts_fired",
            Self::Phase(PhaseMetric::BatteryImpact) => "battery_impact",
            Self::Phase(PhaseMetric::Engagement) => "engagement",
        }
    }

    fn window_metric(self) -> Option<Metric> {
        match self {
            Self::Window(m) => Some(m),
            Self::Phase(_) => None,
        }
    }

    /// `(successes, trials, higher_is_worse)` for proportion metrics.
    fn proportion(self, a: &WindowAggregate) -> Option<(u64, u64, bool)> {
        Some(match self {
            Self::Window(Metric::ErrorRate) => (a.errors.saturating_sub(a.unavailable), a.count, true),
            Self::Window(Metric::ModelUnavailableRate) => (a.unavailable, a.count, true),
            Self::Window(Metric::Accuracy) => (a.correct, a.labelled, false),
            Self::Window(Metric::PcdaAccuracy) => (a.pcda_correct, a.pcda_labelled, false),
            Self::Window(Metric::Satisfaction) => (a.ratings_positive, a.ratings, false),
            _ => return None,
        })
    }

    fn has_source(self) -> bool {
        !matches!(self, Self::Phase(PhaseMetric::BatteryImpact | PhaseMetric::Engagement))
    }
}

/// One success criterion of a phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub name: String,
    pub metric: CriterionMetric,
    /// The metric must be at least this.
    #[serde(default)]
    pub min: Option<f64>,
    /// The metric must be at most this.
    #[serde(default)]
    pub max: Option<f64>,
    /// Compare with the baseline in the same windows: the candidate may be worse by at most this
    /// much (latency: a fraction, 0.10 = 10 % slower; rates: absolute, 0.02 = two points).
    #[serde(default)]
    pub vs_baseline_margin: Option<f64>,
    /// Samples (each side, for comparisons) before the criterion may pass or fail.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Whether NOT_EVALUABLE keeps the phase from advancing.
    #[serde(default = "yes")]
    pub blocking: bool,
}

fn default_min_samples() -> u64 { 30 }
fn yes() -> bool { true }

text_enum! {
    /// A criterion's verdict (see the module doc).
    pub enum Verdict {
        Pass = "PASS",
        Fail = "FAIL",
        Insufficient = "INSUFFICIENT",
        NotEvaluable = "NOT_EVALUABLE",
    }
}

/// A criterion's verdict as published in decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionResult {
    pub name: String,
    pub metric: String,
    pub verdict: Verdict,
    #[serde(default)]
    pub value: Option<f64>,
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub baseline_value: Option<f64>,
    #[serde(default)]
    pub p_value: Option<f64>,
    pub samples: i64,
    pub baseline_samples: i64,
    pub min_samples: i64,
    pub blocking: bool,
    pub detail: String,
}

impl CriterionResult {
    /// Whether the criterion lets the phase advance.
    pub fn holds(&self) -> bool {
        self.verdict == Verdict::Pass || (self.verdict == Verdict::NotEvaluable && !self.blocking)
    }
}

impl Criterion {
    /// Checks the criterion; `key` is where it sits in the config (named in the error).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let bounds = self.min.is_some() as u8 + self.max.is_some() as u8 + self.vs_baseline_margin.is_some() as u8;
        if bounds != 1 {
            return Err(invalid(key, "set exactly one of min, max or vs_baseline_margin"));
        }
        let per_cohort = match self.metric {
            CriterionMetric::Window(m) => !m.on_pipeline() && m != Metric::ModelLoadMs,
            CriterionMetric::Phase(p) => !matches!(p, PhaseMetric::CriticalAlerts | PhaseMetric::AlertsFired),
        };
        if self.vs_baseline_margin.is_some() && !per_cohort {
            return Err(invalid(key, format!("{} has no per-cohort baseline to compare with; use min or max", self.metric.name())));
        }
        if self.vs_baseline_margin.is_some_and(|m| m < 0.0) {
            return Err(invalid(key, "vs_baseline_margin must not be negative"));
        }
        Ok(())
    }

    fn result(&self, verdict: Verdict, detail: String) -> CriterionResult {
        CriterionResult {
            name: self.name.clone(),
            metric: self.metric.name().into(),
            verdict,
            value: None,
            threshold: self.min.or(self.max).or(self.vs_baseline_margin),
            baseline_value: None,
            p_value: None,
            samples: 0,
            baseline_samples: 0,
            min_samples: self.min_samples as i64,
            blocking: self.blocking,
            detail,
        }
    }

    /// The verdict on what the phase has seen so far; `soaked`: the phase's soak time is over.
    pub fn evaluate(&self, agg: &PhaseAggregate, z: f64, alpha: f64, soaked: bool) -> CriterionResult {
        if !self.metric.has_source() {
            return self.result(Verdict::NotEvaluable, format!("no source for {} in this deployment", self.metric.name()));
        }
        let on_pipeline = self.metric.window_metric().is_some_and(Metric::on_pipeline);
        let cand = if on_pipeline { &agg.pipeline } else { &agg.candidate };
        let min_n = self.min_samples.max(1);
        let no_data = |r: &Self, n: u64| {
            if n == 0 && soaked {
                r.result(Verdict::NotEvaluable, "no samples arrived during the soak".into())
            } else {
                r.result(Verdict::Insufficient, format!("{n} of {min_n} samples"))
            }
        };
        // alert counts: windows are the samples
        if let CriterionMetric::Phase(p @ (PhaseMetric::CriticalAlerts | PhaseMetric::AlertsFired)) = self.metric {
            let count = if p == PhaseMetric::CriticalAlerts { agg.critical_alerts } else { agg.alerts_fired };
            if agg.windows < min_n {
                return CriterionResult { samples: agg.windows as i64, ..no_data(self, agg.windows) };
            }
            let bound = self.max.or(self.min).unwrap_or(0.0);
            let ok = self.max.map_or(true, |m| count as f64 <= m) && self.min.map_or(true, |m| count as f64 >= m);
            let v = if ok { Verdict::Pass } else { Verdict::Fail };
            return CriterionResult { value: Some(count as f64), samples: agg.windows as i64, ..self.result(v, format!("{count} fired over {} windows (bound {bound})", agg.windows)) };
        }
        // comparison with the baseline
        if let Some(margin) = self.vs_baseline_margin {
            let base = &agg.baseline;
            if let Some((xc, nc, higher_worse)) = self.metric.proportion(cand) {
                let (xb, nb, _) = self.metric.proportion(base).expect("same metric");
                let mut r = self.result(Verdict::Insufficient, String::new());
                r.samples = nc as i64;
                r.baseline_samples = nb as i64;
                r.value = (nc > 0).then(|| xc as f64 / nc as f64);
                r.baseline_value = (nb > 0).then(|| xb as f64 / nb as f64);
                if nc < min_n || nb < min_n {
                    if nc == 0 && soaked {
                        return CriterionResult { samples: 0, baseline_samples: nb as i64, ..no_data(self, 0) };
                    }
                    r.detail = format!("{nc} candidate and {nb} baseline samples of {min_n} each");
                    return r;
                }
                // "worse" as a rate that should be low: errors, or failures of accuracy/satisfaction
                let p = if higher_worse { stats::two_proportion_exceeds(xc, nc, xb, nb, margin) } else { stats::two_proportion_exceeds(nc - xc, nc, nb - xb, nb, margin) };
                let p = p.unwrap_or(1.0);
                r.p_value = Some(p);
                let (vc, vb) = (xc as f64 / nc as f64, xb as f64 / nb as f64);
                if p < alpha {
                    r.verdict = Verdict::Fail;
                    r.detail = format!("{vc:.3} vs baseline {vb:.3}: worse by more than {margin} (two-proportion test p={p:.4} < {alpha})");
                } else {
                    r.verdict = Verdict::Pass;
                    r.detail = format!("{vc:.3} vs baseline {vb:.3}: not worse by more than {margin} (p={p:.3})");
                }
                return r;
            }
            // latency distributions
            let (nc, nb) = (cand.latency.len(), base.latency.len());
            let mut r = self.result(Verdict::Insufficient, String::new());
            r.samples = nc as i64;
            r.baseline_samples = nb as i64;
            r.value = cand.latency.quantile_ms(0.95);
            r.baseline_value = base.latency.quantile_ms(0.95);
            if nc < min_n || nb < min_n {
                if nc == 0 && soaked {
                    return CriterionResult { samples: 0, baseline_samples: nb as i64, ..no_data(self, 0) };
                }
                r.detail = format!("{nc} candidate and {nb} baseline latency samples of {min_n} each");
                return r;
            }
            let c: Vec<(f64, u64)> = cand.latency.iter_ms().collect();
            let b: Vec<(f64, u64)> = base.latency.iter_ms().collect();
            let p = stats::mann_whitney_greater(&c, &b, 1.0 + margin).unwrap_or(1.0);
            r.p_value = Some(p);
            let (pc, pb) = (r.value.unwrap_or(0.0), r.baseline_value.unwrap_or(0.0));
            if p < alpha {
                r.verdict = Verdict::Fail;
                r.detail = format!("p95 {pc:.2} ms vs baseline {pb:.2} ms: slower than baseline +{:.0} % (Mann-Whitney p={p:.4} < {alpha})", margin * 100.0);
            } else {
                r.verdict = Verdict::Pass;
                r.detail = format!("p95 {pc:.2} ms vs baseline {pb:.2} ms: within baseline +{:.0} % (Mann-Whitney p={p:.3})", margin * 100.0);
            }
            return r;
        }
        // a fixed bound
        if let Some((x, n, _)) = self.metric.proportion(cand) {
            if n < min_n {
                return CriterionResult { samples: n as i64, value: (n > 0).then(|| x as f64 / n as f64), ..no_data(self, n) };
            }
            let v = x as f64 / n as f64;
            let (lo, hi) = stats::wilson(x, n, z);
            let (verdict, detail) = match (self.min, self.max) {
                (Some(min), _) if min >= 1.0 => if x == n { (Verdict::Pass, format!("{x}/{n}")) } else { (Verdict::Fail, format!("{x}/{n} below {min}")) },
                (Some(min), _) if lo >= min => (Verdict::Pass, format!("{v:.3} ({x}/{n}), lower bound {lo:.3} ≥ {min}")),
                (Some(min), _) if hi < min => (Verdict::Fail, format!("{v:.3} ({x}/{n}), upper bound {hi:.3} < {min}")),
                (Some(min), _) => (Verdict::Insufficient, format!("{v:.3} ({x}/{n}) not yet conclusive against {min}: [{lo:.3}, {hi:.3}]")),
                (_, Some(max)) if max <= 0.0 => if x == 0 { (Verdict::Pass, format!("0 of {n}")) } else { (Verdict::Fail, format!("{x} of {n}, bound {max}")) },
                (_, Some(max)) if hi <= max => (Verdict::Pass, format!("{v:.3} ({x}/{n}), upper bound {hi:.3} ≤ {max}")),
                (_, Some(max)) if lo > max => (Verdict::Fail, format!("{v:.3} ({x}/{n}), lower bound {lo:.3} > {max}")),
                (_, Some(max)) => (Verdict::Insufficient, format!("{v:.3} ({x}/{n}) not yet conclusive against {max}: [{lo:.3}, {hi:.3}]")),
                _ => unreachable!("validated: one bound"),
            };
            return CriterionResult { value: Some(v), samples: n as i64, ..self.result(verdict, detail) };
        }
        let metric = self.metric.window_metric().expect("alert and sourceless metrics handled above");
        match cand.metric(metric) {
            None => no_data(self, 0),
            Some((_, n)) if n < min_n => CriterionResult { samples: n as i64, ..no_data(self, n) },
            Some((v, n)) => {
                let ok = self.min.map_or(true, |m| v >= m) && self.max.map_or(true, |m| v <= m);
                let bound = self.min.map(|m| format!("≥ {m}")).or(self.max.map(|m| format!("≤ {m}"))).unwrap_or_default();
                let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
                CriterionResult { value: Some(v), samples: n as i64, ..self.result(verdict, format!("{} {v:.2} over {n} samples (must be {bound})", self.metric.name())) }
            }
        }
    }
}
