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
//! One block rather than one per column: a batch then costs one pool get and the two
//! small allocations of an Arrow buffer's owner, whatever its length, which is what
//! keeps the event path near zero allocator calls per event.

use std::fmt;

use arrow_buffer::{Buffer, ScalarBuffer, ToByteSlice};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{Event, EventType};
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
    // Typed views of the one block (each holds a reference to it).
    ts: ScalarBuffer<i64>,
    pos: ScalarBuffer<u64>,
    users: ScalarBuffer<u64>,
    items: ScalarBuffer<u64>,
    weights: ScalarBuffer<f32>,
    kinds: ScalarBuffer<u8>,
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
    /// A batch holding `events`, in a block from `pool`.
    pub fn from_events(events: &[Event], pool: &BufferPool) -> Self {
        Self::from_events_in(events, events.len(), pool)
    }

    /// A batch holding `events` in a block with room for `cap` of them (at least
    /// `events.len()`): a sender whose batches vary in length asks for one capacity, so
    /// every block comes from one size class of the pool and any returned block fits the
    /// next batch.
    pub fn from_events_in(events: &[Event], cap: usize, pool: &BufferPool) -> Self {
        let mut b = EventBatchBuilder::new(cap.max(events.len()), pool);
        for e in events {
            b.push(e);
        }
        b.finish()
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
        &self.ts
    }

    /// Positions in the source.
    pub fn pos(&self) -> &[u64] {
        &self.pos
    }

    /// User ids.
    pub fn users(&self) -> &[u64] {
        &self.users
    }

    /// Item ids.
    pub fn items(&self) -> &[u64] {
        &self.items
    }

    /// Weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    fn kinds(&self) -> &[u8] {
        &self.kinds
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
pub struct EventBatchBuilder<'p> {
    block: crate::PooledVec<'p, u8>,
    layout: Layout,
    len: usize,
}

impl<'p> EventBatchBuilder<'p> {
    /// A builder with room for `cap` events, in a block from `pool`.
    pub fn new(cap: usize, pool: &'p BufferPool) -> Self {
        let layout = Layout { cap: cap.max(1) };
        let mut block = pool.vec::<u8>(layout.bytes());
        // Zeroed once per batch (a memset of ~37 bytes per event), so that every byte
        // the columns expose is initialised even if a batch is finished early.
        block.resize_zeroed(layout.bytes());
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
        let (l, len) = (self.layout, self.len);
        let block: Buffer = self.block.into_buffer();
        // Offsets in values of each column's type (the layout's are in bytes).
        EventBatch {
            ts: ScalarBuffer::new(block.clone(), l.ts() / 8, len),
            pos: ScalarBuffer::new(block.clone(), l.pos() / 8, len),
            users: ScalarBuffer::new(block.clone(), l.user() / 8, len),
            items: ScalarBuffer::new(block.clone(), l.item() / 8, len),
            weights: ScalarBuffer::new(block.clone(), l.weight() / 4, len),
            kinds: ScalarBuffer::new(block, l.kind(), len),
            len,
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
