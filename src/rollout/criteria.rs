//! Rollout criteria: what each phase checks, and how a verdict is reached from a phase's windows.
//!
//! A criterion reads one metric of the candidate (or of the pipeline, for process metrics) and
//! either compares it with a fixed bound (`min` / `max`) or with the baseline in the same windows
//! (`vs_baseline_margin`). With `rollout.method: sequential` (the default) every statistical
//! verdict comes from an anytime-valid confidence sequence ([`super::stats`]) at the criterion's
//! share of `alpha`, so it may be read at every window close:
//! - **comparisons** (`vs_baseline_margin` m, `effect` δ): the candidate-minus-baseline difference
//!   θ (rates: absolute; latency and memory: log of the ratio) FAILs when the sequence's lower bound
//!   is above m (worse by more than the margin, with confidence 1 − α) and PASSes when its upper
//!   bound is below m + δ (not worse by δ or more beyond the margin, with confidence 1 − α); in
//!   between it is INSUFFICIENT and the phase holds until the evidence settles it. Between m and
//!   m + δ is the indifference zone: the effect the criterion is sized to detect is δ.
//! - **fixed bounds** on a proportion: FAIL when the sequence is wholly on the wrong side of the
//!   bound, PASS when wholly on the right side; bounds of 0 and 1 are exact (one counter-example
//!   fails). Other fixed bounds (model load time) compare the phase's value.
//! - **latency** is compared per ONNX Runtime run at equal batch size
//!   ([`super::stats::equal_size_log_ratio`]): a canary's runs are small batches and the baseline's
//!   large ones, so per-document times are not alike, and sizes only one cohort ran are left out;
//!   with no size in common by the end of the soak the criterion is NOT_EVALUABLE.
//! - **memory** (`memory_mb` with `vs_baseline_margin`): the infer process's per-window peak RSS in
//!   the phase against the same measure over the windows before the rollout started (log ratio,
//!   windows as the unit). The process's absolute RSS is an alert (`memory_high`), not a rollout
//!   criterion: the process exceeds a fixed bound on its own while it drains a backlog.
//!
//! `INSUFFICIENT`: below the minimum sample, or not conclusive yet (HOLD); `NOT_EVALUABLE`: the
//! metric has no source here (battery, engagement), no sample arrived by the end of the soak, or no
//! memory reference exists; `blocking` says whether that stops the phase from advancing. With
//! `method: fixed_alpha` the verdicts are those of one-sided fixed-horizon tests at `alpha` read at
//! every look (kept to measure them against; see `payslip-stream rollout simulate`).

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
    /// The degradation beyond the margin (comparisons) that the criterion must detect, in the
    /// margin's units: also the width of its indifference zone and the scale of its mixture. For
    /// fixed bounds, the scale of the mixture. Default by metric (rates 0.02, accuracy and
    /// satisfaction 0.05, latency and memory 0.25 = 25 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<f64>,
}

/// How verdicts are reached (`rollout.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Anytime-valid confidence sequences (module doc).
    #[default]
    Sequential,
    /// Fixed-horizon one-sided tests at `alpha`, read at every look (for comparison only).
    FixedAlpha,
}

/// What a verdict is reached with.
#[derive(Debug, Clone, Copy)]
pub struct Judge<'a> {
    pub method: Method,
    /// The level of this criterion: `rollout.alpha` divided among the rollout's statistical
    /// criteria (sequential), or `alpha` itself (fixed).
    pub alpha: f64,
    /// The phase's soak time is over.
    pub soaked: bool,
    /// Per-window ln(peak RSS MB) of the infer process before the rollout started.
    pub memory_reference: &'a crate::window::aggregate::Moments,
}

fn default_min_samples() -> u64 { 30 }

/// The effect a criterion is sized for when `effect` is not set.
pub fn default_effect(metric: CriterionMetric) -> f64 {
    match metric {
        CriterionMetric::Window(Metric::ErrorRate | Metric::ModelUnavailableRate) => 0.02,
        CriterionMetric::Window(Metric::Accuracy | Metric::PcdaAccuracy | Metric::Satisfaction) => 0.05,
        CriterionMetric::Window(Metric::LatencyP95Ms | Metric::ProcessingP95Ms | Metric::MemoryMb) => 0.25,
        _ => 0.05,
    }
}

fn yes() -> bool { true }

/// Whether the criterion's verdict is statistical (it can fail by chance, so it spends alpha).
pub fn is_statistical(c: &Criterion) -> bool {
    let CriterionMetric::Window(_) = c.metric else { return false };
    if c.vs_baseline_margin.is_some() {
        return true;
    }
    c.metric.proportion(&WindowAggregate::default()).is_some() && !c.min.is_some_and(|v| v >= 1.0) && !c.max.is_some_and(|v| v <= 0.0)
}

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
            CriterionMetric::Window(m) => (!m.on_pipeline() && m != Metric::ModelLoadMs) || m == Metric::MemoryMb,
            CriterionMetric::Phase(p) => !matches!(p, PhaseMetric::CriticalAlerts | PhaseMetric::AlertsFired),
        };
        if self.vs_baseline_margin.is_some() && !per_cohort {
            return Err(invalid(key, format!("{} has no per-cohort baseline to compare with; use min or max", self.metric.name())));
        }
        if self.vs_baseline_margin.is_some_and(|m| m < 0.0) {
            return Err(invalid(key, "vs_baseline_margin must not be negative"));
        }
        if self.effect.is_some_and(|e| !(e > 0.0)) {
            return Err(invalid(key, "effect must be more than 0 (the degradation the criterion must detect)"));
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

    /// The verdict on what the phase has seen so far.
    pub fn evaluate(&self, agg: &PhaseAggregate, j: &Judge<'_>) -> CriterionResult {
        if !self.metric.has_source() {
            return self.result(Verdict::NotEvaluable, format!("no source for {} in this deployment", self.metric.name()));
        }
        let soaked = j.soaked;
        let on_pipeline = self.metric.window_metric().is_some_and(Metric::on_pipeline);
        let cand = if on_pipeline { &agg.pipeline } else { &agg.candidate };
        let min_n = self.min_samples.max(1);
        let effect = self.effect.unwrap_or_else(|| default_effect(self.metric));
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
                let (bc, bb) = if higher_worse { (xc, xb) } else { (nc - xc, nb - xb) };
                let (vc, vb) = (xc as f64 / nc as f64, xb as f64 / nb as f64);
                let (pc, varc) = stats::proportion(bc, nc);
                let (pb, varb) = stats::proportion(bb, nb);
                let what = |lo: f64, hi: f64| format!("{vc:.3} vs baseline {vb:.3}; worse by [{lo:.4}, {hi:.4}]");
                return self.compare(r, pc - pb, varc + varb, margin, effect, j, &what, &|m| format!("{m:.3}"));
            }
            if self.metric == CriterionMetric::Window(Metric::MemoryMb) {
                let (m, refm) = (&agg.memory, j.memory_reference);
                let mut r = self.result(Verdict::Insufficient, String::new());
                r.samples = m.w as i64;
                r.baseline_samples = refm.w as i64;
                r.value = m.mean().map(f64::exp);
                r.baseline_value = refm.mean().map(f64::exp);
                if refm.w < 2.0 {
                    return CriterionResult { verdict: Verdict::NotEvaluable, detail: "no memory reference: fewer than 2 windows were measured before the rollout started".into(), ..r };
                }
                if (m.w as u64) < min_n.max(2) {
                    r.detail = format!("{} of {} windows", m.w, min_n.max(2));
                    return r;
                }
                let df = m.w + refm.w - 2.0;
                let pooled = ((m.sum_sq_dev() + refm.sum_sq_dev()) / df.max(1.0)).max(1e-6);
                let est = m.mean().unwrap_or(0.0) - refm.mean().unwrap_or(0.0);
                let var = pooled * (1.0 / m.w + 1.0 / refm.w);
                let (mc, mb) = (r.value.unwrap_or(0.0), r.baseline_value.unwrap_or(0.0));
                let what = |lo: f64, hi: f64| format!("peak RSS {mc:.0} MB per window vs {mb:.0} MB before the rollout; ratio [{:.3}, {:.3}]", lo.exp(), hi.exp());
                return self.compare(r, est, var, (1.0 + margin).ln(), ((1.0 + margin + effect) / (1.0 + margin)).ln(), j, &what, &|m| format!("×{:.3}", m.exp()));
            }
            // latency: per run, corrected for batch size
            let mut r = self.result(Verdict::Insufficient, String::new());
            r.value = cand.latency.quantile_ms(0.95);
            r.baseline_value = base.latency.quantile_ms(0.95);
            let (nc, nb) = (cand.run_count(), base.run_count());
            r.samples = nc.round() as i64;
            r.baseline_samples = nb.round() as i64;
            if nc < min_n as f64 || nb < min_n as f64 {
                if nc == 0.0 && soaked {
                    return CriterionResult { samples: 0, baseline_samples: r.baseline_samples, ..no_data(self, 0) };
                }
                r.detail = format!("{nc:.0} candidate and {nb:.0} baseline runs of {min_n} each");
                return r;
            }
            let Some((est, var, _, _)) = stats::equal_size_log_ratio(&cand.runs, &base.runs, 1e-4) else {
                let sizes = |runs: &std::collections::BTreeMap<u16, crate::window::aggregate::Moments>| runs.keys().map(u16::to_string).collect::<Vec<_>>().join(",");
                let detail = format!("the cohorts ran no batch size in common (candidate {}, baseline {}): run times are compared like for like only", sizes(&cand.runs), sizes(&base.runs));
                // without a common batch size by the end of the soak the criterion cannot be judged
                let verdict = if soaked { Verdict::NotEvaluable } else { Verdict::Insufficient };
                return CriterionResult { verdict, detail, ..r };
            };
            let (pc, pb) = (r.value.unwrap_or(0.0), r.baseline_value.unwrap_or(0.0));
            let what = |lo: f64, hi: f64| format!("run time at equal batch size ×[{:.3}, {:.3}] of baseline (p95 per document {pc:.2} ms vs {pb:.2} ms)", lo.exp(), hi.exp());
            return self.compare(r, est, var, (1.0 + margin).ln(), ((1.0 + margin + effect) / (1.0 + margin)).ln(), j, &what, &|m| format!("×{:.3}", m.exp()));
        }
        // a fixed bound on a proportion
        if let Some((x, n, _)) = self.metric.proportion(cand) {
            if n < min_n {
                return CriterionResult { samples: n as i64, value: (n > 0).then(|| x as f64 / n as f64), ..no_data(self, n) };
            }
            let v = x as f64 / n as f64;
            let (lo, hi) = match j.method {
                Method::Sequential => {
                    let (p, var) = stats::proportion(x, n);
                    let b = stats::sequence(p, var, effect, j.alpha);
                    (b.lower.max(0.0), b.upper.min(1.0))
                }
                Method::FixedAlpha => stats::wilson(x, n, stats::z_for(j.alpha)),
            };
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

    /// The verdict on a candidate-minus-baseline difference `est` (variance `var`) against `margin`,
    /// with `effect` the size to detect beyond it (both in the units of `est`).
    #[allow(clippy::too_many_arguments)]
    fn compare(&self, mut r: CriterionResult, est: f64, var: f64, margin: f64, effect: f64, j: &Judge<'_>, what: &dyn Fn(f64, f64) -> String, show: &dyn Fn(f64) -> String) -> CriterionResult {
        match j.method {
            Method::Sequential => {
                let b = stats::sequence(est, var, effect, j.alpha);
                let p = stats::always_valid_p(est, margin, var, effect * effect);
                r.p_value = Some(p);
                let (lo, hi) = (b.lower, b.upper);
                if lo > margin {
                    r.verdict = Verdict::Fail;
                    r.detail = format!("{}: worse than the baseline by more than {} (anytime-valid, α={:.2e}, p={p:.2e})", what(lo, hi), show(margin), j.alpha);
                } else if hi < margin + effect {
                    r.verdict = Verdict::Pass;
                    r.detail = format!("{}: not worse than {} (anytime-valid, α={:.2e})", what(lo, hi), show(margin + effect), j.alpha);
                } else {
                    r.verdict = Verdict::Insufficient;
                    r.detail = format!("{}: not yet conclusive against {} / {} (α={:.2e})", what(lo, hi), show(margin), show(margin + effect), j.alpha);
                }
            }
            Method::FixedAlpha => {
                let p = 1.0 - stats::normal_cdf((est - margin) / var.max(1e-300).sqrt());
                r.p_value = Some(p);
                let w = stats::z_for(j.alpha) * var.sqrt();
                if p < j.alpha {
                    r.verdict = Verdict::Fail;
                    r.detail = format!("{}: worse by more than {} (fixed-horizon z-test p={p:.4} < {})", what(est - w, est + w), show(margin), j.alpha);
                } else {
                    r.verdict = Verdict::Pass;
                    r.detail = format!("{}: not worse by more than {} (p={p:.3})", what(est - w, est + w), show(margin));
                }
            }
        }
        r
    }
}
