//! Measuring the live heap: a counting global allocator.
//!
//! The GC trigger needs the live heap *measured*, not estimated. A binary installs
//! [`CountingAllocator`] as its `#[global_allocator]`; it forwards every call to the
//! system allocator and keeps the bytes currently allocated in one relaxed atomic, and
//! the allocator calls made (allocations and reallocations) in another, which is what
//! `allocs_per_event` is measured from. tidepool's per-event path allocates nothing, so
//! the counters' cost is paid per batch and per state growth, not per event.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);

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
        CALLS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
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
            // One call, counted once (by `add`).
            REALLOCS.fetch_add(1, Ordering::Relaxed);
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

/// Allocator calls (allocations and reallocations) made so far through
/// [`CountingAllocator`], or `None` when it is not the global allocator.
pub fn alloc_calls() -> Option<u64> {
    (INSTALLED.load(Ordering::Relaxed) == 1).then(|| CALLS.load(Ordering::Relaxed))
}

/// Allocator calls per event over a stretch of a run: sampled by whoever watches the run,
/// from the first sample past the warm-up to the last sample at which events were still
/// being processed (so start-up and the final report are left out).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AllocWindow {
    /// Events processed inside the window.
    pub events: u64,
    /// Allocator calls inside the window (every thread of the process).
    pub allocs: u64,
    /// Of which reallocations (a growing vector).
    pub reallocs: u64,
    /// Bytes requested inside the window.
    pub bytes: u64,
}

impl AllocWindow {
    /// Allocator calls per event.
    pub fn per_event(&self) -> f64 {
        self.allocs as f64 / self.events.max(1) as f64
    }
}

/// Watches a run's event counter and the allocator, for [`AllocWindow`].
#[derive(Debug)]
pub struct AllocMeter {
    warm_up: u64,
    start: Option<(u64, u64, u64, u64)>,
    last: Option<(u64, u64, u64, u64)>,
}

impl AllocMeter {
    /// A meter whose window opens once `warm_up` events have been processed.
    pub fn new(warm_up: u64) -> Self {
        Self {
            warm_up,
            start: None,
            last: None,
        }
    }

    /// One sample: `processed` events so far.
    pub fn sample(&mut self, processed: u64) {
        let (Some(calls), Some(_)) = (alloc_calls(), heap_live()) else {
            return;
        };
        let now = (
            processed,
            calls,
            BYTES.load(Ordering::Relaxed),
            REALLOCS.load(Ordering::Relaxed),
        );
        match self.start {
            None if processed >= self.warm_up => self.start = Some(now),
            Some(_) if self.last.is_none_or(|l| processed > l.0) => self.last = Some(now),
            _ => {}
        }
    }

    /// The window, if it holds any events.
    pub fn window(&self) -> Option<AllocWindow> {
        let (start, last) = (self.start?, self.last?);
        (last.0 > start.0).then(|| AllocWindow {
            events: last.0 - start.0,
            allocs: last.1 - start.1,
            bytes: last.2 - start.2,
            reallocs: last.3 - start.3,
        })
    }
}
