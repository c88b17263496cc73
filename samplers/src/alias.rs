//! Walker/Vose alias tables that are rebuilt in place.
//!
//! Building costs O(n) and, after the first build at a size, allocates nothing: the
//! buffers are reused. Drawing costs O(1): one uniform index and one uniform float.

use rand::{Rng, RngExt};

/// An alias table over weights `w_0..w_{n-1}`, drawing `i` with probability `w_i / Σw`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AliasTable {
    prob: Vec<f32>,
    alias: Vec<u32>,
    weights: Vec<f64>,
    total: f64,
    small: Vec<u32>,
    large: Vec<u32>,
    scaled: Vec<f64>,
}

impl AliasTable {
    /// Rebuilds the table from `weights` (negative or non-finite weights count as 0).
    pub fn rebuild(&mut self, weights: impl IntoIterator<Item = f64>) {
        self.weights.clear();
        self.weights.extend(weights.into_iter().map(|w| {
            if w.is_finite() && w > 0.0 {
                w
            } else {
                0.0
            }
        }));
        let n = self.weights.len();
        self.total = self.weights.iter().sum();
        self.prob.clear();
        self.prob.resize(n, 1.0);
        self.alias.clear();
        self.alias.extend(0..n as u32);
        if n == 0 || self.total <= 0.0 {
            return;
        }
        self.scaled.clear();
        self.scaled
            .extend(self.weights.iter().map(|w| w * n as f64 / self.total));
        self.small.clear();
        self.large.clear();
        for (i, &s) in self.scaled.iter().enumerate() {
            if s < 1.0 {
                self.small.push(i as u32);
            } else {
                self.large.push(i as u32);
            }
        }
        while let (Some(&s), Some(&l)) = (self.small.last(), self.large.last()) {
            self.small.pop();
            self.prob[s as usize] = self.scaled[s as usize] as f32;
            self.alias[s as usize] = l;
            self.scaled[l as usize] -= 1.0 - self.scaled[s as usize];
            if self.scaled[l as usize] < 1.0 {
                self.large.pop();
                self.small.push(l);
            }
        }
        // Leftovers are 1 up to rounding.
        for &i in self.small.iter().chain(&self.large) {
            self.prob[i as usize] = 1.0;
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Whether any entry has positive weight (otherwise [`AliasTable::draw`] is uniform).
    pub fn has_mass(&self) -> bool {
        self.total > 0.0
    }

    /// Probability of drawing `i` (0 outside the table).
    pub fn probability(&self, i: u32) -> f64 {
        match self.weights.get(i as usize) {
            Some(w) if self.total > 0.0 => w / self.total,
            _ => 0.0,
        }
    }

    /// Draws an index. The table must not be empty.
    #[inline]
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        let i = rng.random_range(0..self.prob.len() as u32);
        if rng.random::<f32>() < self.prob[i as usize] {
            i
        } else {
            self.alias[i as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::SeedableRng;

    #[test]
    fn draws_follow_the_weights() {
        let weights = [1.0, 0.0, 3.0, 6.0, 10.0];
        let mut t = AliasTable::default();
        t.rebuild(weights);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut counts = [0u32; 5];
        let n = 200_000;
        for _ in 0..n {
            counts[t.draw(&mut rng) as usize] += 1;
        }
        assert_eq!(counts[1], 0, "zero weight is never drawn");
        let chi2 = crate::testing::chi_square(&counts, &weights);
        assert!(
            chi2 < crate::testing::CHI2_999[3],
            "chi2 {chi2}, counts {counts:?}"
        );
        assert!((t.probability(4) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn rebuild_reuses_and_handles_empty_mass() {
        let mut t = AliasTable::default();
        t.rebuild([0.0, 0.0]);
        assert!(!t.has_mass());
        t.rebuild([2.0, 2.0]);
        assert!(t.has_mass());
        assert!((t.probability(1) - 0.5).abs() < 1e-12);
    }
}
