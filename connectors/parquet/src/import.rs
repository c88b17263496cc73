//! CSV/TSV → Parquet import, sorted by event time.
//!
//! The import reads the whole input, sorts it by event time with a *stable* sort (rows
//! with equal timestamps keep their input order, which is what makes the MovieLens
//! reference figures reproducible), optionally keeps only the first occurrence of each
//! (user, item) pair, and writes tidepool's canonical schema. A malformed row stops the
//! import with `file:line: reason`, or, with `skip_bad`, goes to the dead-letter sink
//! with its reason and raw text and is counted.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{Float32Array, RecordBatch, TimestampMillisecondArray, UInt64Array, UInt8Array};
use rustc_hash::FxHashSet;
use tidepool_pipeline::event::event_schema;
use tidepool_pipeline::{BufferPool, DeadLetter, DeadLetterSink, Error, EventType, Result};

use crate::source::IntTimeUnit;
use crate::writer::EventWriter;

/// A column named by header or by 0-based index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColRef {
    /// By header name.
    Name(String),
    /// By 0-based position.
    Index(usize),
}

impl std::str::FromStr for ColRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::Config("empty column reference".into()));
        }
        Ok(match s.parse::<usize>() {
            Ok(i) => ColRef::Index(i),
            Err(_) => ColRef::Name(s.to_string()),
        })
    }
}

impl std::fmt::Display for ColRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColRef::Name(n) => write!(f, "{n}"),
            ColRef::Index(i) => write!(f, "#{i}"),
        }
    }
}

/// Known export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// MovieLens 100K `u.data`: tab-separated `user item rating timestamp`, no header.
    Movielens100k,
    /// MovieLens CSV (`ratings.csv`): `userId,movieId,rating,timestamp` with a header.
    MovielensCsv,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "movielens-100k" => Ok(Preset::Movielens100k),
            "movielens-csv" => Ok(Preset::MovielensCsv),
            other => Err(Error::Config(format!(
                "unknown preset {other:?}; valid: movielens-100k, movielens-csv"
            ))),
        }
    }
}

/// How to read a delimited file.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvOptions {
    /// Field delimiter.
    pub delimiter: u8,
    /// Whether the first line names the columns.
    pub has_header: bool,
    /// User id column.
    pub user: ColRef,
    /// Item id column.
    pub item: ColRef,
    /// Event time column.
    pub time: ColRef,
    /// Unit of the event time column.
    pub time_unit: IntTimeUnit,
    /// Rating column: its value becomes the weight and the event type `rating`.
    pub rating: Option<ColRef>,
    /// Rows rated below this are left out (counted, not dead-lettered).
    pub min_rating: Option<f64>,
    /// Keep only the first occurrence (in time order) of each (user, item) pair.
    pub dedup: bool,
    /// Skip malformed rows (to the dead-letter sink) instead of failing.
    pub skip_bad: bool,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            delimiter: b',',
            has_header: true,
            user: ColRef::Name("user_id".into()),
            item: ColRef::Name("item_id".into()),
            time: ColRef::Name("ts".into()),
            time_unit: IntTimeUnit::Millis,
            rating: None,
            min_rating: None,
            dedup: false,
            skip_bad: false,
            row_group_rows: crate::writer::DEFAULT_ROW_GROUP_ROWS,
        }
    }
}

impl CsvOptions {
    /// The options of a preset.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Movielens100k => Self {
                delimiter: b'\t',
                has_header: false,
                user: ColRef::Index(0),
                item: ColRef::Index(1),
                rating: Some(ColRef::Index(2)),
                time: ColRef::Index(3),
                time_unit: IntTimeUnit::Seconds,
                ..Self::default()
            },
            Preset::MovielensCsv => Self {
                delimiter: b',',
                has_header: true,
                user: ColRef::Name("userId".into()),
                item: ColRef::Name("movieId".into()),
                rating: Some(ColRef::Name("rating".into())),
                time: ColRef::Name("timestamp".into()),
                time_unit: IntTimeUnit::Seconds,
                ..Self::default()
            },
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// Data rows read (header excluded).
    pub rows_read: u64,
    /// Rows written to Parquet.
    pub rows_written: u64,
    /// Malformed rows skipped (only with `skip_bad`).
    pub bad_rows: u64,
    /// Rows left out by `min_rating`.
    pub below_min_rating: u64,
    /// Repeated (user, item) pairs left out by `dedup`.
    pub duplicates: u64,
    /// Whether the input was already in time order.
    pub was_sorted: bool,
}

#[derive(Clone, Copy)]
struct Row {
    ts: i64,
    user: u64,
    item: u64,
    weight: f32,
    kind: EventType,
}

fn resolve(col: &ColRef, header: Option<&csv::ByteRecord>, what: &str) -> Result<usize> {
    match (col, header) {
        (ColRef::Index(i), _) => Ok(*i),
        (ColRef::Name(name), Some(h)) => {
            h.iter().position(|f| f == name.as_bytes()).ok_or_else(|| {
                let names: Vec<_> = h.iter().map(String::from_utf8_lossy).collect();
                Error::Config(format!(
                    "{what} column {name:?} is not in the header ({})",
                    names.join(", ")
                ))
            })
        }
        (ColRef::Name(name), None) => Err(Error::Config(format!(
            "{what} column {name:?} is named, but the file has no header: use a 0-based index"
        ))),
    }
}

fn field<'r>(record: &'r csv::ByteRecord, index: usize, what: &str) -> Result<&'r str, String> {
    let raw = record
        .get(index)
        .ok_or_else(|| format!("has {} fields, {what} is field {}", record.len(), index + 1))?;
    std::str::from_utf8(raw)
        .map(str::trim)
        .map_err(|_| format!("{what} is not valid UTF-8"))
}

fn parse_id(record: &csv::ByteRecord, index: usize, what: &str) -> Result<u64, String> {
    let s = field(record, index, what)?;
    s.parse::<u64>()
        .map_err(|_| format!("{what} {s:?} is not an unsigned integer"))
}

/// Imports `input` into a Parquet file at `output`, sorted by event time.
///
/// With `skip_bad`, malformed rows go to `dead`; without it the first one is an error
/// naming file, line and reason, and no output file is left behind.
pub fn import_csv(
    input: &Path,
    output: &Path,
    options: &CsvOptions,
    dead: &dyn DeadLetterSink,
) -> Result<ImportReport> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(options.delimiter)
        .has_headers(options.has_header)
        .flexible(true)
        .from_path(input)
        .map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(io) => Error::io(input, io),
            other => Error::connector(format!("opening {}", input.display()), format!("{other:?}")),
        })?;
    let header = if options.has_header {
        Some(
            reader
                .byte_headers()
                .map_err(|e| Error::connector(format!("reading header of {}", input.display()), e))?
                .clone(),
        )
    } else {
        None
    };
    let user_col = resolve(&options.user, header.as_ref(), "user")?;
    let item_col = resolve(&options.item, header.as_ref(), "item")?;
    let time_col = resolve(&options.time, header.as_ref(), "time")?;
    let rating_col = options
        .rating
        .as_ref()
        .map(|c| resolve(c, header.as_ref(), "rating"))
        .transpose()?;

    let name = input.display().to_string();
    let mut report = ImportReport::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        let parsed = match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                report.rows_read += 1;
                parse_row(&record, user_col, item_col, time_col, rating_col, options)
            }
            Err(e) => {
                report.rows_read += 1;
                Err(format!("unreadable row: {e}"))
            }
        };
        let line = record.position().map_or(line, |p| p.line());
        match parsed {
            Ok(Some(row)) => rows.push(row),
            Ok(None) => report.below_min_rating += 1,
            Err(reason) if options.skip_bad => {
                report.bad_rows += 1;
                let raw = record
                    .iter()
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join(&(options.delimiter as char).to_string());
                dead.send(DeadLetter {
                    location: format!("{name}:{line}"),
                    reason,
                    raw: Some(raw),
                })?;
            }
            Err(reason) => {
                return Err(Error::BadInput {
                    location: format!("{name}:{line}"),
                    reason: format!("{reason} (use --skip-bad to skip malformed rows)"),
                })
            }
        }
    }

    report.was_sorted = rows.windows(2).all(|w| w[0].ts <= w[1].ts);
    if !report.was_sorted {
        // Stable: equal timestamps keep their input order.
        rows.sort_by_key(|r| r.ts);
    }
    if options.dedup {
        let mut seen = FxHashSet::default();
        let before = rows.len();
        rows.retain(|r| seen.insert((r.user, r.item)));
        report.duplicates = (before - rows.len()) as u64;
    }

    let mut writer = EventWriter::create(output, event_schema(), options.row_group_rows)?;
    // Each chunk's columns reuse the blocks of the previous chunk, dropped once written.
    let pool = BufferPool::new(Default::default());
    for chunk in rows.chunks(64 * 1024) {
        writer.write(&rows_to_batch(chunk, &pool)?)?;
    }
    report.rows_written = writer.finish()?;
    dead.flush()?;
    Ok(report)
}

fn parse_row(
    record: &csv::ByteRecord,
    user_col: usize,
    item_col: usize,
    time_col: usize,
    rating_col: Option<usize>,
    options: &CsvOptions,
) -> Result<Option<Row>, String> {
    if record.len() == 1 && record.get(0).is_some_and(|f| f.is_empty()) {
        return Err("empty line".into());
    }
    let user = parse_id(record, user_col, "user")?;
    let item = parse_id(record, item_col, "item")?;
    let t = field(record, time_col, "time")?;
    let ts = t
        .parse::<i64>()
        .ok()
        .and_then(|v| match options.time_unit {
            IntTimeUnit::Seconds => v.checked_mul(1000),
            IntTimeUnit::Millis => Some(v),
        })
        .ok_or_else(|| format!("time {t:?} is not an integer timestamp"))?;
    let (weight, kind) = match rating_col {
        Some(c) => {
            let r = field(record, c, "rating")?;
            let rating = r
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("rating {r:?} is not a number"))?;
            if options.min_rating.is_some_and(|min| rating < min) {
                return Ok(None);
            }
            (rating as f32, EventType::Rating)
        }
        None => (1.0, EventType::View),
    };
    Ok(Some(Row {
        ts,
        user,
        item,
        weight,
        kind,
    }))
}

fn rows_to_batch(rows: &[Row], pool: &BufferPool) -> Result<RecordBatch> {
    let column = |f: &dyn Fn(&Row) -> u64| {
        let mut v = pool.vec::<u64>(rows.len());
        rows.iter().for_each(|r| v.push(f(r)));
        v.into_scalar()
    };
    let (mut kinds, mut times, mut weights) = (
        pool.vec::<u8>(rows.len()),
        pool.vec::<i64>(rows.len()),
        pool.vec::<f32>(rows.len()),
    );
    for r in rows {
        kinds.push(r.kind as u8);
        times.push(r.ts);
        weights.push(r.weight);
    }
    RecordBatch::try_new(
        event_schema(),
        vec![
            Arc::new(UInt64Array::new(column(&|r| r.user), None)),
            Arc::new(UInt64Array::new(column(&|r| r.item), None)),
            Arc::new(UInt8Array::new(kinds.into_scalar(), None)),
            Arc::new(
                TimestampMillisecondArray::new(times.into_scalar(), None).with_timezone("UTC"),
            ),
            Arc::new(Float32Array::new(weights.into_scalar(), None)),
        ],
    )
    .map_err(|e| Error::Internal(format!("building an event batch: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_pipeline::MemoryDeadLetters;

    fn run(
        text: &str,
        options: &CsvOptions,
    ) -> (Result<ImportReport>, MemoryDeadLetters, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        std::fs::write(&input, text).unwrap();
        let dead = MemoryDeadLetters::new(10);
        let report = import_csv(&input, &dir.path().join("out.parquet"), options, &dead);
        (report, dead, dir)
    }

    #[test]
    fn bad_rows_fail_with_file_and_line() {
        let text = "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,x,3.0,101\n";
        let (report, _, dir) = run(text, &CsvOptions::preset(Preset::MovielensCsv));
        let err = report.unwrap_err().to_string();
        assert!(
            err.contains("in.csv:3: item \"x\" is not an unsigned integer"),
            "{err}"
        );
        assert!(!dir.path().join("out.parquet").exists());
        assert!(!dir.path().join("out.parquet.tmp").exists());
    }

    #[test]
    fn skip_bad_counts_and_dead_letters_every_bad_row() {
        let text = "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,x,3.0,101\n2,3\n\n4,5,abc,1\n3,3,1.0,-5\n";
        let options = CsvOptions {
            skip_bad: true,
            ..CsvOptions::preset(Preset::MovielensCsv)
        };
        let (report, dead, _dir) = run(text, &options);
        let report = report.unwrap();
        assert_eq!(report.rows_written, 2);
        assert_eq!(report.bad_rows, 3);
        assert_eq!(dead.count(), 3);
        let reasons: Vec<_> = dead
            .kept()
            .into_iter()
            .map(|d| (d.location, d.reason))
            .collect();
        assert!(reasons[0].0.ends_with("in.csv:3"));
        assert!(reasons[1].1.contains("has 2 fields"), "{reasons:?}");
        assert!(reasons[2].1.contains("rating \"abc\""), "{reasons:?}");
        assert!(!report.was_sorted);
    }

    #[test]
    fn min_rating_and_dedup_are_counted() {
        let text = "1\t2\t5\t10\n1\t2\t4\t5\n1\t3\t1\t7\n";
        let options = CsvOptions {
            min_rating: Some(3.0),
            dedup: true,
            ..CsvOptions::preset(Preset::Movielens100k)
        };
        let (report, _, _dir) = run(text, &options);
        let report = report.unwrap();
        assert_eq!(report.rows_read, 3);
        assert_eq!(report.below_min_rating, 1);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.rows_written, 1);
    }

    #[test]
    fn unknown_header_names_the_columns() {
        let text = "a,b,c\n1,2,3\n";
        let (report, _, _dir) = run(text, &CsvOptions::default());
        let err = report.unwrap_err().to_string();
        assert!(
            err.contains("user column \"user_id\" is not in the header (a, b, c)"),
            "{err}"
        );
    }
}
