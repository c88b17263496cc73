//! The library API and the run driver: run a backtest on any source and get its report
//! back, with the run's stop flag and progress in the caller's hands. The CLI's
//! `backtest` and the Python package both run through [`backtest`]; `train` shares its
//! pieces (signals, the progress bar, the memory side of the summary, the output files,
//! the configuration fingerprint of checkpoints).
//!
//! ```no_run
//! use tidepool_jobs::api::{self, Control, Input};
//! let args = api::options(["--model", "mostpop", "data.parquet"])?;
//! let outcome = api::backtest(&args, Input::FromArgs, Control::library())?;
//! println!("{}", outcome.summary["variants"][0]["recall@10"]);
//! # anyhow::Ok(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arrow_array::RecordBatch;
use indicatif::{ProgressBar, ProgressStyle};
use tidepool_connector_parquet::ArrowSource;
use tidepool_operators::checkpoint::{CheckpointSettings, Checkpointer};
use tidepool_operators::live::LiveMetrics;
use tidepool_operators::{run_dataflow, BacktestConfig, BacktestReport, RunOptions};
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::{
    DeadLetterSink, EventSource, JsonlDeadLetters, MemoryDeadLetters, Stoppable,
};

use crate::cli::BacktestArgs;
use crate::report::{summary_json, summary_table, windows_batch, write_metrics};

/// Where a backtest reads its events.
pub enum Input {
    /// What the arguments say: their Parquet inputs, or the generated stream.
    FromArgs,
    /// Record batches in memory (one schema), mapped by the arguments' column flags
    /// (`--user-col`, `--item-col`, `--time-col`, `--time-unit`); `description` names
    /// them in reports.
    Batches {
        /// The batches, in replay order.
        batches: Vec<RecordBatch>,
        /// A short name for reports and errors.
        description: String,
    },
}

/// A progress callback: events processed so far, and the total when known.
pub type Progress = Box<dyn Fn(u64, Option<u64>) + Send>;

/// How a run is driven from outside.
pub struct Control {
    /// Set it to stop: the sources stop reading, the run drains what was read and
    /// reports it.
    pub stop: Arc<AtomicBool>,
    /// Whether SIGINT/SIGTERM set `stop` and SIGUSR1 asks for a GC cycle (the CLI);
    /// a library caller handles signals itself.
    pub signals: bool,
    /// Whether to draw the progress bar (unless `--quiet`) and print the summary table
    /// and warnings, as the CLI does.
    pub print: bool,
    /// Called with the events processed so far and the total when known.
    pub progress: Option<Progress>,
}

impl Control {
    /// The CLI's: signals handled, bar and table printed.
    pub fn cli() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            signals: true,
            print: true,
            progress: None,
        }
    }

    /// A library caller's: nothing printed, no signal handlers.
    pub fn library() -> Self {
        Self {
            signals: false,
            print: false,
            ..Self::cli()
        }
    }
}

/// What a backtest produced.
pub struct Outcome {
    /// The full report.
    pub report: BacktestReport,
    /// The summary, with the keys of `--summary-json`.
    pub summary: serde_json::Value,
    /// Per-window metrics, the columns of `--metrics-out`.
    pub windows: RecordBatch,
    /// Whether the run was stopped before the end of its input.
    pub stopped: bool,
}

/// Parses backtest options written as the command line writes them (without the
/// `tidepool backtest` words): the same names, defaults, validation and messages.
pub fn options<I, S>(flags: I) -> Result<BacktestArgs, clap::Error>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let argv = ["tidepool".into(), "backtest".into()]
        .into_iter()
        .chain(flags.into_iter().map(Into::into));
    match crate::cli::Cli::try_parse_from(argv)?.command {
        crate::cli::Command::Backtest(args) => Ok(*args),
        _ => unreachable!("the argument list starts with `backtest`"),
    }
}

/// Runs a backtest: the source, dead letters, GC controller, live metrics, telemetry
/// endpoint, progress, summary, `--summary-json`, `--metrics-out`, `--report` and
/// `--save-model` are set up here, whoever calls.
pub fn backtest(args: &BacktestArgs, input: Input, control: Control) -> anyhow::Result<Outcome> {
    let config = args.config()?;
    config.validate()?;
    let pool = args.pool();
    let stop = Arc::clone(&control.stop);
    if control.signals {
        stop_on_signals(&stop)?;
    }
    let inner: Arc<dyn EventSource> = match input {
        Input::FromArgs => args.source(&pool)?,
        Input::Batches {
            batches,
            description,
        } => Arc::new(ArrowSource::new(
            batches,
            &args.mapping(),
            &description,
            &pool,
        )?),
    };
    let source: Arc<dyn EventSource> = Arc::new(Stoppable::new(inner, Arc::clone(&stop)));
    let info = source.info();
    tracing::info!(source = %info.description, workers = config.workers, "backtest starting");
    let dead: Arc<dyn DeadLetterSink> = match &args.dead_letters {
        Some(path) => Arc::new(JsonlDeadLetters::new(path)),
        None => Arc::new(MemoryDeadLetters::new(5)),
    };
    let bar = progress_bar(info.rows.unwrap_or(0), args.quiet || !control.print);
    let tracker = Tracker::new(bar, &control, info.rows);
    let gc = Arc::new(GcController::new(config.gc.clone(), config.workers).with_pool(pool.clone()));
    // `kill -USR1 PID` asks for a compaction cycle, like calling runtime.GC().
    #[cfg(unix)]
    if control.signals {
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, gc.manual_flag())
            .context("installing the SIGUSR1 handler")?;
    }
    let live = Arc::new(LiveMetrics::new(&config));
    crate::serve::start_if(
        args.metrics_addr.as_deref(),
        args.admin_token.as_deref(),
        || crate::serve::Telemetry {
            trained: Arc::clone(&tracker.trained),
            gc: Arc::clone(&gc),
            checkpoints: None,
            dead: Arc::clone(&dead),
            pool: pool.clone(),
            kafka: None,
            live: Some(Arc::clone(&live)),
            started: Instant::now(),
        },
    )?;
    let checkpoints = match &args.save_model {
        Some(dir) => Some(Arc::new(Checkpointer::new(CheckpointSettings {
            dir: dir.clone(),
            // Only the final checkpoint, and only the newest kept.
            interval: None,
            keep: 1,
            config_hash: config_hash(&config)?,
            config: Some(config.clone()),
            source: [
                ("kind".to_string(), "backtest".to_string()),
                ("description".to_string(), info.description.clone()),
            ]
            .into_iter()
            .collect(),
        })?)),
        None => None,
    };
    let options = RunOptions {
        gc: Arc::clone(&gc),
        checkpoints,
        restore: None,
        deltas: None,
        publish_every: None,
        cluster: args.cluster()?,
        live: Some(live),
    };
    let report = run_dataflow(source, &config, Arc::clone(&dead), options, &|done| {
        tracker.record(done)
    })?;
    tracker.bar.finish_and_clear();
    let stopped = stop.load(Ordering::Relaxed);
    if control.print {
        print_outcome(args, &report, stopped, info.rows, &pool);
    }
    let summary = summary_json(&report, &info.description);
    conclude(
        args,
        report,
        summary,
        &pool,
        &info.description,
        &tracker,
        control.print,
        stopped,
    )
}

/// What a run's progress feeds, ten times a second: the telemetry's trained counter, the
/// report's throughput curve, the progress bar and the caller's callback.
pub(crate) struct Tracker<'a> {
    pub(crate) trained: Arc<AtomicU64>,
    pub(crate) bar: ProgressBar,
    throughput: std::cell::RefCell<crate::html::Throughput>,
    started: Instant,
    progress: Option<&'a Progress>,
    /// The events the run will see, when known.
    total: Option<u64>,
}

impl<'a> Tracker<'a> {
    pub(crate) fn new(bar: ProgressBar, control: &'a Control, total: Option<u64>) -> Self {
        Self {
            trained: Arc::new(AtomicU64::new(0)),
            bar,
            throughput: std::cell::RefCell::new(crate::html::Throughput::new()),
            started: Instant::now(),
            progress: control.progress.as_ref(),
            total,
        }
    }

    /// `done` events processed so far.
    pub(crate) fn record(&self, done: u64) {
        self.trained.store(done, Ordering::Relaxed);
        self.throughput
            .borrow_mut()
            .push((self.started.elapsed().as_secs_f64(), done));
        self.bar.set_position(done);
        if let Some(progress) = self.progress {
            progress(done, self.total);
        }
    }
}

/// The end every run shares, whatever its source: `summary` completed (stopped_early,
/// memory), the files asked for written, the per-window metrics as Arrow.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conclude(
    args: &BacktestArgs,
    report: BacktestReport,
    mut summary: serde_json::Value,
    pool: &tidepool_pipeline::BufferPool,
    description: &str,
    tracker: &Tracker<'_>,
    print: bool,
    stopped: bool,
) -> anyhow::Result<Outcome> {
    summary["stopped_early"] = stopped.into();
    memory_summary(&mut summary, &report, pool)?;
    let throughput = tracker.throughput.borrow();
    write_outputs(
        args,
        &report,
        &summary,
        pool,
        description,
        &throughput,
        print,
    )?;
    let windows = windows_batch(&report, pool)?;
    Ok(Outcome {
        report,
        summary,
        windows,
        stopped,
    })
}

/// The files every run writes when asked, whatever its source: `--summary-json`
/// (`summary`, complete), `--metrics-out` and `--report`.
fn write_outputs(
    args: &BacktestArgs,
    report: &BacktestReport,
    summary: &serde_json::Value,
    pool: &tidepool_pipeline::BufferPool,
    description: &str,
    throughput: &crate::html::Throughput,
    print: bool,
) -> anyhow::Result<()> {
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(summary)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.metrics_out {
        write_metrics(report, path, pool)?;
    }
    if let Some(dir) = &args.report {
        let page = crate::html::write_report(dir, report, description, throughput)?;
        if print {
            eprintln!("report: {}", page.display());
        }
    }
    Ok(())
}

/// The CLI's table and warnings.
fn print_outcome(
    args: &BacktestArgs,
    report: &BacktestReport,
    stopped: bool,
    rows: Option<u64>,
    pool: &tidepool_pipeline::BufferPool,
) {
    if stopped {
        eprintln!(
            "stopped by a signal after {} of {} rows; the results below cover those",
            report.rows,
            rows.map_or("?".to_string(), |r| r.to_string())
        );
    }
    print!("{}", summary_table(report));
    let stats = pool.stats();
    if args.pool {
        println!(
            "buffer pool: hit rate {:.3} ({} gets, {} misses), {} bytes held",
            stats.hit_rate, stats.gets, stats.misses, stats.bytes_held
        );
    }
    if report.dead_letters > 0 {
        match &args.dead_letters {
            Some(path) => eprintln!(
                "warning: {} rows were rejected; see {}",
                report.dead_letters,
                path.display()
            ),
            None => eprintln!(
                "warning: {} rows were rejected (write them out with --dead-letters PATH)",
                report.dead_letters
            ),
        }
    }
    if report.reordered > 0 {
        eprintln!(
            "warning: {} events arrived after later ones and were processed late; sort the input with `tidepool import`",
            report.reordered
        );
    }
}

/// SIGINT/SIGTERM set `flag` (the sources stop, the run drains and reports, exit 0); a
/// second signal kills the process the default way.
pub(crate) fn stop_on_signals(flag: &Arc<AtomicBool>) -> anyhow::Result<()> {
    #[cfg(unix)]
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_default(sig, Arc::clone(flag))
            .context("installing a signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(flag))
            .context("installing a signal handler")?;
    }
    Ok(())
}

/// The process's peak resident set size (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The memory side of a summary, the same for every command: the buffer pool's
/// counters, heap and RSS peaks, and the GC cycles.
pub(crate) fn memory_summary(
    summary: &mut serde_json::Value,
    report: &BacktestReport,
    pool: &tidepool_pipeline::BufferPool,
) -> anyhow::Result<()> {
    summary["pool"] = serde_json::to_value(pool.stats())?;
    summary["pool"]["enabled"] = serde_json::Value::Bool(pool.config().enabled);
    if let Some((gets, misses)) = report.pool_steady {
        summary["pool"]["steady"] = serde_json::json!({
            "gets": gets,
            "misses": misses,
            "hit_rate": if gets == 0 { 1.0 } else { 1.0 - misses as f64 / gets as f64 },
        });
    }
    if let Some(peak) = tidepool_pipeline::memory::heap::heap_peak() {
        summary["heap_peak_bytes"] = peak.into();
    }
    summary["gc"] = gc_summary(report)?;
    if let Some(rss) = peak_rss_bytes() {
        summary["rss_peak_bytes"] = rss.into();
    }
    Ok(())
}

/// The `gc` object of the summary JSON: counters without the long timeline and samples.
pub(crate) fn gc_summary(report: &BacktestReport) -> anyhow::Result<serde_json::Value> {
    let mut gc = serde_json::to_value(&report.gc)?;
    if let Some(obj) = gc.as_object_mut() {
        obj.remove("timeline");
        obj.remove("heap_samples");
        obj.insert("users_evicted".into(), report.users_evicted.into());
        obj.insert("items_expired".into(), report.items_expired.into());
    }
    Ok(gc)
}

pub(crate) fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events, {per_sec}, eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// FNV-1a, 64 bits: a hash that stays the same across builds and platforms, for the
/// checkpoint's configuration fingerprint.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fingerprint of what a checkpoint's state depends on: the variants, the seed, the
/// protocol, retention and the popularity window (not workers, GC or tick).
pub fn config_hash(config: &BacktestConfig) -> anyhow::Result<String> {
    let relevant = serde_json::json!({
        "variants": config.variants,
        "seed": config.seed,
        "eval": config.eval,
        "state": config.state,
        "popularity_window_ms": config.popularity_window_ms,
    });
    Ok(format!(
        "{:016x}",
        fnv1a(serde_json::to_string(&relevant)?.as_bytes())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_hash_ignores_runtime_settings() {
        let a = BacktestConfig::default();
        let mut b = a.clone();
        b.workers = 4;
        b.tick_ms = Some(1);
        assert_eq!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
        b.variants[0].model.dim = 8;
        assert_ne!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
