//! `tidepool train` and `tidepool produce`: the Kafka-connected commands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tidepool_connector_generator::{Generator, GeneratorConfig};
use tidepool_connector_kafka::{
    commit_offsets, produce, Embedded, JsonMapping, KafkaDeltaSink, KafkaSettings, KafkaSource,
    StopAt,
};
use tidepool_connector_parquet::{import_csv, ColumnMapping, CsvOptions, ParquetSource};
use tidepool_operators::checkpoint::{CheckpointSettings, Checkpointer};
use tidepool_operators::{run_dataflow, BacktestConfig, BacktestReport, RunOptions};
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::{DeadLetterSink, Event, EventSource, JsonlDeadLetters, MemoryDeadLetters};

use crate::api::{Control, Outcome};
use crate::cli::{KafkaArgs, ProduceArgs, RecommendArgs, StopWhen, TrainArgs};
use crate::report::{summary_json, summary_table};

/// Default tick of a followed stream: rounds of one minute of event time.
const STREAM_TICK_MS: i64 = 60_000;

/// Default allowed lateness of a followed stream: partitions are read interleaved, so
/// events reach a worker a little out of event-time order.
const STREAM_LATENESS_MS: i64 = 300_000;

/// Default bound on event times ahead of the wall clock in a followed stream.
const STREAM_MAX_SKEW_MS: i64 = 3_600_000;

impl KafkaArgs {
    fn settings(&self, brokers: &str) -> KafkaSettings {
        KafkaSettings {
            brokers: brokers.to_string(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            config: self.kafka_config.iter().cloned().collect(),
        }
    }

    /// What a checkpoint records of the source: topic, group, partitions, field mapping.
    fn identity(&self, settings: &KafkaSettings) -> anyhow::Result<BTreeMap<String, String>> {
        let partitions = settings
            .partitions()
            .map(|p| {
                p.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let m = self.mapping();
        Ok(BTreeMap::from([
            ("topic".to_string(), settings.topic.clone()),
            ("group".to_string(), settings.group.clone()),
            ("partitions".to_string(), partitions),
            (
                "mapping".to_string(),
                format!(
                    "user={} item={} ts={} time_unit={:?} type={} weight={} types={:?}",
                    m.user,
                    m.item,
                    m.ts.as_deref().unwrap_or("kafka timestamp"),
                    m.time_unit,
                    m.event_type,
                    m.weight.as_deref().unwrap_or("-"),
                    m.types
                ),
            ),
        ]))
    }

    fn mapping(&self) -> JsonMapping {
        JsonMapping {
            user: self.user_field.clone(),
            item: self.item_field.clone(),
            ts: (self.time_field != "kafka").then(|| self.time_field.clone()),
            time_unit: self.field_time_unit,
            event_type: self.type_field.clone(),
            weight: Some("weight".into()),
            types: self.types.clone(),
            max_bytes: self.max_message_bytes,
        }
    }
}

/// Starts an embedded cluster with the topic, filled with the generated stream the
/// run arguments describe.
fn embedded_demo(args: &TrainArgs) -> anyhow::Result<Embedded> {
    let cluster = Embedded::start(1)?;
    cluster.create_topic(&args.kafka.topic, args.kafka.partitions)?;
    let bootstrap = cluster.bootstrap();
    eprintln!(
        "embedded Kafka cluster at {bootstrap} (topic {}, {} partitions); filling it with {} generated events",
        args.kafka.topic, args.kafka.partitions, args.run.events
    );
    let settings = args.kafka.settings(&bootstrap);
    let report = produce(
        &settings,
        generated_events(args.run.generator())?,
        None,
        &|_| {},
    )?;
    eprintln!(
        "produced {} events in {:.2}s",
        report.messages, report.seconds
    );
    Ok(cluster)
}

/// The events of a generated stream, in order.
pub(crate) fn generated_events(
    cfg: GeneratorConfig,
) -> anyhow::Result<impl Iterator<Item = Event>> {
    let generator = Generator::new(cfg)?;
    Ok(generator.flat_map(|batch| {
        let origin = tidepool_pipeline::BatchOrigin {
            source: "generator".into(),
            first_row: 0,
            first_pos: 0,
        };
        let mut out = Vec::new();
        // Generated batches always decode: a failure would be a bug, and it would show
        // as fewer events produced than asked for.
        let _ = tidepool_pipeline::event::decode_events(&batch, &origin, &mut out, &mut |_| {});
        out
    }))
}

/// Refuses the backtest flags that would be silently ignored by `train`: --save-model,
/// the Parquet column mapping (Kafka payloads are mapped by the --*-field flags) and, with real
/// brokers, the generated stream's sizes. A flag is seen as given when its value differs
/// from the default.
fn refuse_file_and_generator_flags(args: &TrainArgs) -> anyhow::Result<()> {
    let defaults = crate::api::options(Vec::<String>::new())?;
    let run = &args.run;
    if run.save_model.is_some() {
        bail!("--save-model is for backtests; train writes checkpoints with --checkpoint-dir");
    }
    for (flag, given, field) in [
        (
            "--user-col",
            run.user_col != defaults.user_col,
            "--user-field",
        ),
        (
            "--item-col",
            run.item_col != defaults.item_col,
            "--item-field",
        ),
        (
            "--time-col",
            run.time_col != defaults.time_col,
            "--time-field",
        ),
        (
            "--time-unit",
            run.time_unit != defaults.time_unit,
            "--field-time-unit",
        ),
    ] {
        if given {
            bail!("{flag} maps Parquet columns and does not apply to train; Kafka payloads are mapped with {field}");
        }
    }
    if args.kafka.brokers != "embedded" {
        for (flag, given) in [
            ("--events", run.events != defaults.events),
            ("--users", run.users != defaults.users),
            ("--items", run.items != defaults.items),
            ("--user-churn", run.user_churn != defaults.user_churn),
        ] {
            if given {
                bail!("{flag} sizes the generated stream that fills an embedded cluster; it does not apply with --brokers {}", args.kafka.brokers);
            }
        }
    }
    Ok(())
}

/// Checks `train`'s arguments without touching Kafka and returns the run's
/// configuration, with the streaming defaults (tick, lateness, skew bound) where the
/// arguments leave them open. `tidepool validate` runs the same checks.
pub fn check(args: &TrainArgs) -> anyhow::Result<BacktestConfig> {
    if !args.run.inputs.is_empty() {
        bail!("train reads Kafka; load files into a topic with `tidepool produce`, or replay them with `tidepool backtest`");
    }
    refuse_file_and_generator_flags(args)?;
    let mut config = args.run.config()?;
    config.tick_ms = config.tick_ms.or(Some(STREAM_TICK_MS));
    if args.run.allowed_lateness.is_none() {
        config.allowed_lateness_ms = STREAM_LATENESS_MS;
    }
    if args.run.max_skew.is_none() {
        config.max_skew_ms = Some(STREAM_MAX_SKEW_MS);
    }
    config.validate()?;
    if args.checkpoint_dir.is_none() {
        if let Some(flag) = [
            ("--publish-topic", args.publish_topic.is_some()),
            ("--publish-dir", args.publish_dir.is_some()),
        ]
        .iter()
        .find_map(|(flag, set)| set.then_some(flag))
        {
            bail!("{flag} publishes the rows each checkpoint changed: it needs --checkpoint-dir");
        }
    }
    if args.publish_interval.is_some() && args.publish_topic.is_none() && args.publish_dir.is_none()
    {
        bail!("--publish-interval needs somewhere to publish: --publish-topic or --publish-dir");
    }
    Ok(config)
}

/// Runs `tidepool train` as the CLI does: signals, progress spinner, tables on stdout.
pub fn train(args: &TrainArgs) -> anyhow::Result<BacktestReport> {
    train_with(args, Control::cli()).map(|outcome| outcome.report)
}

/// Runs a Kafka retraining job under `control` (see [`crate::api::Control`]): setting
/// `control.stop` ends the readers as SIGINT does (the run drains and writes its final
/// checkpoint); with `control.signals` SIGINT/SIGTERM, SIGUSR1 (GC cycle) and SIGUSR2
/// (checkpoint) are handled; with `control.print` the spinner and tables are drawn.
pub fn train_with(args: &TrainArgs, control: Control) -> anyhow::Result<Outcome> {
    let config = check(args)?;
    let embedded = if args.kafka.brokers == "embedded" {
        Some(embedded_demo(args)?)
    } else {
        None
    };
    let brokers = embedded
        .as_ref()
        .map_or_else(|| args.kafka.brokers.clone(), Embedded::bootstrap);
    let settings = args.kafka.settings(&brokers);
    let stop = match args.stop_at {
        Some(StopWhen::Never) => StopAt::Never,
        Some(StopWhen::End) => StopAt::End,
        Some(StopWhen::Idle(d)) => StopAt::Idle(d),
        None if embedded.is_some() => StopAt::End,
        None => StopAt::Never,
    };
    let dead: Arc<dyn DeadLetterSink> = match (&args.dead_letter_topic, &args.run.dead_letters) {
        (Some(topic), _) => {
            if let Some(cluster) = &embedded {
                cluster.create_topic(topic, 1)?;
            }
            Arc::new(tidepool_connector_kafka::KafkaDeadLetters::new(
                &KafkaSettings {
                    topic: topic.clone(),
                    ..args.kafka.settings(&brokers)
                },
            )?)
        }
        (None, Some(path)) => Arc::new(JsonlDeadLetters::new(path)),
        (None, None) => Arc::new(MemoryDeadLetters::new(5)),
    };
    let pool = args.run.pool();
    let gc = Arc::new(GcController::new(config.gc.clone(), config.workers).with_pool(pool.clone()));

    let checkpoints = match &args.checkpoint_dir {
        Some(dir) => {
            let commit_settings = settings.clone();
            let cp = Checkpointer::new(CheckpointSettings {
                dir: dir.clone(),
                interval: Some(args.checkpoint_interval),
                keep: args.keep_checkpoints,
                config_hash: crate::api::config_hash(&config)?,
                config: Some(config.clone()),
                source: args.kafka.identity(&settings)?,
            })?
            .on_commit(Box::new(move |manifest| {
                // Committed for monitoring (consumer lag); restarts use the checkpoint.
                if let Err(e) = commit_offsets(&commit_settings, &manifest.positions) {
                    tracing::warn!(error = %e, "could not commit offsets to the consumer group");
                }
            }));
            Some(Arc::new(cp))
        }
        None => None,
    };
    let restore = match &checkpoints {
        Some(cp) => cp.latest(args.force_checkpoint)?.map(Arc::new),
        None => None,
    };
    let start: BTreeMap<i32, i64> = restore
        .as_ref()
        .map(|l| l.manifest.positions.clone())
        .unwrap_or_default();
    if let Some(l) = &restore {
        eprintln!(
            "resuming from checkpoint {} ({} events trained, offsets {:?})",
            l.manifest.id, l.manifest.events, l.manifest.positions
        );
    }
    let source = KafkaSource::new(settings, args.kafka.mapping(), Arc::clone(&dead))?
        .starting_at(start)
        .stop_at(stop)
        .on_rewind(args.kafka.on_rewind)
        .with_pool(pool.clone());
    let counters = source.counters();
    let stopped = source.stop_flag();
    // The caller's stop flag ends the readers like a signal does; the watcher ends with
    // the run.
    let run_over = Arc::new(AtomicBool::new(false));
    {
        let (from, to, over) = (
            Arc::clone(&control.stop),
            source.stop_flag(),
            Arc::clone(&run_over),
        );
        std::thread::Builder::new()
            .name("tidepool-stop".into())
            .spawn(move || {
                while !over.load(Ordering::Relaxed) {
                    if from.load(Ordering::Relaxed) {
                        to.store(true, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
            .context("starting the stop watcher")?;
    }
    #[cfg(unix)]
    if control.signals {
        use signal_hook::consts::{SIGUSR1, SIGUSR2};
        // SIGINT/SIGTERM end the readers; the run drains and writes a final checkpoint.
        crate::api::stop_on_signals(&source.stop_flag())?;
        signal_hook::flag::register(SIGUSR1, gc.manual_flag())
            .context("installing the SIGUSR1 handler")?;
        if let Some(cp) = &checkpoints {
            signal_hook::flag::register(SIGUSR2, cp.request_flag())
                .context("installing the SIGUSR2 handler")?;
        }
    }
    let description = source.info().description;
    let bar = if args.run.quiet || !control.print {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} {human_pos} events trained, {per_sec}")
        {
            bar.set_style(style);
        }
        bar
    };
    let tracker = crate::api::Tracker::new(bar, &control, None);
    let mut sinks: Vec<Arc<dyn tidepool_pipeline::delta::DeltaSink>> = Vec::new();
    if let Some(topic) = &args.publish_topic {
        if let Some(cluster) = &embedded {
            cluster.create_topic(topic, args.kafka.partitions)?;
        }
        let delta_settings = KafkaSettings {
            topic: topic.clone(),
            ..args.kafka.settings(&brokers)
        };
        sinks.push(Arc::new(KafkaDeltaSink::new(&delta_settings)?));
    }
    if let Some(dir) = &args.publish_dir {
        sinks.push(Arc::new(tidepool_connector_parquet::ParquetDeltaSink::new(
            dir,
        )?));
    }
    let deltas: Option<Arc<dyn tidepool_pipeline::delta::DeltaSink>> = match sinks.len() {
        0 => None,
        1 => sinks.pop(),
        _ => Some(Arc::new(tidepool_pipeline::delta::DeltaSinks(sinks))),
    };
    let live = Arc::new(tidepool_operators::live::LiveMetrics::new(&config));
    crate::serve::start_if(
        args.run.metrics_addr.as_deref(),
        args.run.admin_token.as_deref(),
        || crate::serve::Telemetry {
            trained: Arc::clone(&tracker.trained),
            gc: Arc::clone(&gc),
            checkpoints: checkpoints.clone(),
            dead: Arc::clone(&dead),
            pool: pool.clone(),
            kafka: Some(Arc::clone(&counters)),
            live: Some(Arc::clone(&live)),
            started: std::time::Instant::now(),
        },
    )?;
    let options = RunOptions {
        gc,
        checkpoints,
        restore,
        deltas,
        publish_every: args.publish_interval,
        cluster: args.run.cluster()?,
        live: Some(live),
    };
    let report = run_dataflow(
        Arc::new(source),
        &config,
        Arc::clone(&dead),
        options,
        &|n| tracker.record(n),
    );
    run_over.store(true, Ordering::Relaxed);
    let report = report?;
    tracker.bar.finish_and_clear();
    let (messages, skipped, rejected, lost) = (
        counters.messages.load(Ordering::Relaxed),
        counters.skipped.load(Ordering::Relaxed),
        counters.rejected.load(Ordering::Relaxed),
        counters.offsets_lost.load(Ordering::Relaxed),
    );
    if control.print {
        print_train_outcome(&report, messages, skipped, rejected);
    }
    if lost > 0 {
        eprintln!("warning: {lost} offsets were gone from the broker (retention) before they could be read");
    }
    drop(embedded);
    let mut summary = summary_json(&report, &description);
    summary["kafka"] = serde_json::json!({
        "messages": messages, "skipped": skipped, "dead_letters": rejected,
        "offsets_lost_to_retention": lost,
        "offsets_rewound": counters.offsets_rewound.load(Ordering::Relaxed),
    });
    summary["checkpoints"] = serde_json::to_value(&report.checkpoints)?;
    // As in a backtest: whether a signal ended the run (a `--stop-at` end is not early).
    let stopped = stopped.load(Ordering::Relaxed);
    crate::api::conclude(
        &args.run,
        report,
        summary,
        &pool,
        &description,
        &tracker,
        control.print,
        stopped,
    )
}

/// The CLI's account of a finished `train`: the metrics table, what Kafka delivered and
/// the checkpoints.
fn print_train_outcome(report: &BacktestReport, messages: u64, skipped: u64, rejected: u64) {
    print!("{}", summary_table(report));
    println!("kafka: {messages} messages read, {skipped} skipped by type, {rejected} dead letters");
    if let Some(cp) = &report.checkpoints {
        println!(
            "checkpoints: {} written (last {:?}, {} bytes, {:.1} ms pause){}",
            cp.written,
            cp.last_id,
            cp.last_bytes,
            cp.last_pause_ms,
            cp.restored_from
                .map_or_else(String::new, |id| format!(", resumed from {id}"))
        );
    }
}

/// Runs `tidepool produce`.
pub fn produce_file(args: &ProduceArgs) -> anyhow::Result<u64> {
    if args.brokers == "embedded" {
        bail!("an embedded cluster lives inside one process; produce into it with `tidepool train --brokers embedded`, or give real brokers");
    }
    let dir = tempfile::tempdir()?;
    let parquet = match args.preset {
        Some(preset) => {
            let out = dir.path().join("input.parquet");
            import_csv(
                &args.input,
                &out,
                &CsvOptions::preset(preset),
                &MemoryDeadLetters::new(0),
            )?;
            out
        }
        None => args.input.clone(),
    };
    let source = ParquetSource::open(&[parquet.display().to_string()], ColumnMapping::default())?;
    let dead = MemoryDeadLetters::new(5);
    let mut events = Vec::new();
    for batch in source.open(0, 1)? {
        let batch = batch?;
        batch.decode(&mut events, &mut |l| {
            let _ = dead.send(l);
        })?;
    }
    if dead.count() > 0 {
        eprintln!(
            "warning: {} rows could not be read and were not produced",
            dead.count()
        );
    }
    let settings = KafkaSettings {
        brokers: args.brokers.clone(),
        topic: args.topic.clone(),
        group: String::new(),
        config: args.kafka_config.iter().cloned().collect(),
    };
    let total = events.len() as u64;
    let bar = ProgressBar::new(total);
    let report = produce(&settings, events, args.rate, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!(
        "produced {} events to {} in {:.2}s ({:.0}/s)",
        report.messages,
        args.topic,
        report.seconds,
        report.messages as f64 / report.seconds.max(1e-9)
    );
    Ok(report.messages)
}

/// Runs `tidepool recommend`: prints the user's top items, or fails for a user the
/// checkpoint does not hold.
pub fn recommend(
    args: &RecommendArgs,
) -> anyhow::Result<Vec<tidepool_operators::serve::Recommendation>> {
    let items = recommend_items(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&items)?);
    } else {
        println!("{:>4} {:>20} {:>12}", "rank", "item", "score");
        for (i, r) in items.iter().enumerate() {
            println!("{:>4} {:>20} {:>12.6}", i + 1, r.item, r.score);
        }
    }
    Ok(items)
}

/// A user's top items from a checkpoint (its newest, given a checkpoint root), best
/// first, scored as the evaluator scores; fails for a user the checkpoint does not hold.
pub fn recommend_items(
    args: &RecommendArgs,
) -> anyhow::Result<Vec<tidepool_operators::serve::Recommendation>> {
    use tidepool_operators::checkpoint;
    let path = if args.checkpoint.join("manifest.json").exists() {
        args.checkpoint.clone()
    } else {
        checkpoint::list(&args.checkpoint)?
            .pop()
            .map(|(_, p)| p)
            .with_context(|| format!("no checkpoint in {}", args.checkpoint.display()))?
    };
    let manifest = checkpoint::read_manifest(&path)?;
    let loaded = checkpoint::load(&path, &manifest.config_hash, false)?;
    let mut rec = tidepool_operators::serve::Recommender::new(&loaded)?;
    let Some(items) = rec.recommend(args.variant.as_deref(), args.user, args.k)? else {
        bail!(
            "user {} is not in checkpoint {} (never seen, or evicted past its TTL)",
            args.user,
            path.display()
        );
    };
    Ok(items)
}
