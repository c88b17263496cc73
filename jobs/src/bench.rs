//! `tidepool bench`: training throughput on synthetic data and on MovieLens, for one
//! and more workers, measured in one run so the ratios are comparable.
//!
//! Throughput runs switch evaluation off (`eval_every = 0`): they measure decode,
//! exchange, sampling and training. Quality figures come from `tidepool backtest`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tidepool_connector_generator::GeneratorConfig;
use tidepool_connector_parquet::{import_csv, ColumnMapping, CsvOptions, ParquetSource, Preset};
use tidepool_operators::{run_backtest, BacktestConfig, ModelKind};
use tidepool_pipeline::MemoryDeadLetters;

use crate::cli::BenchArgs;
use crate::commands::generate_to;

/// Where the shared data sets live: the flag, `$TIDEPOOL_DATA_DIR`, or `../shared/data`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("TIDEPOOL_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

fn throughput(
    input: &std::path::Path,
    workers: usize,
    model: ModelKind,
) -> anyhow::Result<(u64, f64)> {
    let source = Arc::new(ParquetSource::open(
        &[input.display().to_string()],
        ColumnMapping::default(),
    )?);
    let mut config = BacktestConfig {
        workers,
        ..BacktestConfig::default()
    };
    config.eval.eval_every = 0;
    config.variants[0].model.kind = model;
    config.variants[0].name = model.name().into();
    let report = run_backtest(
        source,
        &config,
        Arc::new(MemoryDeadLetters::new(0)),
        &|_| {},
    )?;
    Ok((report.events, report.events_per_sec()))
}

/// Runs the benchmark and prints a table (and JSON with `--json`).
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run `cargo run --release -p tidepool-jobs -- bench` for real figures");
    }
    let dir = tempfile::tempdir()?;
    let mut results = Vec::new();

    let synthetic = dir.path().join("synthetic.parquet");
    let cfg = GeneratorConfig {
        events: args.events,
        users: (args.events / 100).max(1000),
        items: (args.events / 500).max(1000),
        ..GeneratorConfig::default()
    };
    let started = Instant::now();
    generate_to(&synthetic, cfg, 1 << 20)?;
    eprintln!(
        "generated {} events in {:.1}s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    for &w in &args.workers {
        let (events, eps) = throughput(&synthetic, w, ModelKind::Bpr)?;
        eprintln!("synthetic bpr, {w} worker(s): {eps:.0} events/s");
        results.push(json!({"data": "synthetic", "model": "bpr", "workers": w, "events": events, "events_per_sec": eps}));
    }

    let ratings = data_dir(args.data_dir.clone()).join("ml-latest-small/ratings.csv");
    if ratings.exists() {
        let ml = dir.path().join("ml.parquet");
        let options = CsvOptions {
            dedup: true,
            ..CsvOptions::preset(Preset::MovielensCsv)
        };
        import_csv(&ratings, &ml, &options, &MemoryDeadLetters::new(0))?;
        for &w in &args.workers {
            let (events, eps) = throughput(&ml, w, ModelKind::Bpr)?;
            eprintln!("ml-latest-small bpr, {w} worker(s): {eps:.0} events/s");
            results.push(json!({"data": "ml-latest-small", "model": "bpr", "workers": w, "events": events, "events_per_sec": eps}));
        }
    } else {
        eprintln!(
            "warning: {} not found; MovieLens figures skipped",
            ratings.display()
        );
    }

    println!(
        "{:<18} {:<8} {:>8} {:>12} {:>14}",
        "data", "model", "workers", "events", "events/s"
    );
    for r in &results {
        println!(
            "{:<18} {:<8} {:>8} {:>12} {:>14.0}",
            r["data"].as_str().unwrap_or(""),
            r["model"].as_str().unwrap_or(""),
            r["workers"].as_u64().unwrap_or(0),
            r["events"].as_u64().unwrap_or(0),
            r["events_per_sec"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({ "results": results }))?,
        )?;
    }
    Ok(())
}
