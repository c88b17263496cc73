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
//!
//! ## The membership filter
//!
//! Every negative a sampler draws is checked against the user's set, and almost every
//! check says "not there". A probe for an absent item walks a run of occupied slots (2.5
//! on average at half load, 8.5 at 3/4), each a branch the CPU cannot predict, in a
//! region that is a cache miss of its own. So each user's span shares its cache line with
//! a two-bit Bloom filter of the set ([`FILTER_BITS`] bits): a check the filter rules out
//! reads only that line, which finding the region reads anyway. With 100 items in a set
//! about one absent item in seven still probes; answers are exact either way.

use serde::{Deserialize, Serialize};

/// Marks an empty slot (no dense item index reaches it: indices are `u32` below the
/// catalogue length).
const EMPTY: u32 = u32::MAX;

/// Smallest region, in slots.
const MIN_CAP: u32 = 4;

/// Words of a user's filter: the rest of the 64-byte line after its span.
const FILTER_WORDS: usize = 13;

/// Bits of a user's filter.
const FILTER_BITS: u64 = FILTER_WORDS as u64 * 32;

/// Where a user's set lives in the arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Span {
    offset: u32,
    /// Slots of the region (0: no region yet).
    cap: u32,
    len: u32,
}

/// A user's span and filter, one cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(64))]
struct Entry {
    span: Span,
    filter: Filter,
}

/// A Bloom filter of a user's set: two bits per item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Filter([u32; FILTER_WORDS]);

impl Filter {
    /// The item's two bits: the two halves of one 64-bit multiplicative hash, each
    /// mapped onto the filter by a multiply-shift (no division).
    #[inline]
    fn bits(item: u32) -> [u32; 2] {
        let h = (item as u64 ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        [
            (((h >> 32) * FILTER_BITS) >> 32) as u32,
            (((h & 0xffff_ffff) * FILTER_BITS) >> 32) as u32,
        ]
    }

    #[inline]
    fn insert(&mut self, item: u32) {
        for b in Self::bits(item) {
            self.0[(b / 32) as usize] |= 1 << (b % 32);
        }
    }

    /// False only if `item` was never inserted.
    #[inline]
    fn may_contain(&self, item: u32) -> bool {
        Self::bits(item)
            .iter()
            .all(|&b| self.0[(b / 32) as usize] & (1 << (b % 32)) != 0)
    }
}

/// Every owned user's item set, by dense user index.
#[derive(Clone, Debug, Default)]
pub(crate) struct Histories {
    slots: Vec<u32>,
    entries: Vec<Entry>,
    /// Free regions by `log2(cap)`.
    free: Vec<Vec<u32>>,
}

/// What checkpoints hold of [`Histories`]: the arena and the spans. Filters are rebuilt
/// from the sets on load, so the format does not depend on them.
/// Borrowed to write (`&[u32]`, `&[Vec<u32>]`), owned to read.
#[derive(Serialize, Deserialize)]
struct Stored<S, F> {
    slots: S,
    spans: Vec<Span>,
    free: F,
}

impl Serialize for Histories {
    fn serialize<Z: serde::Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        Stored {
            slots: &self.slots[..],
            spans: self.entries.iter().map(|e| e.span).collect(),
            free: &self.free[..],
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Histories {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = Stored::<Vec<u32>, Vec<Vec<u32>>>::deserialize(d)?;
        let mut entries = Vec::with_capacity(stored.spans.len());
        for span in stored.spans {
            let region = stored
                .slots
                .get(span.offset as usize..(span.offset as usize + span.cap as usize))
                .ok_or_else(|| serde::de::Error::custom("a history span lies outside its arena"))?;
            let mut filter = Filter::default();
            region
                .iter()
                .filter(|&&x| x != EMPTY)
                .for_each(|&x| filter.insert(x));
            entries.push(Entry { span, filter });
        }
        Ok(Self {
            slots: stored.slots,
            entries,
            free: stored.free,
        })
    }
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
    filter: &'a Filter,
}

impl<'a> History<'a> {
    /// Whether `item` is in the set.
    #[inline]
    pub(crate) fn contains(&self, item: u32) -> bool {
        let cap = self.region.len() as u32;
        if cap == 0 || !self.filter.may_contain(item) {
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
        self.entries.len()
    }

    /// Adds a user with an empty set, at the next dense index.
    pub(crate) fn push_user(&mut self) {
        self.entries.push(Entry::default());
    }

    /// Hints that user `user`'s set will be read soon: where its region lies, and its
    /// filter.
    #[inline]
    pub(crate) fn prefetch_span(&self, user: u32) {
        if let Some(entry) = self.entries.get(user as usize) {
            crate::prefetch::values(std::slice::from_ref(entry));
        }
    }

    /// Hints the slot where a probe for `item` in `user`'s set starts (the insert of the
    /// event's item, and its check as a positive).
    #[inline]
    pub(crate) fn prefetch_slot(&self, user: u32, item: u32) {
        if let Some(e) = self.entries.get(user as usize) {
            if e.span.cap > 0 {
                let at = (e.span.offset + slot_of(item, e.span.cap)) as usize;
                if let Some(slot) = self.slots.get(at) {
                    crate::prefetch::values(std::slice::from_ref(slot));
                }
            }
        }
    }

    /// User `user`'s set.
    #[inline]
    pub(crate) fn get(&self, user: u32) -> History<'_> {
        let e = &self.entries[user as usize];
        let s = e.span;
        History {
            region: &self.slots[s.offset as usize..(s.offset + s.cap) as usize],
            len: s.len,
            filter: &e.filter,
        }
    }

    /// Adds `item` to `user`'s set.
    #[inline]
    pub(crate) fn insert(&mut self, user: u32, item: u32) {
        let s = self.entries[user as usize].span;
        if (s.len + 1) * 4 > s.cap * 3 {
            self.grow(user);
        }
        let e = &mut self.entries[user as usize];
        e.filter.insert(item);
        let s = &mut e.span;
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
        let old = self.entries[user as usize].span;
        let cap = (old.cap * 2).max(MIN_CAP);
        let offset = self.take_region(cap);
        // The filter stays: the set keeps its items.
        self.entries[user as usize].span = Span {
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
        self.entries[user as usize].span.cap as u64 * 4
    }

    /// Bytes of every user's region (free regions not counted: they are reused).
    pub(crate) fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.span.cap as u64 * 4).sum()
    }

    /// Keeps the users `keep` accepts, in order, re-laid out compactly (free regions
    /// dropped): the arena is rebuilt at its live size.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let live: usize = self.entries.iter().map(|e| e.span.cap as usize).sum();
        let mut next = Histories {
            slots: Vec::with_capacity(live),
            entries: Vec::with_capacity(self.entries.len()),
            free: Vec::new(),
        };
        for (u, e) in self.entries.iter().enumerate() {
            if keep(u as u32) {
                next.append_region(&self.slots, e);
            }
        }
        *self = next;
    }

    /// Copies a region of another arena in as the next user (hash layout kept: same cap).
    fn append_region(&mut self, slots: &[u32], e: &Entry) {
        let s = e.span;
        let offset = self.slots.len() as u32;
        self.slots
            .extend_from_slice(&slots[s.offset as usize..(s.offset + s.cap) as usize]);
        self.entries.push(Entry {
            span: Span { offset, ..s },
            filter: e.filter,
        });
    }

    /// Appends `other`'s users after these.
    pub(crate) fn absorb(&mut self, other: &Histories) {
        for e in &other.entries {
            self.append_region(&other.slots, e);
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
        // Checkpoints hold the sets only; the filters come back from them.
        let bytes = postcard::to_allocvec(&both).unwrap();
        let back: Histories = postcard::from_bytes(&bytes).unwrap();
        check(&back, &twice);
        assert_eq!(back.entries, both.entries);
    }

    #[test]
    fn the_filter_rules_out_most_absent_items() {
        let mut x = 99u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 33) as u32
        };
        for (items, at_most) in [(20, 0.02), (100, 0.2), (200, 0.45)] {
            let mut filter = Filter::default();
            let inserted: FxHashSet<u32> = (0..items).map(|_| next() % 1_000_000).collect();
            inserted.iter().for_each(|&i| filter.insert(i));
            assert!(inserted.iter().all(|&i| filter.may_contain(i)));
            let (mut tried, mut passed) = (0, 0);
            while tried < 20_000 {
                let i = next() % 1_000_000;
                if !inserted.contains(&i) {
                    tried += 1;
                    passed += usize::from(filter.may_contain(i));
                }
            }
            let rate = passed as f64 / tried as f64;
            assert!(
                rate <= at_most,
                "{items} items: {rate} of absent items pass"
            );
        }
    }

    #[test]
    fn a_corrupt_span_is_an_error_not_a_panic() {
        let stored = Stored {
            slots: vec![EMPTY; 4],
            spans: vec![Span {
                offset: 2,
                cap: 4,
                len: 0,
            }],
            free: Vec::<Vec<u32>>::new(),
        };
        let bytes = postcard::to_allocvec(&stored).unwrap();
        assert!(postcard::from_bytes::<Histories>(&bytes).is_err());
    }
}
