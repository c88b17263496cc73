//! Replaying Parquet files as an [`EventSource`].
//!
//! The source reads only metadata up front: row counts and, per row group, the minimum
//! and maximum event time from the column statistics. Row groups are ordered by
//! `(min ts, file, row group)` and dealt round-robin to workers, so each worker reads a
//! disjoint share whose row groups come in event-time order. A worker streams its row
//! groups one at a time in batches of [`DEFAULT_BATCH_ROWS`] rows, reading only the
//! mapped columns: memory is bounded by a batch per worker and a row group's compressed
//! mapped columns (read whole up to 64 MiB, see `chunks`), never a file.
//!
//! Each row's replay position is `file index << 40 | row in file`: unique, and the same
//! whatever the number of workers, so ties in event time break the same way always.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::statistics::Statistics;
use tidepool_pipeline::event::{EVENT_TYPE, ITEM_ID, TS, USER_ID, WEIGHT};
use tidepool_pipeline::{
    BatchOrigin, BufferPool, Error, EventReader, EventSource, Result, SourceBatch, SourceInfo,
};

use crate::chunks::{chunk_ranges, RowGroupBytes, IN_MEMORY_LIMIT};
use crate::paths::expand_inputs;

/// Rows per batch read from Parquet. The reader's own allocations are per batch (pages,
/// levels, arrays), so large batches keep allocator calls per event small; 64 k rows of
/// the mapped columns is a few megabytes.
pub const DEFAULT_BATCH_ROWS: usize = 65_536;

/// Bits of a replay position that hold the row within its file.
const ROW_BITS: u32 = 40;

/// Unit of an integer time column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IntTimeUnit {
    /// Seconds since the epoch.
    Seconds,
    /// Milliseconds since the epoch.
    #[default]
    Millis,
}

impl IntTimeUnit {
    fn to_ms(self, v: i64) -> i64 {
        match self {
            IntTimeUnit::Seconds => v.saturating_mul(1000),
            IntTimeUnit::Millis => v,
        }
    }
}

impl std::str::FromStr for IntTimeUnit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "s" => Ok(IntTimeUnit::Seconds),
            "ms" => Ok(IntTimeUnit::Millis),
            other => Err(Error::Config(format!(
                "unknown time unit {other:?}; valid: s, ms"
            ))),
        }
    }
}

/// Which file columns hold the event fields. Defaults are tidepool's own names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMapping {
    /// User id column.
    pub user: String,
    /// Item id column.
    pub item: String,
    /// Event time column.
    pub ts: String,
    /// Event type column, if the files have one.
    pub event_type: Option<String>,
    /// Weight column, if the files have one.
    pub weight: Option<String>,
    /// Unit of the time column when it is a plain integer (timestamp types carry theirs).
    pub int_time_unit: IntTimeUnit,
}

impl Default for ColumnMapping {
    fn default() -> Self {
        Self {
            user: USER_ID.into(),
            item: ITEM_ID.into(),
            ts: TS.into(),
            event_type: Some(EVENT_TYPE.into()),
            weight: Some(WEIGHT.into()),
            int_time_unit: IntTimeUnit::Millis,
        }
    }
}

#[derive(Clone, Debug)]
struct RowGroup {
    file: usize,
    index: usize,
    first_row: u64,
    min_ts: Option<i64>,
}

#[derive(Clone, Debug)]
struct FileEntry {
    path: PathBuf,
    name: Arc<str>,
    /// Leaf column indices to read and the canonical name of each, in file order.
    projection: Vec<(usize, &'static str)>,
    /// Whether the time column is a plain integer that needs the mapping's unit.
    int_time: bool,
    /// The footer, parsed once: each row group opens with it instead of parsing it again
    /// (hundreds of allocator calls per parse).
    metadata: ArrowReaderMetadata,
}

/// Parquet files replayed as events.
#[derive(Debug)]
pub struct ParquetSource {
    files: Vec<FileEntry>,
    row_groups: Vec<RowGroup>,
    info: SourceInfo,
    mapping: ColumnMapping,
    batch_rows: usize,
    pool: BufferPool,
}

impl ParquetSource {
    /// Opens the files that `inputs` (paths, directories, globs) name, reading metadata.
    pub fn open(inputs: &[String], mapping: ColumnMapping) -> Result<Self> {
        let paths = expand_inputs(inputs)?;
        if paths.len() >= 1 << (64 - ROW_BITS) {
            return Err(Error::Config(format!(
                "{} files is more than one replay can address",
                paths.len()
            )));
        }
        let mut files = Vec::new();
        let mut row_groups = Vec::new();
        let (mut rows, mut min_ts, mut max_ts) = (0u64, None::<i64>, None::<i64>);
        for (file_index, path) in paths.into_iter().enumerate() {
            let context = || format!("reading metadata of {}", path.display());
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::default())
                .map_err(|e| Error::connector(context(), e))?;
            let builder =
                ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata.clone());
            let schema = Arc::clone(builder.schema());
            let (projection, ts_type) = project(&schema, &mapping).map_err(|e| {
                let message = match e {
                    Error::Config(m) => m,
                    other => other.to_string(),
                };
                Error::Config(format!("{}: {message}", path.display()))
            })?;
            let int_time = matches!(ts_type, DataType::Int64 | DataType::Int32);
            let to_ms = |v: i64| match &ts_type {
                DataType::Timestamp(TimeUnit::Second, _) => v.saturating_mul(1000),
                DataType::Timestamp(TimeUnit::Microsecond, _) => v.div_euclid(1000),
                DataType::Timestamp(TimeUnit::Nanosecond, _) => v.div_euclid(1_000_000),
                DataType::Int64 | DataType::Int32 => mapping.int_time_unit.to_ms(v),
                _ => v,
            };
            let meta = builder.metadata();
            // Statistics are per leaf column; other (nested) columns shift leaf indices.
            let ts_leaf = meta
                .file_metadata()
                .schema_descr()
                .columns()
                .iter()
                .position(|c| c.path().parts() == [mapping.ts.as_str()]);
            let file_len = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            check_chunks(meta, file_len).map_err(|reason| Error::BadInput {
                location: path.display().to_string(),
                reason,
            })?;
            let mut first_row = 0u64;
            for (index, rg) in meta.row_groups().iter().enumerate() {
                let n = rg.num_rows().max(0) as u64;
                let stats = ts_leaf.and_then(|leaf| rg.column(leaf).statistics());
                let (lo, hi) = match stats {
                    Some(Statistics::Int64(s)) => (s.min_opt().copied(), s.max_opt().copied()),
                    Some(Statistics::Int32(s)) => (
                        s.min_opt().map(|&v| v as i64),
                        s.max_opt().map(|&v| v as i64),
                    ),
                    _ => (None, None),
                };
                let (lo, hi) = (lo.map(to_ms), hi.map(to_ms));
                if let Some(lo) = lo {
                    min_ts = Some(min_ts.map_or(lo, |m| m.min(lo)));
                }
                if let Some(hi) = hi {
                    max_ts = Some(max_ts.map_or(hi, |m| m.max(hi)));
                }
                if n > 0 {
                    row_groups.push(RowGroup {
                        file: file_index,
                        index,
                        first_row,
                        min_ts: lo,
                    });
                }
                first_row += n;
                rows += n;
            }
            if first_row >= 1 << ROW_BITS {
                return Err(Error::Config(format!(
                    "{} has {first_row} rows, more than one file may hold (2^40)",
                    path.display()
                )));
            }
            files.push(FileEntry {
                name: path.display().to_string().into(),
                path,
                projection,
                int_time,
                metadata,
            });
        }
        row_groups.sort_by_key(|rg| (rg.min_ts.unwrap_or(i64::MIN), rg.file, rg.index));
        let description = match files.as_slice() {
            [one] => one.name.to_string(),
            many => format!("{} Parquet files", many.len()),
        };
        Ok(Self {
            files,
            row_groups,
            info: SourceInfo {
                description,
                rows: Some(rows),
                min_ts,
                max_ts,
            },
            mapping,
            batch_rows: DEFAULT_BATCH_ROWS,
            pool: BufferPool::new(Default::default()),
        })
    }

    /// Builds the columns tidepool converts (integer times) in `pool`.
    pub fn with_pool(mut self, pool: BufferPool) -> Self {
        self.pool = pool;
        self
    }

    /// Sets the rows per batch (at least 1).
    pub fn with_batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.max(1);
        self
    }

    /// The files this source replays.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }
}

/// The leaf columns to read for `mapping`, with their canonical names, and the type of
/// the time column.
pub(crate) fn project(
    schema: &Schema,
    mapping: &ColumnMapping,
) -> Result<(Vec<(usize, &'static str)>, DataType)> {
    let mut wanted: Vec<(&str, &'static str, bool)> = vec![
        (mapping.user.as_str(), USER_ID, true),
        (mapping.item.as_str(), ITEM_ID, true),
        (mapping.ts.as_str(), TS, true),
    ];
    if let Some(c) = &mapping.event_type {
        wanted.push((c.as_str(), EVENT_TYPE, false));
    }
    if let Some(c) = &mapping.weight {
        wanted.push((c.as_str(), WEIGHT, false));
    }
    let mut projection = Vec::new();
    let mut ts_type = DataType::Null;
    for (column, canonical, required) in wanted {
        match schema.index_of(column) {
            Ok(i) => {
                let field = schema.field(i);
                if field.data_type().is_nested() {
                    return Err(Error::Config(format!(
                        "column {column} is nested ({}); expected a flat column",
                        field.data_type()
                    )));
                }
                if canonical == TS {
                    ts_type = field.data_type().clone();
                }
                projection.push((i, canonical));
            }
            Err(_) if !required => {}
            Err(_) => {
                let found: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(Error::Config(format!(
                    "column {column} (for {canonical}) is missing; columns: {}",
                    found.join(", ")
                )));
            }
        }
    }
    projection.sort_by_key(|(i, _)| *i);
    Ok((projection, ts_type))
}

impl EventSource for ParquetSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn open(&self, worker: usize, workers: usize) -> Result<EventReader> {
        let mine: Vec<RowGroup> = self
            .row_groups
            .iter()
            .enumerate()
            .filter(|(i, _)| i % workers.max(1) == worker)
            .map(|(_, rg)| rg.clone())
            .collect();
        let files = self.files.clone();
        let unit = self.mapping.int_time_unit;
        let batch_rows = self.batch_rows;
        let pool = self.pool.clone();
        let reader = mine.into_iter().flat_map(move |rg| {
            let FileEntry {
                path,
                name,
                projection,
                int_time,
                metadata,
            } = files[rg.file].clone();
            // Opening reads page headers, which parquet-rs may also panic on. The parsed
            // footer is only read here, so a panic cannot leave it half-changed.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                open_row_group(&path, &metadata, &rg, &projection, batch_rows)
            }))
            .unwrap_or_else(|_| {
                Err(Error::connector(
                    format!("reading {} row group {}", path.display(), rg.index),
                    "the Parquet decoder failed on damaged data",
                ))
            });
            match opened {
                Err(e) => Box::new(std::iter::once(Err(e))) as EventReader,
                Ok(batches) => {
                    let pool = pool.clone();
                    let mut schema = None;
                    let mut row = rg.first_row;
                    let file_bits = (rg.file as u64) << ROW_BITS;
                    let batches = Unpanicking {
                        inner: Some(batches),
                        context: format!("reading {name} row group {}", rg.index),
                    };
                    Box::new(batches.map(move |batch| {
                        let batch = batch?;
                        let records =
                            canonical(&batch, &projection, int_time, unit, &pool, &mut schema)?;
                        let origin = BatchOrigin {
                            source: Arc::clone(&name),
                            first_row: row,
                            first_pos: file_bits | row,
                        };
                        row += records.num_rows() as u64;
                        Ok(SourceBatch::new(records, origin))
                    }))
                }
            }
        });
        Ok(Box::new(reader))
    }
}

/// Where every column chunk of `meta` lies must be inside the file: parquet-rs asserts
/// this (it panics on a negative offset or length), and damaged metadata says otherwise.
fn check_chunks(
    meta: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
) -> std::result::Result<(), String> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for (c, col) in rg.columns().iter().enumerate() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or_else(|| col.data_page_offset());
            let len = col.compressed_size();
            let inside = start >= 0
                && len >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= file_len);
            if !inside {
                return Err(format!(
                    "damaged metadata: row group {g} column {c} claims bytes {start}..{start}+{len} of a {file_len}-byte file"
                ));
            }
        }
    }
    Ok(())
}

/// A Parquet batch reader whose panics (parquet-rs asserts on some damaged data) become
/// an error naming the file and row group, after which it ends.
struct Unpanicking<I> {
    inner: Option<I>,
    context: String,
}

impl<I, T, E> Iterator for Unpanicking<I>
where
    I: Iterator<Item = std::result::Result<T, E>>,
    E: std::fmt::Display,
{
    type Item = Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        let inner = self.inner.as_mut()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.next())) {
            Ok(None) => None,
            Ok(Some(item)) => Some(item.map_err(|e| Error::connector(self.context.clone(), e))),
            Err(panic) => {
                // Never touch a reader that panicked again.
                self.inner = None;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Some(Err(Error::connector(
                    self.context.clone(),
                    format!("the Parquet decoder failed on damaged data ({message})"),
                )))
            }
        }
    }
}

fn open_row_group(
    path: &PathBuf,
    metadata: &ArrowReaderMetadata,
    rg: &RowGroup,
    projection: &[(usize, &'static str)],
    batch_rows: usize,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let context = || format!("reading {} row group {}", path.display(), rg.index);
    let meta = metadata.metadata();
    let mask = ProjectionMask::roots(
        meta.file_metadata().schema_descr(),
        projection.iter().map(|(i, _)| *i),
    );
    // Small enough row groups are read whole (see `chunks`), larger ones page by page.
    let ranges = chunk_ranges(meta.row_group(rg.index), |leaf| mask.leaf_included(leaf));
    let reader = if ranges.iter().map(|(a, b)| b - a).sum::<u64>() <= IN_MEMORY_LIMIT {
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bytes =
            RowGroupBytes::read(&mut file, file_len, &ranges).map_err(|e| Error::io(path, e))?;
        batches(bytes, metadata, rg.index, mask, batch_rows)
    } else {
        batches(file, metadata, rg.index, mask, batch_rows)
    };
    reader.map_err(|e| Error::connector(context(), e))
}

/// The batch reader of row group `index` of `reader`, projected to `mask`.
fn batches<R: parquet::file::reader::ChunkReader + 'static>(
    reader: R,
    metadata: &ArrowReaderMetadata,
    index: usize,
    mask: ProjectionMask,
    batch_rows: usize,
) -> parquet::errors::Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    ParquetRecordBatchReaderBuilder::new_with_metadata(reader, metadata.clone())
        .with_row_groups(vec![index])
        .with_projection(mask)
        .with_batch_size(batch_rows)
        .build()
}

/// Renames the projected columns to tidepool's names and puts integer times in ms. The
/// renamed schema is kept in `schema` and reused while the column types stay the same.
pub(crate) fn canonical(
    batch: &RecordBatch,
    projection: &[(usize, &'static str)],
    int_time: bool,
    unit: IntTimeUnit,
    pool: &BufferPool,
    schema: &mut Option<SchemaRef>,
) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(projection.len());
    for (position, (_, name)) in projection.iter().enumerate() {
        let mut column = Arc::clone(batch.column(position));
        if *name == TS && int_time {
            let mut ms = pool.vec::<i64>(column.len());
            match column.data_type() {
                DataType::Int64 => column
                    .as_primitive::<Int64Type>()
                    .values()
                    .iter()
                    .for_each(|&v| ms.push(unit.to_ms(v))),
                DataType::Int32 => column
                    .as_primitive::<arrow_array::types::Int32Type>()
                    .values()
                    .iter()
                    .for_each(|&v| ms.push(unit.to_ms(v as i64))),
                _ => {}
            }
            if ms.len() == column.len() {
                column = Arc::new(Int64Array::new(ms.into_scalar(), column.nulls().cloned()));
            }
        }
        columns.push(column);
    }
    let same = schema.as_ref().is_some_and(|s| {
        s.fields().len() == columns.len()
            && s.fields()
                .iter()
                .zip(&columns)
                .all(|(f, c)| f.data_type() == c.data_type())
    });
    if !same {
        let fields: Vec<Field> = projection
            .iter()
            .zip(&columns)
            .map(|((_, name), c)| Field::new(*name, c.data_type().clone(), true))
            .collect();
        *schema = Some(Arc::new(Schema::new(fields)));
    }
    let schema = schema
        .clone()
        .ok_or_else(|| Error::Internal("renamed schema missing".into()))?;
    RecordBatch::try_new(schema, columns)
        .map_err(|e| Error::Internal(format!("renaming columns: {e}")))
}
