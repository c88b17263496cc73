//! The GC trigger governing real state, with the live heap measured by the counting
//! allocator (installed for this test binary only, so the numbers are this process's).
//!
//! The tests share one global heap counter, so they run one at a time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_connector_generator::{GeneratorConfig, GeneratorSource};
use tidepool_operators::{
    run_backtest_with, BacktestConfig, BacktestReport, ModelConfig, VariantConfig,
};
use tidepool_pipeline::event::events_batch;
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::memory::gc::GcConfig;
use tidepool_pipeline::memory::heap::{heap_live, CountingAllocator};
use tidepool_pipeline::{
    BatchOrigin, BufferPool, Event, EventReader, EventSource, EventType, MemoryDeadLetters,
    SourceBatch, SourceInfo,
};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator::new();

static SERIAL: Mutex<()> = Mutex::new(());

const MIB: u64 = 1 << 20;

fn bpr(dim: usize) -> Vec<VariantConfig> {
    vec![VariantConfig {
        name: "bpr".into(),
        model: ModelConfig {
            dim,
            ..ModelConfig::default()
        },
    }]
}

fn run(source: Arc<dyn EventSource>, config: &BacktestConfig) -> BacktestReport {
    run_with(source, config, None)
}

/// [`run`] with the batches built in `pool`.
fn run_with(
    source: Arc<dyn EventSource>,
    config: &BacktestConfig,
    pool: Option<BufferPool>,
) -> BacktestReport {
    let mut gc = GcController::new(config.gc.clone(), config.workers);
    if let Some(pool) = pool {
        gc = gc.with_pool(pool);
    }
    let gc = Arc::new(gc);
    run_backtest_with(
        source,
        config,
        Arc::new(MemoryDeadLetters::new(5)),
        gc,
        &|_| {},
    )
    .expect("the backtest runs")
}

fn max_heap(samples: &[(f64, u64)], from: f64, to: f64) -> u64 {
    samples
        .iter()
        .filter(|(t, _)| (from..to).contains(t))
        .map(|s| s.1)
        .max()
        .unwrap_or(0)
}

/// Recall@K over the last quarter of the metric windows.
fn recent_recall(report: &BacktestReport) -> f64 {
    let windows = &report.variants[0].windows;
    let recent = &windows[windows.len() * 3 / 4..];
    let (hits, scored) = recent.iter().fold((0, 0), |(h, s), w| {
        (h + w.quality.hits, s + w.quality.scored)
    });
    hits as f64 / scored.max(1) as f64
}

/// A stream of ever-new users: without a TTL the state (and the heap) grows with the
/// stream; with one, cycles fire, evicted users are counted, the heap levels off, and
/// recall over the recent windows holds.
#[test]
fn unbounded_users_under_a_ttl_keep_the_heap_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    assert!(heap_live().is_some(), "the counting allocator is installed");
    let stream = GeneratorConfig {
        events: 300_000,
        users: 3_000,
        items: 2_000,
        user_churn: 30,
        // Small source batches (for the generator's Arrow batches; its source sends the
        // dataflow's own): the state's growth, not the few megabytes of batches in
        // flight and in the pool, is what the halves below compare.
        batch_rows: 8192,
        ..GeneratorConfig::default()
    };
    let config = |ttl: Option<Duration>| BacktestConfig {
        variants: bpr(32),
        // 25 %: the run's heap (events travel as shared pooled batches, not per-worker
        // copies) grows slowly enough that 50 % would leave room for two cycles only.
        gc: GcConfig {
            gc_percent: Some(25),
            min_heap: 8 * MIB,
            ..GcConfig::default()
        },
        state: tidepool_operators::StateConfig {
            user_ttl_ms: ttl.map(|d| d.as_millis() as i64),
            item_ttl_ms: None,
        },
        ..BacktestConfig::default()
    };
    let source =
        || -> Arc<dyn EventSource> { Arc::new(GeneratorSource::new(stream.clone()).unwrap()) };
    // No reserve of batch blocks: the same ~11 MB in both runs from the start, which
    // would only dilute the comparison of state below (the blocks in flight are there
    // all the same).
    let pool = || {
        Some(BufferPool::new(tidepool_pipeline::PoolConfig {
            reserve: Some(0),
            ..Default::default()
        }))
    };
    let unbounded = run_with(source(), &config(None), pool());
    let bounded = run_with(
        source(),
        &config(Some(Duration::from_secs(20 * 60))),
        pool(),
    );

    assert_eq!(unbounded.users_evicted, 0);
    assert!(
        bounded.users_evicted > 10_000,
        "{} evicted; cycles {:?}",
        bounded.users_evicted,
        bounded.gc.timeline
    );
    assert!(bounded.gc.cycles_total >= 3, "{:?}", bounded.gc.cycles);
    assert!(
        bounded.users * 3 < unbounded.users,
        "users held: {} with a TTL, {} without",
        bounded.users,
        unbounded.users
    );
    assert!(bounded.gc.freed.history > 0 && bounded.gc.freed.embeddings > 0);
    assert!(
        bounded.user_state_bytes * 2 < unbounded.user_state_bytes,
        "user state: {} with a TTL, {} without",
        bounded.user_state_bytes,
        unbounded.user_state_bytes
    );

    // Without a TTL the heap keeps growing through the second half of the run; with one
    // it levels off.
    let halves = |r: &BacktestReport| {
        let end = r.gc.heap_samples.last().map_or(0.0, |s| s.0);
        (
            max_heap(&r.gc.heap_samples, 0.0, end / 2.0),
            max_heap(&r.gc.heap_samples, end / 2.0, f64::MAX),
        )
    };
    let (b1, b2) = halves(&bounded);
    let (u1, u2) = halves(&unbounded);
    // Vec-backed state grows by doubling, so single samples jump; the comparison is of
    // growth between the halves.
    let why = format!("with a TTL: {b1} then {b2}; without: {u1} then {u2}");
    assert!(u2 > u1 + u1 / 2, "without a TTL the heap grows: {why}");
    // Levelling off is judged on what compaction leaves (each cycle's heap after it):
    // the peaks above depend on where in the GC sawtooth a half ends, up to gc_percent
    // above the retained heap, which is as large as the bounded run's whole growth.
    let retained = |r: &BacktestReport, upper: bool| {
        let end = r.gc.heap_samples.last().map_or(0.0, |s| s.0);
        r.gc.timeline
            .iter()
            .filter(|c| (c.at_s >= end / 2.0) == upper)
            .map(|c| c.heap_after)
            .max()
    };
    let (rb1, rb2) = (retained(&bounded, false), retained(&bounded, true));
    let (ru1, ru2) = (retained(&unbounded, false), retained(&unbounded, true));
    let why = format!(
        "{why}; after cycles, with a TTL: {rb1:?} then {rb2:?}; without: {ru1:?} then {ru2:?}"
    );
    let (Some(rb1), Some(rb2), Some(ru1), Some(ru2)) = (rb1, rb2, ru1, ru2) else {
        panic!("both runs compact in both halves: {why}");
    };
    eprintln!("heap: {why}");
    assert!(
        rb2.saturating_sub(rb1) * 3 < ru2.saturating_sub(ru1),
        "with a TTL it levels off: {why}"
    );
    // At the end the bounded heap is well below the unbounded one (the rest is the item
    // table and the batches in flight, the same in both).
    assert!(b2 * 3 < u2 * 2, "{why}");

    let (rb, ru) = (recent_recall(&bounded), recent_recall(&unbounded));
    assert!(ru > 0.02, "the model learns at all: {ru}");
    assert!(
        rb >= 0.8 * ru,
        "recent recall {rb} with a TTL vs {ru} without"
    );
}

/// Events, then an idle input: a source that yields empty batches for a while.
struct IdleAfter {
    events: Vec<Event>,
    idle: Duration,
}

impl EventSource for IdleAfter {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            description: "events then idle".into(),
            rows: Some(self.events.len() as u64),
            min_ts: self.events.first().map(|e| e.ts),
            max_ts: self.events.last().map(|e| e.ts),
        }
    }

    fn open(&self, worker: usize, _workers: usize) -> tidepool_pipeline::Result<EventReader> {
        if worker != 0 {
            return Ok(Box::new(std::iter::empty()));
        }
        let pool = BufferPool::new(Default::default());
        let origin = |pos: u64| BatchOrigin {
            source: "idle".into(),
            first_row: pos,
            first_pos: pos,
        };
        let mut batches = Vec::new();
        for (i, chunk) in self.events.chunks(8192).enumerate() {
            batches.push(Ok(SourceBatch::new(
                events_batch(chunk, &pool)?,
                origin(i as u64 * 8192),
            )));
        }
        let end = self.events.len() as u64;
        let empty = events_batch(&[], &pool)?;
        let idle = self.idle;
        let mut idle_until = None;
        let idle_batches = std::iter::from_fn(move || {
            let until = *idle_until.get_or_insert_with(|| Instant::now() + idle);
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
            Some(Ok(SourceBatch::new(empty.clone(), origin(end))))
        });
        Ok(Box::new(batches.into_iter().chain(idle_batches)))
    }
}

/// Users active early go quiet; one late event moves event time past their TTL; then the
/// input idles. With the ratio rule off, a forced cycle still runs during the idle
/// period, evicts them, and the live heap drops without any new event.
#[test]
fn idle_input_gets_forced_cycles_and_memory_drops() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ttl_ms = 60_000;
    let mut events: Vec<Event> = (0..60_000u64)
        .map(|i| Event {
            ts: i as i64,
            pos: i,
            user: i % 20_000,
            item: i % 500,
            weight: 1.0,
            kind: EventType::View,
        })
        .collect();
    events.push(Event {
        ts: 60_000 + 2 * ttl_ms,
        pos: 60_000,
        user: 1_000_000,
        item: 1,
        weight: 1.0,
        kind: EventType::Click,
    });
    let config = BacktestConfig {
        variants: bpr(64),
        gc: GcConfig {
            gc_percent: None,
            force_interval_ms: 1_500,
            ..GcConfig::default()
        },
        state: tidepool_operators::StateConfig {
            user_ttl_ms: Some(ttl_ms),
            item_ttl_ms: None,
        },
        tick_ms: Some(1_000),
        ..BacktestConfig::default()
    };
    let started = Instant::now();
    let report = run(
        Arc::new(IdleAfter {
            events,
            idle: Duration::from_secs(5),
        }),
        &config,
    );
    let idle_from = report.gc.heap_samples.first().map_or(0.0, |s| s.0);
    let forced: Vec<_> = report
        .gc
        .timeline
        .iter()
        .filter(|c| c.trigger == "forced" && c.freed.history > 0)
        .collect();
    assert_eq!(report.events, 60_001);
    assert!(
        !forced.is_empty(),
        "no forced cycle freed history: {:?} (ran {:?}, samples from {idle_from})",
        report.gc.timeline,
        started.elapsed()
    );
    assert_eq!(
        report.users_evicted, 20_000,
        "every early user, and not the late one"
    );
    let cycle = forced[0];
    assert!(
        cycle.heap_after + 2 * MIB < cycle.heap_before,
        "the heap dropped: {} -> {}",
        cycle.heap_before,
        cycle.heap_after
    );
    assert!(
        cycle.freed.history + cycle.freed.embeddings > 5 * MIB,
        "{:?}",
        cycle.freed
    );
    assert_eq!(report.users, 1, "only the late user is held");
}
