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
use tidepool_operators::config::recommended_variants;
use tidepool_operators::{
    reference_kernel, reference_kernel_parallel, reference_scoring_kernel, run_backtest,
    BacktestConfig, ModelConfig, ModelKind, Optimizer, VariantConfig,
};
use tidepool_pipeline::EventSource;
use tidepool_pipeline::MemoryDeadLetters;

use crate::cli::BenchArgs;
use crate::commands::generate_to;

/// Where the shared data sets live: the flag, `$TIDEPOOL_DATA_DIR`, or `../shared/data`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("TIDEPOOL_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

/// Samplers compared by `bench`, with the decay half-life suited to each data set.
fn sampler_specs(decay: &str) -> Vec<String> {
    vec![
        "uniform".into(),
        "pop:0.75".into(),
        "pop:0.75,logq=true".into(),
        format!("decay:{decay}"),
        "dns:32".into(),
        "inbatch".into(),
        "mix:0.5*uniform+0.5*dns:32".into(),
        "mix:0.5*pop:0.75+0.5*dns:32".into(),
    ]
}

/// One pass with every sampler as a variant (quality), then one run per sampler with
/// evaluation off (speed).
fn samplers(
    data: &str,
    input: &std::path::Path,
    decay: &str,
    results: &mut Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    let specs = sampler_specs(decay);
    let open = || -> anyhow::Result<Arc<ParquetSource>> {
        Ok(Arc::new(ParquetSource::open(
            &[input.display().to_string()],
            ColumnMapping::default(),
        )?))
    };
    let mut config = BacktestConfig::default();
    let base = config.variants[0].model.clone();
    config.variants = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut v = VariantConfig::parse(&format!("v{i}={spec}"), &base)?;
            v.name = spec.clone();
            Ok(v)
        })
        .collect::<anyhow::Result<_>>()?;
    let quality = run_backtest(
        open()?,
        &config,
        Arc::new(MemoryDeadLetters::new(0)),
        &|_| {},
    )?;
    for (spec, v) in specs.iter().zip(&quality.variants) {
        let mut speed = BacktestConfig::default();
        speed.eval.eval_every = 0;
        speed.variants[0] = v_config(&config, &v.name)?;
        let run = run_backtest(
            open()?,
            &speed,
            Arc::new(MemoryDeadLetters::new(0)),
            &|_| {},
        )?;
        eprintln!(
            "{data} {spec}: recall@10 {:.6}, {:.0} events/s",
            v.total.recall(),
            run.events_per_sec()
        );
        results.push(json!({
            "data": data, "sampler": spec, "recall@10": v.total.recall(),
            "ndcg@10": v.total.ndcg(), "events_per_sec": run.events_per_sec(),
        }));
    }
    Ok(())
}

/// The configuration of the variant named `name` in `config`.
fn v_config(config: &BacktestConfig, name: &str) -> anyhow::Result<VariantConfig> {
    config
        .variants
        .iter()
        .find(|v| v.name == name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no variant {name}"))
}

/// The models compared by `bench --models`: `(row label, variant specs)`; the last is
/// the recommended configuration, whose components run with it.
fn model_rows() -> anyhow::Result<Vec<(&'static str, Vec<VariantConfig>)>> {
    let base = ModelConfig::default();
    let one = |label: &'static str, spec: &str| -> anyhow::Result<_> {
        Ok((
            label,
            vec![VariantConfig::parse(&format!("m={spec}"), &base)?],
        ))
    };
    let recommended_base = ModelConfig {
        kind: ModelKind::Ensemble,
        ..ModelConfig::default()
    };
    Ok(vec![
        one("mostpop", ",model=mostpop")?,
        one("bpr (uniform)", "uniform")?,
        one("bpr (dns:32)", "dns:32")?,
        one("bpr (pop:0.75)", "pop:0.75")?,
        one("bpr (pop:0.75, logq)", "pop:0.75,logq=true")?,
        one("itemknn", ",model=itemknn")?,
        (
            "default (ensemble)",
            recommended_variants(&recommended_base),
        ),
    ])
}

/// `bench --models`: quality and speed of every model alone, and of the default, on
/// each data set; then itemknn's training speed and scoring cost and the ensemble's
/// overhead over its components.
fn models(
    inputs: &[(&str, PathBuf)],
    big: &std::path::Path,
    results: &mut Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    let open = |input: &std::path::Path| -> anyhow::Result<Arc<ParquetSource>> {
        Ok(Arc::new(ParquetSource::open(
            &[input.display().to_string()],
            ColumnMapping::default(),
        )?))
    };
    let run = |input: &std::path::Path, config: &BacktestConfig| {
        run_backtest(
            open(input)?,
            config,
            Arc::new(MemoryDeadLetters::new(0)),
            &|_| {},
        )
        .map_err(anyhow::Error::from)
    };
    println!(
        "{:<16} {:<22} {:>10} {:>10} {:>12}",
        "data", "model", "recall@10", "ndcg@10", "events/s"
    );
    for (data, input) in inputs {
        for (label, variants) in model_rows()? {
            let config = BacktestConfig {
                variants,
                ..BacktestConfig::default()
            };
            let report = run(input, &config)?;
            let q = report.variants[0].total;
            println!(
                "{data:<16} {label:<22} {:>10.6} {:>10.6} {:>12.0}",
                q.recall(),
                q.ndcg(),
                report.events_per_sec()
            );
            results.push(json!({
                "data": data, "model": label, "recall@10": q.recall(), "ndcg@10": q.ndcg(),
                "events_per_sec": report.events_per_sec(),
            }));
        }
    }
    // itemknn training at history 20, evaluation off, on 1 and 2 workers: the state is
    // replicated, so each worker does all of the counting.
    let knn = |history: usize, neighbours: usize| -> anyhow::Result<VariantConfig> {
        Ok(VariantConfig::parse(
            &format!("itemknn=,model=itemknn,history={history},neighbours={neighbours}"),
            &ModelConfig::default(),
        )?)
    };
    for workers in [1, 2] {
        let mut config = BacktestConfig {
            workers,
            variants: vec![knn(20, 50)?],
            ..BacktestConfig::default()
        };
        config.eval.eval_every = 0;
        let report = run(big, &config)?;
        println!(
            "itemknn training (history 20, 50 neighbours, eval off), {workers} worker(s): {} events in {:.2}s = {:.0} events/s per worker",
            report.events,
            report.seconds,
            report.events_per_sec()
        );
        results.push(json!({
            "bench": "itemknn_train", "workers": workers, "events": report.events,
            "events_per_sec_per_worker": report.events_per_sec(),
        }));
    }
    // Scoring cost: the same run with every event scored, minus the run without scoring.
    let timed = |eval_every: u64| -> anyhow::Result<(f64, u64)> {
        let mut config = BacktestConfig {
            variants: vec![knn(20, 50)?],
            ..BacktestConfig::default()
        };
        config.eval.eval_every = eval_every;
        let r = run(big, &config)?;
        Ok((r.seconds, r.variants[0].total.scored))
    };
    let (plain, _) = timed(0)?;
    let (scoring, scored) = timed(1)?;
    let per = (scoring - plain).max(0.0) / scored.max(1) as f64 * 1e6;
    println!(
        "itemknn scoring (history 20, 50 neighbours): {scored} held-out items, {per:.2} us each"
    );
    results.push(json!({ "bench": "itemknn_score", "scored": scored, "us_per_scored_event": per }));
    // The ensemble's overhead: the default's components alone against them plus the mix.
    for (data, input) in inputs {
        let recommended = recommended_variants(&ModelConfig {
            kind: ModelKind::Ensemble,
            ..ModelConfig::default()
        });
        let components = BacktestConfig {
            variants: recommended[1..].to_vec(),
            ..BacktestConfig::default()
        };
        let with = BacktestConfig {
            variants: recommended,
            ..BacktestConfig::default()
        };
        let (a, b) = (run(input, &components)?, run(input, &with)?);
        println!(
            "{data}: ensemble overhead over its components: {:.2}s vs {:.2}s ({:+.0} %)",
            b.seconds,
            a.seconds,
            (b.seconds / a.seconds - 1.0) * 100.0
        );
        results.push(json!({
            "bench": "ensemble_overhead", "data": data, "components_seconds": a.seconds,
            "with_ensemble_seconds": b.seconds,
        }));
    }
    Ok(())
}

/// One BPR variant over a Parquet file on `workers` workers, evaluating every
/// `eval_every`-th event (0: none), with `optimizer`.
fn bpr_run(
    input: &std::path::Path,
    workers: usize,
    eval_every: u64,
    optimizer: Optimizer,
) -> anyhow::Result<tidepool_operators::BacktestReport> {
    let source = Arc::new(ParquetSource::open(
        &[input.display().to_string()],
        ColumnMapping::default(),
    )?);
    let mut config = BacktestConfig {
        workers,
        ..BacktestConfig::default()
    };
    config.eval.eval_every = eval_every;
    config.variants[0].model.kind = ModelKind::Bpr;
    config.variants[0].model.optimizer = optimizer;
    config.variants[0].name = ModelKind::Bpr.name().into();
    Ok(run_backtest(
        source,
        &config,
        Arc::new(MemoryDeadLetters::new(0)),
        &|_| {},
    )?)
}

/// Scoring at the limit: a BPR backtest that ranks every event against the whole
/// catalogue (`eval_every = 1`) against the reference scoring loop over as many items.
fn scoring(
    dir: &std::path::Path,
    workers: &[usize],
    results: &mut Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    let input = dir.join("scoring.parquet");
    // Items appear early (a fifth of the stream is warm-up, not scored), so the scored
    // events rank against nearly the whole catalogue.
    generate_to(
        &input,
        GeneratorConfig {
            events: 60_000,
            users: 2_000,
            items: 5_000,
            ..GeneratorConfig::default()
        },
        1 << 20,
    )?;
    for &w in workers {
        let report = bpr_run(&input, w, 1, Optimizer::default())?;
        let scored = report.variants[0].total.scored;
        let eps = scored as f64 / report.seconds.max(1e-9);
        let items = report.items as usize;
        let kernel =
            reference_scoring_kernel(report.config.variants[0].model.dim, items, 10_000, 42);
        let reference = kernel.events_per_sec();
        let ratio = eps / (w as f64 * reference);
        eprintln!(
            "scoring, {items} items, {w} worker(s): {eps:.0} scored events/s; reference {reference:.0}/s; {ratio:.2} of {w} x the reference"
        );
        results.push(json!({
            "data": format!("scoring {items} items"), "model": "bpr", "optimizer": "eval=1",
            "workers": w, "events": scored, "events_per_sec": eps,
            "reference_events_per_sec": reference, "ratio": ratio,
        }));
    }
    Ok(())
}

/// Dense `(user, item)` events with the user and item counts.
type DenseEvents = (Vec<(u32, u32)>, usize, usize);

/// The events of a Parquet file as dense `(user, item)` indices (in order of first
/// appearance), with the user and item counts: the reference kernel's input.
fn dense_events(input: &std::path::Path) -> anyhow::Result<DenseEvents> {
    let source = ParquetSource::open(&[input.display().to_string()], ColumnMapping::default())?;
    let (mut users, mut items) = (
        rustc_hash::FxHashMap::<u64, u32>::default(),
        rustc_hash::FxHashMap::<u64, u32>::default(),
    );
    let mut out = Vec::new();
    let mut decoded = Vec::new();
    for batch in source.open(0, 1)? {
        let batch = batch?;
        decoded.clear();
        batch.decode(&mut decoded, &mut |_| {})?;
        for e in &decoded {
            let n = users.len() as u32;
            let u = *users.entry(e.user).or_insert(n);
            let n = items.len() as u32;
            let i = *items.entry(e.item).or_insert(n);
            out.push((u, i));
        }
    }
    Ok((out, users.len(), items.len()))
}

/// One GC soak run: `tidepool backtest` in a child process, read back from its summary.
fn gc_run(
    args: &BenchArgs,
    percent: &str,
    limit: Option<usize>,
    dir: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let name = match limit {
        Some(_) => format!("gc-{percent}-limit"),
        None => format!("gc-{percent}"),
    };
    let summary = dir.join(format!("{name}.json"));
    let events = args.gc_events.to_string();
    let users = (args.gc_events / 100).max(1000).to_string();
    let churn = 20.to_string();
    let workers = args.gc_workers.to_string();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args([
        "backtest",
        "--quiet",
        "--events",
        &events,
        "--users",
        &users,
        "--user-churn",
        &churn,
        "--user-ttl",
        "2h",
        "--eval-every",
        "100",
        "--workers",
        &workers,
        "--gc",
        percent,
    ]);
    if args.gc_knn {
        // A catalogue of a million items, each keeping 50 neighbours, under a half-life
        // so that faded entries are there for the cycles to drop.
        cmd.args([
            "--model",
            "itemknn",
            "--items",
            "1000000",
            "--neighbours",
            "50",
            "--history",
            "20",
            "--half-life",
            "10min",
        ]);
    } else {
        cmd.args(["--model", "bpr"]);
    }
    cmd.arg("--summary-json").arg(&summary);
    if let Some(limit) = limit {
        cmd.args(["--memory-limit", &limit.to_string()]);
    }
    if let Some(report) = &args.gc_report {
        cmd.arg("--report").arg(report.join(&name));
    }
    // The child's settings come from the flags alone.
    for var in ["TIDEPOOL_GC", "TIDEPOOL_MEMORY_LIMIT", "TIDEPOOL_GCTRACE"] {
        cmd.env_remove(var);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
    let gc = &s["gc"];
    let cycles = gc["cycles_total"].as_u64().unwrap_or(0);
    let pause_total = gc["pause_total_ms"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "run": name,
        "gc_percent": percent,
        "memory_limit": limit,
        "events_per_sec": s["train_events_per_sec"],
        "rss_peak_bytes": s["rss_peak_bytes"],
        "heap_peak_bytes": gc["heap_peak"],
        "cycles": cycles,
        "cycles_by_trigger": gc["cycles"],
        "throttled": gc["throttled"],
        "pause_mean_ms": if cycles > 0 { pause_total / cycles as f64 } else { 0.0 },
        "pause_max_ms": gc["pause_max_ms"],
        "users_evicted": gc["users_evicted"],
        "cooccurrence_bytes": s["cooccurrence_bytes"],
        "cooccurrence_freed_bytes": gc["freed"]["cooccurrence"],
        "recall@10": s["recall@10"],
    }))
}

/// The GC soak: every gc_percent without and with the memory limit, one process each.
fn gc_soak(args: &BenchArgs) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = tempfile::tempdir()?;
    let mut runs = Vec::new();
    for limit in [None, Some(args.gc_limit)] {
        for percent in ["25", "50", "100", "200", "off"] {
            let run = gc_run(args, percent, limit, dir.path())?;
            eprintln!("{run}");
            runs.push(run);
        }
    }
    let mb = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1e6;
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "run", "events/s", "RSS MB", "heap MB", "cycles", "mean ms", "max ms", "recall", "knn MB"
    );
    for r in &runs {
        println!(
            "{:<16} {:>10.0} {:>9.1} {:>9.1} {:>7} {:>9.2} {:>9.2} {:>9.6} {:>9.1}",
            r["run"].as_str().unwrap_or(""),
            r["events_per_sec"].as_f64().unwrap_or(0.0),
            mb(&r["rss_peak_bytes"]),
            mb(&r["heap_peak_bytes"]),
            r["cycles"].as_u64().unwrap_or(0),
            r["pause_mean_ms"].as_f64().unwrap_or(0.0),
            r["pause_max_ms"].as_f64().unwrap_or(0.0),
            r["recall@10"].as_f64().unwrap_or(0.0),
            mb(&r["cooccurrence_bytes"]),
        );
    }
    Ok(runs)
}

/// The Kafka path: produce into an embedded cluster, then train from it (2 workers,
/// most-popular and BPR, evaluation off, a checkpoint every 5 s and at the end); and the
/// checkpoint cost for 1 M users x 64 dims.
fn kafka_bench(args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use tidepool_connector_kafka::{
        consume_baseline, produce, Embedded, JsonMapping, KafkaSettings, KafkaSource, StopAt,
    };
    use tidepool_operators::checkpoint::{CheckpointSettings, Checkpointer};
    use tidepool_operators::{run_dataflow, RunOptions};
    use tidepool_pipeline::memory::collector::GcController;

    let n = args.kafka_events;
    // The mock cluster keeps at most 5 MiB per partition (about 50 k of these messages,
    // fewer when producer batches are small): enough partitions that nothing is dropped
    // before it is read.
    let partitions = (n / 20_000).clamp(4, 256) as i32;
    let cluster = Embedded::start(1)?;
    cluster.create_topic("bench", partitions)?;
    let settings = KafkaSettings {
        brokers: cluster.bootstrap(),
        topic: "bench".into(),
        group: "bench".into(),
        ..KafkaSettings::default()
    };
    let cfg = GeneratorConfig {
        events: n,
        users: (n / 50).max(1000),
        items: (n / 500).max(1000),
        ..GeneratorConfig::default()
    };
    let events = crate::stream::generated_events(cfg)?;
    let produced = produce(&settings, events, None, &|_| {})?;
    eprintln!(
        "produced {} events in {:.1}s ({:.0}/s) into {partitions} partitions",
        produced.messages,
        produced.seconds,
        produced.messages as f64 / produced.seconds
    );
    // The ceiling: bare consumers, two threads as the pipeline has two workers.
    let mut baseline_settings = settings.clone();
    baseline_settings
        .config
        .extend(args.kafka_config.iter().cloned());
    let (read, secs) = consume_baseline(&baseline_settings, 2)?;
    let baseline = read as f64 / secs;
    eprintln!(
        "bare consumers (2 threads, no decoding): {read} messages in {secs:.2}s = {baseline:.0}/s"
    );
    let mut rows = Vec::new();
    for model in [ModelKind::Mostpop, ModelKind::Bpr] {
        let dir = tempfile::tempdir()?;
        let mut config = BacktestConfig {
            workers: 2,
            // A replayed backlog is dense in event time: 30-minute rounds hold ~36 k of
            // these events, so progress tracking is not the cost (1-minute rounds, the
            // live default, hold 1,200).
            tick_ms: Some(30 * 60_000),
            allowed_lateness_ms: 300_000,
            ..BacktestConfig::default()
        };
        config.eval.eval_every = 0;
        config.variants[0].model.kind = model;
        config.variants[0].name = model.name().into();
        let cp = Arc::new(Checkpointer::new(CheckpointSettings {
            dir: dir.path().to_path_buf(),
            interval: Some(std::time::Duration::from_secs(5)),
            keep: 2,
            config_hash: crate::api::config_hash(&config)?,
            config: Some(config.clone()),
            source: Default::default(),
        })?);
        let dead = Arc::new(MemoryDeadLetters::new(0));
        let mut consumer = KafkaSettings {
            group: format!("bench-{}", model.name()),
            ..settings.clone()
        };
        consumer.config.extend(args.kafka_config.iter().cloned());
        let source = KafkaSource::new(
            consumer,
            JsonMapping::default(),
            Arc::clone(&dead) as Arc<dyn tidepool_pipeline::DeadLetterSink>,
        )?
        .stop_at(StopAt::End);
        let options = RunOptions {
            gc: Arc::new(GcController::new(config.gc.clone(), 2)),
            checkpoints: Some(Arc::clone(&cp)),
            restore: None,
            deltas: None,
            publish_every: None,
            cluster: None,
            live: None,
        };
        let report = run_dataflow(Arc::new(source), &config, dead, options, &|_| {})?;
        let stats = cp.stats();
        eprintln!(
            "kafka -> train ({}): {} events in {:.2}s = {:.0} events/s; {} checkpoints, last {} bytes, max pause {:.1} ms",
            model.name(),
            report.events,
            report.seconds,
            report.events_per_sec(),
            stats.written,
            stats.last_bytes,
            stats.max_pause_ms
        );
        rows.push(json!({
            "model": model.name(), "events": report.events, "seconds": report.seconds,
            "share_of_bare_consumers": report.events_per_sec() / baseline,
            "events_per_sec": report.events_per_sec(), "checkpoints": stats.written,
            "checkpoint_bytes": stats.last_bytes, "checkpoint_max_pause_ms": stats.max_pause_ms,
        }));
    }
    let dir = tempfile::tempdir()?;
    let (secs, bytes) = tidepool_operators::checkpoint::bench_user_part(dir.path(), 1_000_000, 64)?;
    eprintln!("checkpoint of 1 M users x 64 dims (Adagrad): {bytes} bytes in {secs:.2}s");
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>14}",
        "model", "events", "events/s", "checkpoints", "max pause ms"
    );
    for r in &rows {
        println!(
            "{:<10} {:>12} {:>12.0} {:>12} {:>14.1}",
            r["model"].as_str().unwrap_or(""),
            r["events"].as_u64().unwrap_or(0),
            r["events_per_sec"].as_f64().unwrap_or(0.0),
            r["checkpoints"].as_u64().unwrap_or(0),
            r["checkpoint_max_pause_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "produce: {:.0} events/s; checkpoint of 1 M users x 64 dims: {:.1} MB in {secs:.2}s",
        produced.messages as f64 / produced.seconds,
        bytes as f64 / 1e6
    );
    println!("bare consumers (the ceiling of the consume path): {baseline:.0} messages/s");
    Ok(json!({
        "produce_events_per_sec": produced.messages as f64 / produced.seconds,
        "bare_consumers_per_sec": baseline,
        "train": rows,
        "checkpoint_1m_users_64d": { "seconds": secs, "bytes": bytes },
    }))
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The smallest and largest of `values`.
fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Runs the benchmark and prints a table (and JSON with `--json`).
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run `cargo run --release -p tidepool-jobs -- bench` for real figures");
    }
    if args.kafka {
        let result = kafka_bench(args)?;
        if let Some(path) = &args.json {
            std::fs::write(
                path,
                serde_json::to_string_pretty(&json!({ "kafka": result }))?,
            )?;
        }
        return Ok(());
    }
    if args.gc {
        let runs = gc_soak(args)?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&json!({ "gc": runs }))?)?;
        }
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut results = Vec::new();
    let mut sampler_results = Vec::new();
    let ratings = data_dir(args.data_dir.clone()).join("ml-latest-small/ratings.csv");
    let ml = dir.path().join("ml.parquet");
    if ratings.exists() {
        let options = CsvOptions {
            dedup: true,
            ..CsvOptions::preset(Preset::MovielensCsv)
        };
        import_csv(&ratings, &ml, &options, &MemoryDeadLetters::new(0))?;
    } else {
        eprintln!(
            "warning: {} not found; MovieLens figures skipped",
            ratings.display()
        );
    }

    if args.models {
        let small = dir.path().join("synthetic-100k.parquet");
        generate_to(&small, GeneratorConfig::default(), 1 << 20)?;
        let big = dir.path().join("synthetic-knn.parquet");
        generate_to(
            &big,
            GeneratorConfig {
                events: 2_000_000,
                users: 100_000,
                items: 20_000,
                ..GeneratorConfig::default()
            },
            1 << 20,
        )?;
        let mut inputs = vec![("synthetic-100k", small)];
        if ml.exists() {
            inputs.push(("ml-latest-small", ml.clone()));
        }
        let mut model_results = Vec::new();
        models(&inputs, &big, &mut model_results)?;
        if let Some(path) = &args.json {
            std::fs::write(
                path,
                serde_json::to_string_pretty(&json!({ "models": model_results }))?,
            )?;
        }
        return Ok(());
    }

    if args.samplers {
        let small = dir.path().join("synthetic-100k.parquet");
        generate_to(&small, GeneratorConfig::default(), 1 << 20)?;
        samplers("synthetic-100k", &small, "10min", &mut sampler_results)?;
        if ml.exists() {
            samplers("ml-latest-small", &ml, "30days", &mut sampler_results)?;
        }
    }

    if !args.no_throughput {
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
        let mut inputs = vec![("synthetic", synthetic)];
        if args.large_events > 0 {
            // Tables far beyond the caches: every row a training step touches is a miss.
            let large = dir.path().join("synthetic-1m.parquet");
            generate_to(
                &large,
                GeneratorConfig {
                    events: args.large_events,
                    users: 1_000_000,
                    items: 1_000_000,
                    ..GeneratorConfig::default()
                },
                1 << 20,
            )?;
            inputs.push(("synthetic 1Mx1M", large));
        }
        if ml.exists() {
            inputs.push(("ml-latest-small", ml.clone()));
        }
        for (data, input) in &inputs {
            let (events, users, items) = dense_events(input)?;
            for optimizer in [Optimizer::Adagrad, Optimizer::Sgd] {
                let cfg = ModelConfig {
                    optimizer,
                    ..ModelConfig::default()
                };
                // Per worker count, each round's events/s and ratio. Each round measures
                // the reference first, in the same process and sitting, and every ratio
                // is against its own round's reference, so drift of the machine between
                // rounds cancels in the ratio.
                // Per worker count, each round's events/s, ratio, and the reference
                // kernel on as many threads at once (events/s): the machine's own scaling.
                let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); args.workers.len()];
                let mut references = Vec::new();
                let mut events_run = 0;
                for round in 1..=args.repeat {
                    let kernel = reference_kernel(&cfg, users, items, &events, 42);
                    let reference = kernel.events_per_sec();
                    references.push(reference);
                    eprintln!(
                        "{data} reference kernel ({}, {users} users x {items} items, round {round}/{}): {reference:.0} events/s",
                        optimizer.name(),
                        args.repeat
                    );
                    for (&w, runs) in args.workers.iter().zip(&mut runs) {
                        let parallel = if w > 1 {
                            reference_kernel_parallel(&cfg, users, items, &events, 42, w)
                                .events_per_sec()
                        } else {
                            reference
                        };
                        let run = bpr_run(input, w, 0, optimizer)?;
                        let eps = run.events_per_sec();
                        events_run = run.events;
                        let ratio = eps / (w as f64 * reference);
                        eprintln!(
                            "{data} bpr {}, {w} worker(s), round {round}/{}: {eps:.0} events/s, {ratio:.2} of {w} x the reference; the reference on {w} thread(s) at once: {parallel:.0} events/s ({:.2} of {w} x one)",
                            optimizer.name(),
                            args.repeat,
                            parallel / (w as f64 * reference)
                        );
                        runs.push((eps, ratio, parallel));
                    }
                }
                for (&w, runs) in args.workers.iter().zip(&runs) {
                    let eps: Vec<f64> = runs.iter().map(|r| r.0).collect();
                    let ratios: Vec<f64> = runs.iter().map(|r| r.1).collect();
                    let parallel: Vec<f64> = runs.iter().map(|r| r.2).collect();
                    let of_parallel: Vec<f64> = runs.iter().map(|r| r.0 / r.2).collect();
                    let (lo, hi) = range(&ratios);
                    results.push(json!({
                        "data": data, "model": "bpr", "optimizer": optimizer.name(),
                        "workers": w, "events": events_run, "events_per_sec": median(&eps),
                        "reference_events_per_sec": median(&references),
                        "ratio": median(&ratios), "ratio_min": lo, "ratio_max": hi,
                        "rounds": args.repeat,
                        "parallel_reference_events_per_sec": median(&parallel),
                        "ratio_to_parallel": median(&of_parallel),
                    }));
                }
            }
        }
    }

    if !args.no_throughput {
        scoring(dir.path(), &args.workers, &mut results)?;
    }

    if !results.is_empty() {
        println!(
            "{:<18} {:<12} {:>8} {:>12} {:>14} {:>14} {:>8} {:>11} {:>14} {:>8}",
            "data",
            "model",
            "workers",
            "events",
            "events/s",
            "reference/s",
            "ratio",
            "range",
            "parallel ref/s",
            "of par."
        );
        for r in &results {
            // Rows measured over several rounds give medians and the ratios' range.
            let spread = match (r["ratio_min"].as_f64(), r["ratio_max"].as_f64()) {
                (Some(lo), Some(hi)) if r["rounds"].as_u64().unwrap_or(1) > 1 => {
                    format!("{lo:.2}-{hi:.2}")
                }
                _ => String::new(),
            };
            // Training rows with several workers carry the reference on as many threads.
            let (parallel, of_parallel) = match (
                r["parallel_reference_events_per_sec"].as_f64(),
                r["ratio_to_parallel"].as_f64(),
            ) {
                (Some(p), Some(o)) if r["workers"].as_u64().unwrap_or(1) > 1 => {
                    (format!("{p:.0}"), format!("{o:.2}"))
                }
                _ => (String::new(), String::new()),
            };
            println!(
                "{:<18} {:<12} {:>8} {:>12} {:>14.0} {:>14.0} {:>8.2} {:>11} {:>14} {:>8}",
                r["data"].as_str().unwrap_or(""),
                format!(
                    "{} {}",
                    r["model"].as_str().unwrap_or(""),
                    r["optimizer"].as_str().unwrap_or("")
                ),
                r["workers"].as_u64().unwrap_or(0),
                r["events"].as_u64().unwrap_or(0),
                r["events_per_sec"].as_f64().unwrap_or(0.0),
                r["reference_events_per_sec"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0),
                spread,
                parallel,
                of_parallel
            );
        }
    }
    if !sampler_results.is_empty() {
        println!();
        println!(
            "{:<18} {:<30} {:>10} {:>10} {:>12}",
            "data", "sampler", "recall@10", "ndcg@10", "events/s"
        );
        for r in &sampler_results {
            println!(
                "{:<18} {:<30} {:>10.6} {:>10.6} {:>12.0}",
                r["data"].as_str().unwrap_or(""),
                r["sampler"].as_str().unwrap_or(""),
                r["recall@10"].as_f64().unwrap_or(0.0),
                r["ndcg@10"].as_f64().unwrap_or(0.0),
                r["events_per_sec"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(path) = &args.json {
        let all = json!({ "results": results, "samplers": sampler_results });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range_of_rounds() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[0.9, 0.2, 0.5]), 0.5);
        assert_eq!(median(&[0.9, 0.2, 0.5, 0.6]), 0.55);
        assert_eq!(range(&[0.9, 0.2, 0.5]), (0.2, 0.9));
    }
}
