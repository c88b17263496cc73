//! Memory discipline: the sharded buffer pool that tidepool's Arrow columns are built in,
//! and the heap-ratio trigger that decides when streaming state is compacted.

pub mod collector;
pub mod gc;
#[allow(unsafe_code)]
pub mod heap;

#[allow(unsafe_code)]
mod pool;

pub use pool::{
    BufferPool, PoolConfig, PoolStats, PooledVec, SharedBlock, UniqueBlock, ALIGN, DEFAULT_CEILING,
    DEFAULT_FLOOR, DEFAULT_RETAIN_PER_CLASS, HEADER as BLOCK_HEADER, POISON,
};
