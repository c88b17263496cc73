//! Measuring the live heap: a counting global allocator.
//!
//! The GC trigger needs the live heap *measured*, not estimated. A binary installs
//! [`CountingAllocator`] as its `#[global_allocator]`; it forwards every call to the
//! system allocator and keeps the bytes currently allocated in one relaxed atomic.
//! tidepool's per-event path allocates nothing, so the counter's cost is paid per batch
//! and per state growth, not per event.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting live bytes.
#[derive(Debug, Default)]
pub struct CountingAllocator;

impl CountingAllocator {
    /// A counting allocator (for `#[global_allocator] static A: CountingAllocator = ...`).
    pub const fn new() -> Self {
        CountingAllocator
    }

    #[inline]
    fn add(bytes: usize) {
        INSTALLED.store(1, Ordering::Relaxed);
        let live = LIVE.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        if live as u64 > PEAK.load(Ordering::Relaxed) {
            PEAK.store(live as u64, Ordering::Relaxed);
        }
    }

    #[inline]
    fn sub(bytes: usize) {
        LIVE.fetch_sub(bytes as i64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator with the caller's
// layout; the counters are relaxed atomics with no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (hence by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        Self::sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is valid by the caller's contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            Self::sub(layout.size());
            Self::add(new_size);
        }
        new
    }
}

/// Bytes currently allocated through [`CountingAllocator`], or `None` when it is not the
/// global allocator of this process (nothing was counted yet).
pub fn heap_live() -> Option<u64> {
    (INSTALLED.load(Ordering::Relaxed) == 1).then(|| LIVE.load(Ordering::Relaxed).max(0) as u64)
}

/// The highest live heap seen so far (approximate under concurrent allocation).
pub fn heap_peak() -> Option<u64> {
    (INSTALLED.load(Ordering::Relaxed) == 1).then(|| PEAK.load(Ordering::Relaxed))
}
