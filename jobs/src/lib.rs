//! The `tidepool` command line, as a library so tests drive exactly what users run.
//!
//! - [`api`]: the library entry point and run driver: a backtest on any source, its
//!   report back; the setup `train` shares.
//! - [`cli`]: arguments (clap), defaults taken from the library crates.
//! - [`commands`]: `backtest`, `import`, `generate`.
//! - [`bench`]: `tidepool bench`, throughput measurements.
//! - [`report`]: summary table, summary JSON, per-window metrics files.
//! - [`stream`]: `train` (Kafka, checkpoints) and `produce`.
//! - [`job`]: job files (`run`, `validate`).
//! - [`serve`]: `/metrics`, `/healthz` and admin endpoints of a running job.
//! - [`plot`]: charts for report directories (plotters, SVG).
//!
//! Layers, with no cycle: `cli` (arguments and the configuration they describe) <
//! `report`, `html`, `plot`, `serve` < `api` (the driver) < `commands`, `stream` < `job`,
//! `bench`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod html;
pub mod job;
pub mod plot;
pub mod report;
pub mod serve;
pub mod stream;

/// Runs a parsed command line.
pub fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Backtest(args) => commands::backtest(&args).map(drop),
        cli::Command::Import(args) => commands::import(&args).map(drop),
        cli::Command::Generate(args) => commands::generate(&args).map(drop),
        cli::Command::Bench(args) => bench::bench(&args),
        cli::Command::Train(args) => stream::train(&args).map(drop),
        cli::Command::Produce(args) => stream::produce_file(&args).map(drop),
        cli::Command::Recommend(args) => stream::recommend(&args).map(drop),
        cli::Command::Run(args) => job::run(&args.job, &args.overrides),
        cli::Command::Validate(args) => job::validate(&args.job, &args.overrides),
    }
}
