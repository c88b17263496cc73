//! `ensemble`: a mix of other variants' scores with weights learned online.
//!
//! Components score on different scales (co-occurrence ratios, counts, dot products), so
//! each component's scores for a user are first put on one scale ([`Norm`]): by rank
//! (`-log2(1 + rank)` within the component's top [`RANK_DEPTH`], the rest tied below; the
//! default) or by z-score over the live catalogue. The ensemble's score is
//! `m(j) = sum_c w_c f_c(j)`, with the weights positive and summing to one, each at least
//! [`WEIGHT_FLOOR`]. A component without spread for this user (itemknn for a user with no
//! history) contributes a constant and so steps aside by itself.
//!
//! The weights learn from the stream, prequentially like everything else: on a learning
//! event the components' scores are taken *before* any model trains on the event.
//! [`Objective::Hedge`] (the default) charges each component `1 - NDCG@K` of its own rank
//! of the held-out item and sets `w_c ∝ exp(-lr * cumulative loss_c)`: it converges to
//! the best component, and the floor keeps the others ordering what that one ties (the
//! items a co-occurrence model has no opinion on), which is how the mix beats its best
//! component. [`Objective::Top`] (pairwise loss against the best other candidates,
//! exponentiated-gradient steps) and [`Objective::Softmax`] (cross-entropy over all
//! candidates) are there to compare; both measured worse on ml-latest-small.
//!
//! Learning events are every `learn_every`-th event at the phase of the protocol's
//! scored events (replay index ≡ warm-up mod `learn_every`), so that with
//! `learn_every == eval_every` every scored event is also a learning event and the score
//! vectors serve both. Weights are per worker, learned from the events of the users that
//! worker owns; reports show their mean over workers and learning steps.

use crate::config::EnsembleConfig;
use crate::history::History;

/// Adagrad's initial accumulator (`top`, `softmax`); Hedge keeps its cumulative losses in
/// the same slots, where only differences matter.
const ADAGRAD_START: f32 = 0.1;

/// Weights and scratch of one ensemble variant on one worker.
#[derive(Debug)]
pub(crate) struct Ensemble {
    /// Variant indices of the components, in the configured order.
    pub(crate) components: Vec<usize>,
    weights: Vec<f32>,
    acc: Vec<f32>,
    lr: f32,
    learn_every: u64,
    norm: Norm,
    objective: Objective,
    /// Per component: the normalised scores of the last [`Ensemble::mix`].
    feats: Vec<Vec<f32>>,
    mixed: Vec<f32>,
    /// Scratch for rank normalisation.
    order: Vec<u32>,
    /// The gradient of the last softmax step (tests).
    last_grad: Vec<f32>,
}

/// How component scores are put on one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// `(s - mean) / std` over the live catalogue.
    Z,
    /// `-log2(1 + rank)` within the component's top [`RANK_DEPTH`], the rest tied below
    /// (a learned, discounted rank fusion).
    #[default]
    Rank,
}

/// How deep rank normalisation ranks each component.
pub const RANK_DEPTH: usize = 200;

/// The smallest weight a component keeps. Small enough not to reorder the leader's
/// distinct ranks (rank features differ by at least log2(201/200) = 0.007 within the
/// depth, and a trailing component moves an item by at most 1e-4 * 7.7).
pub(crate) const WEIGHT_FLOOR: f32 = 1e-4;

/// Competitors of the held-out item in one `top` learning step.
pub const TOP_PAIRS: usize = 20;

/// Components an ensemble may mix.
pub const MAX_COMPONENTS: usize = 16;

/// What the weights learn to minimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Pairwise logistic loss of the held-out item against the [`TOP_PAIRS`] best other
    /// candidates: aims at the top of the list, where recall@K is decided.
    Top,
    /// Softmax cross-entropy of the held-out item over all candidates.
    Softmax,
    /// Hedge on each component's NDCG@K of the held-out item (the default: it measured
    /// best on ml-latest-small, see the grid in docs/models.md).
    #[default]
    Hedge,
}

impl std::str::FromStr for Norm {
    type Err = tidepool_pipeline::Error;
    fn from_str(s: &str) -> tidepool_pipeline::Result<Self> {
        match s {
            "rank" => Ok(Self::Rank),
            "z" => Ok(Self::Z),
            other => Err(tidepool_pipeline::Error::Config(format!(
                "unknown norm {other:?}; valid: rank, z"
            ))),
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = tidepool_pipeline::Error;
    fn from_str(s: &str) -> tidepool_pipeline::Result<Self> {
        match s {
            "top" => Ok(Self::Top),
            "softmax" => Ok(Self::Softmax),
            "hedge" => Ok(Self::Hedge),
            other => Err(tidepool_pipeline::Error::Config(format!(
                "unknown objective {other:?}; valid: hedge, top, softmax"
            ))),
        }
    }
}

impl Ensemble {
    pub(crate) fn new(cfg: &EnsembleConfig, components: Vec<usize>) -> Self {
        let n = components.len();
        Self {
            components,
            weights: vec![1.0 / n as f32; n],
            acc: vec![ADAGRAD_START; n],
            lr: cfg.lr,
            learn_every: cfg.learn_every,
            norm: cfg.norm,
            objective: cfg.objective,
            feats: vec![Vec::new(); n],
            mixed: Vec::new(),
            order: Vec::new(),
            last_grad: Vec::new(),
        }
    }

    /// Whether the event at replay index `index` is a learning event.
    #[inline]
    pub(crate) fn learns(&self, index: u64, warmup: u64) -> bool {
        index % self.learn_every == warmup % self.learn_every
    }

    /// The current weights.
    pub(crate) fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Restores weights (checkpoints).
    pub(crate) fn set_weights(&mut self, weights: &[f32], acc: &[f32]) {
        if weights.len() == self.weights.len() && acc.len() == self.acc.len() {
            self.weights.copy_from_slice(weights);
            self.acc.copy_from_slice(acc);
        }
    }

    /// The Adagrad accumulators (checkpoints).
    pub(crate) fn accumulators(&self) -> &[f32] {
        &self.acc
    }

    /// Mixes the components' dense scores (`scores[c]` over items `0..alive.len()`,
    /// `scores` in component order) into [`Ensemble::mixed`]. Dead items get negative
    /// infinity.
    pub(crate) fn mix(&mut self, scores: &[&[f32]], alive: &[bool]) {
        let n = alive.len();
        for (c, s) in scores.iter().enumerate() {
            let mut feat = std::mem::take(&mut self.feats[c]);
            feat.clear();
            feat.resize(n, 0.0);
            match self.norm {
                Norm::Z => z_scores(&s[..n], alive, &mut feat),
                Norm::Rank => rank_scores(&s[..n], alive, &mut feat, &mut self.order),
            }
            self.feats[c] = feat;
        }
        self.mixed.clear();
        self.mixed.resize(n, 0.0);
        for (feat, &w) in self.feats.iter().zip(&self.weights) {
            for (m, &f) in self.mixed.iter_mut().zip(feat) {
                *m += w * f;
            }
        }
        for (m, &a) in self.mixed.iter_mut().zip(alive) {
            if !a {
                *m = f32::NEG_INFINITY;
            }
        }
    }

    /// The mixed scores of the last [`Ensemble::mix`].
    pub(crate) fn mixed(&self) -> &[f32] {
        &self.mixed
    }

    /// One learning step for held-out `target` from the last [`Ensemble::mix`], under
    /// the configured objective. Returns the loss.
    /// `scores` are the components' dense scores the mix was made from.
    pub(crate) fn learn(
        &mut self,
        scores: &[&[f32]],
        target: u32,
        history: History<'_>,
        k: usize,
    ) -> f64 {
        match self.objective {
            Objective::Top => self.learn_top(target, history),
            Objective::Softmax => self.learn_softmax(target, history),
            Objective::Hedge => self.learn_hedge(scores, target, history, k),
        }
    }

    /// Hedge (Freund & Schapire 1997): each component's loss is `1 - NDCG@K` of its own
    /// rank of the target; weights are `exp(-lr * cumulative loss)`, normalised. Returns
    /// the weighted loss.
    fn learn_hedge(
        &mut self,
        scores: &[&[f32]],
        target: u32,
        history: History<'_>,
        k: usize,
    ) -> f64 {
        let mut expected = 0.0f64;
        for (c, s) in scores.iter().enumerate() {
            if target as usize >= s.len() {
                return 0.0;
            }
            let rank = crate::eval::rank_of(s, target, history.iter());
            let gain = if rank < k as u64 {
                1.0 / (rank as f64 + 2.0).log2()
            } else {
                0.0
            };
            let loss = 1.0 - gain;
            expected += self.weights[c] as f64 * loss;
            // `acc` holds the cumulative loss here.
            self.acc[c] += loss as f32;
        }
        let best = self.acc.iter().copied().fold(f32::INFINITY, f32::min);
        for (w, &l) in self.weights.iter_mut().zip(&self.acc) {
            *w = (-self.lr * (l - best)).exp();
        }
        self.normalise();
        expected
    }

    /// Scales the weights to sum to one, with every weight at least [`WEIGHT_FLOOR`]:
    /// no component dies for good (the stream may change which one is right), and a
    /// component far behind still orders the items the leader ties (a sparse model's
    /// zeros), which a weight that underflowed to 0 would not.
    fn normalise(&mut self) {
        let sum: f32 = self.weights.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            self.weights.iter_mut().for_each(|w| *w /= sum);
        }
        if self.weights.iter().any(|&w| w < WEIGHT_FLOOR) {
            self.weights
                .iter_mut()
                .for_each(|w| *w = w.max(WEIGHT_FLOOR));
            let sum: f32 = self.weights.iter().sum();
            self.weights.iter_mut().for_each(|w| *w /= sum);
        }
    }

    /// One step on the mean pairwise logistic loss of `target` against the
    /// [`TOP_PAIRS`] best other candidates under the current mix: the pairs that decide
    /// whether the target makes the top of the list.
    fn learn_top(&mut self, target: u32, history: History<'_>) -> f64 {
        let t = target as usize;
        if t >= self.mixed.len() || !self.mixed[t].is_finite() {
            return 0.0;
        }
        let mixed = &self.mixed;
        self.order.clear();
        self.order.extend(
            (0..mixed.len() as u32)
                .filter(|&j| j != target && mixed[j as usize].is_finite() && !history.contains(j)),
        );
        let by_mix = |a: &u32, b: &u32| {
            mixed[*b as usize]
                .total_cmp(&mixed[*a as usize])
                .then(a.cmp(b))
        };
        if self.order.len() > TOP_PAIRS {
            self.order.select_nth_unstable_by(TOP_PAIRS, by_mix);
            self.order.truncate(TOP_PAIRS);
        }
        if self.order.is_empty() {
            return 0.0;
        }
        let pairs = self.order.len() as f32;
        let mut loss = 0.0f64;
        let mut grad = [0.0f32; MAX_COMPONENTS];
        for &j in &self.order {
            let j = j as usize;
            let x = mixed[t] - mixed[j];
            let (l, slope) = crate::model::bpr::loss_and_slope(x);
            loss += l as f64;
            for (c, f) in self.feats.iter().enumerate() {
                grad[c] -= slope * (f[t] - f[j]) / pairs;
            }
        }
        self.step(&grad[..self.feats.len()]);
        loss / pairs as f64
    }

    /// An exponentiated-gradient step (Kivinen & Warmuth 1997) with Adagrad's
    /// per-component step sizes: the weights stay positive and sum to one, so only the
    /// trade-off between components is learned. Unconstrained weights would let the
    /// pairwise loss shrink them all towards zero, where every pair ties: a cheap way to
    /// a lower loss while the held-out item is mostly outside the top.
    fn step(&mut self, grad: &[f32]) {
        if grad.iter().any(|g| !g.is_finite()) {
            return;
        }
        for (c, &g) in grad.iter().enumerate() {
            self.acc[c] += g * g;
            self.weights[c] *= (-self.lr * g / self.acc[c].sqrt()).exp();
        }
        self.normalise();
    }

    /// One step on the softmax cross-entropy of `target` among the candidates (live items
    /// that are not in `history`, plus the target).
    fn learn_softmax(&mut self, target: u32, history: History<'_>) -> f64 {
        let t = target as usize;
        if t >= self.mixed.len() || !self.mixed[t].is_finite() {
            return 0.0;
        }
        let candidate = |j: usize| j == t || !history.contains(j as u32);
        let max = self
            .mixed
            .iter()
            .enumerate()
            .filter(|&(j, m)| m.is_finite() && candidate(j))
            .map(|(_, &m)| m)
            .fold(f32::NEG_INFINITY, f32::max);
        // Softmax weights over all live items; the history's terms are taken back out.
        let mut z = 0.0f64;
        let mut expect = vec![0.0f64; self.feats.len()];
        for (j, &m) in self.mixed.iter().enumerate() {
            if !m.is_finite() {
                continue;
            }
            let e = ((m - max) as f64).exp();
            z += e;
            for (c, f) in self.feats.iter().enumerate() {
                expect[c] += e * f[j] as f64;
            }
        }
        for h in history.iter() {
            let j = h as usize;
            if j == t || j >= self.mixed.len() || !self.mixed[j].is_finite() {
                continue;
            }
            let e = ((self.mixed[j] - max) as f64).exp();
            z -= e;
            for (c, f) in self.feats.iter().enumerate() {
                expect[c] -= e * f[j] as f64;
            }
        }
        if z <= 0.0 || !z.is_finite() {
            return 0.0;
        }
        let loss = -(((self.mixed[t] - max) as f64).exp() / z).ln();
        let grad: Vec<f32> = (0..self.feats.len())
            .map(|c| (expect[c] / z - self.feats[c][t] as f64) as f32)
            .collect();
        self.last_grad.clone_from(&grad);
        self.step(&grad);
        loss
    }
}

/// `(s - mean) / std` over the live items; 0 for dead items and for a component without
/// spread (it carries no ranking information here).
fn z_scores(s: &[f32], alive: &[bool], out: &mut [f32]) {
    let (mut sum, mut sq, mut cnt) = (0.0f64, 0.0f64, 0u64);
    for (&x, &a) in s.iter().zip(alive) {
        if a && x.is_finite() {
            sum += x as f64;
            sq += (x as f64) * (x as f64);
            cnt += 1;
        }
    }
    let mean = if cnt > 0 { sum / cnt as f64 } else { 0.0 };
    let var = if cnt > 0 {
        (sq / cnt as f64 - mean * mean).max(0.0)
    } else {
        0.0
    };
    let inv = if var > 1e-24 { 1.0 / var.sqrt() } else { 0.0 };
    let (mean, inv) = (mean as f32, inv as f32);
    for ((o, &x), &a) in out.iter_mut().zip(s).zip(alive) {
        *o = if a && x.is_finite() {
            (x - mean) * inv
        } else {
            0.0
        };
    }
}

/// `-log2(1 + r)` where r is the number of live items scored strictly higher, for the
/// items above the component's [`RANK_DEPTH`]-th score; everything else ties at the
/// value of that depth. Ties share the better rank, so a sparse component's zeros all
/// tie. Costs O(items) (a selection, not a sort) plus O(depth log depth).
fn rank_scores(s: &[f32], alive: &[bool], out: &mut [f32], order: &mut Vec<u32>) {
    order.clear();
    order.extend(
        s.iter()
            .zip(alive)
            .enumerate()
            .filter(|(_, (x, a))| **a && x.is_finite())
            .map(|(j, _)| j as u32),
    );
    let by_score = |a: &u32, b: &u32| s[*b as usize].total_cmp(&s[*a as usize]);
    let depth = RANK_DEPTH.min(order.len());
    if depth < order.len() {
        order.select_nth_unstable_by(depth, by_score);
        order.truncate(depth + 1);
    }
    order.sort_unstable_by(by_score);
    let floor_score = order.get(depth).map(|&j| s[j as usize]);
    // Everything at or below the depth's score shares the rank of the first such item.
    let tail_rank = order
        .iter()
        .position(|&j| Some(s[j as usize]) == floor_score)
        .unwrap_or(order.len());
    let tail = -((1 + tail_rank) as f32).log2();
    out.iter_mut().for_each(|o| *o = tail);
    let mut rank = 0;
    for (p, &j) in order.iter().enumerate().take(tail_rank) {
        if p > 0 && s[j as usize] < s[order[p - 1] as usize] {
            rank = p;
        }
        out[j as usize] = -((1 + rank) as f32).log2();
    }
    for (o, &a) in out.iter_mut().zip(alive) {
        if !a {
            *o = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ensemble() -> Ensemble {
        Ensemble::new(
            &EnsembleConfig {
                components: vec!["a".into(), "b".into()],
                learn_every: 1,
                lr: 0.1,
                norm: Norm::Z,
                objective: Objective::Softmax,
            },
            vec![0, 1],
        )
    }

    #[test]
    fn mixing_is_scale_free_and_skips_dead_items() {
        let mut e = ensemble();
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [100.0f32, 200.0, 300.0, 400.0];
        let alive = [true, true, true, false];
        e.mix(&[&a, &b], &alive);
        let m = e.mixed().to_vec();
        assert_eq!(m[3], f32::NEG_INFINITY);
        // Both components say the same thing on different scales: equal z-scores, and
        // weights of 1/2 each give back one z-score.
        let z = |x: f32| (x - 2.0) / (2.0f32 / 3.0).sqrt();
        for j in 0..3 {
            assert!((m[j] - z(a[j])).abs() < 1e-5, "{m:?}");
        }
    }

    #[test]
    fn weight_moves_to_the_component_that_ranks_the_target() {
        let mut e = ensemble();
        // Component a always puts the target (item 0) first, b puts it last.
        let a = [5.0f32, 1.0, 2.0, 3.0];
        let b = [0.0f32, 3.0, 2.0, 1.0];
        let alive = [true; 4];
        let arena = crate::history::arena_of(&[]);
        let mut losses = Vec::new();
        for _ in 0..50 {
            e.mix(&[&a, &b], &alive);
            losses.push(e.learn(&[&a, &b], 0, arena.get(0), 10));
        }
        let w = e.weights();
        assert!(w[0] > 0.8 && w[1] < 0.2, "{w:?}");
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        assert!(losses[49] < losses[0], "{losses:?}");
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let a = [0.3f32, 1.0, -2.0, 0.5, 0.1];
        let b = [1.0f32, 0.0, 0.2, 0.7, -1.0];
        let alive = [true; 5];
        let history = crate::history::arena_of(&[3]);
        let loss_at = |w: [f32; 2]| {
            let mut e = ensemble();
            e.weights.copy_from_slice(&w);
            e.mix(&[&a, &b], &alive);
            let m = e.mixed().to_vec();
            let z: f64 = (0..5)
                .filter(|&j| j != 3)
                .map(|j| (m[j] as f64).exp())
                .sum();
            -((m[1] as f64).exp() / z).ln()
        };
        let mut e = ensemble();
        e.mix(&[&a, &b], &alive);
        e.learn(&[&a, &b], 1, history.get(0), 10);
        for c in 0..2 {
            let h = 1e-3;
            let mut wp = [0.5f32, 0.5];
            let mut wm = [0.5f32, 0.5];
            wp[c] += h;
            wm[c] -= h;
            let g = (loss_at(wp) - loss_at(wm)) / (2.0 * h as f64);
            let got = e.last_grad[c] as f64;
            assert!((got - g).abs() < 2e-3, "component {c}: {got} vs {g}");
        }
    }
}
