//! Distribution, exclusion and reproducibility tests for every sampler.

use std::collections::HashSet;

use rand::rngs::Xoshiro256PlusPlus;
use rand::SeedableRng;

use crate::testing::{chi_square, CHI2_999};
use crate::{AnySampler, Exclusion, Negative, Refresh, Sampler, SamplerSpec};

struct Set(HashSet<u32>);

impl Exclusion for Set {
    fn excludes(&self, item: u32) -> bool {
        self.0.contains(&item)
    }
    fn excluded_count(&self) -> usize {
        self.0.len()
    }
}

fn sampler(spec: &str) -> AnySampler {
    SamplerSpec::parse(spec).unwrap().build()
}

/// Counts of `draws` single draws over `n` items.
fn histogram(s: &mut AnySampler, n: usize, draws: usize, seed: u64) -> Vec<u32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut out = Vec::with_capacity(draws);
    let mut scorer = |i: u32| i as f32;
    for _ in 0..draws {
        s.sample(&n, &(), 1, &mut rng, &mut scorer, &mut out);
    }
    let mut counts = vec![0u32; n];
    out.iter().for_each(|neg| counts[neg.item as usize] += 1);
    counts
}

fn assert_fits(counts: &[u32], weights: &[f64]) {
    let dof = weights.iter().filter(|&&w| w > 0.0).count() - 1;
    let chi2 = chi_square(counts, weights);
    assert!(
        chi2 < CHI2_999[dof - 1],
        "chi2 {chi2} (dof {dof}): {counts:?} vs {weights:?}"
    );
    for (c, w) in counts.iter().zip(weights) {
        if *w == 0.0 {
            assert_eq!(*c, 0, "a zero-weight item was drawn");
        }
    }
}

const COUNTS: [u64; 8] = [50, 0, 10, 5, 20, 1, 8, 6];

fn refreshed(spec: &str) -> AnySampler {
    let mut s = sampler(spec);
    s.refresh(&Refresh {
        window_counts: &COUNTS,
        now_ms: 0,
    });
    s
}

#[test]
fn uniform_is_uniform() {
    let counts = histogram(&mut sampler("uniform"), 20, 100_000, 11);
    assert_fits(&counts, &[1.0; 20]);
}

#[test]
fn pop_follows_counts_to_the_alpha() {
    for alpha in [0.75, 1.0, 0.0] {
        let mut s = refreshed(&format!("pop:{alpha}"));
        let counts = histogram(&mut s, COUNTS.len(), 100_000, 3);
        let weights: Vec<f64> = COUNTS
            .iter()
            .map(|&c| if c == 0 { 0.0 } else { (c as f64).powf(alpha) })
            .collect();
        assert_fits(&counts, &weights);
        let total: f64 = weights.iter().sum();
        assert!((s.probability(0, 8) as f64 - weights[0] / total).abs() < 1e-6);
    }
}

#[test]
fn pop_without_counts_falls_back_to_uniform() {
    let counts = histogram(&mut sampler("pop"), 10, 50_000, 4);
    assert_fits(&counts, &[1.0; 10]);
}

#[test]
fn decay_halves_every_half_life() {
    let hour = 3_600_000i64;
    let mut s = match sampler("decay:1h") {
        AnySampler::Decay(d) => d,
        other => panic!("{other:?}"),
    };
    s.observe(0, 0);
    s.observe(1, hour);
    s.observe(2, hour);
    s.observe(2, hour);
    assert!((s.weight(0, hour) - 0.5).abs() < 1e-12);
    assert!((s.weight(0, 3 * hour) - 0.125).abs() < 1e-12);
    assert!((s.weight(2, 2 * hour) - 1.0).abs() < 1e-12);
    let mut any = AnySampler::Decay(s);
    any.refresh(&Refresh {
        window_counts: &[],
        now_ms: hour,
    });
    let counts = histogram(&mut any, 3, 70_000, 8);
    assert_fits(&counts, &[0.5, 1.0, 2.0]);
}

#[test]
fn inbatch_follows_recent_positives() {
    let mut s = sampler("inbatch:6");
    // Older positives fall out of the ring: only the last six count.
    for item in [7, 7, 7, 0, 1, 1, 2, 2, 2] {
        s.observe(item, 0);
    }
    let counts = histogram(&mut s, 8, 60_000, 9);
    assert_fits(&counts, &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn inbatch_q_estimates_the_positive_frequency() {
    let mut s = sampler("inbatch");
    for i in 0..20_000u32 {
        // Item 0 is every other positive, the rest spread over 100 items.
        s.observe(if i % 2 == 0 { 0 } else { 1 + i % 100 }, 0);
    }
    let q = s.probability(0, 101);
    assert!((q - 0.5).abs() < 0.1, "q(0) = {q}");
}

#[test]
fn mix_draws_from_the_mixture() {
    let mut s = refreshed("mix:1*uniform+3*pop:1");
    let counts = histogram(&mut s, COUNTS.len(), 100_000, 12);
    let total: f64 = COUNTS.iter().sum::<u64>() as f64;
    let weights: Vec<f64> = COUNTS
        .iter()
        .map(|&c| 0.25 / 8.0 + 0.75 * c as f64 / total)
        .collect();
    assert_fits(&counts, &weights);
    assert!((s.probability(0, 8) as f64 - weights[0]).abs() < 1e-6);
}

#[test]
fn dns_keeps_the_best_scored_base_candidates() {
    let mut dns = sampler("dns:8");
    let mut base = sampler("uniform");
    for seed in 0..50 {
        let mut r1 = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut r2 = Xoshiro256PlusPlus::seed_from_u64(seed);
        let score = |i: u32| ((i * 37) % 101) as f32;
        let (mut picked, mut candidates) = (Vec::new(), Vec::new());
        dns.sample(&1000usize, &(), 2, &mut r1, &mut { score }, &mut picked);
        base.sample(&1000usize, &(), 8, &mut r2, &mut { score }, &mut candidates);
        let mut best: Vec<u32> = candidates.iter().map(|c| c.item).collect();
        best.sort_by(|a, b| score(*b).partial_cmp(&score(*a)).unwrap());
        best.dedup();
        let picked: Vec<u32> = picked.iter().map(|n| n.item).collect();
        assert_eq!(picked, best[..2].to_vec(), "seed {seed}");
    }
}

const ALL: [&str; 8] = [
    "uniform",
    "pop:0.75",
    "decay:1h",
    "dns:16",
    "dns:4:pop:1",
    "inbatch:64",
    "mix:1*pop:0.75+1*dns:8",
    "mix:2*uniform+1*inbatch:32",
];

fn prime(s: &mut AnySampler) {
    for i in 0..200u32 {
        s.observe(i % 40, i as i64 * 1000);
    }
    let counts: Vec<u64> = (0..40).map(|i| 1 + i % 7).collect();
    s.refresh(&Refresh {
        window_counts: &counts,
        now_ms: 200_000,
    });
}

#[test]
fn every_sampler_respects_exclusion_and_gives_up_when_nothing_is_left() {
    for spec in ALL {
        let mut s = sampler(spec);
        prime(&mut s);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let excluded = Set((0..36).collect());
        let mut out = Vec::new();
        let mut scorer = |i: u32| -(i as f32);
        for _ in 0..500 {
            s.sample(&40usize, &excluded, 4, &mut rng, &mut scorer, &mut out);
        }
        assert!(!out.is_empty(), "{spec} drew nothing");
        assert!(
            out.iter().all(|n| n.item >= 36 && n.item < 40),
            "{spec}: {out:?}"
        );
        assert!(
            out.iter().all(|n| n.q > 0.0 && n.q <= 1.0),
            "{spec}: q out of range"
        );
        let all = Set((0..40).collect());
        let mut none = Vec::new();
        assert_eq!(
            s.sample(&40usize, &all, 4, &mut rng, &mut scorer, &mut none),
            0,
            "{spec}"
        );
    }
}

#[test]
fn every_sampler_is_reproducible() {
    let draw = |spec: &str, seed: u64| -> Vec<Negative> {
        let mut s = sampler(spec);
        prime(&mut s);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..50 {
            s.sample(
                &40usize,
                &(),
                4,
                &mut rng,
                &mut |i| (i % 5) as f32,
                &mut out,
            );
        }
        out
    };
    for spec in ALL {
        assert_eq!(draw(spec, 3), draw(spec, 3), "{spec}");
        assert_ne!(draw(spec, 3), draw(spec, 4), "{spec}");
    }
}

#[test]
fn peek_foresees_the_next_draws_without_moving_the_rng() {
    let counts: Vec<u64> = (0..50).map(|i| (i % 7) as u64 * 3).collect();
    for spec in ["uniform", "pop:0.75", "dns:4"] {
        let mut s = sampler(spec);
        s.refresh(&Refresh {
            window_counts: &counts,
            now_ms: 0,
        });
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let mut scorer = |i: u32| i as f32;
        for _ in 0..20 {
            let mut peeked = Vec::new();
            s.peek(50, 4, &rng, &mut peeked);
            let mut drawn = Vec::new();
            s.sample(&50usize, &(), 4, &mut rng, &mut scorer, &mut drawn);
            let drawn: Vec<u32> = drawn.iter().map(|n| n.item).collect();
            if spec == "dns:4" {
                assert!(peeked.is_empty(), "dns proposes by score: nothing to peek");
            } else {
                assert_eq!(peeked, drawn, "{spec}");
            }
        }
    }
}
