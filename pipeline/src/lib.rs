//! tidepool's shared vocabulary: what every other crate speaks.
//!
//! - [`event`]: the event schema (Arrow columns, the compact [`Event`]) and the decoder.
//! - [`source`]: [`EventSource`], the trait connectors implement.
//! - [`dead_letter`]: records that could not be used, with their reason.
//! - [`metrics`]: additive quality counters and the names they are reported under.
//! - [`memory`]: the sharded Arrow buffer pool (the only `unsafe` code in tidepool).
//! - [`error`]: [`Error`], classified by domain.
//!
//! This crate depends on Arrow's data crates only: no timely, no client libraries.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod batch;
pub mod dead_letter;
pub mod delta;
pub mod error;
pub mod event;
pub mod memory;
pub mod metrics;
pub mod source;

pub use batch::{EventBatch, EventBatchBuilder};
pub use dead_letter::{DeadLetter, DeadLetterSink, JsonlDeadLetters, MemoryDeadLetters};
pub use error::{Error, ErrorDomain, Result};
pub use event::{BatchOrigin, Event, EventType};
pub use memory::{BufferPool, PoolConfig, PoolStats, PooledVec};
pub use metrics::Quality;
pub use source::{EventReader, EventSource, SourceBatch, SourceInfo, Stoppable};
