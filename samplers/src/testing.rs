//! Statistics helpers for the samplers' distribution tests.

/// 99.9 % critical values of the chi-square distribution for 1..=20 degrees of freedom,
/// indexed by `dof - 1`.
pub(crate) const CHI2_999: [f64; 20] = [
    10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53,
    36.12, 37.70, 39.25, 40.79, 42.31, 43.82, 45.31,
];

/// Pearson's chi-square of observed `counts` against expected proportions `weights`
/// (cells with zero expected weight are skipped).
pub(crate) fn chi_square(counts: &[u32], weights: &[f64]) -> f64 {
    let n: f64 = counts.iter().map(|&c| c as f64).sum();
    let total: f64 = weights.iter().sum();
    counts
        .iter()
        .zip(weights)
        .filter(|(_, &w)| w > 0.0)
        .map(|(&c, &w)| {
            let e = n * w / total;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}
