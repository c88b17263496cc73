//! Parquet and CSV connectors: replay Parquet history as an event source, write events to
//! Parquet, and import CSV/TSV exports into sorted Parquet.
//!
//! - [`ParquetSource`]: files, directories or globs replayed in event-time order, split
//!   over workers by row group.
//! - [`ArrowSource`]: record batches in memory, mapped and replayed like a file.
//! - [`EventWriter`]: atomic Parquet output.
//! - [`ParquetDeltaSink`]: model deltas for serving as Parquet files ([`read_deltas`]).
//! - [`import_csv`]: CSV/TSV → Parquet sorted by event time, with presets for MovieLens.
//!
//! Buffers are allocated by arrow-rs and parquet themselves here (decoding pages,
//! building batches); tidepool's own batches are built downstream.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod chunks;
mod deltas;
mod import;
mod memory;
mod paths;
mod source;
mod writer;

pub use deltas::{read_deltas, ParquetDeltaSink};
pub use import::{import_csv, ColRef, CsvOptions, ImportReport, Preset};
pub use memory::ArrowSource;
pub use paths::expand_inputs;
pub use source::{ColumnMapping, IntTimeUnit, ParquetSource, DEFAULT_BATCH_ROWS};
pub use writer::{EventWriter, DEFAULT_ROW_GROUP_ROWS};
