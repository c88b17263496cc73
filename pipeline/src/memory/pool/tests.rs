use super::*;
use arrow_array::types::UInt64Type;
use arrow_array::{Array, ArrayRef, PrimitiveArray, RecordBatch, UInt64Array};

fn pool(cfg: PoolConfig) -> BufferPool {
    BufferPool::new(PoolConfig {
        poison: false,
        ..cfg
    })
}

fn small() -> PoolConfig {
    PoolConfig {
        floor: 1024,
        ceiling: 1 << 20,
        shards: 2,
        ..PoolConfig::default()
    }
}

#[test]
fn requests_round_up_to_their_class() {
    let p = pool(small());
    let v = p.vec::<u64>(100); // 800 bytes -> 1 KiB class
    assert_eq!(v.capacity(), 128);
    let v = p.vec::<u8>(1025); // -> 2 KiB
    assert_eq!(v.capacity(), 2048);
    let v = p.vec::<u32>(0); // zero-size requests work
    assert_eq!(v.capacity(), 256);
    assert_eq!(p.stats().unpooled, 0);
}

#[test]
fn above_the_ceiling_is_unpooled_counted_and_not_truncated() {
    let p = pool(small());
    let mut v = p.vec::<u8>((1 << 20) + 1);
    assert!(v.capacity() > 1 << 20);
    v.extend_from_slice(&vec![7u8; (1 << 20) + 1]);
    assert_eq!(v.len(), (1 << 20) + 1);
    drop(v);
    let s = p.stats();
    assert_eq!((s.unpooled, s.gets, s.bytes_held), (1, 0, 0));
    // Pushing past the capacity grows into a bigger block; nothing is cut off.
    let mut v = p.vec::<u64>(1);
    for i in 0..10_000u64 {
        v.push(i);
    }
    assert_eq!(v.as_slice().len(), 10_000);
    assert_eq!(v.as_slice()[9_999], 9_999);
}

#[test]
fn the_off_switch_pools_nothing() {
    let p = pool(PoolConfig {
        enabled: false,
        ..small()
    });
    drop(p.vec::<u64>(10));
    drop(p.vec::<u64>(10));
    let s = p.stats();
    assert_eq!((s.unpooled, s.gets, s.puts, s.bytes_held), (2, 0, 0, 0));
}

#[test]
fn private_then_shared_then_miss() {
    let p = pool(small());
    BufferPool::register_worker(0);
    let a = p.vec::<u8>(1000);
    let b = p.vec::<u8>(1000);
    assert_eq!(p.stats().misses, 2);
    drop(a); // private slot
    drop(b); // private slot taken: shared stack
    assert_eq!(p.stats().bytes_held, 2048);
    let _c = p.vec::<u8>(1000);
    let _d = p.vec::<u8>(1000);
    let _e = p.vec::<u8>(1000);
    let s = p.stats();
    assert_eq!((s.hits_private, s.hits_shared, s.misses), (1, 1, 3));
    assert_eq!(s.gets, 5);
    assert!((s.hit_rate - 0.4).abs() < 1e-12);
}

#[test]
fn a_miss_steals_from_another_shard() {
    let p = pool(small());
    let q = p.clone();
    std::thread::spawn(move || {
        BufferPool::register_worker(1);
        let blocks: Vec<_> = (0..3).map(|_| q.vec::<u8>(1000)).collect();
        drop(blocks);
    })
    .join()
    .unwrap();
    BufferPool::register_worker(0);
    // Shard 1 holds one private and two shared blocks; shard 0 holds none.
    let _a = p.vec::<u8>(1000);
    let _b = p.vec::<u8>(1000);
    let _c = p.vec::<u8>(1000);
    let s = p.stats();
    assert_eq!(s.hits_stolen, 2, "{s:?}");
    assert_eq!(s.misses, 4, "private slots are not stolen: {s:?}");
}

#[test]
fn rotation_moves_to_victims_and_drains_in_two_cycles() {
    let p = pool(small());
    BufferPool::register_worker(0);
    drop((p.vec::<u8>(1000), p.vec::<u8>(5000)));
    assert_eq!(p.stats().bytes_held, 1024 + 8192);
    p.rotate();
    assert_eq!(p.stats().bytes_held, 1024 + 8192, "victims are still held");
    let _again = p.vec::<u8>(1000);
    assert_eq!(p.stats().hits_victim, 1);
    p.rotate();
    p.rotate();
    let s = p.stats();
    assert_eq!(s.bytes_held, 0);
    assert_eq!(s.expired, 1);
}

#[test]
fn retention_is_bounded_per_class() {
    let p = pool(PoolConfig {
        retain_per_class: 2048,
        ..small()
    });
    let blocks: Vec<_> = (0..5).map(|_| p.vec::<u8>(1000)).collect();
    drop(blocks);
    let s = p.stats();
    assert_eq!((s.puts, s.drops, s.bytes_held), (2, 3, 2048));
}

#[test]
fn a_reserve_serves_the_first_gets_within_retention() {
    let p = pool(PoolConfig {
        retain_per_class: 8 * 1024,
        ..small()
    });
    BufferPool::register_worker(0);
    // Retention is per class over two shards: 4 KiB each, four 1 KiB blocks.
    assert_eq!(p.reserve(1000, 6), 4);
    assert_eq!(
        p.reserve(1 << 21, 3),
        0,
        "above the ceiling nothing is pooled"
    );
    let s = p.stats();
    assert_eq!((s.reserved, s.gets, s.bytes_held), (4, 0, 4096));
    let blocks: Vec<_> = (0..5).map(|_| p.vec::<u8>(1000)).collect();
    let s = p.stats();
    assert_eq!((s.hits_shared, s.misses, s.bytes_held), (4, 1, 0), "{s:?}");
    drop(blocks);
    p.rotate();
    p.rotate();
    assert_eq!(
        p.stats().bytes_held,
        0,
        "reserved blocks expire like others"
    );
}

#[test]
fn poison_mode_catches_a_use_after_return() {
    let p = BufferPool::new(PoolConfig {
        poison: true,
        ..small()
    });
    let mut v = p.vec::<u64>(16);
    v.extend_from_slice(&[42; 16]);
    let buffer = v.into_buffer();
    let raw = buffer.as_ptr();
    assert_eq!(buffer.typed_data::<u64>()[3], 42);
    drop(buffer);
    // SAFETY: the block went back to the pool, which keeps it allocated (retention is far
    // above 128 bytes), so reading it is defined; what a stale reader sees is the poison.
    let stale = unsafe { std::slice::from_raw_parts(raw, 128) };
    assert!(
        stale.iter().all(|&b| b == POISON),
        "returned memory is poisoned"
    );
}

#[test]
fn a_record_batch_dropped_on_another_thread_returns_its_buffers() {
    let p = pool(small());
    let mut users = p.vec::<u64>(1000);
    let mut items = p.vec::<u64>(1000);
    for i in 0..1000 {
        users.push(i);
        items.push(i * 2);
    }
    let users: ArrayRef = Arc::new(PrimitiveArray::<UInt64Type>::new(users.into_scalar(), None));
    let items: ArrayRef = Arc::new(UInt64Array::new(items.into_scalar(), None));
    let batch = RecordBatch::try_from_iter(vec![("u", users), ("i", items)]).unwrap();
    let slice = batch.slice(10, 5);
    assert_eq!(p.stats().bytes_held, 0);
    drop(batch);
    assert_eq!(p.stats().puts, 0, "a slice still holds the buffers");
    std::thread::spawn(move || {
        BufferPool::register_worker(1);
        assert_eq!(slice.column(1).len(), 5);
        drop(slice);
    })
    .join()
    .unwrap();
    let s = p.stats();
    assert_eq!((s.puts, s.bytes_held), (2, 2 * 8192));
}

#[test]
fn stress_every_block_is_accounted_for() {
    let p = pool(PoolConfig {
        shards: 4,
        retain_per_class: 1 << 20,
        ..small()
    });
    let (tx, rx) = std::sync::mpsc::channel::<Vec<arrow_buffer::Buffer>>();
    std::thread::scope(|s| {
        for t in 0..4usize {
            let p = p.clone();
            let tx = tx.clone();
            s.spawn(move || {
                BufferPool::register_worker(t);
                let mut keep = Vec::new();
                for i in 0..5_000usize {
                    let mut v = p.vec::<u32>((i * 37 + t * 11) % 3000);
                    v.push(i as u32);
                    keep.push(v.into_buffer());
                    if keep.len() > 8 {
                        // Half the buffers die on another thread.
                        if i % 2 == 0 {
                            tx.send(std::mem::take(&mut keep)).unwrap();
                        } else {
                            keep.clear();
                        }
                    }
                    if t == 0 && i % 500 == 0 {
                        p.rotate();
                    }
                }
            });
        }
        drop(tx);
        s.spawn(move || {
            BufferPool::register_worker(3);
            for batch in rx {
                drop(batch);
            }
        });
    });
    let s = p.stats();
    let hits = s.hits_private + s.hits_shared + s.hits_stolen + s.hits_victim;
    assert_eq!(s.gets, hits + s.misses);
    assert_eq!(s.gets, s.puts + s.drops, "every buffer came back: {s:?}");
    assert_eq!(
        s.misses,
        s.drops + s.expired + s.blocks_held,
        "every block is accounted: {s:?}"
    );
    assert!(hits > s.misses, "the pool is reused: {s:?}");
}
