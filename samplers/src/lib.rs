//! Negative samplers over dense item ids.
//!
//! This crate owns the *algorithms* that pick negatives for a positive (user, item) event.
//! It knows nothing about dataflows, Arrow or time: items are dense `u32` indices assigned
//! in order of first appearance by the caller, and a sampler sees the catalogue only through
//! [`Catalogue`] (how many items exist) and the user's known positives through
//! [`Exclusion`].
//!
//! Contract every sampler keeps:
//! - never returns an item for which [`Exclusion::excludes`] is true (the user's known
//!   positives and the positive being trained);
//! - is reproducible: the same RNG state and the same observations give the same draws;
//! - reports the probability `q` it drew each negative with, so a model can apply the
//!   sampled-softmax logQ correction;
//! - gives up after a bounded number of rejections instead of looping forever when the
//!   user has interacted with (almost) every item, and says how many it could draw.
//!
//! - [`Uniform`]: uniform over the items seen so far.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod uniform;

pub use uniform::Uniform;

use rand::Rng;

/// A negative drawn by a [`Sampler`].
#[derive(Clone, Copy, Debug, PartialEq)]
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

/// A negative sampler.
///
/// Generic over the RNG so that the hot path is monomorphised; callers pass a seeded
/// generator they own, which keeps runs reproducible.
pub trait Sampler {
    /// A short name for reports, e.g. `uniform`.
    fn name(&self) -> String;

    /// Tell the sampler that `item` received a positive at event time `ts_ms`. Samplers that
    /// keep popularity use it; the default ignores it.
    fn observe(&mut self, item: u32, ts_ms: i64) {
        let _ = (item, ts_ms);
    }

    /// Draw up to `count` negatives for one positive, appending them to `out`.
    ///
    /// Returns how many were drawn. Fewer than `count` means the catalogue had (almost) no
    /// item left that the exclusion allows; callers count that, they do not loop.
    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        out: &mut Vec<Negative>,
    ) -> usize;
}

/// How many proposals a rejection sampler makes per requested negative before it gives
/// up. With a user who has seen half of the catalogue the chance of 64 straight
/// rejections is 2^-64, so giving up means the user really has (almost) nothing left.
pub const MAX_REJECTIONS_PER_DRAW: usize = 64;
