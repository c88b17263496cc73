//! Per-worker state of the prequential learner: the item catalogue replica and the
//! histories of the users this worker owns.
//!
//! Dense item indices are assigned in order of first appearance in the replay order.
//! Every worker sees every event's item (the stream is broadcast), so every worker
//! assigns the same index to the same item without talking to the others: the index is
//! a pure function of the replay order, independent of the number of workers. The
//! evaluator's tie rule ("first appeared before") is then a plain comparison of
//! indices, and the shared item table can be addressed by it.

use crate::history::{Histories, History};
use crate::id_index::IdIndex;
use tidepool_samplers::{Catalogue, Exclusion};

/// Items seen so far, with their interaction counts, in order of first appearance.
///
/// Items idle past the item TTL are *expired*: they leave the id index (a returning
/// item gets a new dense index and a fresh row) and stop being candidates or negatives,
/// but keep a tombstone in the dense vectors (about 25 bytes) so that dense indices never
/// move; every worker expires the same items at the same logical time, so the replicas
/// and the shared item table stay consistent.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ItemCatalogue {
    index: IdIndex,
    ids: Vec<u64>,
    counts: Vec<u64>,
    last_seen: Vec<i64>,
    alive: Vec<bool>,
    expired: usize,
}

impl ItemCatalogue {
    /// The dense index of a live item seen before, if any.
    #[inline]
    pub(crate) fn lookup(&self, id: u64) -> Option<u32> {
        self.index.get(id)
    }

    /// Hints that `id` will be looked up or observed soon.
    #[inline]
    pub(crate) fn prefetch(&self, id: u64) {
        self.index.prefetch(id);
    }

    /// Hints that the counters of dense item `dense` will be updated soon (by
    /// [`ItemCatalogue::observe`]: they are misses of their own once the catalogue
    /// outgrows the cache).
    #[inline]
    pub(crate) fn prefetch_counters(&self, dense: u32) {
        let d = dense as usize;
        if let (Some(count), Some(seen)) = (self.counts.get(d), self.last_seen.get(d)) {
            crate::prefetch::values(std::slice::from_ref(count));
            crate::prefetch::values(std::slice::from_ref(seen));
        }
    }

    /// Counts one interaction with `id` at event time `ts`, assigning it the next dense
    /// index if new (or expired).
    #[inline]
    pub(crate) fn observe(&mut self, id: u64, ts: i64) -> u32 {
        let next = self.ids.len() as u32;
        let dense = self.index.get_or_insert(id, next);
        if dense == next {
            self.ids.push(id);
            self.counts.push(0);
            self.last_seen.push(ts);
            self.alive.push(true);
        }
        self.observe_known(dense, ts)
    }

    /// [`ItemCatalogue::observe`] for an item already looked up: `dense` is its live
    /// index (dense indices do not change within a round).
    #[inline]
    pub(crate) fn observe_known(&mut self, dense: u32, ts: i64) -> u32 {
        let d = dense as usize;
        self.counts[d] += 1;
        self.last_seen[d] = self.last_seen[d].max(ts);
        dense
    }

    /// Interaction counts by dense index (0 for expired items).
    #[inline]
    pub(crate) fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Whether a dense index is a live item (not expired).
    #[inline]
    pub(crate) fn is_alive(&self, dense: u32) -> bool {
        self.alive.get(dense as usize).copied().unwrap_or(false)
    }

    /// Liveness by dense index.
    pub(crate) fn alive(&self) -> &[bool] {
        &self.alive
    }

    /// Expired items so far.
    pub(crate) fn expired(&self) -> usize {
        self.expired
    }

    /// Expires the live items last seen before `cutoff`; returns how many, and appends
    /// their ids to `expired` when given.
    pub(crate) fn expire_before(
        &mut self,
        cutoff: i64,
        mut expired: Option<&mut Vec<u64>>,
    ) -> usize {
        let mut n = 0;
        for d in 0..self.ids.len() {
            if self.alive[d] && self.last_seen[d] < cutoff {
                if let Some(out) = expired.as_mut() {
                    out.push(self.ids[d]);
                }
                self.alive[d] = false;
                self.counts[d] = 0;
                self.index.remove(self.ids[d]);
                n += 1;
            }
        }
        if n > 0 {
            self.expired += n;
            self.index.shrink_to_fit();
        }
        n
    }

    /// The raw id of a dense index.
    pub(crate) fn id(&self, dense: u32) -> u64 {
        self.ids[dense as usize]
    }

    /// Dense indices handed out (live and expired).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Live items.
    pub(crate) fn live(&self) -> usize {
        self.ids.len() - self.expired
    }
}

impl Catalogue for ItemCatalogue {
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The users this worker owns and the items each has interacted with.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Users {
    index: IdIndex,
    ids: Vec<u64>,
    histories: Histories,
    last_seen: Vec<i64>,
    evicted: u64,
}

/// Bytes of a user's bookkeeping outside the history: id, index entry, last-seen time,
/// the history's place in the arena and its filter.
const USER_ENTRY_BYTES: u64 = 8 + 12 + 8 + 64;

impl Users {
    /// The dense (worker-local) index of a user, created on first sight; `ts` is the
    /// event time of the interaction.
    #[inline]
    pub(crate) fn get_or_insert(&mut self, id: u64, ts: i64) -> u32 {
        let next = self.ids.len() as u32;
        let dense = self.index.get_or_insert(id, next);
        if dense == next {
            self.ids.push(id);
            self.histories.push_user();
            self.last_seen.push(ts);
        }
        self.touch(dense, ts)
    }

    /// [`Users::get_or_insert`] for a user already looked up: `dense` is its index.
    #[inline]
    pub(crate) fn touch(&mut self, dense: u32, ts: i64) -> u32 {
        let d = dense as usize;
        self.last_seen[d] = self.last_seen[d].max(ts);
        dense
    }

    /// Hints that user `id` will be looked up soon.
    #[inline]
    pub(crate) fn prefetch(&self, id: u64) {
        self.index.prefetch(id);
    }

    /// Hints the slot of user `dense`'s history where `item` would be inserted (its
    /// span must be in cache by now: see [`Users::prefetch_history`]).
    #[inline]
    pub(crate) fn prefetch_history_slot(&self, dense: u32, item: u32) {
        self.histories.prefetch_slot(dense, item);
    }

    /// Hints that the history of user `dense` will be read soon: where it lies, and
    /// when it was last seen.
    #[inline]
    pub(crate) fn prefetch_history(&self, dense: u32) {
        self.histories.prefetch_span(dense);
        if let Some(seen) = self.last_seen.get(dense as usize) {
            crate::prefetch::values(std::slice::from_ref(seen));
        }
    }

    /// The raw id of a dense user.
    pub(crate) fn id(&self, dense: u32) -> u64 {
        self.ids[dense as usize]
    }

    /// The dense index of a user held now.
    pub(crate) fn lookup(&self, id: u64) -> Option<u32> {
        self.index.get(id)
    }

    #[inline]
    pub(crate) fn history(&self, dense: u32) -> History<'_> {
        self.histories.get(dense)
    }

    #[inline]
    pub(crate) fn remember(&mut self, dense: u32, item: u32) {
        self.histories.insert(dense, item);
    }

    /// Users held now.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Users evicted so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Evicts users last seen before `cutoff`, compacting the dense indices of the rest
    /// (their order is kept). Returns `(remap, history bytes freed)`, where `remap[old]`
    /// is the new dense index of a kept user; `None` when nobody was evicted. The evicted
    /// users' ids are appended to `evicted` when given.
    pub(crate) fn evict_before(
        &mut self,
        cutoff: i64,
        mut evicted: Option<&mut Vec<u64>>,
    ) -> Option<(Vec<Option<u32>>, u64)> {
        if !self.last_seen.iter().any(|&t| t < cutoff) {
            return None;
        }
        let mut remap = Vec::with_capacity(self.ids.len());
        let mut freed = 0;
        let mut next = 0u32;
        let ids = std::mem::take(&mut self.ids);
        let last_seen = std::mem::take(&mut self.last_seen);
        let mut index = IdIndex::default();
        for (d, (id, seen)) in ids.into_iter().zip(last_seen).enumerate() {
            if seen < cutoff {
                if let Some(out) = evicted.as_mut() {
                    out.push(id);
                }
                freed += self.histories.bytes_of(d as u32) + USER_ENTRY_BYTES;
                remap.push(None);
                self.evicted += 1;
            } else {
                remap.push(Some(next));
                index.insert(id, next);
                self.ids.push(id);
                self.last_seen.push(seen);
                next += 1;
            }
        }
        self.histories.retain(|d| remap[d as usize].is_some());
        // The old map's buckets are sized for the peak population; a fresh one is not.
        self.index = index;
        self.ids.shrink_to_fit();
        self.last_seen.shrink_to_fit();
        Some((remap, freed))
    }

    /// Keeps only the users `keep` accepts (by raw id), compacting indices; returns the
    /// remap as [`Users::evict_before`] does.
    pub(crate) fn retain(&mut self, keep: impl Fn(u64) -> bool) -> Vec<Option<u32>> {
        let mut remap = Vec::with_capacity(self.ids.len());
        let mut next = 0u32;
        let ids = std::mem::take(&mut self.ids);
        let last_seen = std::mem::take(&mut self.last_seen);
        self.index = IdIndex::default();
        for (id, seen) in ids.into_iter().zip(last_seen) {
            if keep(id) {
                remap.push(Some(next));
                self.index.insert(id, next);
                self.ids.push(id);
                self.last_seen.push(seen);
                next += 1;
            } else {
                remap.push(None);
            }
        }
        self.histories.retain(|d| remap[d as usize].is_some());
        remap
    }

    /// Appends the users of `other` (disjoint ids), returning the offset of its first one.
    pub(crate) fn absorb(&mut self, other: Users) -> u32 {
        let offset = self.ids.len() as u32;
        for (i, id) in other.ids.iter().enumerate() {
            self.index.insert(*id, offset + i as u32);
        }
        self.ids.extend(other.ids);
        self.histories.absorb(&other.histories);
        self.last_seen.extend(other.last_seen);
        offset
    }

    /// Counts evictions that happened before a restore.
    pub(crate) fn add_evicted(&mut self, n: u64) {
        self.evicted += n;
    }

    /// Approximate heap bytes held: histories plus per-user bookkeeping.
    pub(crate) fn bytes(&self) -> u64 {
        self.histories.bytes() + self.ids.len() as u64 * USER_ENTRY_BYTES
    }
}

/// What a negative must not be: the user's known items, the positive at hand, and
/// expired items.
pub(crate) struct Excluding<'a> {
    pub(crate) history: History<'a>,
    pub(crate) positive: u32,
    pub(crate) catalogue: &'a ItemCatalogue,
}

impl Exclusion for Excluding<'_> {
    #[inline]
    fn excludes(&self, item: u32) -> bool {
        item == self.positive || self.history.contains(item) || !self.catalogue.is_alive(item)
    }

    #[inline]
    fn excludes_all(&self, len: usize) -> bool {
        // The exact count checks whether the positive is in the history, a probe of the
        // set; a user far from having seen everything needs no probe to say no.
        self.history.len() + 1 + self.catalogue.expired() >= len && self.excluded_count() >= len
    }

    fn excluded_count(&self) -> usize {
        // Histories may name expired items; counting them twice would only make the
        // samplers give up early, so the sum is capped by the catalogue.
        (self.history.len()
            + usize::from(!self.history.contains(self.positive))
            + self.catalogue.expired())
        .min(self.catalogue.len())
    }
}

/// The worker that owns a user: a mixed hash so that sequential ids spread evenly.
#[inline]
pub(crate) fn owner(user: u64, peers: usize) -> usize {
    let h = splitmix64(user);
    // The same worker as `h % peers`, without a 64-bit division (tens of cycles, and
    // every worker asks for every event, several times with the cache hints) for the
    // usual power-of-two shapes.
    if peers.is_power_of_two() {
        (h & (peers as u64 - 1)) as usize
    } else {
        (h % peers as u64) as usize
    }
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
        assert_eq!(c.observe(50, 0), 0);
        assert_eq!(c.observe(7, 0), 1);
        assert_eq!(c.observe(50, 0), 0);
        assert_eq!(c.lookup(7), Some(1));
        assert_eq!(c.lookup(8), None);
        assert_eq!(c.counts(), &[2, 1]);
        assert_eq!(c.id(1), 7);
    }

    #[test]
    fn expired_items_get_new_indices_and_are_excluded() {
        let mut c = ItemCatalogue::default();
        c.observe(50, 10);
        c.observe(7, 20);
        c.observe(50, 30);
        assert_eq!(c.expire_before(25, None), 1, "item 7 was last seen at 20");
        assert_eq!((c.live(), c.len(), c.expired()), (1, 2, 1));
        assert_eq!(c.lookup(7), None);
        assert!(!c.is_alive(1) && c.is_alive(0));
        assert_eq!(c.counts(), &[2, 0]);
        assert_eq!(c.observe(7, 40), 2, "a returning item starts afresh");
        let arena = crate::history::arena_of(&[]);
        let ex = Excluding {
            history: arena.get(0),
            positive: 2,
            catalogue: &c,
        };
        assert!(ex.excludes(1) && !ex.excludes(0));
        assert_eq!(ex.excluded_count(), 2);
    }

    #[test]
    fn evicting_users_compacts_in_order() {
        let mut u = Users::default();
        for (id, ts) in [(10, 5), (11, 1), (12, 7), (13, 2)] {
            let d = u.get_or_insert(id, ts);
            u.remember(d, id as u32);
        }
        assert_eq!(u.evict_before(0, None), None);
        let before = u.bytes();
        let (remap, freed) = u.evict_before(5, None).unwrap();
        assert_eq!(remap, vec![Some(0), None, Some(1), None]);
        assert!(freed > 0 && u.bytes() + freed == before, "{freed} {before}");
        assert_eq!((u.len(), u.evicted()), (2, 2));
        assert_eq!(u.get_or_insert(12, 8), 1);
        assert!(u.history(1).contains(12));
        assert_eq!(u.get_or_insert(11, 9), 2, "an evicted user returns afresh");
        assert!(u.history(2).is_empty());
    }

    #[test]
    fn exclusion_counts_positive_once() {
        let arena = crate::history::arena_of(&[1, 2]);
        let history = arena.get(0);
        let mut c = ItemCatalogue::default();
        (0..5).for_each(|i| {
            c.observe(i, 0);
        });
        let ex = Excluding {
            history,
            positive: 2,
            catalogue: &c,
        };
        assert_eq!(ex.excluded_count(), 2);
        // The bound answers as the exact count does, the positive in the history or not.
        for len in 0..6 {
            assert_eq!(ex.excludes_all(len), len <= 2, "{len}");
        }
        let ex = Excluding {
            history,
            positive: 3,
            catalogue: &c,
        };
        assert_eq!(ex.excluded_count(), 3);
        for len in 0..6 {
            assert_eq!(ex.excludes_all(len), len <= 3, "{len}");
        }
        assert!(ex.excludes(3) && ex.excludes(1) && !ex.excludes(0));
    }

    #[test]
    fn owners_spread_sequential_ids() {
        let mut per = [0u32; 4];
        for u in 0..4000 {
            per[owner(u, 4)] += 1;
        }
        assert!(per.iter().all(|&n| (800..1200).contains(&n)), "{per:?}");
        // Checkpoints and clusters rely on one assignment: the shortcut is the modulo.
        for peers in 1..=9 {
            for u in 0..1000 {
                assert_eq!(owner(u, peers), (splitmix64(u) % peers as u64) as usize);
            }
        }
    }
}
