//! Per-worker state of the prequential learner: the item catalogue replica and the
//! histories of the users this worker owns.
//!
//! Dense item indices are assigned in order of first appearance in the replay order.
//! Every worker sees every event's item (the stream is broadcast), so every worker
//! assigns the same index to the same item without talking to the others: the index is
//! a pure function of the replay order, independent of the number of workers. The
//! evaluator's tie rule ("first appeared before") is then a plain comparison of
//! indices, and the shared item table can be addressed by it.

use rustc_hash::{FxHashMap, FxHashSet};
use tidepool_samplers::{Catalogue, Exclusion};

/// Items seen so far, with their interaction counts, in order of first appearance.
#[derive(Debug, Default)]
pub(crate) struct ItemCatalogue {
    index: FxHashMap<u64, u32>,
    ids: Vec<u64>,
    counts: Vec<u64>,
}

impl ItemCatalogue {
    /// The dense index of an item seen before, if any.
    #[inline]
    pub(crate) fn lookup(&self, id: u64) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// Counts one interaction with `id`, assigning it the next dense index if new.
    #[inline]
    pub(crate) fn observe(&mut self, id: u64) -> u32 {
        let next = self.ids.len() as u32;
        let dense = *self.index.entry(id).or_insert(next);
        if dense == next {
            self.ids.push(id);
            self.counts.push(0);
        }
        self.counts[dense as usize] += 1;
        dense
    }

    /// Interaction counts by dense index.
    #[inline]
    pub(crate) fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The raw id of a dense index.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn id(&self, dense: u32) -> u64 {
        self.ids[dense as usize]
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

impl Catalogue for ItemCatalogue {
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The users this worker owns and the items each has interacted with.
#[derive(Debug, Default)]
pub(crate) struct Users {
    index: FxHashMap<u64, u32>,
    ids: Vec<u64>,
    histories: Vec<FxHashSet<u32>>,
}

impl Users {
    /// The dense (worker-local) index of a user, created on first sight.
    #[inline]
    pub(crate) fn get_or_insert(&mut self, id: u64) -> u32 {
        let next = self.ids.len() as u32;
        let dense = *self.index.entry(id).or_insert(next);
        if dense == next {
            self.ids.push(id);
            self.histories.push(FxHashSet::default());
        }
        dense
    }

    #[inline]
    pub(crate) fn history(&self, dense: u32) -> &FxHashSet<u32> {
        &self.histories[dense as usize]
    }

    #[inline]
    pub(crate) fn remember(&mut self, dense: u32, item: u32) {
        self.histories[dense as usize].insert(item);
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

/// What a negative must not be: the user's known items and the positive at hand.
pub(crate) struct Excluding<'a> {
    pub(crate) history: &'a FxHashSet<u32>,
    pub(crate) positive: u32,
}

impl Exclusion for Excluding<'_> {
    #[inline]
    fn excludes(&self, item: u32) -> bool {
        item == self.positive || self.history.contains(&item)
    }

    fn excluded_count(&self) -> usize {
        self.history.len() + usize::from(!self.history.contains(&self.positive))
    }
}

/// The worker that owns a user: a mixed hash so that sequential ids spread evenly.
#[inline]
pub(crate) fn owner(user: u64, peers: usize) -> usize {
    (splitmix64(user) % peers as u64) as usize
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
#[inline]
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_assigns_in_first_appearance_order() {
        let mut c = ItemCatalogue::default();
        assert_eq!(c.observe(50), 0);
        assert_eq!(c.observe(7), 1);
        assert_eq!(c.observe(50), 0);
        assert_eq!(c.lookup(7), Some(1));
        assert_eq!(c.lookup(8), None);
        assert_eq!(c.counts(), &[2, 1]);
        assert_eq!(c.id(1), 7);
    }

    #[test]
    fn exclusion_counts_positive_once() {
        let history: FxHashSet<u32> = [1, 2].into_iter().collect();
        let ex = Excluding {
            history: &history,
            positive: 2,
        };
        assert_eq!(ex.excluded_count(), 2);
        let ex = Excluding {
            history: &history,
            positive: 3,
        };
        assert_eq!(ex.excluded_count(), 3);
        assert!(ex.excludes(3) && ex.excludes(1) && !ex.excludes(0));
    }

    #[test]
    fn owners_spread_sequential_ids() {
        let mut per = [0u32; 4];
        for u in 0..4000 {
            per[owner(u, 4)] += 1;
        }
        assert!(per.iter().all(|&n| (800..1200).contains(&n)), "{per:?}");
    }
}
