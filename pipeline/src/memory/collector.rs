//! The process's GC controller: owns the trigger state, the run-time settings, the cycle
//! bookkeeping, the trace lines and the counters.
//!
//! A cycle is *decided* here and *carried out* by the workers: the dataflow's driver asks
//! [`GcController::poll`] between batches, and when it returns a [`CycleTicket`] the
//! driver stamps a compaction command into the dataflow so every worker compacts at the
//! same logical time (their item replicas must stay identical). Each worker reports what
//! it freed with [`GcController::report`]; the last report closes the cycle: the heap is
//! measured again, the pool's victim tier rotates, the trigger re-marks, a trace line is
//! printed if asked for, and the counters move.
//!
//! Everything here is shared across threads behind one mutex: it is touched a few
//! times per batch, never per event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use super::gc::{GcConfig, GcState, TriggerKind};
use super::heap::heap_live;
use super::BufferPool;

/// Bytes freed by a cycle, by state owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Freed {
    /// User interaction histories evicted past retention.
    pub history: u64,
    /// Embedding rows (with optimiser state) expired past their TTL.
    pub embeddings: u64,
    /// Differential trace updates compacted away.
    pub traces: u64,
    /// Buffer-pool blocks freed by the victim rotation.
    pub pool: u64,
    /// `itemknn` co-occurrence state: faded entries, expired items' lists, idle users'
    /// recent sequences, surplus capacity.
    pub cooccurrence: u64,
}

impl Freed {
    /// Adds another report.
    pub fn merge(&mut self, other: &Freed) {
        self.history += other.history;
        self.embeddings += other.embeddings;
        self.traces += other.traces;
        self.pool += other.pool;
        self.cooccurrence += other.cooccurrence;
    }

    /// Sum over owners.
    pub fn total(&self) -> u64 {
        self.history + self.embeddings + self.traces + self.pool + self.cooccurrence
    }
}

/// A cycle the controller decided on; the driver passes it into the dataflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CycleTicket {
    /// Cycle number, from 1.
    pub cycle: u64,
    /// Why it runs (as a [`TriggerKind`] name index, so tickets stay plain data).
    pub trigger: u8,
}

impl CycleTicket {
    /// The trigger of this ticket.
    pub fn kind(&self) -> TriggerKind {
        TRIGGERS[usize::from(self.trigger).min(TRIGGERS.len() - 1)]
    }
}

const TRIGGERS: [TriggerKind; 4] = [
    TriggerKind::Ratio,
    TriggerKind::Limit,
    TriggerKind::Forced,
    TriggerKind::Manual,
];

fn trigger_index(kind: TriggerKind) -> u8 {
    TRIGGERS.iter().position(|k| *k == kind).unwrap_or(0) as u8
}

/// One finished cycle, as the report's timeline shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CycleRecord {
    /// Cycle number.
    pub cycle: u64,
    /// Seconds since the controller started, at the end of the cycle.
    pub at_s: f64,
    /// Trigger name.
    pub trigger: &'static str,
    /// Live heap when the cycle was decided.
    pub heap_before: u64,
    /// Live heap after it.
    pub heap_after: u64,
    /// The heap goal that was in force.
    pub goal: u64,
    /// Longest worker pause (ms): the dataflow waits for the slowest worker.
    pub pause_ms: f64,
    /// What the owners freed.
    pub freed: Freed,
}

/// Counters for the summary JSON (`gc`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcStats {
    /// Cycles run, by trigger name.
    pub cycles: BTreeMap<&'static str, u64>,
    /// Cycles run in all.
    pub cycles_total: u64,
    /// Limit cycles skipped by the death-spiral guard.
    pub throttled: u64,
    /// Sum of cycle pauses (ms).
    pub pause_total_ms: f64,
    /// Longest cycle pause (ms).
    pub pause_max_ms: f64,
    /// Bytes freed by owner, over all cycles.
    pub freed: Freed,
    /// Highest live heap seen (bytes), when the counting allocator is installed.
    pub heap_peak: Option<u64>,
    /// Live heap after the last cycle.
    pub heap_marked: u64,
    /// The settings in force at the end.
    pub config: GcConfig,
    /// Every cycle, in order.
    pub timeline: Vec<CycleRecord>,
    /// Live heap samples `(seconds, bytes)`, for the sawtooth plot.
    pub heap_samples: Vec<(f64, u64)>,
}

struct Pending {
    ticket: CycleTicket,
    heap_before: u64,
    goal: u64,
    reports: usize,
    freed: Freed,
    pause_ms: f64,
}

struct Inner {
    cfg: GcConfig,
    state: GcState,
    stats: GcStats,
    pending: Option<Pending>,
    next_cycle: u64,
    last_sample_ms: Option<u64>,
    warned_throttle: bool,
}

/// Keeps this many heap samples; older ones are thinned to every other one.
const MAX_SAMPLES: usize = 4096;
/// At most one heap sample per this many ms.
const SAMPLE_EVERY_MS: u64 = 20;

/// The process-wide GC controller. Cheap to share (`Arc`).
pub struct GcController {
    inner: Mutex<Inner>,
    started: Instant,
    workers: usize,
    manual: Arc<AtomicBool>,
    pool: Option<BufferPool>,
    heap: Box<dyn Fn() -> Option<u64> + Send + Sync>,
}

impl std::fmt::Debug for GcController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcController")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl GcController {
    /// A controller for `workers` workers, measuring the heap with the counting allocator.
    pub fn new(cfg: GcConfig, workers: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                stats: GcStats {
                    config: cfg.clone(),
                    ..GcStats::default()
                },
                cfg,
                state: GcState::new(0),
                pending: None,
                next_cycle: 1,
                last_sample_ms: None,
                warned_throttle: false,
            }),
            started: Instant::now(),
            workers: workers.max(1),
            manual: Arc::new(AtomicBool::new(false)),
            pool: None,
            heap: Box::new(heap_live),
        }
    }

    /// Rotates `pool`'s victim tier at every cycle and counts what that frees.
    pub fn with_pool(mut self, pool: BufferPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The pool it rotates, if any.
    pub fn pool(&self) -> Option<&BufferPool> {
        self.pool.as_ref()
    }

    /// Measures the heap with `heap` instead of the counting allocator (tests).
    pub fn with_heap(mut self, heap: impl Fn() -> Option<u64> + Send + Sync + 'static) -> Self {
        self.heap = Box::new(heap);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is plain counters: a panic elsewhere cannot leave it half-written in a
        // way that matters more than losing the GC altogether.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The flag a signal handler (SIGUSR1) or admin endpoint sets to ask for a cycle.
    pub fn manual_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.manual)
    }

    /// Asks for a cycle at the next poll (like Go's `runtime.GC()`, but asynchronous).
    pub fn request(&self) {
        self.manual.store(true, Ordering::Relaxed);
    }

    /// Changes `gc_percent` while running (like `debug.SetGCPercent`); returns the old one.
    pub fn set_gc_percent(&self, percent: Option<u32>) -> Option<u32> {
        let mut inner = self.lock();
        let old = inner.cfg.gc_percent;
        inner.cfg.gc_percent = percent;
        inner.stats.config.gc_percent = percent;
        old
    }

    /// Changes the soft memory limit while running; returns the old one.
    pub fn set_memory_limit(&self, limit: Option<u64>) -> Option<u64> {
        let mut inner = self.lock();
        let old = inner.cfg.memory_limit;
        inner.cfg.memory_limit = limit;
        inner.stats.config.memory_limit = limit;
        old
    }

    /// The settings in force.
    pub fn config(&self) -> GcConfig {
        self.lock().cfg.clone()
    }

    /// Whether a cycle is decided but not yet reported by every worker.
    pub fn in_cycle(&self) -> bool {
        self.lock().pending.is_some()
    }

    /// Samples the heap and decides whether a cycle starts now. At most one cycle is in
    /// flight: while one is, this returns `None`.
    pub fn poll(&self) -> Option<CycleTicket> {
        let now = self.now_ms();
        let heap = (self.heap)();
        let mut inner = self.lock();
        if let Some(h) = heap {
            sample(&mut inner, now, h);
        }
        if inner.pending.is_some() {
            return None;
        }
        if self.manual.swap(false, Ordering::Relaxed) {
            inner.state.request();
        }
        let decision = inner.state.decide(heap.unwrap_or(0), now, &inner.cfg);
        if decision.throttled {
            inner.stats.throttled += 1;
            if !inner.warned_throttle {
                inner.warned_throttle = true;
                eprintln!(
                    "tidepool: gc: over {:.0}% of the last {} ms went to compaction; the memory \
                     limit cannot be held without thrashing, so limit cycles are throttled \
                     (raise memory_limit or reduce state retention)",
                    inner.cfg.max_gc_fraction * 100.0,
                    inner.cfg.fraction_window_ms
                );
            }
        }
        let kind = decision.trigger?;
        let ticket = CycleTicket {
            cycle: inner.next_cycle,
            trigger: trigger_index(kind),
        };
        inner.next_cycle += 1;
        inner.pending = Some(Pending {
            ticket,
            heap_before: heap.unwrap_or(0),
            goal: decision.goal,
            reports: 0,
            freed: Freed::default(),
            pause_ms: 0.0,
        });
        Some(ticket)
    }

    /// A worker finished its part of `ticket`'s cycle, freeing `freed` in `pause_ms`.
    /// The last worker's report closes the cycle.
    pub fn report(&self, ticket: CycleTicket, freed: Freed, pause_ms: f64) {
        let mut inner = self.lock();
        let Some(pending) = inner.pending.as_mut().filter(|p| p.ticket == ticket) else {
            return;
        };
        pending.reports += 1;
        pending.freed.merge(&freed);
        pending.pause_ms = pending.pause_ms.max(pause_ms);
        if pending.reports < self.workers {
            return;
        }
        let Some(mut pending) = inner.pending.take() else {
            return;
        };
        drop(inner);
        if let Some(pool) = &self.pool {
            let before = pool.stats().bytes_held;
            pool.rotate();
            pending.freed.pool += before.saturating_sub(pool.stats().bytes_held);
        }
        let heap_after = (self.heap)().unwrap_or(0);
        let now = self.now_ms();
        let mut inner = self.lock();
        let cfg = inner.cfg.clone();
        inner
            .state
            .finished(heap_after, now, pending.pause_ms.ceil() as u64, &cfg);
        let kind = pending.ticket.kind();
        let record = CycleRecord {
            cycle: pending.ticket.cycle,
            at_s: now as f64 / 1000.0,
            trigger: kind.name(),
            heap_before: pending.heap_before,
            heap_after,
            goal: pending.goal,
            pause_ms: pending.pause_ms,
            freed: pending.freed,
        };
        if cfg.trace {
            eprintln!("{}", trace_line(&record));
        }
        sample(&mut inner, now, heap_after);
        let stats = &mut inner.stats;
        *stats.cycles.entry(kind.name()).or_default() += 1;
        stats.cycles_total += 1;
        stats.pause_total_ms += pending.pause_ms;
        stats.pause_max_ms = stats.pause_max_ms.max(pending.pause_ms);
        stats.freed.merge(&pending.freed);
        stats.heap_marked = heap_after;
        stats.timeline.push(record);
    }

    /// The counters so far.
    pub fn stats(&self) -> GcStats {
        let mut stats = self.lock().stats.clone();
        stats.heap_peak = super::heap::heap_peak();
        stats
    }
}

fn sample(inner: &mut Inner, now: u64, heap: u64) {
    if inner
        .last_sample_ms
        .is_some_and(|last| now < last + SAMPLE_EVERY_MS)
    {
        return;
    }
    inner.last_sample_ms = Some(now);
    let samples = &mut inner.stats.heap_samples;
    samples.push((now as f64 / 1000.0, heap));
    if samples.len() > MAX_SAMPLES {
        // Thin evenly so a long run keeps its whole shape in bounded memory.
        let mut keep = false;
        samples.retain(|_| {
            keep = !keep;
            keep
        });
    }
}

/// Megabytes as GCTRACE prints them.
fn mb(bytes: u64) -> String {
    format!("{}MB", bytes / 1_000_000)
}

/// `gc 7 @41.2s ratio: 812MB -> 403MB (goal 806MB), 38ms; history -210MB, ...`
pub fn trace_line(r: &CycleRecord) -> String {
    let goal = if r.goal == u64::MAX {
        "none".to_string()
    } else {
        mb(r.goal)
    };
    format!(
        "gc {} @{:.1}s {}: {} -> {} (goal {}), {:.0}ms; history -{}, embeddings -{}, traces -{}, pool -{}, cooccurrence -{}",
        r.cycle,
        r.at_s,
        r.trigger,
        mb(r.heap_before),
        mb(r.heap_after),
        goal,
        r.pause_ms,
        mb(r.freed.history),
        mb(r.freed.embeddings),
        mb(r.freed.traces),
        mb(r.freed.pool),
        mb(r.freed.cooccurrence),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const MIB: u64 = 1 << 20;

    fn controller(heap: Arc<AtomicU64>, workers: usize) -> GcController {
        GcController::new(
            GcConfig {
                min_heap: 10 * MIB,
                ..GcConfig::default()
            },
            workers,
        )
        .with_heap(move || Some(heap.load(Ordering::Relaxed)))
    }

    #[test]
    fn a_cycle_closes_with_the_last_worker_and_re_marks() {
        let heap = Arc::new(AtomicU64::new(5 * MIB));
        let gc = controller(Arc::clone(&heap), 2);
        assert_eq!(gc.poll(), None, "below the floor");
        heap.store(12 * MIB, Ordering::Relaxed);
        let ticket = gc.poll().expect("over the floor");
        assert_eq!(ticket.kind(), TriggerKind::Ratio);
        assert_eq!(ticket.cycle, 1);
        assert_eq!(gc.poll(), None, "one cycle at a time");
        let freed = Freed {
            history: 3 * MIB,
            ..Freed::default()
        };
        gc.report(ticket, freed, 4.0);
        assert!(gc.in_cycle(), "one of two workers reported");
        heap.store(6 * MIB, Ordering::Relaxed);
        gc.report(ticket, freed, 9.0);
        assert!(!gc.in_cycle());
        let stats = gc.stats();
        assert_eq!(stats.cycles_total, 1);
        assert_eq!(stats.cycles.get("ratio"), Some(&1));
        assert_eq!(stats.freed.history, 6 * MIB);
        assert_eq!(stats.pause_max_ms, 9.0);
        assert_eq!(stats.heap_marked, 6 * MIB);
        // Re-marked at 6 MiB: the goal is max(12 MiB, floor 10 MiB).
        heap.store(11 * MIB, Ordering::Relaxed);
        assert_eq!(gc.poll(), None);
        heap.store(12 * MIB, Ordering::Relaxed);
        assert_eq!(gc.poll().map(|t| t.cycle), Some(2));
    }

    #[test]
    fn manual_requests_and_run_time_settings() {
        let heap = Arc::new(AtomicU64::new(MIB));
        let gc = controller(Arc::clone(&heap), 1);
        gc.manual_flag().store(true, Ordering::Relaxed);
        let t = gc.poll().expect("manual");
        assert_eq!(t.kind(), TriggerKind::Manual);
        gc.report(t, Freed::default(), 1.0);
        assert_eq!(gc.poll(), None, "the request was consumed");
        // gc_percent off, then 25: the goal follows at once.
        gc.set_gc_percent(None);
        heap.store(100 * MIB, Ordering::Relaxed);
        assert_eq!(gc.poll(), None, "ratio off");
        assert_eq!(gc.set_gc_percent(Some(25)), None);
        assert_eq!(gc.poll().map(|t| t.kind()), Some(TriggerKind::Ratio));
        assert_eq!(gc.stats().config.gc_percent, Some(25));
    }

    #[test]
    fn trace_lines_read_like_gctrace() {
        let r = CycleRecord {
            cycle: 7,
            at_s: 41.23,
            trigger: "ratio",
            heap_before: 812_000_000,
            heap_after: 403_000_000,
            goal: 806_000_000,
            pause_ms: 38.2,
            freed: Freed {
                history: 210_000_000,
                embeddings: 180_000_000,
                traces: 12_000_000,
                pool: 7_000_000,
                cooccurrence: 0,
            },
        };
        assert_eq!(
            trace_line(&r),
            "gc 7 @41.2s ratio: 812MB -> 403MB (goal 806MB), 38ms; history -210MB, \
             embeddings -180MB, traces -12MB, pool -7MB, cooccurrence -0MB"
        );
    }
}
