//! The Parquet reader never panics on a damaged file: a good file with bytes flipped,
//! overwritten, cut off or spliced in either reads (the damage hit bytes that no check
//! covers, e.g. inside a value) or fails with an error naming the file. Every decoded
//! batch then goes through the event decoder, which dead-letters what it cannot use.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use proptest::prelude::*;
use tidepool_connector_parquet::{ColumnMapping, EventWriter, IntTimeUnit, ParquetSource};
use tidepool_pipeline::event::decode_events;
use tidepool_pipeline::EventSource;

/// A small file with every column the mapping can read, several row groups, and nulls.
fn good_file(path: &Path) {
    let n = 3_000u64;
    let schema = Arc::new(Schema::new(vec![
        Field::new("user", DataType::UInt64, true),
        Field::new("item", DataType::UInt64, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, true),
    ]));
    let kinds = ["view", "click", "cart", "purchase"];
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(
            (0..n)
                .map(|i| (i % 101 != 0).then_some(i % 257))
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from_iter_values((0..n).map(|i| i * 7 % 613))),
        Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64 * 3))),
        Arc::new(StringArray::from_iter(
            (0..n).map(|i| (i % 53 != 0).then(|| kinds[i as usize % 4])),
        )),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
    let mut w = EventWriter::create(path, schema, 1_000).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

fn mapping() -> ColumnMapping {
    ColumnMapping {
        user: "user".into(),
        item: "item".into(),
        ts: "ts".into(),
        event_type: Some("kind".into()),
        weight: None,
        int_time_unit: IntTimeUnit::Seconds,
    }
}

/// Reads the whole file as a backtest would (every worker share, every batch, the event
/// decoder); an error must name the file.
fn read_all(path: &Path) -> Result<(u64, u64), String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let named = |e: tidepool_pipeline::Error| {
        let text = e.to_string();
        assert!(
            text.contains(&name),
            "the error does not name the file: {text}"
        );
        text
    };
    let source = ParquetSource::open(&[path.display().to_string()], mapping()).map_err(named)?;
    let (mut events, mut dead) = (0u64, 0u64);
    for worker in 0..2 {
        for batch in source.open(worker, 2).map_err(named)? {
            let batch = batch.map_err(named)?;
            let mut out = Vec::new();
            dead += decode_events(&batch.records, &batch.origin, &mut out, &mut |letter| {
                assert!(!letter.reason.is_empty());
            })
            .map_err(named)?;
            events += out.len() as u64;
        }
    }
    Ok((events, dead))
}

#[test]
fn the_undamaged_file_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.parquet");
    good_file(&path);
    let (events, dead) = read_all(&path).unwrap();
    // Rows with a null user (30) or a null event type (57, one of them both) are dead
    // letters; every other row is an event.
    assert_eq!(events + dead, 3_000);
    assert_eq!(dead, 86);
}

/// One way to damage a file.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR a byte at a fraction of the length.
    Flip(f64, u8),
    /// Overwrite a run of bytes.
    Overwrite(f64, Vec<u8>),
    /// Cut the file at a fraction of its length.
    Truncate(f64),
    /// Insert bytes.
    Splice(f64, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (0.0..1.0f64, 1..=255u8).prop_map(|(at, x)| Damage::Flip(at, x)),
        2 => (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Damage::Overwrite(at, b)),
        1 => (0.0..1.0f64).prop_map(Damage::Truncate),
        1 => (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Damage::Splice(at, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    match damage {
        Damage::Flip(f, x) => {
            let i = at(*f, bytes.len());
            bytes[i] ^= x;
        }
        Damage::Overwrite(f, run) => {
            let i = at(*f, bytes.len());
            for (j, b) in run.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + j) {
                    *slot = *b;
                }
            }
        }
        Damage::Truncate(f) => bytes.truncate(at(*f, bytes.len())),
        Damage::Splice(f, run) => {
            let i = at(*f, bytes.len());
            bytes.splice(i..i, run.iter().copied());
        }
    }
}

proptest! {
    // 400 cases per run; PROPTEST_CASES=N for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
        ..ProptestConfig::default()
    })]

    #[test]
    fn damaged_files_never_panic(damages in prop::collection::vec(damage(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.parquet");
        good_file(&good);
        let mut bytes = std::fs::read(&good).unwrap();
        for d in &damages {
            apply(&mut bytes, d);
        }
        let path = dir.path().join("damaged.parquet");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok((events, dead)) = read_all(&path) {
            // Damage that went unnoticed can change values, never invent rows.
            prop_assert!(events + dead <= 3_000, "{events} + {dead}");
        }
    }
}
