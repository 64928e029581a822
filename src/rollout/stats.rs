//! The statistics rollout criteria rest on.
//!
//! **Sequential (the default, `rollout.method: sequential`)**: every verdict comes from a
//! *confidence sequence*, a confidence interval that holds at every look at once, so the controller
//! may judge at every window close for days without raising its error rates. The construction is
//! the normal-mixture (Robbins) boundary for an estimator that is approximately Gaussian with known
//! variance, as in Johari, Pekelis and Walsh, "Always valid inference" (mSPRT, 2017/2022), Howard,
//! Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences"
//! (Ann. Statist. 2021, the normal mixture), and Lindon, Sanden and Shirikian, "Rapid Regression
//! Detection in Software Deployments through Sequential Testing" (KDD 2022) for canaries. For an
//! estimate `θ̂` of `θ` with variance `s²` (information `1/s²` grows as samples arrive) and a
//! N(0, τ²) mixture over the effect, the likelihood ratio against `θ = θ0` is
//!
//! ```text
//! Λ(θ0) = sqrt(s² / (s² + τ²)) · exp( τ² (θ̂ − θ0)² / (2 s² (s² + τ²)) )
//! ```
//!
//! a nonnegative martingale under `θ = θ0` (Ville's inequality: `P(∃t: Λ_t ≥ 1/α) ≤ α`). The set of
//! `θ0` with `Λ(θ0) < 1/α` is the confidence sequence `θ̂ ± w` ([`mixture_half_width`]); the
//! always-valid p-value is `min(1, 1/Λ)` ([`always_valid_p`]). `τ` is set to the effect a criterion
//! must detect, which is where the boundary is tightest.
//!
//! **Fixed-α (`rollout.method: fixed_alpha`, kept to measure what it does)**: one-sided z-tests and
//! Wilson bounds at `alpha` at every look. Looked at repeatedly, they fail a healthy candidate far
//! more often than `alpha` (see `payslip-stream rollout simulate`).

/// Standard normal CDF (Φ), from `erfc` (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96 + t * (0.096_784_18 + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The z with `P(Z > z) = alpha` (one-sided critical value), by bisection on [`normal_cdf`].
pub fn z_for(alpha: f64) -> f64 {
    let target = 1.0 - alpha.clamp(1e-12, 0.5);
    let (mut lo, mut hi) = (0.0, 10.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if normal_cdf(mid) < target {
            lo = mid
        } else {
            hi = mid
        }
    }
    (lo + hi) / 2.0
}

/// ln Λ(θ0) of the normal mixture (module doc): `estimate` θ̂, `var` its variance s², `tau2` τ².
pub fn mixture_log_lr(estimate: f64, theta0: f64, var: f64, tau2: f64) -> f64 {
    let (s2, t2) = (var.max(1e-300), tau2.max(1e-300));
    let d = estimate - theta0;
    0.5 * (s2 / (s2 + t2)).ln() + t2 * d * d / (2.0 * s2 * (s2 + t2))
}

/// Half-width `w` of the confidence sequence `θ̂ ± w` at level `alpha` (each one-sided statement
/// `θ > θ̂ − w`, `θ < θ̂ + w` holds at every look with probability at least 1 − alpha).
pub fn mixture_half_width(var: f64, tau2: f64, alpha: f64) -> f64 {
    let (s2, t2) = (var.max(1e-300), tau2.max(1e-300));
    (2.0 * s2 * (s2 + t2) / t2 * ((1.0 / alpha).ln() + 0.5 * ((s2 + t2) / s2).ln())).sqrt()
}

/// Always-valid one-sided p-value of "θ > θ0" (1 when the estimate is not above θ0).
pub fn always_valid_p(estimate: f64, theta0: f64, var: f64, tau2: f64) -> f64 {
    if estimate <= theta0 {
        return 1.0;
    }
    (-mixture_log_lr(estimate, theta0, var, tau2)).exp().min(1.0)
}

/// A proportion's estimate and the variance used for it: `x/n`, with the variance taken at
/// `(x + ½)/(n + 1)` so that 0 of n or n of n still has some (Jeffreys-like).
pub fn proportion(x: u64, n: u64) -> (f64, f64) {
    let nf = n.max(1) as f64;
    let shrunk = (x as f64 + 0.5) / (nf + 1.0);
    (x as f64 / nf, shrunk * (1.0 - shrunk) / nf)
}

/// A one-sided test result on `θ` (an estimate with its confidence sequence at some alpha).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
    pub var: f64,
}

/// The confidence sequence of an estimate at `alpha` with mixture scale `tau`.
pub fn sequence(estimate: f64, var: f64, tau: f64, alpha: f64) -> Bounds {
    let w = mixture_half_width(var, tau * tau, alpha);
    Bounds { estimate, lower: estimate - w, upper: estimate + w, var }
}

/// The candidate's run time relative to the baseline's at equal batch size: per batch size both
/// cohorts ran, the difference of their mean ln(run time); the sizes combined by inverse variance,
/// with one within-group variance pooled over all groups (floored at `min_var`). Runs of a size
/// only one cohort ran are not used: run time does not scale with batch size in a way one could
/// extrapolate safely (a slow period falls on large batches more than on small ones, and a model's
/// cost per document differs between a batch of 1 and one of 32). Returns `(θ̂ = ln ratio, var,
/// candidate runs compared, baseline runs compared)`; None without a size in common or with fewer
/// than 2 degrees of freedom for the variance.
pub fn equal_size_log_ratio(
    candidate: &std::collections::BTreeMap<u16, crate::window::aggregate::Moments>,
    baseline: &std::collections::BTreeMap<u16, crate::window::aggregate::Moments>,
    min_var: f64,
) -> Option<(f64, f64, f64, f64)> {
    let mut ss = 0.0;
    let mut df = 0.0;
    for m in candidate.values().chain(baseline.values()).filter(|m| m.w > 0.0) {
        ss += m.sum_sq_dev();
        df += m.w - 1.0;
    }
    if df < 2.0 {
        return None;
    }
    let pooled = (ss / df).max(min_var);
    let (mut num, mut info, mut nc, mut nb) = (0.0, 0.0, 0.0, 0.0);
    for (k, c) in candidate {
        let Some(b) = baseline.get(k) else { continue };
        let (Some(mc), Some(mb)) = (c.mean(), b.mean()) else { continue };
        // a size with less than one whole run on a side (a run split across windows) counts as one
        let var_k = pooled * (1.0 / c.w.max(1.0) + 1.0 / b.w.max(1.0));
        num += (mc - mb) / var_k;
        info += 1.0 / var_k;
        nc += c.w;
        nb += b.w;
    }
    (info > 0.0).then(|| (num / info, 1.0 / info, nc, nb))
}

/// Wilson score interval of `successes / n` at critical value `z` (each side one-sided at alpha).
pub fn wilson(successes: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = successes as f64 / n_f;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n_f)) / (1.0 + z2 / n_f);
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / (1.0 + z2 / n_f);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boundaries against values computed independently (by hand from the closed form, checked with
    /// a numeric integral of the mixture below).
    #[test]
    fn the_mixture_boundary_matches_its_closed_form_and_a_numeric_integral() {
        // s² = 1, τ² = 1, α = 0.05: w = sqrt(2·1·2/1·(ln 20 + ½ ln 2)) = sqrt(4·(2.995732 + 0.346574))
        let w = mixture_half_width(1.0, 1.0, 0.05);
        assert!((w - (4.0f64 * (20f64.ln() + 0.5 * 2f64.ln())).sqrt()).abs() < 1e-12);
        assert!((w - 3.656_395).abs() < 1e-5, "{w}");
        // at the boundary Λ = 1/α exactly
        assert!((mixture_log_lr(w, 0.0, 1.0, 1.0) - 20f64.ln()).abs() < 1e-9);
        // Λ as the integral over the effect of the likelihood ratio N(θ̂; δ, s²)/N(θ̂; 0, s²) against
        // the N(0, τ²) prior, by the trapezoid rule
        let (est, s2, t2) = (0.7, 0.09, 0.04);
        let mut integral = 0.0;
        let h = 1e-4;
        let mut delta = -3.0;
        while delta < 3.0 {
            let f = |d: f64| ((-(est - d).powi(2) + est * est) / (2.0 * s2)).exp() * (-d * d / (2.0 * t2)).exp() / (2.0 * std::f64::consts::PI * t2).sqrt();
            integral += h * (f(delta) + f(delta + h)) / 2.0;
            delta += h;
        }
        assert!((mixture_log_lr(est, 0.0, s2, t2) - integral.ln()).abs() < 1e-6, "{} vs {}", mixture_log_lr(est, 0.0, s2, t2), integral.ln());
        // p-value: 1/Λ above θ0, 1 below
        assert!((always_valid_p(est, 0.0, s2, t2) - 1.0 / integral).abs() < 1e-6);
        assert_eq!(always_valid_p(-0.5, 0.0, s2, t2), 1.0);
    }

    #[test]
    fn the_sequence_narrows_with_information_and_widens_with_confidence() {
        let a = mixture_half_width(0.01, 0.01, 0.01);
        assert!(mixture_half_width(0.001, 0.01, 0.01) < a);
        assert!(mixture_half_width(0.01, 0.01, 0.001) > a);
        // wider than the fixed-horizon interval at the same level: the price of looking at every window
        assert!(a > z_for(0.01) * 0.1);
    }

    #[test]
    fn proportions_keep_some_variance_at_zero_and_at_one() {
        let (p, v) = proportion(0, 100);
        assert_eq!(p, 0.0);
        assert!(v > 0.0 && v < 1e-4, "{v}");
        let (p, v) = proportion(100, 100);
        assert_eq!(p, 1.0);
        assert!(v > 0.0);
    }

    #[test]
    fn run_times_are_compared_at_equal_batch_size_only() {
        use crate::window::aggregate::Moments;
        use std::collections::BTreeMap;
        // candidate 10 % slower at every size it ran (1 and 2); the baseline also ran 8 and 16,
        // and slow periods hit its large batches: those sizes must not count
        let time = |k: u16, slower: f64, i: u32| slower * 5.0 * (k as f64).powf(0.8) * (1.0 + (i % 5) as f64 * 0.01);
        let (mut c, mut b): (BTreeMap<u16, Moments>, BTreeMap<u16, Moments>) = Default::default();
        for i in 0..200 {
            for k in [1u16, 2] {
                c.entry(k).or_default().add(time(k, 1.1, i).ln(), 1.0);
                b.entry(k).or_default().add(time(k, 1.0, i).ln(), 1.0);
            }
            for k in [8u16, 16] {
                b.entry(k).or_default().add((time(k, 1.0, i) * 30.0).ln(), 1.0);
            }
        }
        let (est, var, nc, nb) = equal_size_log_ratio(&c, &b, 1e-8).unwrap();
        assert!((est - 1.1f64.ln()).abs() < 1e-9, "{est} vs {}", 1.1f64.ln());
        assert!(var > 0.0 && nc == 400.0 && nb == 400.0, "{var} {nc} {nb}");
        // no size in common: no comparison
        let one = |k: u16| BTreeMap::from([(k, Moments { w: 10.0, sum: 10.0, sum_sq: 10.5 })]);
        assert!(equal_size_log_ratio(&one(1), &one(8), 1e-8).is_none());
    }

    #[test]
    fn normal_quantiles() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((z_for(0.05) - 1.644_854).abs() < 1e-4);
        assert!((z_for(0.01) - 2.326_348).abs() < 1e-4);
    }

    #[test]
    fn wilson_bounds_bracket_the_estimate_and_tighten_with_samples() {
        let z = z_for(0.05);
        let (lo, hi) = wilson(30, 30, z);
        assert!(lo > 0.9 && hi == 1.0, "{lo} {hi}");
        let (lo10, _) = wilson(10, 10, z);
        assert!(lo10 < lo);
        let (lo, hi) = wilson(58, 100, z);
        assert!(lo < 0.58 && hi > 0.58 && hi < 0.67, "{lo} {hi}");
    }
}
