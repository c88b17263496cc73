//! Parquet in, prequential metrics out, on files small enough to check by hand.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use tidepool_connector_parquet::{ColumnMapping, EventWriter, IntTimeUnit, ParquetSource};
use tidepool_operators::ModelKind;
use tidepool_pipeline::Quality;

use crate::common::{config, run};

/// Writes (user, item, ts seconds) rows with a nullable user column, under the names
/// MovieLens uses, so the source's column mapping is exercised too.
fn write(path: &Path, rows: &[(Option<u64>, u64, i64)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("userId", DataType::UInt64, true),
        Field::new("movieId", DataType::UInt64, false),
        Field::new("timestamp", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
    let mut w = EventWriter::create(path, schema, 1024).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

fn mapping() -> ColumnMapping {
    ColumnMapping {
        user: "userId".into(),
        item: "movieId".into(),
        ts: "timestamp".into(),
        event_type: None,
        weight: None,
        int_time_unit: IntTimeUnit::Seconds,
    }
}

#[test]
fn tiny_history_end_to_end_across_files_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    // Two time-partitioned files, one with a row whose user id is null.
    write(
        &dir.path().join("part-0.parquet"),
        &[(Some(1), 10, 1), (Some(2), 10, 2), (Some(3), 20, 3)],
    );
    write(
        &dir.path().join("part-1.parquet"),
        &[(Some(3), 10, 4), (None, 10, 5), (Some(1), 20, 6)],
    );
    for workers in [1, 2] {
        let source =
            Arc::new(ParquetSource::open(&[dir.path().display().to_string()], mapping()).unwrap());
        let mut cfg = config(ModelKind::Mostpop, workers);
        cfg.eval.warmup = 0.0;
        cfg.eval.eval_every = 1;
        cfg.eval.k = 1;
        let (report, dead) = run(source, &cfg);
        // e0 unseen: miss; e1 {10}: hit; e2 item 20 unseen: miss;
        // e3 user 3 knows 20, so {10}: hit; e4 user 1 knows 10, so {20}: hit.
        let q = report.variants[0].total;
        assert_eq!(
            (report.rows, report.events, q.scored, q.hits),
            (6, 5, 5, 3),
            "workers={workers}"
        );
        assert_eq!(report.dead_letters, 1);
        let letters = dead.kept();
        assert!(
            letters[0].location.ends_with("part-1.parquet row 1"),
            "{letters:?}"
        );
        assert_eq!(letters[0].reason, "user_id is null");
        assert_eq!(report.reordered, 0);
        assert_eq!(report.items, 2);
        assert_eq!(report.users, 3);
        // Windows add up to the totals.
        let mut sum = Quality::default();
        report.variants[0]
            .windows
            .iter()
            .for_each(|w| sum.merge(&w.quality));
        assert_eq!(sum, q);
    }
}

#[test]
fn unsorted_input_is_processed_late_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shuffled.parquet");
    let rows: Vec<_> = (0..2000i64)
        .map(|i| {
            (
                Some((i % 37) as u64),
                (i * 7 % 101) as u64,
                if i % 10 == 5 { i - 1000 } else { i },
            )
        })
        .collect();
    write(&path, &rows);
    let source = Arc::new(ParquetSource::open(&[path.display().to_string()], mapping()).unwrap());
    let mut cfg = config(ModelKind::Bpr, 1);
    cfg.tick_ms = Some(10_000);
    let (report, _) = run(source, &cfg);
    assert_eq!(report.events, 2000, "late events are not dropped");
    assert!(report.reordered > 0, "late events are counted");
    assert!(report.variants[0].total.pairs > 0);
}

#[test]
fn missing_columns_and_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    write(&path, &[(Some(1), 1, 1)]);
    let err = ParquetSource::open(&[path.display().to_string()], ColumnMapping::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column user_id (for user_id) is missing"),
        "{err}"
    );
    assert!(err.contains("userId, movieId, timestamp"), "{err}");
    let err = ParquetSource::open(&[format!("{}/*.nothing", dir.path().display())], mapping())
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no files"), "{err}");
}

#[test]
fn a_source_without_time_statistics_still_replays_in_coarse_rounds() {
    use tidepool_connector_generator::{Generator, GeneratorConfig};
    let batches: Vec<_> = Generator::new(GeneratorConfig {
        events: 5_000,
        users: 100,
        items: 100,
        ..GeneratorConfig::default()
    })
    .unwrap()
    .collect();
    let (report, _) = run(
        Arc::new(crate::common::VecSource(batches)),
        &config(ModelKind::Mostpop, 2),
    );
    assert_eq!(report.events, 5_000);
    assert_eq!(report.tick_ms, 3_600_000);
    assert_eq!(report.protocol.window_ms, 86_400_000);
    assert!(report.variants[0].windows.len() <= 2);
}

/// A damaged, truncated, foreign or wrongly shaped file is a clear error naming the file,
/// never a panic.
#[test]
fn damaged_and_foreign_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    let rows: Vec<(Option<u64>, u64, i64)> = (0..5_000)
        .map(|i| (Some(i % 97), i % 13, i as i64))
        .collect();
    write(&good, &rows);
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.parquet",
            bytes[..bytes.len() / 2].to_vec(),
            "truncated.parquet",
        ),
        (
            "text.parquet",
            b"not parquet at all".to_vec(),
            "text.parquet",
        ),
        ("empty.parquet", Vec::new(), "empty.parquet"),
        (
            "footer.parquet",
            {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 12..n - 8].copy_from_slice(&[0xff; 4]);
                b
            },
            "footer.parquet",
        ),
    ];
    for (name, content, named) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = match ParquetSource::open(&[path.display().to_string()], mapping()) {
            Err(e) => e.to_string(),
            Ok(source) => {
                let source = Arc::new(source);
                let cfg = config(ModelKind::Mostpop, 1);
                match tidepool_operators::run_backtest(
                    source,
                    &cfg,
                    Arc::new(tidepool_pipeline::MemoryDeadLetters::new(10)),
                    &|_| {},
                ) {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("{name} was read as if it were fine"),
                }
            }
        };
        assert!(err.contains(named), "{name}: {err}");
    }
    // The right file with the wrong column names: which column, and the ones there are.
    let wrong = ColumnMapping {
        user: "customer".into(),
        ..mapping()
    };
    let err = match ParquetSource::open(&[good.display().to_string()], wrong) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing column is an error"),
    };
    assert!(err.contains("good.parquet: column customer (for user_id) is missing; columns: userId, movieId, timestamp"), "{err}");
    assert_eq!(err.matches("invalid configuration").count(), 1, "{err}");
}
