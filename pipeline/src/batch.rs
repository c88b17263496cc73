//! The batches events travel in between operators: columns in one pooled block, shared
//! by reference count.
//!
//! An [`EventBatch`] is what the dataflow's event edges carry. Its columns (`ts`, `pos`,
//! `user`, `item`, `weight`, `kind`) live in one block from the sharded
//! [`BufferPool`]; cloning a batch clones a reference, so the broadcast hands the same
//! block to every worker of a process instead of copying events, and the block goes
//! back to the pool (the shard of whichever thread drops the last reference) when the
//! last worker is done with it. Between processes a batch is serialised column by
//! column and rebuilt on the other side in the receiving thread's pool
//! ([`BufferPool::install_current`]).
//!
//! One block rather than one per column, shared through a count in the block itself
//! ([`SharedBlock`]) rather than an Arrow buffer's owner: a batch costs one pool get and
//! no allocator call whatever its length, which is what keeps the event path at zero
//! allocator calls per event once the pool is warm.

use std::fmt;

use arrow_buffer::ToByteSlice;
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{Event, EventType};
use crate::memory::{SharedBlock, UniqueBlock};
use crate::BufferPool;

/// Bytes of one event across the columns.
const ROW_BYTES: usize = 8 + 8 + 8 + 8 + 4 + 1;

/// Where each column starts, in bytes, for a block with room for `cap` events. The
/// 8-byte columns come first, so every column is aligned for its type (the block is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    cap: usize,
}

impl Layout {
    fn ts(self) -> usize {
        0
    }
    fn pos(self) -> usize {
        8 * self.cap
    }
    fn user(self) -> usize {
        16 * self.cap
    }
    fn item(self) -> usize {
        24 * self.cap
    }
    fn weight(self) -> usize {
        32 * self.cap
    }
    fn kind(self) -> usize {
        36 * self.cap
    }
    fn bytes(self) -> usize {
        ROW_BYTES * self.cap
    }
}

/// A batch of events in columns, in one pooled block; cloning shares it.
#[derive(Clone)]
pub struct EventBatch {
    block: SharedBlock,
    layout: Layout,
    len: usize,
}

impl fmt::Debug for EventBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBatch")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PartialEq for EventBatch {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl EventBatch {
    /// Events a full batch holds: as many as fill a 512 KiB pool class with the
    /// block's header (14,168 of 37 bytes). The ingest sends batches of this size and
    /// sources that build batches use its class, so one class of blocks serves them all.
    pub const BATCH_EVENTS: usize = Self::capacity_in(512 << 10);

    /// A batch holding `events`, in a block from `pool`.
    pub fn from_events(events: &[Event], pool: &BufferPool) -> Self {
        Self::from_events_in(events, events.len(), pool)
    }

    /// A batch holding `events` in a block of the size class that `cap` events fill: a
    /// sender whose batches vary in length asks for one capacity, so every block comes
    /// from one size class of the pool and any returned block fits the next batch. The
    /// columns are laid out for `events.len()`, so a short batch writes and zeroes only
    /// its own bytes.
    pub fn from_events_in(events: &[Event], cap: usize, pool: &BufferPool) -> Self {
        let mut b = EventBatchBuilder::with_block(events.len(), Self::block_bytes(cap), pool);
        for e in events {
            b.push(e);
        }
        b.finish()
    }

    /// The bytes a batch with room for `cap` events asks the pool for (its columns and
    /// the block's header).
    pub fn block_bytes(cap: usize) -> usize {
        Layout { cap: cap.max(1) }.bytes() + crate::memory::BLOCK_HEADER
    }

    /// The most events a batch fits in a block of `bytes` (the inverse of
    /// [`block_bytes`](Self::block_bytes)).
    pub const fn capacity_in(bytes: usize) -> usize {
        bytes.saturating_sub(crate::memory::BLOCK_HEADER) / ROW_BYTES
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Event times (ms).
    pub fn ts(&self) -> &[i64] {
        self.block.values(self.layout.ts(), self.len)
    }

    /// Positions in the source.
    pub fn pos(&self) -> &[u64] {
        self.block.values(self.layout.pos(), self.len)
    }

    /// User ids.
    pub fn users(&self) -> &[u64] {
        self.block.values(self.layout.user(), self.len)
    }

    /// Item ids.
    pub fn items(&self) -> &[u64] {
        self.block.values(self.layout.item(), self.len)
    }

    /// Weights.
    pub fn weights(&self) -> &[f32] {
        self.block.values(self.layout.weight(), self.len)
    }

    fn kinds(&self) -> &[u8] {
        self.block.values(self.layout.kind(), self.len)
    }

    /// Whether two batches share one block (clones do).
    pub fn shares_block_with(&self, other: &EventBatch) -> bool {
        self.block.ptr_eq(&other.block)
    }

    /// Holders of this batch's block (its clones, this one included).
    pub fn holders(&self) -> usize {
        self.block.ref_count()
    }

    /// The events, in batch order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Event> + '_ {
        let (ts, pos, users, items, weights, kinds) = (
            self.ts(),
            self.pos(),
            self.users(),
            self.items(),
            self.weights(),
            self.kinds(),
        );
        (0..self.len).map(move |i| Event {
            ts: ts[i],
            pos: pos[i],
            user: users[i],
            item: items[i],
            weight: weights[i],
            kind: EventType::from_code(kinds[i]).unwrap_or(EventType::View),
        })
    }

    /// Appends the events to `out`.
    pub fn extend_into(&self, out: &mut Vec<Event>) {
        out.extend(self.iter());
    }
}

/// Fills an [`EventBatch`] of a fixed capacity.
pub struct EventBatchBuilder {
    block: UniqueBlock,
    layout: Layout,
    len: usize,
}

impl EventBatchBuilder {
    /// A builder with room for `cap` events, in a block from `pool`.
    pub fn new(cap: usize, pool: &BufferPool) -> Self {
        Self::with_block(cap, 0, pool)
    }

    /// A builder with room for `cap` events, in a pooled block of at least `block`
    /// bytes (see [`EventBatch::from_events_in`]).
    pub fn with_block(cap: usize, block: usize, pool: &BufferPool) -> Self {
        let layout = Layout { cap: cap.max(1) };
        // Zeroed once per batch (a memset of ~37 bytes per event), so that every byte
        // the columns expose is initialised even if a batch is finished early.
        let block = pool.unique_block_in(layout.bytes(), block);
        Self {
            block,
            layout,
            len: 0,
        }
    }

    /// Events added so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether another event fits.
    pub fn is_full(&self) -> bool {
        self.len == self.layout.cap
    }

    fn put<T: arrow_buffer::ArrowNativeType + ToByteSlice>(&mut self, offset: usize, value: T) {
        let at = offset + self.len * std::mem::size_of::<T>();
        let slot = &mut self.block.as_mut_slice()[at..at + std::mem::size_of::<T>()];
        slot.copy_from_slice(value.to_byte_slice());
    }

    /// Adds an event (panics when full: check [`is_full`](Self::is_full)).
    #[inline]
    pub fn push(&mut self, e: &Event) {
        assert!(!self.is_full(), "event batch full");
        let l = self.layout;
        self.put(l.ts(), e.ts);
        self.put(l.pos(), e.pos);
        self.put(l.user(), e.user);
        self.put(l.item(), e.item);
        self.put(l.weight(), e.weight);
        self.put(l.kind(), e.kind as u8);
        self.len += 1;
    }

    /// The batch.
    pub fn finish(self) -> EventBatch {
        EventBatch {
            block: self.block.share(),
            layout: self.layout,
            len: self.len,
        }
    }
}

// Between processes: the length, then every column as a sequence (bincode writes each
// value little-endian, so hosts of either byte order agree).
impl Serialize for EventBatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(7)?;
        t.serialize_element(&(self.len as u64))?;
        t.serialize_element(self.ts())?;
        t.serialize_element(self.pos())?;
        t.serialize_element(self.users())?;
        t.serialize_element(self.items())?;
        t.serialize_element(self.weights())?;
        t.serialize_element(self.kinds())?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for EventBatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Batch;
        impl<'de> Visitor<'de> for Batch {
            type Value = EventBatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event batch")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventBatch, A::Error> {
                let missing = || de::Error::custom("event batch cut short");
                let len = seq.next_element::<u64>()?.ok_or_else(missing)? as usize;
                let ts: Vec<i64> = seq.next_element()?.ok_or_else(missing)?;
                let pos: Vec<u64> = seq.next_element()?.ok_or_else(missing)?;
                let users: Vec<u64> = seq.next_element()?.ok_or_else(missing)?;
                let items: Vec<u64> = seq.next_element()?.ok_or_else(missing)?;
                let weights: Vec<f32> = seq.next_element()?.ok_or_else(missing)?;
                let kinds: Vec<u8> = seq.next_element()?.ok_or_else(missing)?;
                if [
                    pos.len(),
                    users.len(),
                    items.len(),
                    weights.len(),
                    kinds.len(),
                ]
                .iter()
                .any(|&n| n != len)
                    || ts.len() != len
                {
                    return Err(de::Error::custom("event batch columns of unequal length"));
                }
                let pool = BufferPool::current();
                let mut b = EventBatchBuilder::new(len, &pool);
                for i in 0..len {
                    b.push(&Event {
                        ts: ts[i],
                        pos: pos[i],
                        user: users[i],
                        item: items[i],
                        weight: weights[i],
                        kind: EventType::from_code(kinds[i])
                            .ok_or_else(|| de::Error::custom("unknown event type code"))?,
                    });
                }
                Ok(b.finish())
            }
        }
        d.deserialize_tuple(7, Batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolConfig;

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                ts: 1_000 + i as i64,
                pos: 10 * i as u64,
                user: i as u64 % 7,
                item: i as u64 % 11,
                weight: i as f32 / 2.0,
                kind: EventType::ALL[i % EventType::ALL.len()],
            })
            .collect()
    }

    #[test]
    fn columns_round_trip_and_clones_share_the_block() {
        let pool = BufferPool::new(PoolConfig::default());
        let e = events(1000);
        let b = EventBatch::from_events(&e, &pool);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.iter().collect::<Vec<_>>(), e);
        assert_eq!(b.iter().nth(999), Some(e[999]));
        let c = b.clone();
        assert_eq!(c.ts().as_ptr(), b.ts().as_ptr(), "a clone shares the block");
        assert!(c.shares_block_with(&b));
        assert_eq!(b.holders(), 2);
        // The block returns to the pool only when the last holder drops it.
        let before = pool.stats();
        drop(b);
        assert_eq!(pool.stats().puts, before.puts);
        drop(c);
        assert_eq!(pool.stats().puts, before.puts + 1);
    }

    #[test]
    fn serialised_batches_are_rebuilt_in_the_current_pool() {
        let pool = BufferPool::new(PoolConfig::default());
        let e = events(300);
        let b = EventBatch::from_events(&e, &pool);
        // Any serde format will do for the shape; timely uses bincode.
        let bytes = serde_json::to_string(&b).unwrap();
        let receiving = BufferPool::new(PoolConfig::default());
        let back = std::thread::scope(|s| {
            s.spawn(|| {
                receiving.install_current();
                let back: EventBatch = serde_json::from_str(&bytes).unwrap();
                back
            })
            .join()
            .unwrap()
        });
        assert_eq!(back, b);
        assert_eq!(receiving.stats().gets, 1, "rebuilt in the receiver's pool");
        let bad = bytes.replacen("[300,", "[301,", 1);
        assert!(serde_json::from_str::<EventBatch>(&bad).is_err());
    }

    #[test]
    fn short_batches_take_the_full_batches_class() {
        let pool = BufferPool::new(PoolConfig::default());
        let e = events(1000);
        let short = EventBatch::from_events_in(&e[..3], 1000, &pool);
        assert_eq!(short.iter().collect::<Vec<_>>(), e[..3]);
        drop(short);
        let full = EventBatch::from_events_in(&e, 1000, &pool);
        assert_eq!(full.iter().collect::<Vec<_>>(), e);
        let s = pool.stats();
        assert_eq!(
            (s.gets, s.misses),
            (2, 1),
            "the short batch's block served the full one"
        );
    }

    #[test]
    fn a_full_builder_says_so() {
        let pool = BufferPool::new(PoolConfig::default());
        let mut b = EventBatchBuilder::new(2, &pool);
        let e = events(2);
        b.push(&e[0]);
        assert!(!b.is_full());
        b.push(&e[1]);
        assert!(b.is_full());
        assert_eq!(b.finish().len(), 2);
    }
}
