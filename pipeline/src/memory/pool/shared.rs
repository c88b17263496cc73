//! Pooled blocks shared by a reference count kept in the block itself.
//!
//! An Arrow buffer over a pooled block costs two allocator calls whatever its length
//! (the owner that returns the block, and Arrow's `Bytes` around it); on an edge that
//! carries a batch per few thousand events those two calls are most of what the event
//! path allocates. A [`SharedBlock`] keeps its count, its pool and its class in a header
//! at the start of the block, so building, cloning and dropping one allocate nothing
//! once the pool is warm: a clone is one atomic increment, and the last drop returns
//! the block to the shard of the thread that drops it.

use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};

use arrow_buffer::ArrowNativeType;

use super::{BufferPool, ALIGN};

/// The header at the start of every shared block; the payload follows at [`HEADER`]
/// bytes, so it keeps the block's 64-byte alignment.
#[repr(C)]
struct Header {
    refs: AtomicUsize,
    /// Whose block this is; taken out by the last drop.
    pool: ManuallyDrop<BufferPool>,
    /// The block as the pool handed it out.
    capacity: usize,
    class: Option<usize>,
    /// Payload bytes.
    len: usize,
}

/// Bytes before the payload.
pub const HEADER: usize = ALIGN;
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER);

/// A block being filled: the only reference to it, so its payload may be written.
pub struct UniqueBlock(SharedBlock);

/// An immutable pooled block shared by reference count (see the module docs).
pub struct SharedBlock {
    header: NonNull<Header>,
}

// SAFETY: a SharedBlock is an immutable shared allocation, like `Arc<[u8]>`: its payload
// is only read through `&self`, its count is atomic, and the last holder (on whatever
// thread) returns it through the pool's own thread-safe paths.
unsafe impl Send for SharedBlock {}
// SAFETY: as above; `&SharedBlock` only reads the payload and the header's fixed fields.
unsafe impl Sync for SharedBlock {}

impl BufferPool {
    /// A zeroed block with room for `len` payload bytes from this pool (the header comes
    /// on top: ask for a class's size less [`HEADER`] to fill the class exactly).
    pub fn unique_block(&self, len: usize) -> UniqueBlock {
        self.unique_block_in(len, 0)
    }

    /// [`unique_block`](Self::unique_block) from a block of at least `block` bytes: a
    /// producer whose payloads vary takes them all from one size class, so any block
    /// returned fits its next payload. Only the payload is zeroed.
    pub fn unique_block_in(&self, len: usize, block: usize) -> UniqueBlock {
        let (ptr, capacity, class) = self.acquire(len.saturating_add(HEADER).max(block));
        let header = ptr.cast::<Header>();
        // SAFETY: the block is at least HEADER bytes, aligned to 64 (enough for the
        // header), and ours alone; the header is written before anything reads it, and
        // the payload is zeroed so every byte a reader sees is initialised.
        unsafe {
            header.as_ptr().write(Header {
                refs: AtomicUsize::new(1),
                pool: ManuallyDrop::new(self.clone()),
                capacity,
                class,
                len,
            });
            std::ptr::write_bytes(ptr.as_ptr().add(HEADER), 0, len);
        }
        UniqueBlock(SharedBlock { header })
    }
}

impl SharedBlock {
    fn header(&self) -> &Header {
        // SAFETY: the header was written when the block was made and lives until the
        // last reference drops; this is a reference.
        unsafe { self.header.as_ref() }
    }

    /// The payload.
    pub fn as_slice(&self) -> &[u8] {
        let len = self.header().len;
        // SAFETY: the payload is `len` initialised bytes after the header, kept alive
        // by this reference and never written while shared.
        unsafe { std::slice::from_raw_parts(self.header.as_ptr().cast::<u8>().add(HEADER), len) }
    }

    /// `len` values of `T` from `offset` bytes into the payload: a column of a block
    /// that holds several. Panics if they overrun the payload or `offset` is not aligned
    /// for `T` (a layout bug, not input).
    pub fn values<T: ArrowNativeType>(&self, offset: usize, len: usize) -> &[T] {
        let bytes = &self.as_slice()[offset..offset + len * std::mem::size_of::<T>()];
        assert_eq!(
            bytes.as_ptr().align_offset(std::mem::align_of::<T>()),
            0,
            "column misaligned"
        );
        // SAFETY: the bytes lie inside the initialised payload (the slice above is
        // bounds-checked) and are aligned for `T` (checked); Arrow's native types are
        // plain numbers, valid for any bit pattern.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), len) }
    }

    /// Whether two references share one block.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.header == other.header
    }

    /// References to this block.
    pub fn ref_count(&self) -> usize {
        self.header().refs.load(Ordering::Acquire)
    }
}

impl Clone for SharedBlock {
    fn clone(&self) -> Self {
        // Relaxed as in `Arc::clone`: the new reference comes from an existing one,
        // which keeps the block alive meanwhile.
        let old = self.header().refs.fetch_add(1, Ordering::Relaxed);
        // A count this high means clones leak (mem::forget in a loop): stop before the
        // count can wrap and free a block still in use.
        if old > isize::MAX as usize {
            std::process::abort();
        }
        Self {
            header: self.header,
        }
    }
}

impl Drop for SharedBlock {
    fn drop(&mut self) {
        if self.header().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other holder's reads happen before the block is reused (as in `Arc`).
        fence(Ordering::Acquire);
        let ptr = self.header.cast::<u8>();
        // SAFETY: this was the last reference: nothing else reads the header or payload.
        // The pool handle is moved out before the block goes back (the pool may poison
        // or hand out the block at once), and the block came from `acquire` on that
        // pool with this capacity and class.
        unsafe {
            let h = self.header.as_ptr();
            let pool = ManuallyDrop::take(&mut (*h).pool);
            let (capacity, class) = ((*h).capacity, (*h).class);
            pool.release(ptr, capacity, class);
        }
    }
}

impl UniqueBlock {
    /// The payload, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.0.header().len;
        // SAFETY: as in `SharedBlock::as_slice`, and this is the only reference (a
        // UniqueBlock is never cloned), so writing cannot race with a reader.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.header.as_ptr().cast::<u8>().add(HEADER), len)
        }
    }

    /// The payload.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// The block, now read-only and shareable.
    pub fn share(self) -> SharedBlock {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolConfig;

    #[test]
    fn the_last_reference_returns_the_block_on_any_thread() {
        let pool = BufferPool::new(PoolConfig {
            shards: 2,
            poison: false,
            ..PoolConfig::default()
        });
        BufferPool::register_worker(0);
        let mut block = pool.unique_block(4096 - HEADER);
        assert!(block.as_slice().iter().all(|&b| b == 0), "zeroed");
        block.as_mut_slice()[..3].copy_from_slice(&[1, 2, 3]);
        let shared = block.share();
        let other = shared.clone();
        assert!(shared.ptr_eq(&other));
        assert_eq!(other.ref_count(), 2);
        assert_eq!(pool.stats().misses, 1);
        drop(shared);
        assert_eq!(pool.stats().puts, 0, "still held");
        std::thread::spawn(move || {
            BufferPool::register_worker(1);
            assert_eq!(&other.as_slice()[..3], &[1, 2, 3]);
        })
        .join()
        .unwrap();
        let s = pool.stats();
        assert_eq!(
            (s.puts, s.bytes_held),
            (1, 4096),
            "one 4 KiB class block: {s:?}"
        );
    }

    #[test]
    fn a_block_beyond_the_ceiling_is_unpooled_and_freed() {
        let pool = BufferPool::new(PoolConfig {
            ceiling: 1 << 16,
            ..PoolConfig::default()
        });
        let block = pool.unique_block(1 << 17).share();
        assert_eq!(block.as_slice().len(), 1 << 17);
        drop(block);
        let s = pool.stats();
        assert_eq!((s.unpooled, s.gets, s.bytes_held), (1, 0, 0));
    }
}
