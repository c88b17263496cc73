//! The streaming frequency estimator of Yi et al., "Sampling-Bias-Corrected Neural
//! Modeling for Large Corpus Item Recommendations" (RecSys 2019), Algorithm 2.
//!
//! For each item (hashed into `H` buckets) it keeps the step at which the item was last
//! seen (`A`) and a moving average of the gap between sightings (`B`). An item seen every
//! `δ` steps has probability `1/δ` per step, so `q = 1 / B`. It needs O(H) memory
//! whatever the number of items, and adapts to drifting popularity through `alpha`.

/// Estimates how often each item occurs in a stream, without per-item exact counts.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FrequencyEstimator {
    last_seen: Vec<u64>,
    gap: Vec<f64>,
    alpha: f64,
    step: u64,
}

impl FrequencyEstimator {
    /// An estimator with `buckets` hash buckets and learning rate `alpha`.
    pub fn new(buckets: usize, alpha: f64) -> Self {
        let buckets = buckets.max(1);
        Self {
            last_seen: vec![0; buckets],
            gap: vec![0.0; buckets],
            alpha: alpha.clamp(1e-6, 1.0),
            step: 0,
        }
    }

    #[inline]
    fn bucket(&self, item: u32) -> usize {
        // Fibonacci hashing: cheap and spreads sequential ids.
        ((item as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % self.gap.len()
    }

    /// Records one occurrence of `item` at the next step.
    #[inline]
    pub fn update(&mut self, item: u32) {
        self.step += 1;
        let b = self.bucket(item);
        if self.last_seen[b] > 0 {
            let delta = (self.step - self.last_seen[b]) as f64;
            self.gap[b] = (1.0 - self.alpha) * self.gap[b] + self.alpha * delta;
        } else {
            // First sighting: assume the average gap so far.
            self.gap[b] = self.step as f64;
        }
        self.last_seen[b] = self.step;
    }

    /// Estimated probability that a step's item is `item` (0 if never seen).
    #[inline]
    pub fn estimate(&self, item: u32) -> f32 {
        let g = self.gap[self.bucket(item)];
        if g > 0.0 {
            (1.0 / g) as f32
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn estimates_converge_to_true_frequencies() {
        // Items 0..4 with probabilities 0.4, 0.3, 0.2, 0.1.
        let p = [0.4, 0.3, 0.2, 0.1];
        let mut est = FrequencyEstimator::new(1 << 12, 0.01);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        for _ in 0..200_000 {
            let r: f64 = rng.random();
            let item = if r < 0.4 {
                0
            } else if r < 0.7 {
                1
            } else if r < 0.9 {
                2
            } else {
                3
            };
            est.update(item);
        }
        for (i, &pi) in p.iter().enumerate() {
            let e = est.estimate(i as u32) as f64;
            assert!(
                (e - pi).abs() < 0.25 * pi,
                "item {i}: estimate {e}, true {pi}"
            );
        }
        assert_eq!(est.estimate(999), 0.0);
    }
}
