//! The live heap is measured: with the counting allocator installed, allocating a known
//! amount shows in `heap_live`, and freeing it takes it back.

use tidepool_pipeline::memory::heap::{heap_live, heap_peak, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator::new();

#[test]
fn a_known_allocation_is_seen_and_released() {
    let before = heap_live().expect("the counting allocator is installed");
    let block = vec![1u8; 64 << 20];
    let during = heap_live().unwrap();
    // Other test threads may allocate a little meanwhile; 64 MiB dominates.
    assert!(during >= before + (64 << 20), "{before} -> {during}");
    assert!(during < before + (65 << 20), "{before} -> {during}");
    assert!(heap_peak().unwrap() >= during);
    drop(block);
    let after = heap_live().unwrap();
    assert!(after < before + (1 << 20), "{before} -> {after}");
}
