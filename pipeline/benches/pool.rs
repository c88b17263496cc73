//! Benchmarks of the sharded buffer pool (`cargo bench -p tidepool-pipeline --bench pool`).
//!
//! 1. get+put latency on one thread: the pool against `Vec::with_capacity` + drop, a
//!    `Mutex<Vec<Vec<u8>>>` pool, `lockfree-object-pool` and `object-pool`.
//! 2. Two threads getting and putting at once (the pool steals across shards).
//! 3. The operator path: event batches of 8 Ki and 64 Ki rows built in pooled buffers
//!    against plain `Vec`s, with allocator calls per batch counted by a counting global
//!    allocator and printed once per size.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Float32Array, RecordBatch, TimestampMillisecondArray, UInt64Array, UInt8Array};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidepool_pipeline::event::event_schema;
use tidepool_pipeline::{BufferPool, PoolConfig};

/// Counts allocator calls so the benchmark can show how many a batch costs.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Allocations of 4 KiB and more: column buffers, not Arrow's small headers.
static LARGE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// relaxed atomic with no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if layout.size() >= 4096 {
            LARGE.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if new_size >= 4096 {
            LARGE.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SIZES: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];

fn pool(shards: usize) -> BufferPool {
    BufferPool::new(PoolConfig {
        shards,
        poison: false,
        ..PoolConfig::default()
    })
}

fn get_put(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_put");
    for size in SIZES {
        let p = pool(1);
        BufferPool::register_worker(0);
        group.bench_with_input(BenchmarkId::new("tidepool", size), &size, |b, &size| {
            b.iter(|| black_box(p.vec::<u8>(size)))
        });
        group.bench_with_input(BenchmarkId::new("vec", size), &size, |b, &size| {
            b.iter(|| black_box(Vec::<u8>::with_capacity(size)))
        });
        let mutex: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        group.bench_with_input(BenchmarkId::new("mutex_vec", size), &size, |b, &size| {
            b.iter(|| {
                let v = mutex
                    .lock()
                    .map(|mut l| l.pop())
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Vec::with_capacity(size));
                let v = black_box(v);
                if let Ok(mut l) = mutex.lock() {
                    l.push(v);
                }
            })
        });
        let lockfree = lockfree_object_pool::LinearObjectPool::new(
            move || Vec::<u8>::with_capacity(size),
            |v| v.clear(),
        );
        group.bench_with_input(
            BenchmarkId::new("lockfree-object-pool", size),
            &size,
            |b, _| b.iter(|| black_box(lockfree.pull())),
        );
        let object = object_pool::Pool::new(4, move || Vec::<u8>::with_capacity(size));
        group.bench_with_input(BenchmarkId::new("object-pool", size), &size, |b, &size| {
            b.iter(|| black_box(object.pull(|| Vec::with_capacity(size))))
        });
    }
    group.finish();
}

/// Two threads each do `iters` get+put pairs; returns the wall time.
fn two_threads(iters: u64, op: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let op = &op;
            s.spawn(move || {
                BufferPool::register_worker(t);
                for _ in 0..iters {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let size = 64 << 10;
    let mut group = c.benchmark_group("two_threads");
    group.throughput(Throughput::Elements(2));
    let p = pool(2);
    group.bench_function("tidepool", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                // Keep two blocks out so the private slot alone cannot serve the thread
                // and the shared stacks (and stealing) take part.
                let a = p.vec::<u8>(size);
                let b = p.vec::<u8>(size);
                black_box((a, b));
            })
        })
    });
    group.bench_function("vec", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box((
                    Vec::<u8>::with_capacity(size),
                    Vec::<u8>::with_capacity(size),
                ));
            })
        })
    });
    let mutex: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    group.bench_function("mutex_vec", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let get = || {
                    mutex
                        .lock()
                        .map(|mut l| l.pop())
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| Vec::with_capacity(size))
                };
                let (a, b) = black_box((get(), get()));
                if let Ok(mut l) = mutex.lock() {
                    l.push(a);
                    l.push(b);
                }
            })
        })
    });
    let lockfree = lockfree_object_pool::LinearObjectPool::new(
        move || Vec::<u8>::with_capacity(size),
        |v| v.clear(),
    );
    group.bench_function("lockfree-object-pool", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box((lockfree.pull(), lockfree.pull()));
            })
        })
    });
    let object = object_pool::Pool::new(8, move || Vec::<u8>::with_capacity(size));
    group.bench_function("object-pool", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box((
                    object.pull(|| Vec::with_capacity(size)),
                    object.pull(|| Vec::with_capacity(size)),
                ));
            })
        })
    });
    group.finish();
}

fn batch_pooled(p: &BufferPool, rows: usize) -> RecordBatch {
    let (mut users, mut items, mut kinds, mut times, mut weights) = (
        p.vec::<u64>(rows),
        p.vec::<u64>(rows),
        p.vec::<u8>(rows),
        p.vec::<i64>(rows),
        p.vec::<f32>(rows),
    );
    for i in 0..rows as u64 {
        users.push(i % 1000);
        items.push(i % 777);
        kinds.push((i % 4) as u8);
        times.push(i as i64);
        weights.push(1.0);
    }
    RecordBatch::try_new(
        event_schema(),
        vec![
            Arc::new(UInt64Array::new(users.into_scalar(), None)),
            Arc::new(UInt64Array::new(items.into_scalar(), None)),
            Arc::new(UInt8Array::new(kinds.into_scalar(), None)),
            Arc::new(
                TimestampMillisecondArray::new(times.into_scalar(), None).with_timezone("UTC"),
            ),
            Arc::new(Float32Array::new(weights.into_scalar(), None)),
        ],
    )
    .expect("schema matches")
}

fn batch_unpooled(rows: usize) -> RecordBatch {
    let (mut users, mut items, mut kinds, mut times, mut weights) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
    );
    for i in 0..rows as u64 {
        users.push(i % 1000);
        items.push(i % 777);
        kinds.push((i % 4) as u8);
        times.push(i as i64);
        weights.push(1.0f32);
    }
    RecordBatch::try_new(
        event_schema(),
        vec![
            Arc::new(UInt64Array::from(users)),
            Arc::new(UInt64Array::from(items)),
            Arc::new(UInt8Array::from(kinds)),
            Arc::new(TimestampMillisecondArray::from(times).with_timezone("UTC")),
            Arc::new(Float32Array::from(weights)),
        ],
    )
    .expect("schema matches")
}

/// Allocator calls per batch in steady state (after a warm-up batch): all of them, and
/// those of 4 KiB or more (column buffers).
fn allocations_per_batch(build: impl Fn() -> RecordBatch) -> (f64, f64) {
    drop(build());
    let (all, large) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        LARGE.load(Ordering::Relaxed),
    );
    for _ in 0..100 {
        drop(black_box(build()));
    }
    (
        (ALLOCATIONS.load(Ordering::Relaxed) - all) as f64 / 100.0,
        (LARGE.load(Ordering::Relaxed) - large) as f64 / 100.0,
    )
}

fn batches(c: &mut Criterion) {
    let mut group = c.benchmark_group("event_batch");
    let p = pool(1);
    BufferPool::register_worker(0);
    for rows in [8 << 10, 64 << 10] {
        let pooled = allocations_per_batch(|| batch_pooled(&p, rows));
        let unpooled = allocations_per_batch(|| batch_unpooled(rows));
        println!(
            "event_batch/{rows} rows: allocator calls per batch for column buffers (>= 4 KiB): \
             pooled {:.1}, unpooled {:.1}; all calls: pooled {:.1}, unpooled {:.1} \
             (the rest are Arrow's array, buffer and schema headers)",
            pooled.1, unpooled.1, pooled.0, unpooled.0
        );
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("pooled", rows), &rows, |b, &rows| {
            b.iter(|| black_box(batch_pooled(&p, rows)))
        });
        group.bench_with_input(BenchmarkId::new("unpooled", rows), &rows, |b, &rows| {
            b.iter(|| black_box(batch_unpooled(rows)))
        });
    }
    group.finish();
}

criterion_group!(benches, get_put, contended, batches);
criterion_main!(benches);
