//! The subcommands, as functions the binary and the tests both call.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use tidepool_connector_generator::{Generator, GeneratorConfig};
use tidepool_connector_parquet::{import_csv, CsvOptions, EventWriter, ImportReport};
use tidepool_operators::BacktestReport;
use tidepool_pipeline::event::event_schema;
use tidepool_pipeline::JsonlDeadLetters;

use crate::cli::{BacktestArgs, GenerateArgs, ImportArgs};

/// Runs a backtest as the CLI does: signals, progress bar, table on stdout, optional
/// files (see [`crate::api::backtest`]).
pub fn backtest(args: &BacktestArgs) -> anyhow::Result<BacktestReport> {
    crate::api::backtest(
        args,
        crate::api::Input::FromArgs,
        crate::api::Control::cli(),
    )
    .map(|outcome| outcome.report)
}

/// The CSV options the import arguments describe: the preset (if any), overridden by
/// the explicit flags.
pub fn csv_options(args: &ImportArgs) -> CsvOptions {
    let mut o = args.preset.map(CsvOptions::preset).unwrap_or_default();
    if let Some(d) = args.delimiter {
        o.delimiter = d;
    }
    if args.no_header {
        o.has_header = false;
    }
    if let Some(c) = &args.user {
        o.user = c.clone();
    }
    if let Some(c) = &args.item {
        o.item = c.clone();
    }
    if let Some(c) = &args.time {
        o.time = c.clone();
    }
    if let Some(u) = args.time_unit {
        o.time_unit = u;
    }
    if let Some(c) = &args.rating {
        o.rating = Some(c.clone());
    }
    o.min_rating = args.min_rating.or(o.min_rating);
    o.dedup = args.dedup;
    o.skip_bad = args.skip_bad;
    o.row_group_rows = args.row_group_rows;
    o
}

/// Where an import's dead letters go by default.
pub fn default_dead_letter_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".dead-letters.jsonl");
    PathBuf::from(p)
}

/// Runs `tidepool import`.
pub fn import(args: &ImportArgs) -> anyhow::Result<ImportReport> {
    let options = csv_options(args);
    if options.min_rating.is_some() && options.rating.is_none() {
        bail!("--min-rating needs a rating column (--rating COL or a preset that has one)");
    }
    let dead_path = args
        .dead_letters
        .clone()
        .unwrap_or_else(|| default_dead_letter_path(&args.output));
    let dead = JsonlDeadLetters::new(&dead_path);
    let started = Instant::now();
    let report = import_csv(&args.input, &args.output, &options, &dead)?;
    println!(
        "imported {} rows into {} in {:.2}s ({} read, {} below min rating, {} duplicates, {} bad{})",
        report.rows_written,
        args.output.display(),
        started.elapsed().as_secs_f64(),
        report.rows_read,
        report.below_min_rating,
        report.duplicates,
        report.bad_rows,
        if report.was_sorted { "" } else { "; input was not in time order, sorted" },
    );
    if report.bad_rows > 0 {
        eprintln!(
            "warning: {} malformed rows skipped; see {}",
            report.bad_rows,
            dead_path.display()
        );
        for letter in dead.samples() {
            eprintln!("  {}: {}", letter.location, letter.reason);
        }
    }
    Ok(report)
}

/// Writes a generated stream to Parquet; returns the rows written.
pub fn generate_to(
    path: &Path,
    cfg: GeneratorConfig,
    row_group_rows: usize,
) -> anyhow::Result<u64> {
    let generator = Generator::new(cfg)?;
    let mut writer = EventWriter::create(path, event_schema(), row_group_rows)?;
    for batch in generator {
        writer.write(&batch)?;
    }
    Ok(writer.finish()?)
}

/// Runs `tidepool generate`.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<u64> {
    let cfg = GeneratorConfig {
        events: args.events,
        users: args.users,
        items: args.items,
        seed: args.seed,
        ..GeneratorConfig::default()
    };
    let started = Instant::now();
    let rows = generate_to(&args.output, cfg, args.row_group_rows)?;
    println!(
        "wrote {rows} events to {} in {:.2}s",
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(rows)
}
