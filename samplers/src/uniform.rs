//! Uniform negatives over the catalogue, by rejection.

use rand::{Rng, RngExt};

use crate::{Catalogue, Exclusion, Negative, Sampler, MAX_REJECTIONS_PER_DRAW};

/// Uniform over the items seen so far, rejecting excluded items.
///
/// Each draw costs O(1) expected proposals while the user has seen a small share of the
/// catalogue (the common case); `q = 1 / len` is the proposal probability.
#[derive(Clone, Debug, Default)]
pub struct Uniform;

impl Sampler for Uniform {
    fn name(&self) -> String {
        "uniform".to_string()
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        out: &mut Vec<Negative>,
    ) -> usize {
        let len = catalogue.len();
        if len == 0 || exclusion.excluded_count() >= len {
            return 0;
        }
        let q = 1.0 / len as f32;
        let mut drawn = 0;
        let mut budget = count * MAX_REJECTIONS_PER_DRAW;
        while drawn < count && budget > 0 {
            budget -= 1;
            let item = rng.random_range(0..len as u32);
            if !exclusion.excludes(item) {
                out.push(Negative { item, q });
                drawn += 1;
            }
        }
        drawn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::SeedableRng;
    use std::collections::HashSet;

    struct Set(HashSet<u32>);
    impl Exclusion for Set {
        fn excludes(&self, item: u32) -> bool {
            self.0.contains(&item)
        }
        fn excluded_count(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn never_returns_an_excluded_item() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let excluded = Set((0..90).collect());
        let mut out = Vec::new();
        for _ in 0..1_000 {
            out.clear();
            let n = Uniform.sample(&100usize, &excluded, 4, &mut rng, &mut out);
            assert_eq!(n, 4);
            assert!(out.iter().all(|neg| neg.item >= 90 && neg.item < 100));
        }
    }

    #[test]
    fn gives_up_when_everything_is_excluded() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let excluded = Set((0..10).collect());
        let mut out = Vec::new();
        assert_eq!(
            Uniform.sample(&10usize, &excluded, 4, &mut rng, &mut out),
            0
        );
        assert!(out.is_empty());
        assert_eq!(Uniform.sample(&0usize, &(), 4, &mut rng, &mut out), 0);
    }

    #[test]
    fn same_seed_same_draws() {
        let draw = |seed| {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
            let mut out = Vec::new();
            Uniform.sample(&1000usize, &(), 32, &mut rng, &mut out);
            out
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn draws_are_uniform() {
        // Chi-square goodness of fit over 20 cells; 99.9 % critical value for 19 dof is 43.8.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let mut counts = [0u32; 20];
        let mut out = Vec::new();
        let draws = 100_000;
        Uniform.sample(&20usize, &(), draws, &mut rng, &mut out);
        for neg in &out {
            counts[neg.item as usize] += 1;
            assert!((neg.q - 0.05).abs() < 1e-7);
        }
        let expected = draws as f64 / 20.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 43.8, "chi2 = {chi2}");
    }
}
