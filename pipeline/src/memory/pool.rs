//! A sharded pool of aligned byte blocks that Arrow buffers are built in: Go's
//! `sync.Pool`, done for Arrow.
//!
//! ## Design
//!
//! - **Size classes.** Powers of two between `floor` and `ceiling`. A request is rounded
//!   up to its class; a request above the ceiling (or any request with the pool off) is
//!   allocated exactly, unpooled, and counted. Nothing is ever truncated.
//! - **Shards** (Go's `poolLocal`), one per worker: per class a *private slot* (one block
//!   in an `AtomicPtr`, taken and given back with a single atomic swap) and a *shared
//!   stack* behind a mutex. A worker thread registers its shard once
//!   ([`BufferPool::register_worker`]); a block returned from any thread (an Arrow buffer
//!   dropped wherever its last `RecordBatch` dies) goes to that thread's shard, or to the
//!   block's home shard for unregistered threads.
//! - **A miss** steals from the other shards' shared stacks, starting at a rotating
//!   offset so that thieves spread out, then takes from the victim tier, then allocates.
//! - **Victim tier.** [`BufferPool::rotate`] frees the victim tier and moves every shard's
//!   blocks (private and shared) into it; a block reused before the next rotation comes
//!   back, an idle pool is empty after two rotations, as Go's GC does to `sync.Pool`. The
//!   state-compaction cycle calls it.
//! - **Retention.** Bytes held per class are bounded (`retain_per_class`, split evenly
//!   over the shards' shared stacks); a block returned beyond that is freed and counted
//!   as a drop.
//! - **Reset is the pool's job.** A block handed out is empty by construction (the
//!   builders start at length 0), and with `poison` on, returned memory is overwritten
//!   with [`POISON`] so a use after return reads garbage that tests can see.
//!
//! ## Accounting
//!
//! `gets = hits + misses`, `hits = private + shared + stolen + victim`. Every block the
//! pool allocated is either out (live), held, or was freed: `misses - frees = live +
//! held blocks`, and every return is a `put` (kept) or a `drop` (freed).
//!
//! ## What is pooled
//!
//! Column buffers that tidepool builds itself ([`PooledVec`], [`PooledVec::into_buffer`]);
//! buffers that arrow-rs or parquet allocate internally (decompressed pages, dictionary
//! builders, offsets of string arrays built by arrow's builders) stay theirs.

use std::alloc::Layout;
use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arrow_buffer::{ArrowNativeType, Buffer, ScalarBuffer};
use serde::{Deserialize, Serialize};

/// Alignment of every block: a cache line, which also satisfies every Arrow native type.
pub const ALIGN: usize = 64;
/// The byte poisoned memory is filled with.
pub const POISON: u8 = 0xDE;

/// Default value for [`PoolConfig::floor`].
pub const DEFAULT_FLOOR: usize = 4 << 10;
/// Default value for [`PoolConfig::ceiling`].
pub const DEFAULT_CEILING: usize = 64 << 20;
/// Default value for [`PoolConfig::retain_per_class`].
pub const DEFAULT_RETAIN_PER_CLASS: usize = 256 << 20;

/// `[pool]` settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Off: every request is allocated and freed directly (for comparison).
    pub enabled: bool,
    /// Smallest class in bytes (rounded up to a power of two).
    pub floor: usize,
    /// Largest class in bytes; bigger requests are unpooled.
    pub ceiling: usize,
    /// Shards; 0 means one per worker (set by the job).
    pub shards: usize,
    /// Bytes kept per size class across all shards and the victim tier.
    pub retain_per_class: usize,
    /// Overwrite returned memory with [`POISON`] (on in debug builds by default).
    pub poison: bool,
    /// Blocks of its batch size each reading worker reserves before its first read
    /// (see [`BufferPool::reserve`]); `None` lets the reader size it from its flow
    /// control.
    #[serde(default)]
    pub reserve: Option<usize>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            floor: DEFAULT_FLOOR,
            ceiling: DEFAULT_CEILING,
            shards: 0,
            retain_per_class: DEFAULT_RETAIN_PER_CLASS,
            poison: cfg!(debug_assertions),
            reserve: None,
        }
    }
}

/// Counters of a pool. `hit_rate = hits / (hits + misses)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PoolStats {
    /// Requests for a pooled block.
    pub gets: u64,
    /// Served from the shard's private slot.
    pub hits_private: u64,
    /// Served from the shard's shared stack.
    pub hits_shared: u64,
    /// Served from another shard's shared stack.
    pub hits_stolen: u64,
    /// Served from the victim tier.
    pub hits_victim: u64,
    /// Served by allocating.
    pub misses: u64,
    /// Blocks returned and kept.
    pub puts: u64,
    /// Blocks returned and freed because their class held its retention.
    pub drops: u64,
    /// Blocks freed by rotation (they sat in the victim tier for a whole cycle).
    pub expired: u64,
    /// Requests served outside the pool (above the ceiling, or the pool off).
    pub unpooled: u64,
    /// Blocks allocated ahead of need by [`BufferPool::reserve`] (not gets: a get they
    /// serve counts as a hit).
    pub reserved: u64,
    /// Bytes the pool holds right now.
    pub bytes_held: u64,
    /// Blocks the pool holds right now.
    pub blocks_held: u64,
    /// Hit share of pooled requests.
    pub hit_rate: f64,
}

thread_local! {
    /// The shard of the current thread, set by worker threads.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
    /// The pool of the run this thread works for: where data that arrives without one
    /// (a batch deserialised from another process) is rebuilt.
    static CURRENT: std::cell::RefCell<Option<BufferPool>> = const { std::cell::RefCell::new(None) };
}

/// The pool of threads that never installed one (tests, tools): pooled all the same.
static FALLBACK: std::sync::OnceLock<BufferPool> = std::sync::OnceLock::new();

/// A block owned by the pool or by whoever got it. Its size is its class's. It has no
/// `Drop`: a block is always either in the pool, in a [`PooledVec`] or Arrow buffer (whose
/// drop returns it), or explicitly freed.
struct Block(NonNull<u8>);

// SAFETY: a Block is a uniquely owned heap allocation (like a Box<[u8]>); nothing else
// aliases it while it sits in the pool, so moving it between threads is sound.
unsafe impl Send for Block {}

/// Per-shard counters, padded so shards do not share cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Counters {
    hits_private: AtomicU64,
    hits_shared: AtomicU64,
    hits_stolen: AtomicU64,
    hits_victim: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    drops: AtomicU64,
    expired: AtomicU64,
    unpooled: AtomicU64,
    reserved: AtomicU64,
}

impl Counters {
    #[inline]
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shard {
    /// One block per class, or null. Swapped atomically so any thread may use it.
    private: Box<[AtomicPtr<u8>]>,
    shared: Box<[Mutex<Vec<Block>>]>,
    /// Bytes in `shared`, per class; read before locking so empty stacks are skipped.
    /// Kept per shard so that threads working on their own shards share no counters.
    held: Box<[AtomicUsize]>,
    counters: Counters,
}

struct PoolInner {
    cfg: PoolConfig,
    floor_shift: u32,
    classes: usize,
    shards: Box<[Shard]>,
    victim: Box<[Mutex<Vec<Block>>]>,
    /// Bytes in the victim tier, per class.
    victim_held: Box<[AtomicUsize]>,
    steal_from: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a stack lock leaves a valid Vec; keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PoolInner {
    #[inline]
    fn class_size(&self, class: usize) -> usize {
        1usize << (self.floor_shift as usize + class)
    }

    fn layout(size: usize) -> Layout {
        // Sizes are at most the ceiling or a caller's request: a failure is an overflow of
        // isize, which `alloc` could not serve anyway.
        Layout::from_size_align(size.max(1), ALIGN)
            .unwrap_or_else(|_| panic!("allocation of {size} bytes exceeds isize::MAX"))
    }

    fn allocate(size: usize) -> NonNull<u8> {
        let layout = Self::layout(size);
        // SAFETY: the layout has a non-zero size (`max(1)`) and a valid alignment.
        let ptr = unsafe { std::alloc::alloc(layout) };
        NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    }

    /// # Safety
    /// `ptr` must come from [`PoolInner::allocate`] with the same `size`, and must not be
    /// used afterwards.
    unsafe fn free(ptr: NonNull<u8>, size: usize) {
        // SAFETY: by the caller's contract the pointer was allocated with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), Self::layout(size)) }
    }

    fn shard_index(&self, home: usize) -> usize {
        SHARD.with(|s| s.get()).unwrap_or(home) % self.shards.len()
    }

    fn class_of(&self, size: usize) -> Option<usize> {
        if !self.cfg.enabled || size > self.cfg.ceiling {
            return None;
        }
        let bits = size.max(1).next_power_of_two().trailing_zeros();
        Some(bits.saturating_sub(self.floor_shift) as usize)
    }

    fn get(&self, class: usize, shard: usize) -> Block {
        let size = self.class_size(class);
        let me = &self.shards[shard];
        // The fast path is one atomic swap and one counter.
        if let Some(p) =
            NonNull::new(me.private[class].swap(std::ptr::null_mut(), Ordering::Acquire))
        {
            Counters::bump(&me.counters.hits_private);
            return Block(p);
        }
        let pop = |stack: &Mutex<Vec<Block>>, held: &AtomicUsize| {
            if held.load(Ordering::Relaxed) < size {
                return None;
            }
            let block = lock(stack).pop()?;
            held.fetch_sub(size, Ordering::Relaxed);
            Some(block)
        };
        if let Some(block) = pop(&me.shared[class], &me.held[class]) {
            Counters::bump(&me.counters.hits_shared);
            return block;
        }
        let n = self.shards.len();
        if n > 1 {
            let start = self.steal_from.fetch_add(1, Ordering::Relaxed);
            let stolen = (0..n)
                .map(|i| (start + i) % n)
                .filter(|&s| s != shard)
                .find_map(|s| pop(&self.shards[s].shared[class], &self.shards[s].held[class]));
            if let Some(block) = stolen {
                Counters::bump(&me.counters.hits_stolen);
                return block;
            }
        }
        if let Some(block) = pop(&self.victim[class], &self.victim_held[class]) {
            Counters::bump(&me.counters.hits_victim);
            return block;
        }
        Counters::bump(&me.counters.misses);
        Block(Self::allocate(size))
    }

    fn put(&self, block: Block, class: usize, shard: usize) {
        let size = self.class_size(class);
        let me = &self.shards[shard];
        if self.cfg.poison {
            // SAFETY: the block is `size` bytes, owned by us, and no longer referenced by
            // the caller (it is being returned).
            unsafe { std::ptr::write_bytes(block.0.as_ptr(), POISON, size) };
        }
        if me.private[class]
            .compare_exchange(
                std::ptr::null_mut(),
                block.0.as_ptr(),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            Counters::bump(&me.counters.puts);
            return;
        }
        // Retention is split evenly over the shards, so the check reads one counter.
        let limit = self.cfg.retain_per_class / self.shards.len();
        if me.held[class].load(Ordering::Relaxed) + size > limit {
            Counters::bump(&me.counters.drops);
            // SAFETY: pooled blocks of this class were allocated with `size` bytes.
            unsafe { Self::free(block.0, size) };
            return;
        }
        // Counted before it is pushed, as takers subtract after they pop: the count never
        // falls below the bytes on the stack, so it cannot wrap below zero when a taker
        // pops the block between the push and the count.
        me.held[class].fetch_add(size, Ordering::Relaxed);
        lock(&me.shared[class]).push(block);
        Counters::bump(&me.counters.puts);
    }

    fn rotate(&self) {
        for class in 0..self.classes {
            let size = self.class_size(class);
            let old = std::mem::take(&mut *lock(&self.victim[class]));
            self.victim_held[class].fetch_sub(old.len() * size, Ordering::Relaxed);
            self.shards[0]
                .counters
                .expired
                .fetch_add(old.len() as u64, Ordering::Relaxed);
            for block in old {
                // SAFETY: victim blocks of this class were allocated with `size` bytes.
                unsafe { Self::free(block.0, size) };
            }
            let mut moved = Vec::new();
            for shard in self.shards.iter() {
                if let Some(p) =
                    NonNull::new(shard.private[class].swap(std::ptr::null_mut(), Ordering::Acquire))
                {
                    moved.push(Block(p));
                }
                let mut shared = lock(&shard.shared[class]);
                shard.held[class].fetch_sub(shared.len() * size, Ordering::Relaxed);
                moved.append(&mut shared);
            }
            self.victim_held[class].fetch_add(moved.len() * size, Ordering::Relaxed);
            lock(&self.victim[class]).append(&mut moved);
        }
    }

    /// Bytes and blocks held right now.
    fn held(&self) -> (u64, u64) {
        let (mut bytes, mut blocks) = (0u64, 0u64);
        for class in 0..self.classes {
            let size = self.class_size(class) as u64;
            let mut class_bytes = self.victim_held[class].load(Ordering::Relaxed) as u64;
            for shard in self.shards.iter() {
                class_bytes += shard.held[class].load(Ordering::Relaxed) as u64;
                if !shard.private[class].load(Ordering::Relaxed).is_null() {
                    class_bytes += size;
                }
            }
            bytes += class_bytes;
            blocks += class_bytes / size;
        }
        (bytes, blocks)
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Everything still held is freed; blocks out in buffers keep the pool alive (they
        // hold an `Arc`), so none is out now.
        for class in 0..self.classes {
            let size = self.class_size(class);
            for shard in self.shards.iter() {
                if let Some(p) =
                    NonNull::new(shard.private[class].swap(std::ptr::null_mut(), Ordering::Acquire))
                {
                    // SAFETY: a private block of this class, owned by the pool.
                    unsafe { Self::free(p, size) };
                }
                for block in lock(&shard.shared[class]).drain(..) {
                    // SAFETY: as above, a shared block of this class.
                    unsafe { Self::free(block.0, size) };
                }
            }
            for block in lock(&self.victim[class]).drain(..) {
                // SAFETY: as above, a victim block of this class.
                unsafe { Self::free(block.0, size) };
            }
        }
    }
}

/// A sharded pool of aligned byte blocks. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("config", &self.inner.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl BufferPool {
    /// A pool with `cfg`; `cfg.shards == 0` means one shard.
    pub fn new(cfg: PoolConfig) -> Self {
        let floor = cfg.floor.max(ALIGN).next_power_of_two();
        let ceiling = cfg.ceiling.max(floor).next_power_of_two();
        let floor_shift = floor.trailing_zeros();
        let classes = (ceiling.trailing_zeros() - floor_shift + 1) as usize;
        let cfg = PoolConfig {
            floor,
            ceiling,
            shards: cfg.shards.max(1),
            ..cfg
        };
        let shards = (0..cfg.shards)
            .map(|_| Shard {
                private: (0..classes)
                    .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                    .collect(),
                shared: (0..classes).map(|_| Mutex::new(Vec::new())).collect(),
                held: (0..classes).map(|_| AtomicUsize::new(0)).collect(),
                counters: Counters::default(),
            })
            .collect();
        Self {
            inner: Arc::new(PoolInner {
                floor_shift,
                classes,
                shards,
                victim: (0..classes).map(|_| Mutex::new(Vec::new())).collect(),
                victim_held: (0..classes).map(|_| AtomicUsize::new(0)).collect(),
                steal_from: AtomicUsize::new(0),
                cfg,
            }),
        }
    }

    /// The configuration in effect (floor and ceiling rounded to powers of two).
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Makes the calling thread use shard `index` (modulo the shard count).
    pub fn register_worker(index: usize) {
        SHARD.with(|s| s.set(Some(index)));
    }

    /// Makes this pool the calling thread's [`current`](Self::current) one.
    pub fn install_current(&self) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// The pool the calling thread installed, or a process-wide default one.
    pub fn current() -> BufferPool {
        CURRENT.with(|c| c.borrow().clone()).unwrap_or_else(|| {
            FALLBACK
                .get_or_init(|| Self::new(PoolConfig::default()))
                .clone()
        })
    }

    /// An empty vector of `T` with room for at least `capacity` values.
    pub fn vec<T: ArrowNativeType>(&self, capacity: usize) -> PooledVec<'_, T> {
        PooledVec::with_capacity(self, capacity)
    }

    /// Allocates up to `blocks` blocks of the class that serves `bytes` and lays them in
    /// the calling thread's shard, as far as the class's retention allows; returns how
    /// many. A producer whose blocks in flight are bounded (the ingest, by its flow
    /// control) reserves that bound before its first batch: the allocations a cold pool
    /// would make one miss at a time, the first time each block of the peak is needed,
    /// are made once up front, and the run's gets find recycled blocks from the start.
    /// Blocks it reserves beyond the need expire with the victim tier like any other.
    pub fn reserve(&self, bytes: usize, blocks: usize) -> usize {
        let inner = &self.inner;
        let Some(class) = inner.class_of(bytes) else {
            return 0;
        };
        let size = inner.class_size(class);
        let shard = inner.shard_index(0);
        let me = &inner.shards[shard];
        let limit = inner.cfg.retain_per_class / inner.shards.len();
        let mut laid = 0;
        while laid < blocks && me.held[class].load(Ordering::Relaxed) + size <= limit {
            // Counted before it is pushed, as in `put`.
            me.held[class].fetch_add(size, Ordering::Relaxed);
            lock(&me.shared[class]).push(Block(PoolInner::allocate(size)));
            laid += 1;
        }
        me.counters
            .reserved
            .fetch_add(laid as u64, Ordering::Relaxed);
        laid
    }

    /// Moves every held block into the victim tier and frees the previous victim tier.
    pub fn rotate(&self) {
        self.inner.rotate();
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let mut s = PoolStats::default();
        for shard in self.inner.shards.iter() {
            let c = &shard.counters;
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.hits_private += get(&c.hits_private);
            s.hits_shared += get(&c.hits_shared);
            s.hits_stolen += get(&c.hits_stolen);
            s.hits_victim += get(&c.hits_victim);
            s.misses += get(&c.misses);
            s.puts += get(&c.puts);
            s.drops += get(&c.drops);
            s.expired += get(&c.expired);
            s.unpooled += get(&c.unpooled);
            s.reserved += get(&c.reserved);
        }
        (s.bytes_held, s.blocks_held) = self.inner.held();
        let hits = s.hits_private + s.hits_shared + s.hits_stolen + s.hits_victim;
        s.gets = hits + s.misses;
        s.hit_rate = if hits + s.misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + s.misses) as f64
        };
        s
    }

    /// A block of at least `bytes` bytes: `(pointer, capacity, class)`; class `None` means
    /// unpooled (allocated with exactly `capacity` bytes).
    fn acquire(&self, bytes: usize) -> (NonNull<u8>, usize, Option<usize>) {
        let inner = &self.inner;
        match inner.class_of(bytes) {
            Some(class) => {
                let shard = inner.shard_index(0);
                let Block(ptr) = inner.get(class, shard);
                (ptr, inner.class_size(class), Some(class))
            }
            None => {
                let shard = inner.shard_index(0);
                Counters::bump(&inner.shards[shard].counters.unpooled);
                let size = bytes.max(1);
                (PoolInner::allocate(size), size, None)
            }
        }
    }

    /// # Safety
    /// `ptr`, `capacity` and `class` must come from one call of [`BufferPool::acquire`] on
    /// this pool, and the memory must not be used afterwards.
    unsafe fn release(&self, ptr: NonNull<u8>, capacity: usize, class: Option<usize>) {
        match class {
            Some(class) => {
                let shard = self.inner.shard_index(0);
                self.inner.put(Block(ptr), class, shard);
            }
            // SAFETY: unpooled blocks are allocated with exactly `capacity` bytes.
            None => unsafe { PoolInner::free(ptr, capacity) },
        }
    }
}

/// The owner Arrow holds for a pooled buffer: dropping the last clone of the buffer (or
/// of any array or `RecordBatch` built on it) returns the block to the pool, from
/// whichever thread drops it.
struct PooledAllocation {
    pool: BufferPool,
    ptr: NonNull<u8>,
    capacity: usize,
    class: Option<usize>,
}

// SAFETY: the allocation owns its block exclusively (Arrow only reads through `Bytes`,
// which it shares immutably); returning it goes through the pool's atomics and mutexes.
unsafe impl Send for PooledAllocation {}
// SAFETY: as above; `&PooledAllocation` gives no access to the memory at all.
unsafe impl Sync for PooledAllocation {}
impl std::panic::RefUnwindSafe for PooledAllocation {}

impl Drop for PooledAllocation {
    fn drop(&mut self) {
        // SAFETY: the block came from `acquire` on this pool and Arrow, which held it, has
        // dropped its last reference (this owner is dropped only then).
        unsafe { self.pool.release(self.ptr, self.capacity, self.class) };
    }
}

/// A growable vector of Arrow native values in a pooled block: build a column, then turn it
/// into an Arrow buffer with [`PooledVec::into_buffer`] or [`PooledVec::into_scalar`].
///
/// It borrows the pool rather than cloning its `Arc`, which keeps two atomic reference
/// count updates off every get+put; the `Arc` is cloned only into an Arrow buffer's owner.
pub struct PooledVec<'p, T: ArrowNativeType> {
    pool: &'p BufferPool,
    ptr: NonNull<u8>,
    capacity: usize,
    class: Option<usize>,
    len: usize,
    _type: PhantomData<T>,
}

// SAFETY: a PooledVec uniquely owns its block, like a Vec<T> with T: Send, and the pool
// it borrows is Sync.
unsafe impl<T: ArrowNativeType> Send for PooledVec<'_, T> {}

impl<'p, T: ArrowNativeType> PooledVec<'p, T> {
    fn with_capacity(pool: &'p BufferPool, capacity: usize) -> Self {
        let bytes = capacity.saturating_mul(std::mem::size_of::<T>());
        let (ptr, capacity, class) = pool.acquire(bytes);
        Self {
            pool,
            ptr,
            capacity,
            class,
            len: 0,
            _type: PhantomData,
        }
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values that fit without growing.
    pub fn capacity(&self) -> usize {
        self.capacity / std::mem::size_of::<T>()
    }

    #[cold]
    fn grow(&mut self, needed: usize) {
        let want = needed.max(self.capacity() * 2).max(8);
        let mut bigger = Self::with_capacity(self.pool, want);
        // SAFETY: both blocks are valid for their capacities, do not overlap, and the
        // first `len` values of `self` are initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr(),
                bigger.ptr.as_ptr(),
                self.len * std::mem::size_of::<T>(),
            )
        };
        bigger.len = self.len;
        std::mem::swap(self, &mut bigger);
    }

    /// Appends a value.
    #[inline]
    pub fn push(&mut self, value: T) {
        if self.len == self.capacity() {
            self.grow(self.len + 1);
        }
        // SAFETY: `len < capacity`, the block is aligned to 64 bytes (enough for any
        // native type) and valid for `capacity` bytes.
        unsafe { (self.ptr.as_ptr() as *mut T).add(self.len).write(value) };
        self.len += 1;
    }

    /// Appends values.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        if self.len + values.len() > self.capacity() {
            self.grow(self.len + values.len());
        }
        // SAFETY: there is room for `values.len()` more values (checked above) and the
        // source slice cannot overlap a block we own exclusively.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                (self.ptr.as_ptr() as *mut T).add(self.len),
                values.len(),
            )
        };
        self.len += values.len();
    }

    /// Grows to `len` values, the new ones zero (all-zero bytes are a valid value of
    /// every Arrow native type).
    pub fn resize_zeroed(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        if len > self.capacity() {
            self.grow(len);
        }
        // SAFETY: there is room for `len` values (grown above); the bytes written lie
        // inside the block, past the initialised ones.
        unsafe {
            std::ptr::write_bytes(
                (self.ptr.as_ptr() as *mut T).add(self.len),
                0,
                len - self.len,
            )
        };
        self.len = len;
    }

    /// The values stored, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: the first `len` values are initialised, the block is aligned, and the
        // vector owns it exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut T, self.len) }
    }

    /// The values stored.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the first `len` values are initialised and the block is aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const T, self.len) }
    }

    /// An immutable Arrow buffer over the values; the block returns to the pool when the
    /// last reference to the buffer drops.
    pub fn into_buffer(self) -> Buffer {
        let this = std::mem::ManuallyDrop::new(self);
        let pool = this.pool.clone();
        let len = this.len * std::mem::size_of::<T>();
        let owner = Arc::new(PooledAllocation {
            pool,
            ptr: this.ptr,
            capacity: this.capacity,
            class: this.class,
        });
        // SAFETY: the pointer is valid for `capacity >= len` bytes, of which `len` are
        // initialised; `owner` keeps the block alive and returns it when Arrow drops it.
        unsafe { Buffer::from_custom_allocation(this.ptr, len, owner) }
    }

    /// The values as an Arrow `ScalarBuffer<T>`.
    pub fn into_scalar(self) -> ScalarBuffer<T> {
        let len = self.len;
        ScalarBuffer::new(self.into_buffer(), 0, len)
    }
}

impl<T: ArrowNativeType> Drop for PooledVec<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the block came from `acquire` on this pool and is not used again.
        unsafe { self.pool.release(self.ptr, self.capacity, self.class) };
    }
}

mod shared;
pub use shared::{SharedBlock, UniqueBlock, HEADER};

#[cfg(test)]
mod tests;
