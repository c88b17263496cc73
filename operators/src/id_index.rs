//! The map from raw ids (users', items') to dense indices that the learner probes for
//! every event.
//!
//! A general-purpose hash map computes where an id lives and reads it in one call, so a
//! miss on a table of a hundred thousand users stalls the event that asks. This one is
//! open addressing with linear probing over `(id, index)` slots, where the slot an id
//! starts at is a pure function of the id: [`IdIndex::prefetch`] can hint it events
//! ahead, and the lookup that follows finds it in cache. Removal shifts the following
//! slots back (no tombstones), so probe runs stay as short as the load allows.
//!
//! Serialised as a map, as the `FxHashMap` it replaced was, so checkpoints read the same.

use std::fmt;

use crate::state::splitmix64;

/// An empty slot's index.
const EMPTY: u32 = u32::MAX;

/// Keeps this hash independent of [`crate::state::owner`]'s, which uses the same mixer:
/// a worker's users all share `owner`'s residue, which must not pick their slots.
const SALT: u64 = 0x1d_1dec5;

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    index: u32,
}

const VACANT: Slot = Slot {
    id: 0,
    index: EMPTY,
};

/// `id -> dense index`; indices are below `u32::MAX`.
#[derive(Clone, Default)]
pub(crate) struct IdIndex {
    /// A power of two long (or empty).
    slots: Vec<Slot>,
    len: usize,
}

impl fmt::Debug for IdIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl IdIndex {
    /// Where `id`'s probe starts: the high bits of a salted mix (the low ones of the
    /// unsalted mix pick the owning worker).
    #[inline]
    fn home(&self, id: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        if bits == 0 {
            return 0;
        }
        (splitmix64(id ^ SALT) >> (64 - bits)) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Ids held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Hints that `id` will be looked up soon: its probe's first slot.
    #[inline]
    pub(crate) fn prefetch(&self, id: u64) {
        if let Some(slot) = self.slots.get(self.home(id)) {
            crate::prefetch::values(std::slice::from_ref(slot));
        }
    }

    /// The slot holding `id`, or the vacant slot where it would go.
    #[inline]
    fn find(&self, id: u64) -> usize {
        let mask = self.mask();
        let mut i = self.home(id);
        loop {
            let slot = self.slots[i];
            if slot.index == EMPTY || slot.id == id {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// The index of `id`, if held.
    #[inline]
    pub(crate) fn get(&self, id: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = self.slots[self.find(id)];
        (slot.index != EMPTY).then_some(slot.index)
    }

    /// The index of `id`, which gets `index` if not held yet.
    #[inline]
    pub(crate) fn get_or_insert(&mut self, id: u64, index: u32) -> u32 {
        debug_assert_ne!(index, EMPTY);
        self.reserve_one();
        let i = self.find(id);
        let slot = &mut self.slots[i];
        if slot.index == EMPTY {
            *slot = Slot { id, index };
            self.len += 1;
        }
        slot.index
    }

    /// Maps `id` to `index`, replacing any index it had.
    pub(crate) fn insert(&mut self, id: u64, index: u32) {
        debug_assert_ne!(index, EMPTY);
        self.reserve_one();
        let i = self.find(id);
        if self.slots[i].index == EMPTY {
            self.len += 1;
        }
        self.slots[i] = Slot { id, index };
    }

    /// Forgets `id`; later slots of its probe run move back into the gap.
    pub(crate) fn remove(&mut self, id: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut gap = self.find(id);
        let removed = self.slots[gap].index;
        if removed == EMPTY {
            return None;
        }
        self.len -= 1;
        let mut i = gap;
        loop {
            i = (i + 1) & mask;
            let slot = self.slots[i];
            if slot.index == EMPTY {
                break;
            }
            // A slot may fill the gap if its home is not after the gap along the run
            // (cyclically: the gap lies in [home, i)).
            let home = self.home(slot.id);
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(gap) & mask) {
                self.slots[gap] = slot;
                gap = i;
            }
        }
        self.slots[gap] = VACANT;
        Some(removed)
    }

    /// Every `(id, index)`, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.index != EMPTY)
            .map(|s| (s.id, s.index))
    }

    /// Drops capacity beyond what the ids held need.
    pub(crate) fn shrink_to_fit(&mut self) {
        if Self::capacity_for(self.len) < self.slots.len() {
            self.rebuild(Self::capacity_for(self.len));
        }
    }

    /// Slots for `n` ids at a load of at most 5/8, where linear probing's runs are short.
    fn capacity_for(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (n * 8 / 5 + 1).next_power_of_two().max(8)
        }
    }

    #[inline]
    fn reserve_one(&mut self) {
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.rebuild(Self::capacity_for(self.len + 1).max(self.slots.len() * 2));
        }
    }

    #[cold]
    fn rebuild(&mut self, capacity: usize) {
        let old = std::mem::replace(&mut self.slots, vec![VACANT; capacity]);
        for slot in old.into_iter().filter(|s| s.index != EMPTY) {
            let i = self.find(slot.id);
            self.slots[i] = slot;
        }
    }
}

impl serde::Serialize for IdIndex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // With its length up front: postcard (the checkpoints' format) needs it.
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.len))?;
        for (id, index) in self.iter() {
            map.serialize_entry(&id, &index)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for IdIndex {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = IdIndex;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from ids to dense indices")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<IdIndex, A::Error> {
                let mut index = IdIndex::default();
                while let Some((id, dense)) = map.next_entry::<u64, u32>()? {
                    if dense == EMPTY {
                        return Err(serde::de::Error::custom("dense index u32::MAX is reserved"));
                    }
                    index.insert(id, dense);
                }
                Ok(index)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Any sequence of inserts, lookups and removals agrees with std's map, including
        /// ids that collide in their home slot and removals in the middle of runs.
        #[test]
        fn agrees_with_a_hash_map(ops in prop::collection::vec((0u8..4, 0u64..300, 0u32..1000), 0..2000)) {
            let mut mine = IdIndex::default();
            let mut oracle: HashMap<u64, u32> = HashMap::new();
            for (op, id, v) in ops {
                match op {
                    0 => prop_assert_eq!(mine.get_or_insert(id, v), *oracle.entry(id).or_insert(v)),
                    1 => { mine.insert(id, v); oracle.insert(id, v); }
                    2 => prop_assert_eq!(mine.remove(id), oracle.remove(&id)),
                    _ => mine.shrink_to_fit(),
                }
                prop_assert_eq!(mine.len(), oracle.len());
            }
            for id in 0..300 {
                prop_assert_eq!(mine.get(id), oracle.get(&id).copied());
            }
        }
    }

    #[test]
    fn serialises_as_the_map_it_replaced() {
        let mut mine = IdIndex::default();
        let mut fx = rustc_hash::FxHashMap::default();
        for id in [7u64, 1 << 40, 3, u64::MAX] {
            mine.insert(id, id as u32 % 1000);
            fx.insert(id, id as u32 % 1000);
        }
        let bytes = serde_json::to_vec(&fx).unwrap();
        let back: IdIndex = serde_json::from_slice(&bytes).unwrap();
        for (id, v) in &fx {
            assert_eq!(back.get(*id), Some(*v));
        }
        let again: rustc_hash::FxHashMap<u64, u32> =
            serde_json::from_slice(&serde_json::to_vec(&mine).unwrap()).unwrap();
        assert_eq!(again, fx);
        let again: rustc_hash::FxHashMap<u64, u32> =
            postcard::from_bytes(&postcard::to_allocvec(&mine).unwrap()).unwrap();
        assert_eq!(again, fx);
        let back: IdIndex = postcard::from_bytes(&postcard::to_allocvec(&fx).unwrap()).unwrap();
        assert_eq!(back.len(), fx.len());
    }
}
