//! The statistics rollout criteria rest on: one-sided Wilson score bounds for a proportion against a
//! fixed threshold, a two-proportion z-test for "candidate worse than baseline by more than a margin",
//! and a Mann-Whitney U test (normal approximation, tie-corrected) on latency histograms.
//!
//! All tests are one-sided and answer one question: is the evidence strong enough (p < alpha) to
//! say the candidate is on the wrong side? A criterion fails only on such evidence, so noise does not
//! fail a phase; minimum sample sizes keep noise from passing one.

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

/// p-value of "candidate proportion exceeds baseline proportion by more than `margin`"
/// (H0: p_c - p_b <= margin), unpooled standard error. `None` when either side has no samples.
pub fn two_proportion_exceeds(x_c: u64, n_c: u64, x_b: u64, n_b: u64, margin: f64) -> Option<f64> {
    if n_c == 0 || n_b == 0 {
        return None;
    }
    let (pc, pb) = (x_c as f64 / n_c as f64, x_b as f64 / n_b as f64);
    // a floor on the variance keeps 0/n against 0/n (or 1 against 1) from dividing by zero
    let var = (pc * (1.0 - pc) / n_c as f64 + pb * (1.0 - pb) / n_b as f64).max(0.25 / (n_c as f64 * n_b as f64));
    let z = (pc - pb - margin) / var.sqrt();
    Some(1.0 - normal_cdf(z))
}

/// p-value of "candidate values are stochastically greater than baseline values × `scale`"
/// (one-sided Mann-Whitney U, normal approximation with tie correction and continuity correction).
/// Inputs are `(value, count)` pairs as histograms give them. `None` when either side is empty.
pub fn mann_whitney_greater(candidate: &[(f64, u64)], baseline: &[(f64, u64)], scale: f64) -> Option<f64> {
    let n_c: u64 = candidate.iter().map(|x| x.1).sum();
    let n_b: u64 = baseline.iter().map(|x| x.1).sum();
    if n_c == 0 || n_b == 0 {
        return None;
    }
    // (value, candidate count, baseline count), merged and sorted by value
    let mut all: Vec<(f64, u64, u64)> = candidate.iter().map(|&(v, c)| (v, c, 0)).chain(baseline.iter().map(|&(v, c)| (v * scale, 0, c))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_c = 0.0;
    let mut below = 0u64;
    let mut ties = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        let (mut c, mut b) = (0u64, 0u64);
        while j < all.len() && all[j].0 == all[i].0 {
            c += all[j].1;
            b += all[j].2;
            j += 1;
        }
        let t = (c + b) as f64;
        let mid_rank = below as f64 + (t + 1.0) / 2.0;
        rank_sum_c += c as f64 * mid_rank;
        ties += t * t * t - t;
        below += c + b;
        i = j;
    }
    let (nc, nb) = (n_c as f64, n_b as f64);
    let n = nc + nb;
    let u = rank_sum_c - nc * (nc + 1.0) / 2.0;
    let mean = nc * nb / 2.0;
    let var = nc * nb / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)).max(1.0));
    if var <= 0.0 {
        return Some(if u > mean { 0.0 } else { 1.0 });
    }
    let z = (u - mean - 0.5) / var.sqrt();
    Some(1.0 - normal_cdf(z))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn two_proportion_sees_a_real_difference_and_not_noise() {
        // 20 % vs 5 % on 400 each: clearly worse
        assert!(two_proportion_exceeds(80, 400, 20, 400, 0.0).unwrap() < 0.001);
        // 6 % vs 5 % on 200 each: not evidence
        assert!(two_proportion_exceeds(12, 200, 10, 200, 0.0).unwrap() > 0.2);
        // 0 vs 0 is not worse
        assert!(two_proportion_exceeds(0, 50, 0, 500, 0.0).unwrap() > 0.4);
        assert_eq!(two_proportion_exceeds(1, 0, 1, 10, 0.0), None);
    }

    #[test]
    fn mann_whitney_detects_a_shift_beyond_the_margin() {
        let base: Vec<(f64, u64)> = (0..100).map(|i| (10.0 + i as f64 * 0.1, 1)).collect();
        let slow: Vec<(f64, u64)> = base.iter().map(|&(v, c)| (v * 1.5, c)).collect();
        let same = base.clone();
        assert!(mann_whitney_greater(&slow, &base, 1.10).unwrap() < 0.001, "50 % slower is beyond 10 %");
        assert!(mann_whitney_greater(&same, &base, 1.10).unwrap() > 0.5, "equal is within 10 %");
        assert!(mann_whitney_greater(&same, &base, 1.0).unwrap() > 0.3, "equal is not worse");
        // all values tied: no evidence either way
        assert!(mann_whitney_greater(&[(5.0, 40)], &[(5.0, 60)], 1.0).unwrap() >= 0.5);
        assert_eq!(mann_whitney_greater(&[], &base, 1.0), None);
    }
}
