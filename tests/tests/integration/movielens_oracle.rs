//! The prequential protocol against the published reference on MovieLens
//! ml-latest-small: `mostpop` must give recall@10 = 0.032724 and ndcg@10 = 0.016644 over
//! 9,076 scored events, whatever the number of workers.

use std::sync::Arc;

use tidepool_connector_parquet::{import_csv, ColumnMapping, CsvOptions, ParquetSource, Preset};
use tidepool_operators::ModelKind;
use tidepool_pipeline::MemoryDeadLetters;

use crate::common::{config, data_file, run};

#[test]
fn mostpop_matches_the_reference_on_1_and_2_workers() {
    let Some(ratings) = data_file("ml-latest-small/ratings.csv") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("ml.parquet");
    let options = CsvOptions {
        dedup: true,
        ..CsvOptions::preset(Preset::MovielensCsv)
    };
    let imported = import_csv(&ratings, &parquet, &options, &MemoryDeadLetters::new(0)).unwrap();
    assert_eq!(imported.rows_written, 100_836);
    assert_eq!(imported.bad_rows, 0);

    for workers in [1, 2] {
        let source = Arc::new(
            ParquetSource::open(&[parquet.display().to_string()], ColumnMapping::default())
                .unwrap(),
        );
        let (report, _) = run(source, &config(ModelKind::Mostpop, workers));
        let q = report.variants[0].total;
        assert_eq!(report.events, 100_836, "workers={workers}");
        assert_eq!(report.protocol.warmup, 10_083);
        assert_eq!(q.scored, 9_076);
        assert_eq!(
            format!("{:.6}", q.recall()),
            "0.032724",
            "workers={workers}"
        );
        assert_eq!(format!("{:.6}", q.ndcg()), "0.016644", "workers={workers}");
        assert_eq!(report.dead_letters, 0);
        assert_eq!(report.reordered, 0);
    }
}
