//! The subcommands, as functions the binary and the tests both call.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tidepool_connector_generator::{Generator, GeneratorConfig, GeneratorSource};
use tidepool_connector_parquet::{
    import_csv, ColumnMapping, CsvOptions, EventWriter, ImportReport, ParquetSource,
};
use tidepool_operators::cluster::Cluster;
use tidepool_operators::{
    config::{recommended_variants, KnnConfig},
    BacktestConfig, BacktestReport, EvalConfig, ModelConfig, ModelKind, StateConfig, VariantConfig,
};
use tidepool_pipeline::event::event_schema;
use tidepool_pipeline::memory::gc::GcConfig;
use tidepool_pipeline::{BufferPool, EventSource, JsonlDeadLetters, PoolConfig};

use crate::cli::{BacktestArgs, GenerateArgs, HalfLife, ImportArgs};

fn millis(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl BacktestArgs {
    /// This process's place in a cluster (`None` for one process).
    pub fn cluster(&self) -> anyhow::Result<Option<Cluster>> {
        if self.processes <= 1 && self.hostfile.is_none() {
            return Ok(None);
        }
        let mut cluster = Cluster::new(self.processes, self.process, self.hostfile.as_deref())?;
        cluster.connect_timeout = self.connect_timeout;
        Ok(Some(cluster))
    }

    /// The library configuration these arguments describe.
    pub fn config(&self) -> anyhow::Result<BacktestConfig> {
        // No model flags: the recommended ensemble. Variants without --model are bpr's by
        // default, as before.
        let kind = self.model.unwrap_or(if self.variants.is_empty() {
            ModelKind::Ensemble
        } else {
            ModelKind::Bpr
        });
        let mut model = ModelConfig {
            kind,
            dim: self.dim,
            lr: self.lr,
            reg: self.reg,
            optimizer: self.optimizer,
            item_bias: !self.no_item_bias,
            negatives: self.negatives,
            init_std: self.init_std,
            sampler: self.sampler.clone(),
            logq: self.logq,
            ..ModelConfig::default()
        };
        model.knn = KnnConfig {
            history: self.history,
            decay: self.decay,
            pair_decay: self.pair_decay,
            back: self.back,
            alpha: self.alpha,
            neighbours: self.neighbours,
            half_life_ms: match self.half_life {
                Some(HalfLife(d)) => d.map(millis),
                None => KnnConfig::default().half_life_ms,
            },
        };
        let variants = if self.variants.is_empty() && kind == ModelKind::Ensemble {
            recommended_variants(&model)
        } else if self.variants.is_empty() {
            vec![VariantConfig {
                name: kind.name().into(),
                model,
            }]
        } else {
            self.variants
                .iter()
                .map(|spec| VariantConfig::parse(spec, &model))
                .collect::<Result<_, _>>()?
        };
        Ok(BacktestConfig {
            variants,
            eval: EvalConfig {
                warmup: self.warmup,
                eval_every: self.eval_every,
                k: self.k,
                window_ms: self.metrics_window.map(millis),
            },
            workers: self.workers,
            seed: self.seed,
            tick_ms: self.tick.map(millis),
            rounds_in_flight: self.rounds_in_flight,
            popularity_window_ms: millis(self.pop_window),
            allowed_lateness_ms: self.allowed_lateness.map_or(0, millis),
            late: self.late,
            max_skew_ms: self.max_skew.and_then(|HalfLife(d)| d.map(millis)),
            state: StateConfig {
                user_ttl_ms: self.user_ttl.map(millis),
                item_ttl_ms: self.item_ttl.map(millis),
            },
            gc: self.gc_config()?,
        })
    }

    /// `[gc]` from the environment (`TIDEPOOL_GC`, `TIDEPOOL_MEMORY_LIMIT`,
    /// `TIDEPOOL_GCTRACE`), overridden by the flags given.
    pub fn gc_config(&self) -> anyhow::Result<GcConfig> {
        let mut gc = GcConfig {
            min_heap: self.gc_min_heap as u64,
            force_interval_ms: millis(self.gc_force_interval).max(1) as u64,
            ..GcConfig::default()
        }
        .with_env(|k| std::env::var(k).ok())?;
        if let Some(p) = self.gc_percent {
            gc.gc_percent = p.0;
        }
        if let Some(limit) = self.memory_limit {
            gc.memory_limit = Some(limit as u64);
        }
        gc.trace |= self.gctrace;
        Ok(gc)
    }

    /// The buffer pool these arguments describe, one shard per worker.
    pub fn pool(&self) -> BufferPool {
        BufferPool::new(PoolConfig {
            enabled: self.pool,
            floor: self.pool_floor,
            ceiling: self.pool_ceiling,
            shards: if self.pool_shards == 0 {
                self.workers
            } else {
                self.pool_shards
            },
            retain_per_class: self.pool_retain,
            poison: self.pool_poison,
        })
    }

    /// The source: the Parquet inputs, or the generated default stream, building its
    /// batches in `pool`.
    pub fn source(&self, pool: &BufferPool) -> anyhow::Result<Arc<dyn EventSource>> {
        if self.inputs.is_empty() {
            let cfg = GeneratorConfig {
                events: self.events,
                users: self.users,
                items: self.items,
                user_churn: self.user_churn,
                ..GeneratorConfig::default()
            };
            return Ok(Arc::new(GeneratorSource::new(cfg)?.with_pool(pool.clone())));
        }
        Ok(Arc::new(
            ParquetSource::open(&self.inputs, self.mapping())?.with_pool(pool.clone()),
        ))
    }

    /// Which columns of files (or in-memory batches) hold the event fields.
    pub fn mapping(&self) -> ColumnMapping {
        ColumnMapping {
            user: self.user_col.clone(),
            item: self.item_col.clone(),
            ts: self.time_col.clone(),
            int_time_unit: self.time_unit,
            ..ColumnMapping::default()
        }
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

/// The process's peak resident set size (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The `gc` object of the summary JSON: counters without the long timeline and samples.
/// The memory side of a summary, the same for every command: the buffer pool's
/// counters, heap and RSS peaks, and the GC cycles.
pub(crate) fn memory_summary(
    summary: &mut serde_json::Value,
    report: &BacktestReport,
    pool: &BufferPool,
) -> anyhow::Result<()> {
    summary["pool"] = serde_json::to_value(pool.stats())?;
    summary["pool"]["enabled"] = serde_json::Value::Bool(pool.config().enabled);
    if let Some(peak) = tidepool_pipeline::memory::heap::heap_peak() {
        summary["heap_peak_bytes"] = peak.into();
    }
    summary["gc"] = gc_summary(report)?;
    if let Some(rss) = peak_rss_bytes() {
        summary["rss_peak_bytes"] = rss.into();
    }
    Ok(())
}

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
