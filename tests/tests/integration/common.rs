//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::sync::Arc;

use tidepool_operators::{run_backtest, BacktestConfig, BacktestReport, ModelKind};
use tidepool_pipeline::{EventSource, MemoryDeadLetters, Quality};

/// A file from the shared data directory (`$TIDEPOOL_DATA_DIR`, default `../shared/data`
/// beside the repository). Missing data skips the test loudly, or fails it when
/// `TIDEPOOL_REQUIRE_DATA=1` (as in CI).
pub(crate) fn data_file(relative: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TIDEPOOL_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    let path = dir.join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("TIDEPOOL_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!(
            "data set {} is missing and TIDEPOOL_REQUIRE_DATA=1",
            path.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED: data set {} is missing (set TIDEPOOL_DATA_DIR) ***\n",
        path.display()
    );
    None
}

/// A backtest configuration for one model.
pub(crate) fn config(model: ModelKind, workers: usize) -> BacktestConfig {
    let mut cfg = BacktestConfig {
        workers,
        ..BacktestConfig::default()
    };
    cfg.variants[0].model.kind = model;
    cfg.variants[0].name = model.name().into();
    cfg
}

/// Runs a backtest with dead letters kept in memory.
pub(crate) fn run(
    source: Arc<dyn EventSource>,
    cfg: &BacktestConfig,
) -> (BacktestReport, Arc<MemoryDeadLetters>) {
    let dead = Arc::new(MemoryDeadLetters::new(100));
    let report = run_backtest(source, cfg, Arc::clone(&dead) as _, &|_| {}).expect("backtest runs");
    (report, dead)
}

/// Asserts that two quality counters agree: counts exactly, float sums up to summation
/// order (workers add their shares in a different order).
pub(crate) fn assert_same_quality(a: &Quality, b: &Quality, what: &str) {
    assert_eq!(
        (a.events, a.scored, a.hits, a.pairs),
        (b.events, b.scored, b.hits, b.pairs),
        "{what}"
    );
    for (x, y) in [
        (a.ndcg_sum(), b.ndcg_sum()),
        (a.rr_sum(), b.rr_sum()),
        (a.loss_sum, b.loss_sum),
    ] {
        assert!(
            (x - y).abs() <= 1e-9 * x.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
}

/// An in-memory source of canonical event batches that knows nothing about its time
/// range, like a stream without statistics.
pub(crate) struct VecSource(pub(crate) Vec<arrow_array::RecordBatch>);

impl EventSource for VecSource {
    fn info(&self) -> tidepool_pipeline::SourceInfo {
        tidepool_pipeline::SourceInfo {
            description: "vec".into(),
            rows: Some(self.0.iter().map(|b| b.num_rows() as u64).sum()),
            min_ts: None,
            max_ts: None,
        }
    }

    fn open(
        &self,
        worker: usize,
        _workers: usize,
    ) -> tidepool_pipeline::Result<tidepool_pipeline::EventReader> {
        if worker != 0 {
            return Ok(Box::new(std::iter::empty()));
        }
        let mut pos = 0u64;
        let batches: Vec<_> = self
            .0
            .iter()
            .map(|records| {
                let origin = tidepool_pipeline::BatchOrigin {
                    source: "vec".into(),
                    first_row: pos,
                    first_pos: pos,
                };
                pos += records.num_rows() as u64;
                Ok(tidepool_pipeline::SourceBatch::new(records.clone(), origin))
            })
            .collect();
        Ok(Box::new(batches.into_iter()))
    }
}
