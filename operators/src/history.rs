//! The item sets of every user a worker owns, in one arena.
//!
//! A user's history (the items they interacted with: excluded from their rankings and
//! from their negatives) is an open-addressing hash set of dense item indices. A set per
//! user on the heap costs an allocator call every time one grows, and a stream of new
//! users grows sets all the time: that was most of the allocator calls a run made per
//! event. Here every set is a region of one `Vec<u32>`: a set that fills up moves to a
//! region twice its size, taken from the free list of that size or from the end of the
//! arena, and its old region goes to the free list of its size. The arena itself grows
//! by doubling, so steady state allocates nothing. Freed regions are given back when
//! users are evicted or the worker's users are re-laid out (GC compaction, restore),
//! both of which rebuild the arena compactly.
//!
//! Regions have power-of-two sizes (at least [`MIN_CAP`]) and are probed linearly from a
//! multiplicative hash; the load factor stays at most 3/4.

use serde::{Deserialize, Serialize};

/// Marks an empty slot (no dense item index reaches it: indices are `u32` below the
/// catalogue length).
const EMPTY: u32 = u32::MAX;

/// Smallest region, in slots.
const MIN_CAP: u32 = 4;

/// Where a user's set lives in the arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Span {
    offset: u32,
    /// Slots of the region (0: no region yet).
    cap: u32,
    len: u32,
}

/// Every owned user's item set, by dense user index.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Histories {
    slots: Vec<u32>,
    spans: Vec<Span>,
    /// Free regions by `log2(cap)`.
    free: Vec<Vec<u32>>,
}

#[inline]
fn slot_of(item: u32, cap: u32) -> u32 {
    // Fibonacci hashing: the high bits of the product spread sequential indices.
    ((item.wrapping_mul(0x9E37_79B9) as u64 * cap as u64) >> 32) as u32
}

/// One user's set, read-only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct History<'a> {
    region: &'a [u32],
    len: u32,
}

impl<'a> History<'a> {
    /// Whether `item` is in the set.
    #[inline]
    pub(crate) fn contains(&self, item: u32) -> bool {
        let cap = self.region.len() as u32;
        if cap == 0 {
            return false;
        }
        let mask = cap - 1;
        let mut i = slot_of(item, cap);
        loop {
            match self.region[i as usize] {
                EMPTY => return false,
                x if x == item => return true,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// The open-addressing slots (for cache hints).
    #[inline]
    pub(crate) fn region(&self) -> &'a [u32] {
        self.region
    }

    /// Items in the set, in no particular order.
    #[inline]
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.region.iter().copied().filter(|&x| x != EMPTY)
    }

    /// Items in the set.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the set is empty.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Histories {
    /// Users held.
    #[cfg(test)]
    pub(crate) fn users(&self) -> usize {
        self.spans.len()
    }

    /// Adds a user with an empty set, at the next dense index.
    pub(crate) fn push_user(&mut self) {
        self.spans.push(Span::default());
    }

    /// Hints that user `user`'s set will be read soon: where its region lies.
    #[inline]
    pub(crate) fn prefetch_span(&self, user: u32) {
        if let Some(span) = self.spans.get(user as usize) {
            crate::prefetch::values(std::slice::from_ref(span));
        }
    }

    /// User `user`'s set.
    #[inline]
    pub(crate) fn get(&self, user: u32) -> History<'_> {
        let s = self.spans[user as usize];
        History {
            region: &self.slots[s.offset as usize..(s.offset + s.cap) as usize],
            len: s.len,
        }
    }

    /// Adds `item` to `user`'s set.
    #[inline]
    pub(crate) fn insert(&mut self, user: u32, item: u32) {
        let s = self.spans[user as usize];
        if (s.len + 1) * 4 > s.cap * 3 {
            self.grow(user);
        }
        let s = &mut self.spans[user as usize];
        let mask = s.cap - 1;
        let mut i = slot_of(item, s.cap);
        loop {
            let slot = &mut self.slots[(s.offset + i) as usize];
            match *slot {
                EMPTY => {
                    *slot = item;
                    s.len += 1;
                    return;
                }
                x if x == item => return,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// A region of `cap` slots, all empty: a freed one of that size, or the arena's end.
    fn take_region(&mut self, cap: u32) -> u32 {
        let class = cap.trailing_zeros() as usize;
        if let Some(offset) = self.free.get_mut(class).and_then(Vec::pop) {
            self.slots[offset as usize..(offset + cap) as usize].fill(EMPTY);
            return offset;
        }
        let offset = self.slots.len();
        assert!(
            offset + cap as usize <= u32::MAX as usize,
            "a worker's user histories outgrew 2^32 slots"
        );
        self.slots.resize(offset + cap as usize, EMPTY);
        offset as u32
    }

    fn give_back(&mut self, offset: u32, cap: u32) {
        if cap == 0 {
            return;
        }
        let class = cap.trailing_zeros() as usize;
        if self.free.len() <= class {
            self.free.resize_with(class + 1, Vec::new);
        }
        self.free[class].push(offset);
    }

    #[cold]
    fn grow(&mut self, user: u32) {
        let old = self.spans[user as usize];
        let cap = (old.cap * 2).max(MIN_CAP);
        let offset = self.take_region(cap);
        self.spans[user as usize] = Span {
            offset,
            cap,
            len: 0,
        };
        for k in old.offset..old.offset + old.cap {
            let item = self.slots[k as usize];
            if item != EMPTY {
                self.insert(user, item);
            }
        }
        self.give_back(old.offset, old.cap);
    }

    /// Bytes of `user`'s region.
    pub(crate) fn bytes_of(&self, user: u32) -> u64 {
        self.spans[user as usize].cap as u64 * 4
    }

    /// Bytes of every user's region (free regions not counted: they are reused).
    pub(crate) fn bytes(&self) -> u64 {
        self.spans.iter().map(|s| s.cap as u64 * 4).sum()
    }

    /// Keeps the users `keep` accepts, in order, re-laid out compactly (free regions
    /// dropped): the arena is rebuilt at its live size.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let live: usize = self.spans.iter().map(|s| s.cap as usize).sum();
        let mut next = Histories {
            slots: Vec::with_capacity(live),
            spans: Vec::with_capacity(self.spans.len()),
            free: Vec::new(),
        };
        for (u, s) in self.spans.iter().enumerate() {
            if keep(u as u32) {
                next.append_region(&self.slots, *s);
            }
        }
        *self = next;
    }

    /// Copies a region of another arena in as the next user (hash layout kept: same cap).
    fn append_region(&mut self, slots: &[u32], s: Span) {
        let offset = self.slots.len() as u32;
        self.slots
            .extend_from_slice(&slots[s.offset as usize..(s.offset + s.cap) as usize]);
        self.spans.push(Span { offset, ..s });
    }

    /// Appends `other`'s users after these.
    pub(crate) fn absorb(&mut self, other: &Histories) {
        for s in &other.spans {
            self.append_region(&other.slots, *s);
        }
    }
}

/// A set of the given items, alone in its own arena (tests).
#[cfg(test)]
pub(crate) fn arena_of(items: &[u32]) -> Histories {
    let mut h = Histories::default();
    h.push_user();
    items.iter().for_each(|&i| h.insert(0, i));
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustc_hash::FxHashSet;

    #[test]
    fn sets_match_a_hash_set_through_growth_eviction_and_absorb() {
        let mut h = Histories::default();
        let mut reference: Vec<FxHashSet<u32>> = Vec::new();
        let mut x = 12345u64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if step % 97 == 0 || reference.is_empty() {
                h.push_user();
                reference.push(FxHashSet::default());
            }
            let u = (x % reference.len() as u64) as u32;
            let item = ((x >> 20) % 3000) as u32;
            h.insert(u, item);
            reference[u as usize].insert(item);
        }
        let check = |h: &Histories, reference: &[FxHashSet<u32>]| {
            assert_eq!(h.users(), reference.len());
            for (u, r) in reference.iter().enumerate() {
                let got = h.get(u as u32);
                assert_eq!(got.len(), r.len());
                let mut items: Vec<u32> = got.iter().collect();
                items.sort_unstable();
                let mut want: Vec<u32> = r.iter().copied().collect();
                want.sort_unstable();
                assert_eq!(items, want);
                for probe in 0..3100 {
                    assert_eq!(got.contains(probe), r.contains(&probe));
                }
            }
        };
        check(&h, &reference);
        // Freed regions were reused: the arena holds little beyond the live regions.
        assert!(
            h.slots.len() as u64 * 4 < h.bytes() * 2,
            "{} {}",
            h.slots.len(),
            h.bytes()
        );
        h.retain(|u| u % 3 != 0);
        let kept: Vec<FxHashSet<u32>> = reference
            .iter()
            .enumerate()
            .filter(|(u, _)| u % 3 != 0)
            .map(|(_, r)| r.clone())
            .collect();
        check(&h, &kept);
        assert_eq!(h.slots.len() as u64 * 4, h.bytes(), "compact after retain");
        let mut both = h.clone();
        both.absorb(&h);
        let twice: Vec<FxHashSet<u32>> = kept.iter().chain(kept.iter()).cloned().collect();
        check(&both, &twice);
    }
}
