//! Arrow record batches held in memory (a pyarrow table, a DataFrame converted by
//! pyarrow, batches a program built) replayed as an [`EventSource`], with the column
//! mapping and time conversions of Parquet files.
//!
//! The batches are not copied: they are sliced (zero-copy) into pieces of at most
//! [`DEFAULT_BATCH_ROWS`] rows, renamed to the canonical columns up front (an integer time
//! column is converted to milliseconds then, the one column that is rebuilt) and dealt
//! round-robin to workers in their given order. Each row's replay position is its index
//! in the whole sequence, so a sorted input replays in the same order on any number of
//! workers, as a Parquet file does.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int64Type, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use tidepool_pipeline::event::TS;
use tidepool_pipeline::{
    BatchOrigin, BufferPool, Error, EventReader, EventSource, Result, SourceBatch, SourceInfo,
};

use crate::source::{canonical, project, ColumnMapping, DEFAULT_BATCH_ROWS};

/// Record batches in memory, replayed as events.
#[derive(Debug)]
pub struct ArrowSource {
    /// Canonical pieces with the replay position of their first row.
    pieces: Arc<Vec<(RecordBatch, u64)>>,
    name: Arc<str>,
    info: SourceInfo,
}

impl ArrowSource {
    /// Maps `batches` (all with one schema) by `mapping`; `description` names the source
    /// in reports and errors. Column errors are those of a Parquet file with that schema.
    pub fn new(
        batches: Vec<RecordBatch>,
        mapping: &ColumnMapping,
        description: &str,
        pool: &BufferPool,
    ) -> Result<Self> {
        let Some(first) = batches.first() else {
            return Err(Error::Config(format!("{description}: no record batches")));
        };
        let schema = first.schema();
        let (projection, ts_type) = project(&schema, mapping)
            .map_err(|e| Error::Config(format!("{description}: {}", config_message(e))))?;
        let int_time = matches!(ts_type, DataType::Int64 | DataType::Int32);
        let indices: Vec<usize> = projection.iter().map(|(i, _)| *i).collect();
        let mut pieces = Vec::new();
        let mut renamed = None;
        let (mut row, mut min_ts, mut max_ts) = (0u64, None::<i64>, None::<i64>);
        for (b, batch) in batches.iter().enumerate() {
            if batch.schema() != schema {
                return Err(Error::Config(format!(
                    "{description}: record batch {b} has a schema different from the first's"
                )));
            }
            let projected = batch
                .project(&indices)
                .map_err(|e| Error::Internal(format!("projecting batch {b}: {e}")))?;
            let mut offset = 0;
            while offset < projected.num_rows() {
                let len = DEFAULT_BATCH_ROWS.min(projected.num_rows() - offset);
                let piece = projected.slice(offset, len);
                let piece = canonical(
                    &piece,
                    &projection,
                    int_time,
                    mapping.int_time_unit,
                    pool,
                    &mut renamed,
                )?;
                if let Some((lo, hi)) = ts_range(&piece) {
                    min_ts = Some(min_ts.map_or(lo, |m| m.min(lo)));
                    max_ts = Some(max_ts.map_or(hi, |m| m.max(hi)));
                }
                pieces.push((piece, row));
                row += len as u64;
                offset += len;
            }
        }
        Ok(Self {
            pieces: Arc::new(pieces),
            name: description.into(),
            info: SourceInfo {
                description: description.to_string(),
                rows: Some(row),
                min_ts,
                max_ts,
            },
        })
    }
}

fn config_message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

/// Smallest and largest event time of a canonical piece in milliseconds, nulls skipped
/// (they become dead letters when decoded).
fn ts_range(piece: &RecordBatch) -> Option<(i64, i64)> {
    let column = piece.column_by_name(TS)?;
    let scale = |v: i64| match column.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => v.saturating_mul(1000),
        DataType::Timestamp(TimeUnit::Microsecond, _) => v.div_euclid(1000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => v.div_euclid(1_000_000),
        _ => v,
    };
    let values: &[i64] = match column.data_type() {
        DataType::Int64 => column.as_primitive::<Int64Type>().values(),
        DataType::Timestamp(TimeUnit::Second, _) => {
            column.as_primitive::<TimestampSecondType>().values()
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            column.as_primitive::<TimestampMillisecondType>().values()
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            column.as_primitive::<TimestampMicrosecondType>().values()
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            column.as_primitive::<TimestampNanosecondType>().values()
        }
        _ => return None,
    };
    let nulls = column.nulls();
    let mut range: Option<(i64, i64)> = None;
    for (i, &v) in values.iter().enumerate() {
        if nulls.is_some_and(|n| n.is_null(i)) {
            continue;
        }
        let v = scale(v);
        range = Some(range.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))));
    }
    range
}

impl EventSource for ArrowSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn open(&self, worker: usize, workers: usize) -> Result<EventReader> {
        let pieces = Arc::clone(&self.pieces);
        let name = Arc::clone(&self.name);
        let workers = workers.max(1);
        Ok(Box::new((worker..pieces.len()).step_by(workers).map(
            move |i| {
                let (records, first) = &pieces[i];
                Ok(SourceBatch::new(
                    records.clone(),
                    BatchOrigin {
                        source: Arc::clone(&name),
                        first_row: *first,
                        first_pos: *first,
                    },
                ))
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray, UInt64Array};
    use arrow_schema::{Field, Schema};

    fn batch(users: &[u64], items: &[u64], ts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("uid", DataType::UInt64, false),
            Field::new("iid", DataType::Int64, false),
            Field::new("when", DataType::Int64, false),
            Field::new("note", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(users.to_vec())),
                Arc::new(Int64Array::from(
                    items.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(ts.to_vec())),
                Arc::new(StringArray::from(vec!["x"; users.len()])),
            ],
        )
        .unwrap()
    }

    fn mapping() -> ColumnMapping {
        ColumnMapping {
            user: "uid".into(),
            item: "iid".into(),
            ts: "when".into(),
            event_type: None,
            weight: None,
            int_time_unit: crate::IntTimeUnit::Seconds,
        }
    }

    #[test]
    fn every_row_is_read_once_with_positions_independent_of_workers() {
        let pool = BufferPool::new(Default::default());
        let batches = vec![batch(&[1, 2], &[10, 11], &[5, 6]), batch(&[3], &[12], &[7])];
        let source = ArrowSource::new(batches, &mapping(), "frame", &pool).unwrap();
        assert_eq!(source.info().rows, Some(3));
        assert_eq!(
            (source.info().min_ts, source.info().max_ts),
            (Some(5000), Some(7000))
        );
        for workers in [1, 2, 3] {
            let mut seen = Vec::new();
            for w in 0..workers {
                for b in source.open(w, workers).unwrap() {
                    let b = b.unwrap();
                    let mut events = Vec::new();
                    b.decode(&mut events, &mut |d| panic!("{d:?}")).unwrap();
                    seen.extend(events.iter().map(|e| (e.pos, e.user, e.item, e.ts)));
                }
            }
            seen.sort();
            assert_eq!(
                seen,
                vec![(0, 1, 10, 5000), (1, 2, 11, 6000), (2, 3, 12, 7000)],
                "{workers} workers"
            );
        }
    }

    #[test]
    fn a_missing_column_is_named() {
        let pool = BufferPool::new(Default::default());
        let mut m = mapping();
        m.user = "user".into();
        let err = ArrowSource::new(vec![batch(&[1], &[1], &[1])], &m, "frame", &pool)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("frame") && err.contains("column user"),
            "{err}"
        );
        let err = ArrowSource::new(Vec::new(), &mapping(), "frame", &pool)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no record batches"), "{err}");
    }
}
