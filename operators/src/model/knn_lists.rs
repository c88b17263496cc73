//! The neighbour lists of `itemknn`, in an arena: one list per item, each a slot of a
//! size class, so a list that grows moves to a slot of the next class instead of
//! reallocating its own vectors.
//!
//! Why: lists grow for as long as new items and pairs appear, and a list held in its
//! own `Vec`s reallocates at every doubling; with twenty list updates per event that
//! was more than one allocator call per event on ml-latest-small, against a goal of at
//! most 0.001 end to end (docs/memory.md). Here slots come from chunks of up to 256 KiB that are never
//! returned while the run lasts, and a slot given up on growth or expiry is reused by
//! the next list of its class, so allocator calls scale with the bytes the state grows
//! by, not with the events. A GC cycle rebuilds the arena with every list in the
//! smallest class that holds it ([`Lists::compacted`]): that is when memory goes back.
//!
//! A slot of a class of capacity `cap` holds `cap` items and, past [`LINEAR`] entries, a
//! hash index of positions (at most half full) in one `u32` chunk, and `cap` weights in a
//! parallel `f32` chunk. The classes do not depend on the configuration, so a
//! checkpoint stores the lists as plain `(items, weights)` pairs, in the format the
//! per-list vectors had.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Lists up to this long are searched linearly; longer ones use their hash index.
const LINEAR: usize = 16;
/// An empty slot of an index.
const EMPTY: u32 = u32::MAX;
/// Class of a list with no slot.
const NO_CLASS: u8 = u8::MAX;
/// Bytes of the item chunks of a class at most (the weight chunks are smaller).
const CHUNK_BYTES: usize = 256 * 1024;
/// Slots of a class's first chunk; later chunks double up to [`CHUNK_BYTES`], so a small
/// state does not reserve a quarter mebibyte per class.
const FIRST_CHUNK_SLOTS: usize = 16;

/// Classes: enough for lists of 3 * 2^24 entries.
const CLASSES: usize = 48;

/// Every class's shape, looked up on every access of a list.
const SHAPES: [Shape; CLASSES] = {
    let mut shapes = [Shape { cap: 0, index: 0 }; CLASSES];
    let mut c = 0;
    while c < CLASSES {
        shapes[c] = Shape::compute(c);
        c += 1;
    }
    shapes
};

/// Capacity of class `c`: 4, 6, 8, 12, 16, 24, ... (powers of two and the halves
/// between), so a list at the usual caps (75, 750) wastes a fifth at most.
const fn class_cap(c: usize) -> usize {
    let base = 4usize << (c / 2);
    if c.is_multiple_of(2) {
        base
    } else {
        base + base / 2
    }
}

/// The smallest class that holds `len` entries (the largest class for more: a list is
/// never that long, its cap being `neighbours * 3/2`).
fn class_for(len: usize) -> usize {
    (0..CLASSES)
        .find(|&c| class_cap(c) >= len)
        .unwrap_or(CLASSES - 1)
}

/// Where a list lives, and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    class: u8,
    /// Whether the slot's index maps every entry (it is rebuilt lazily after a cut).
    indexed: bool,
    len: u32,
    chunk: u32,
    slot: u32,
}

impl Head {
    const EMPTY: Head = Head {
        class: NO_CLASS,
        indexed: false,
        len: 0,
        chunk: 0,
        slot: 0,
    };
}

/// One size class: its chunks and its free slots.
#[derive(Clone, Debug, Default)]
struct Class {
    /// Items then index per slot.
    items: Vec<Box<[u32]>>,
    /// Weights per slot.
    weights: Vec<Box<[f32]>>,
    /// Slots handed out of the last chunk.
    used: usize,
    /// Slots given back: `(chunk, slot)`.
    free: Vec<(u32, u32)>,
}

/// The geometry of a class's slot.
#[derive(Clone, Copy)]
struct Shape {
    cap: usize,
    /// Index slots (0 for classes searched linearly).
    index: usize,
}

impl Shape {
    #[inline]
    fn of(class: usize) -> Self {
        SHAPES[class]
    }

    const fn compute(class: usize) -> Self {
        let cap = class_cap(class);
        let index = if cap > LINEAR {
            (2 * cap).next_power_of_two()
        } else {
            0
        };
        Self { cap, index }
    }

    /// `u32` words of a slot in the item chunk.
    fn words(self) -> usize {
        self.cap + self.index
    }

    /// Slots of the `k`-th chunk.
    fn chunk_slots(self, k: usize) -> usize {
        let max = (CHUNK_BYTES / 4 / self.words()).max(1);
        (FIRST_CHUNK_SLOTS << k.min(20)).min(max)
    }
}

#[inline]
fn slot_of(j: u32, mask: usize) -> usize {
    ((j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & mask
}

/// Every item's neighbour list: parallel arrays of dense item index and weight.
#[derive(Clone, Default)]
pub(crate) struct Lists {
    heads: Vec<Head>,
    classes: Vec<Class>,
}

impl Lists {
    /// Lists held (one per item seen, empty or not).
    pub(crate) fn count(&self) -> usize {
        self.heads.len()
    }

    /// Makes room for lists `0..n`.
    pub(crate) fn ensure(&mut self, n: usize) {
        if self.heads.len() < n {
            self.heads.resize(n, Head::EMPTY);
        }
    }

    /// Entries in list `list`.
    #[inline]
    pub(crate) fn len(&self, list: usize) -> usize {
        self.heads.get(list).map_or(0, |h| h.len as usize)
    }

    /// Where a slot's items start in its chunk, and its shape.
    #[inline]
    fn place(h: &Head) -> (Shape, usize) {
        let shape = Shape::of(h.class as usize);
        (shape, h.slot as usize * shape.words())
    }

    /// The items of list `list`.
    #[inline]
    pub(crate) fn items(&self, list: usize) -> &[u32] {
        match self.heads.get(list) {
            Some(h) if h.class != NO_CLASS => {
                let (_, at) = Self::place(h);
                let chunk = &self.classes[h.class as usize].items[h.chunk as usize];
                &chunk[at..at + h.len as usize]
            }
            _ => &[],
        }
    }

    /// The weights of list `list`, parallel to its items.
    #[inline]
    pub(crate) fn weights(&self, list: usize) -> &[f32] {
        match self.heads.get(list) {
            Some(h) if h.class != NO_CLASS => {
                let cap = Shape::of(h.class as usize).cap;
                let chunk = &self.classes[h.class as usize].weights[h.chunk as usize];
                let at = h.slot as usize * cap;
                &chunk[at..at + h.len as usize]
            }
            _ => &[],
        }
    }

    /// Items and weights of list `list`, to change in place (then [`Lists::truncate`]).
    pub(crate) fn entries_mut(&mut self, list: usize) -> (&mut [u32], &mut [f32]) {
        let Some(h) = self
            .heads
            .get(list)
            .filter(|h| h.class != NO_CLASS)
            .copied()
        else {
            return (&mut [], &mut []);
        };
        let (shape, at) = Self::place(&h);
        let class = &mut self.classes[h.class as usize];
        let len = h.len as usize;
        let items = &mut class.items[h.chunk as usize][at..at + len];
        let w_at = h.slot as usize * shape.cap;
        let weights = &mut class.weights[h.chunk as usize][w_at..w_at + len];
        (items, weights)
    }

    /// Every list's weights, to rescale them all.
    pub(crate) fn scale_weights(&mut self, by: f32) {
        for list in 0..self.heads.len() {
            self.entries_mut(list).1.iter_mut().for_each(|w| *w *= by);
        }
    }

    /// Reads the cache lines a search for `j` in list `list` would (a cache hint that
    /// costs independent loads, see `ItemKnn::observe`).
    #[inline]
    pub(crate) fn peek(&self, list: usize, j: u32) -> u32 {
        let Some(h) = self.heads.get(list).filter(|h| h.class != NO_CLASS) else {
            return 0;
        };
        let (shape, at) = Self::place(h);
        let chunk = &self.classes[h.class as usize].items[h.chunk as usize];
        if shape.index == 0 || !h.indexed {
            return chunk[at];
        }
        let p = chunk[at + shape.cap + slot_of(j, shape.index - 1)];
        match chunk.get(at + p as usize) {
            Some(&x) if p != EMPTY => x,
            _ => p,
        }
    }

    /// The position of `j` in list `list`, if present. A long list keeps an
    /// open-addressing index of positions, so an update costs O(1) rather than a scan of
    /// hundreds of entries; it is derived state, rebuilt here after a cut.
    #[inline]
    pub(crate) fn find(&mut self, list: usize, j: u32) -> Option<usize> {
        let h = *self.heads.get(list)?;
        if h.class == NO_CLASS {
            return None;
        }
        let (shape, at) = Self::place(&h);
        let len = h.len as usize;
        if len <= LINEAR || shape.index == 0 {
            let chunk = &self.classes[h.class as usize].items[h.chunk as usize];
            return chunk[at..at + len].iter().position(|&x| x == j);
        }
        if !h.indexed {
            self.rebuild_index(list);
        }
        let chunk = &self.classes[h.class as usize].items[h.chunk as usize];
        let (items, index) = chunk[at..at + shape.words()].split_at(shape.cap);
        let mask = shape.index - 1;
        let mut s = slot_of(j, mask);
        loop {
            match index[s] {
                EMPTY => return None,
                p if items[p as usize] == j => return Some(p as usize),
                _ => s = (s + 1) & mask,
            }
        }
    }

    fn rebuild_index(&mut self, list: usize) {
        let h = &mut self.heads[list];
        h.indexed = true;
        let (shape, at) = Self::place(h);
        let len = h.len as usize;
        let chunk = &mut self.classes[h.class as usize].items[h.chunk as usize];
        let (items, index) = chunk[at..at + shape.words()].split_at_mut(shape.cap);
        index.fill(EMPTY);
        let mask = shape.index - 1;
        for (p, &j) in items[..len].iter().enumerate() {
            let mut s = slot_of(j, mask);
            while index[s] != EMPTY {
                s = (s + 1) & mask;
            }
            index[s] = p as u32;
        }
    }

    /// A free slot of class `class`: a returned one, else the next of the last chunk,
    /// else one of a new chunk.
    fn take_slot(&mut self, class: usize) -> (u32, u32) {
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Class::default);
        }
        let shape = Shape::of(class);
        let c = &mut self.classes[class];
        if let Some(slot) = c.free.pop() {
            return slot;
        }
        let k = c.items.len();
        if k == 0 || c.used == shape.chunk_slots(k - 1) {
            let slots = shape.chunk_slots(k);
            c.items
                .push(vec![EMPTY; slots * shape.words()].into_boxed_slice());
            c.weights
                .push(vec![0.0; slots * shape.cap].into_boxed_slice());
            c.used = 0;
        }
        c.used += 1;
        ((c.items.len() - 1) as u32, (c.used - 1) as u32)
    }

    /// Appends `(j, w)` to list `list`, moving it to a larger class when it is full.
    pub(crate) fn push(&mut self, list: usize, j: u32, w: f32) {
        self.ensure(list + 1);
        let h = self.heads[list];
        let full = h.class == NO_CLASS || h.len as usize == Shape::of(h.class as usize).cap;
        if full {
            self.grow(list, class_for(h.len as usize + 1));
        }
        let h = &mut self.heads[list];
        let (shape, at) = Self::place(h);
        let len = h.len as usize;
        let class = &mut self.classes[h.class as usize];
        let chunk = &mut class.items[h.chunk as usize];
        chunk[at + len] = j;
        class.weights[h.chunk as usize][h.slot as usize * shape.cap + len] = w;
        h.len += 1;
        if len < LINEAR || !h.indexed {
            // Indexed (afresh) at the next search.
            h.indexed = false;
            return;
        }
        let index = &mut chunk[at + shape.cap..at + shape.words()];
        let mask = shape.index - 1;
        let mut s = slot_of(j, mask);
        while index[s] != EMPTY {
            s = (s + 1) & mask;
        }
        index[s] = len as u32;
    }

    /// Moves list `list` into a slot of class `class`, giving its old slot back.
    fn grow(&mut self, list: usize, class: usize) {
        let old = self.heads[list];
        if old.class == NO_CLASS {
            self.place_in(list, class, &[], &[]);
            return;
        }
        // The old class is taken out while its entries are copied, so that both classes
        // can be borrowed; growth always moves to another (larger) class.
        let mut from = std::mem::take(&mut self.classes[old.class as usize]);
        let (shape, at) = Self::place(&old);
        let (len, w_at) = (old.len as usize, old.slot as usize * shape.cap);
        self.place_in(
            list,
            class,
            &from.items[old.chunk as usize][at..at + len],
            &from.weights[old.chunk as usize][w_at..w_at + len],
        );
        from.free.push((old.chunk, old.slot));
        self.classes[old.class as usize] = from;
        // While the entries are still in cache from the copy.
        if len > LINEAR {
            self.rebuild_index(list);
        }
    }

    /// Keeps the first `k` entries of list `list`.
    pub(crate) fn truncate(&mut self, list: usize, k: usize) {
        if let Some(h) = self.heads.get_mut(list) {
            if k < h.len as usize {
                h.len = k as u32;
                h.indexed = false;
            }
        }
    }

    /// Empties list `list` and gives its slot back.
    pub(crate) fn clear(&mut self, list: usize) {
        if let Some(h) = self.heads.get_mut(list) {
            if h.class != NO_CLASS {
                self.classes[h.class as usize].free.push((h.chunk, h.slot));
            }
            *h = Head::EMPTY;
        }
    }

    /// Heap bytes held: every chunk (used or not) and the heads.
    pub(crate) fn bytes(&self) -> u64 {
        let chunks: usize = self
            .classes
            .iter()
            .map(|c| {
                c.items.iter().map(|b| b.len() * 4).sum::<usize>()
                    + c.weights.iter().map(|b| b.len() * 4).sum::<usize>()
                    + c.free.capacity() * 8
            })
            .sum();
        (chunks + self.heads.capacity() * std::mem::size_of::<Head>()) as u64
    }

    /// The same lists in a fresh arena, each in the smallest class that holds it: what a
    /// GC cycle keeps, the rest of the old arena going back to the allocator. Class by
    /// class, each old class dropped once its lists moved, so the cycle holds little
    /// more than the old arena at its peak rather than two whole arenas.
    pub(crate) fn compacted(mut self) -> Self {
        let mut by_class: Vec<Vec<u32>> = vec![Vec::new(); self.classes.len()];
        for (list, h) in self.heads.iter().enumerate() {
            if h.class != NO_CLASS {
                by_class[h.class as usize].push(list as u32);
            }
        }
        let mut out = Lists {
            heads: vec![Head::EMPTY; self.heads.len()],
            classes: Vec::new(),
        };
        for (class, lists) in by_class.iter().enumerate() {
            for &list in lists {
                let list = list as usize;
                out.copy_in(list, self.items(list), self.weights(list));
            }
            self.classes[class] = Class::default();
        }
        out
    }

    /// Makes list `list` these entries, in a fresh slot of class `class` (the caller gives
    /// its old slot back, if any).
    fn place_in(&mut self, list: usize, class: usize, items: &[u32], weights: &[f32]) {
        let (chunk, slot) = self.take_slot(class);
        let shape = Shape::of(class);
        let c = &mut self.classes[class];
        let at = slot as usize * shape.words();
        c.items[chunk as usize][at..at + items.len()].copy_from_slice(items);
        let w_at = slot as usize * shape.cap;
        c.weights[chunk as usize][w_at..w_at + weights.len()].copy_from_slice(weights);
        self.heads[list] = Head {
            class: class as u8,
            indexed: false,
            len: items.len() as u32,
            chunk,
            slot,
        };
    }

    /// Makes list `list` (empty) these entries, in the smallest class that holds them.
    fn copy_in(&mut self, list: usize, items: &[u32], weights: &[f32]) {
        if !items.is_empty() {
            self.place_in(list, class_for(items.len()), items, weights);
        }
    }
}

impl std::fmt::Debug for Lists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lists")
            .field("lists", &self.heads.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Equal when every list holds the same entries in the same order, wherever they live.
impl PartialEq for Lists {
    fn eq(&self, other: &Self) -> bool {
        self.heads.len() == other.heads.len()
            && (0..self.heads.len()).all(|l| {
                self.items(l) == other.items(l)
                    && self
                        .weights(l)
                        .iter()
                        .map(|w| w.to_bits())
                        .eq(other.weights(l).iter().map(|w| w.to_bits()))
            })
    }
}

/// One list as checkpoints store it.
#[derive(Serialize)]
#[serde(rename = "Neighbours")]
struct ListRef<'a> {
    items: &'a [u32],
    weights: &'a [f32],
}

/// One list as checkpoints store it, read back.
#[derive(Deserialize)]
#[serde(rename = "Neighbours")]
struct ListOwned {
    items: Vec<u32>,
    weights: Vec<f32>,
}

impl Serialize for Lists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((0..self.heads.len()).map(|l| ListRef {
            items: self.items(l),
            weights: self.weights(l),
        }))
    }
}

impl<'de> Deserialize<'de> for Lists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let lists = Vec::<ListOwned>::deserialize(d)?;
        let mut out = Lists::default();
        out.ensure(lists.len());
        for (l, list) in lists.iter().enumerate() {
            if list.items.len() != list.weights.len() {
                return Err(serde::de::Error::custom(format!(
                    "neighbour list {l} has {} items but {} weights",
                    list.items.len(),
                    list.weights.len()
                )));
            }
            out.copy_in(l, &list.items, &list.weights);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_grow_by_halves_and_doublings() {
        let caps: Vec<usize> = (0..8).map(class_cap).collect();
        assert_eq!(caps, [4, 6, 8, 12, 16, 24, 32, 48]);
        assert_eq!(class_cap(class_for(751)), 768);
        assert_eq!(class_cap(class_for(76)), 96);
        assert_eq!(class_for(1), 0);
    }

    /// The arena against a vector per list, through growth, cuts, clears, compaction
    /// and a serde round trip.
    #[test]
    fn lists_behave_like_vectors() {
        let mut lists = Lists::default();
        let mut model: Vec<Vec<(u32, f32)>> = vec![Vec::new(); 40];
        let mut x = 7u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..20_000u32 {
            let l = (next() % 40) as usize;
            let j = (next() % 300) as u32;
            match next() % 100 {
                0 => {
                    lists.clear(l);
                    model[l].clear();
                }
                1..=3 => {
                    let k = model[l].len() / 2;
                    lists.truncate(l, k);
                    model[l].truncate(k);
                }
                _ => match lists.find(l, j) {
                    Some(p) => {
                        assert_eq!(model[l][p].0, j);
                        lists.entries_mut(l).1[p] += 1.0;
                        model[l][p].1 += 1.0;
                    }
                    None => {
                        assert!(model[l].iter().all(|e| e.0 != j), "step {step}");
                        lists.push(l, j, step as f32);
                        model[l].push((j, step as f32));
                    }
                },
            }
            if step % 5_000 == 4_999 {
                lists = std::mem::take(&mut lists).compacted();
            }
        }
        let check = |lists: &Lists| {
            for (l, entries) in model.iter().enumerate() {
                let items: Vec<u32> = entries.iter().map(|e| e.0).collect();
                let weights: Vec<f32> = entries.iter().map(|e| e.1).collect();
                assert_eq!(lists.items(l), &items[..]);
                assert_eq!(lists.weights(l), &weights[..]);
            }
        };
        check(&lists);
        let json = serde_json::to_string(&lists).unwrap();
        let back: Lists = serde_json::from_str(&json).unwrap();
        check(&back);
        assert!(back == lists);
        assert!(lists.clone().compacted().bytes() <= lists.bytes());
    }
}
