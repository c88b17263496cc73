//! Negative samplers over dense item ids.
//!
//! This crate owns the *algorithms* that pick negatives for a positive (user, item) event.
//! It knows nothing about dataflows, Arrow or time sources: items are dense `u32`
//! indices assigned in order of first appearance by the caller, the catalogue is seen
//! through [`Catalogue`] (how many items exist), the user's known positives through
//! [`Exclusion`], live popularity through [`Sampler::refresh`], and the current model
//! through a scoring closure.
//!
//! Contract every sampler keeps:
//! - never returns an item for which [`Exclusion::excludes`] is true (the user's known
//!   positives and the positive being trained);
//! - is reproducible: the same RNG state and the same observations give the same draws;
//! - reports the probability `q` with which it proposed each negative, so a model can
//!   apply the sampled-softmax logQ correction;
//! - gives up after a bounded number of rejections instead of looping forever when the
//!   user has interacted with (almost) every item, and says how many it could draw.
//!
//! The samplers ([`AnySampler`], parsed from a [`SamplerSpec`]):
//! - `uniform`: uniform over the items seen so far.
//! - `pop:ALPHA`: live (windowed) popularity to the power `alpha` (0.75 by default), by
//!   alias table.
//! - `decay:HALF_LIFE`: popularity with exponential decay in event time.
//! - `dns:M`: dynamic hard negatives: M candidates from a base sampler, the best-scored
//!   kept (Zhang et al., SIGIR 2013).
//! - `inbatch[:B]`: other recent positives (a ring of the last B), with `q` from the
//!   streaming frequency estimator of Yi et al. (RecSys 2019).
//! - `mix:W*SPEC+W*SPEC...`: a weighted mixture (Yang et al., WWW 2020).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod alias;
mod frequency;
mod samplers;
mod spec;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use alias::AliasTable;
pub use frequency::FrequencyEstimator;
pub use samplers::{AnySampler, Decay, Dns, InBatch, Mix, Popularity, Uniform};
pub use spec::{SamplerSpec, DEFAULT_INBATCH, DEFAULT_POP_ALPHA};

use rand::Rng;

/// A negative drawn by a [`Sampler`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Negative {
    /// Dense item index.
    pub item: u32,
    /// Probability with which the sampler proposed this item (before exclusion), for the
    /// logQ correction of sampled softmax.
    pub q: f32,
}

/// The items a sampler may draw from: dense indices `0..len()`.
pub trait Catalogue {
    /// Number of items seen so far.
    fn len(&self) -> usize;
    /// Whether no item has been seen yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Catalogue for usize {
    fn len(&self) -> usize {
        *self
    }
}

/// The items a draw must not return for the current user.
pub trait Exclusion {
    /// Whether `item` must not be returned as a negative.
    fn excludes(&self, item: u32) -> bool;
    /// How many distinct items are excluded (used to stop early when nothing is left).
    fn excluded_count(&self) -> usize;
    /// Whether every one of `len` items is excluded. Implementations may answer from a
    /// cheap bound before counting exactly: this is asked once per draw of negatives.
    fn excludes_all(&self, len: usize) -> bool {
        self.excluded_count() >= len
    }
}

/// No exclusion at all.
impl Exclusion for () {
    fn excludes(&self, _item: u32) -> bool {
        false
    }
    fn excluded_count(&self) -> usize {
        0
    }
}

/// Live state handed to samplers once per round (before the round's events).
#[derive(Clone, Copy, Debug)]
pub struct Refresh<'a> {
    /// Interactions per dense item over the popularity window, as of the round's start.
    pub window_counts: &'a [u64],
    /// Event time of the round's start, in milliseconds.
    pub now_ms: i64,
}

/// Scores candidates with the current model (higher = more relevant to the user).
pub type Scorer<'a> = dyn FnMut(u32) -> f32 + 'a;

/// A negative sampler.
///
/// Generic over the RNG so that the hot path is monomorphised; callers pass a seeded
/// generator they own, which keeps runs reproducible.
pub trait Sampler {
    /// The spec that builds this sampler, e.g. `pop:0.75`.
    fn name(&self) -> String;

    /// Tells the sampler that `item` received a positive at event time `ts_ms`.
    fn observe(&mut self, item: u32, ts_ms: i64) {
        let _ = (item, ts_ms);
    }

    /// Updates live state (alias tables) once per round.
    fn refresh(&mut self, live: &Refresh<'_>) {
        let _ = live;
    }

    /// The probability with which the sampler proposes `item` right now, from a catalogue
    /// of `len` items.
    fn probability(&self, item: u32, len: usize) -> f32;

    /// The items the next `count` proposals of [`Sampler::sample`] would be, drawn from
    /// a copy of `rng` (which is left as it is) over a catalogue of `len` items, appended
    /// to `out`: what the next draw will most likely return (unless a proposal is
    /// excluded, or the catalogue grows first), so the caller can hint those items' rows
    /// into cache while it works on something else. Samplers whose proposals depend on
    /// more than the RNG (scores, the exclusion) propose nothing, which is always correct.
    fn peek<R: Rng + Clone>(&self, len: usize, count: usize, rng: &R, out: &mut Vec<u32>) {
        let _ = (len, count, rng, out);
    }

    /// Draws up to `count` negatives for one positive, appending them to `out`.
    ///
    /// Returns how many were drawn. Fewer than `count` means the catalogue had (almost) no
    /// item left that the exclusion allows; callers count that, they do not loop.
    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize;
}

/// How many proposals a rejection sampler makes per requested negative before it gives
/// up. With a user who has seen half of the catalogue the chance of 64 straight
/// rejections is 2^-64, so giving up means the user really has (almost) nothing left.
pub const MAX_REJECTIONS_PER_DRAW: usize = 64;
