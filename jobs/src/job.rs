//! Job files: `tidepool run JOB.toml` and `tidepool validate JOB.toml`.
//!
//! A job file deserializes into [`Job`], typed and with unknown keys refused. It is then
//! layered into the arguments of the subcommand it describes (a generated or Parquet
//! source runs as `backtest`, a Kafka source as `train`): clap reads the flags given after
//! the file and the `TIDEPOOL_*` environment over its defaults, and each key the file sets
//! is written into the typed arguments with the option's own parser unless a flag or the
//! option's variable set it, so the order is defaults < file < environment < flags and
//! there is one set of names, defaults and checks. Keys that do not apply to the source
//! kind are refused. Every error names `file:line:column` and, for a bad value, the valid
//! forms.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde::Deserialize;

use crate::cli::{
    check_fraction, parse_duration, parse_event_type, parse_gc_percent, parse_half_life, parse_lib,
    parse_size, parse_stop, BacktestArgs, Cli, Command, ModelTable, TrainArgs,
};

/// `[source]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `generator`, `parquet` or `kafka`.
    pub kind: String,
    /// Parquet: files, directories or globs (relative to the job file).
    pub inputs: Option<Vec<String>>,
    /// Parquet: column names.
    pub user_col: Option<String>,
    /// Parquet: column names.
    pub item_col: Option<String>,
    /// Parquet: column names.
    pub time_col: Option<String>,
    /// Parquet: unit of an integer time column (`s`, `ms`).
    pub time_unit: Option<String>,
    /// Generator: events, users, items, churn.
    pub events: Option<u64>,
    /// Generator.
    pub users: Option<u64>,
    /// Generator.
    pub items: Option<u64>,
    /// Generator.
    pub user_churn: Option<u64>,
    /// Kafka: bootstrap servers or `embedded`.
    pub brokers: Option<String>,
    /// Kafka.
    pub topic: Option<String>,
    /// Kafka.
    pub group: Option<String>,
    /// Kafka: partitions of an embedded cluster's topic.
    pub partitions: Option<i32>,
    /// Kafka: `never`, `end`, `idle:DURATION`.
    pub stop_at: Option<String>,
    /// Kafka: `fail` or `continue` when a partition's offsets go backwards.
    pub on_rewind: Option<String>,
    /// Kafka: JSON field names.
    pub user_field: Option<String>,
    /// Kafka.
    pub item_field: Option<String>,
    /// Kafka.
    pub time_field: Option<String>,
    /// Kafka.
    pub type_field: Option<String>,
    /// Kafka: event types trained on.
    pub types: Option<Vec<String>>,
    /// Kafka: librdkafka settings passed through.
    pub config: Option<std::collections::BTreeMap<String, String>>,
}

/// `[eval]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Warm-up share.
    pub warmup: Option<f64>,
    /// Score every N-th event.
    pub eval_every: Option<u64>,
    /// Cut-off K.
    pub k: Option<usize>,
    /// Metrics window width.
    pub window: Option<String>,
}

/// `[run]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Worker threads.
    pub workers: Option<usize>,
    /// Seed.
    pub seed: Option<u64>,
    /// Round width in event time.
    pub tick: Option<String>,
    /// Rounds in flight.
    pub rounds_in_flight: Option<u64>,
    /// Allowed lateness.
    pub allowed_lateness: Option<String>,
    /// `train` or `dead-letter`.
    pub late: Option<String>,
    /// Bound on event times ahead of the wall clock, or `off`.
    pub max_skew: Option<String>,
    /// Popularity window.
    pub popularity_window: Option<String>,
    /// No progress bar.
    pub quiet: Option<bool>,
}

/// `[pool]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// On or off.
    pub enabled: Option<bool>,
    /// Smallest size class.
    pub floor: Option<String>,
    /// Largest size class.
    pub ceiling: Option<String>,
    /// Bytes kept per class.
    pub retain: Option<String>,
    /// Shards (0: one per worker).
    pub shards: Option<usize>,
    /// Poison returned buffers.
    pub poison: Option<bool>,
    /// Batch blocks reserved per reading worker.
    pub reserve: Option<usize>,
}

/// `[gc]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcSection {
    /// A percentage, or `"off"`.
    pub gc_percent: Option<toml::Value>,
    /// Floor.
    pub min_heap: Option<String>,
    /// Soft limit.
    pub memory_limit: Option<String>,
    /// Forced cycle interval.
    pub force_interval: Option<String>,
    /// GCTRACE lines.
    pub trace: Option<bool>,
}

/// `[state]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// User TTL.
    pub user_ttl: Option<String>,
    /// Item TTL.
    pub item_ttl: Option<String>,
}

/// `[cluster]`: the job as a timely cluster of several processes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Processes.
    pub processes: Option<usize>,
    /// This process's index (usually given per process: `tidepool run JOB --process I`).
    pub process: Option<usize>,
    /// Host file (relative to the job file): `host:port` per process.
    pub hostfile: Option<String>,
}

/// `[checkpoint]` (Kafka jobs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Directory (relative to the job file).
    pub dir: Option<String>,
    /// Interval.
    pub interval: Option<String>,
    /// Checkpoints kept.
    pub keep: Option<usize>,
}

/// `[output]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Summary JSON path.
    pub summary_json: Option<String>,
    /// Per-window metrics path.
    pub metrics_out: Option<String>,
    /// Dead letters path.
    pub dead_letters: Option<String>,
    /// Dead letters topic (Kafka jobs).
    pub dead_letter_topic: Option<String>,
    /// Model delta topic (Kafka jobs).
    pub publish_topic: Option<String>,
    /// Model delta Parquet directory (Kafka jobs).
    pub publish_dir: Option<String>,
    /// Publish changed rows this often between checkpoints too (Kafka jobs).
    pub publish_interval: Option<String>,
    /// Report directory.
    pub report: Option<String>,
    /// Final model as a checkpoint (backtest jobs).
    pub save_model: Option<String>,
}

/// A whole job file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Where events come from.
    pub source: SourceSection,
    /// The model (each variant's defaults).
    #[serde(default)]
    pub model: ModelTable,
    /// Models trained side by side.
    #[serde(default)]
    pub variants: Vec<ModelTable>,
    /// The prequential protocol.
    #[serde(default)]
    pub eval: EvalSection,
    /// Workers and replay.
    #[serde(default)]
    pub run: RunSection,
    /// Several processes.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// The buffer pool.
    #[serde(default)]
    pub pool: PoolSection,
    /// The GC trigger.
    #[serde(default)]
    pub gc: GcSection,
    /// Retention.
    #[serde(default)]
    pub state: StateSection,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Outputs.
    #[serde(default)]
    pub output: OutputSection,
}

/// `line:column` (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// Where a key is set in the file, for errors found after parsing (`file:line:column`).
fn locate(path: &Path, text: &str, section: &str, key: &str) -> String {
    let mut in_section = section.is_empty();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == section;
        } else if in_section
            && t.split('=').next().is_some_and(|k| k.trim() == key)
            && t.contains('=')
        {
            let col = line.find(key).unwrap_or(0);
            let (l, c) = line_col(text, offset + col);
            return format!("{}:{l}:{c}", path.display());
        }
        offset += line.len();
    }
    path.display().to_string()
}

impl Job {
    /// The command this job describes (a backtest or a Kafka `train`), with `overrides`
    /// as flags over it, for jobs built in code. Errors name `[section] key`; relative
    /// paths are taken from `base`. [`load`] does the same for a file, with its
    /// `file:line:column`.
    pub fn command(&self, base: &Path, overrides: &[String]) -> anyhow::Result<Command> {
        if let Some(i) = self.variants.iter().position(|v| v.name.is_none()) {
            bail!("[[variants]] {}: a variant needs a name", i + 1);
        }
        let command = build(self, base, overrides, &|section: &str, key: &str| {
            format!("[{section}] {key}")
        })?;
        match &command {
            Command::Backtest(args) => args.config()?.validate()?,
            Command::Train(args) => drop(crate::stream::check(args)?),
            _ => {}
        }
        Ok(command)
    }
}

/// Reads and checks a job file; returns the command it describes.
pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<Command> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let job: Job = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let (l, c) = line_col(&text, s.start);
                format!("{}:{l}:{c}", path.display())
            })
            .unwrap_or_else(|| path.display().to_string());
        anyhow::anyhow!("{at}: {}", e.message().trim())
    })?;
    if let Some(i) = job.variants.iter().position(|v| v.name.is_none()) {
        let at = locate_nth(path, &text, "variants", i, "name");
        bail!("{at}: variant {} needs a name", i + 1);
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let command = build(&job, base, overrides, &|section: &str, key: &str| {
        locate(path, &text, section, key)
    })?;
    // The models' values are checked by the library; point its message at the line.
    let config = match &command {
        Command::Backtest(args) => Some(args.config()),
        Command::Train(args) => Some(args.run.config()),
        _ => None,
    };
    if let Some(config) = config {
        let checked = config.and_then(|c| c.validate().map_err(anyhow::Error::from));
        if let Err(e) = checked {
            let msg = e.to_string();
            let msg = msg.strip_prefix("invalid configuration: ").unwrap_or(&msg);
            return Err(anyhow::anyhow!(
                "{}: {msg}",
                place_model_error(path, &text, &job, msg)
            ));
        }
    }
    Ok(command)
}

/// `file:line:column` of the key a model configuration error names: in the `[[variants]]`
/// entry of the variant it names, or in `[model]`.
fn place_model_error(path: &Path, text: &str, job: &Job, msg: &str) -> String {
    let (variant, rest) = match msg
        .strip_prefix("variant ")
        .and_then(|r| r.split_once(": "))
    {
        Some((name, rest)) => (Some(name), rest),
        None => (None, msg),
    };
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let key = if word == "component" || rest.starts_with("an ensemble") {
        "components".to_string()
    } else {
        word
    };
    if let Some(n) = variant.and_then(|name| {
        job.variants
            .iter()
            .position(|v| v.name.as_deref() == Some(name))
    }) {
        return locate_nth(path, text, "variants", n, &key);
    }
    locate(path, text, "model", &key)
}

/// Like [`locate`], in the `n`-th (0-based) `[[section]]` table.
fn locate_nth(path: &Path, text: &str, section: &str, n: usize, key: &str) -> String {
    let header = format!("[[{section}]]");
    let mut seen = 0;
    let mut inside = false;
    let mut offset = 0;
    let mut table_at = None;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == header && {
                seen += 1;
                seen == n + 1
            };
            if inside {
                table_at = Some(offset);
            }
        } else if inside && t.split('=').next().is_some_and(|k| k.trim() == key) && t.contains('=')
        {
            let col = line.find(key).unwrap_or(0);
            let (l, c) = line_col(text, offset + col);
            return format!("{}:{l}:{c}", path.display());
        }
        offset += line.len();
    }
    match table_at {
        Some(at) => {
            let (l, c) = line_col(text, at);
            format!("{}:{l}:{c}", path.display())
        }
        None => path.display().to_string(),
    }
}

/// The environment variable of a flag: `--gc-min-heap` is `TIDEPOOL_GC_MIN_HEAP`.
fn env_name(flag: &str) -> String {
    format!("TIDEPOOL_{}", flag.replace('-', "_").to_uppercase())
}

/// Keys of one section that apply to some source kinds only: (section, whether they
/// apply to this job, why not, each key and whether the file sets it).
type Rule<'a> = (&'a str, bool, &'a str, &'a [(&'a str, bool)]);

/// Refuses keys that mean nothing for the job's source kind (a Kafka topic in a
/// Parquet job, generator sizes with real brokers, ...), naming the key and where it is:
/// a key that is silently dropped is a setting the user believes is in force.
fn check_applies(job: &Job, kind: &str, at: &dyn Fn(&str, &str) -> String) -> anyhow::Result<()> {
    let (s, c, o) = (&job.source, &job.checkpoint, &job.output);
    let kafka = kind == "kafka";
    let generated = kind == "generator" || (kafka && s.brokers.as_deref() == Some("embedded"));
    let rules: [Rule; 6] = [
        (
            "source",
            generated,
            "it sizes a generated stream (kind = \"generator\", or a kafka source with brokers = \"embedded\")",
            &[
                ("events", s.events.is_some()),
                ("users", s.users.is_some()),
                ("items", s.items.is_some()),
                ("user_churn", s.user_churn.is_some()),
            ],
        ),
        (
            "source",
            kind == "parquet",
            "it maps Parquet columns (kind = \"parquet\"); Kafka payloads are mapped by user_field, item_field, time_field",
            &[
                ("inputs", s.inputs.is_some()),
                ("user_col", s.user_col.is_some()),
                ("item_col", s.item_col.is_some()),
                ("time_col", s.time_col.is_some()),
                ("time_unit", s.time_unit.is_some()),
            ],
        ),
        (
            "source",
            kafka,
            "it configures a Kafka source (kind = \"kafka\")",
            &[
                ("brokers", s.brokers.is_some()),
                ("topic", s.topic.is_some()),
                ("group", s.group.is_some()),
                ("partitions", s.partitions.is_some()),
                ("stop_at", s.stop_at.is_some()),
                ("on_rewind", s.on_rewind.is_some()),
                ("user_field", s.user_field.is_some()),
                ("item_field", s.item_field.is_some()),
                ("time_field", s.time_field.is_some()),
                ("type_field", s.type_field.is_some()),
                ("types", s.types.is_some()),
                ("config", s.config.is_some()),
            ],
        ),
        (
            "checkpoint",
            kafka,
            "checkpoints are tied to Kafka offsets; a backtest saves its final model with [output] save_model",
            &[
                ("dir", c.dir.is_some()),
                ("interval", c.interval.is_some()),
                ("keep", c.keep.is_some()),
            ],
        ),
        (
            "output",
            kafka,
            "model deltas and dead-letter topics belong to Kafka jobs",
            &[
                ("dead_letter_topic", o.dead_letter_topic.is_some()),
                ("publish_topic", o.publish_topic.is_some()),
                ("publish_dir", o.publish_dir.is_some()),
                ("publish_interval", o.publish_interval.is_some()),
            ],
        ),
        (
            "output",
            !kafka,
            "a Kafka job checkpoints with [checkpoint] dir",
            &[("save_model", o.save_model.is_some())],
        ),
    ];
    for (section, applies, why, keys) in rules {
        if let Some((key, _)) = keys.iter().find(|(_, set)| *set).filter(|_| !applies) {
            bail!(
                "{}: `{key}` does not apply to a {kind} source: {why}",
                at(section, key)
            );
        }
    }
    Ok(())
}

/// The job file as a layer over what clap read: each key the file sets is parsed with the
/// option's own parser and written into the subcommand's typed arguments, unless the
/// command line or the option's `TIDEPOOL_*` variable set that option.
struct FileLayer<'a> {
    /// The subcommand's matches: which options came from where.
    matches: &'a ArgMatches,
    /// The subcommand, to find an option's long name (its variable is named after it).
    command: &'a clap::Command,
    /// Locates a key for messages.
    at: &'a dyn Fn(&str, &str) -> String,
    /// The job file's directory: relative paths in the file are relative to it.
    base: &'a Path,
}

impl FileLayer<'_> {
    /// Whether the file's value for option `id` is in force. Layering: defaults < file <
    /// environment < flags, so a flag or the option's variable beats the file.
    fn in_force(&self, id: &str) -> bool {
        if matches!(
            self.matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            return false;
        }
        // Some options read their variable themselves (--gc reads TIDEPOOL_GC).
        let long = self
            .command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_long());
        long.is_none_or(|l| std::env::var_os(env_name(l)).is_none())
    }

    /// Writes `value` (the file's `[section] key`) into `slot`, the option `id`, through
    /// `convert`; a value `convert` refuses is an error at the key.
    fn put<T: std::fmt::Debug, U>(
        &self,
        (section, key): (&str, &str),
        id: &str,
        value: Option<T>,
        convert: impl FnOnce(T) -> Result<U, String>,
        slot: &mut U,
    ) -> anyhow::Result<()> {
        let Some(value) = value else { return Ok(()) };
        if !self.in_force(id) {
            return Ok(());
        }
        let shown = format!("{value:?}");
        *slot = convert(value).map_err(|e| {
            let e = e.trim_start_matches("invalid configuration: ");
            anyhow::anyhow!(
                "{}: invalid value {shown} for `{key}`: {e}",
                (self.at)(section, key)
            )
        })?;
        Ok(())
    }

    /// A path from the file, relative to the job file.
    fn path(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    /// The settings every job has: source mapping or generator, model, variants, eval,
    /// run, cluster, pool, gc, state and outputs. One line per key, as a table.
    #[rustfmt::skip]
    fn run(&self, job: &Job, a: &mut BacktestArgs) -> anyhow::Result<()> {
        let s = &job.source;
        let src = |key| ("source", key);
        let inputs = s.inputs.as_ref().map(|i| {
            i.iter()
                .map(|p| self.path(p).display().to_string())
                .collect()
        });
        self.put(src("inputs"), "inputs", inputs, Ok, &mut a.inputs)?;
        self.put(src("user_col"), "user_col", s.user_col.clone(), Ok, &mut a.user_col)?;
        self.put(src("item_col"), "item_col", s.item_col.clone(), Ok, &mut a.item_col)?;
        self.put(src("time_col"), "time_col", s.time_col.clone(), Ok, &mut a.time_col)?;
        let unit = s.time_unit.as_deref();
        self.put(src("time_unit"), "time_unit", unit, parse_lib, &mut a.time_unit)?;
        self.put(src("events"), "events", s.events, Ok, &mut a.events)?;
        self.put(src("users"), "users", s.users, Ok, &mut a.users)?;
        self.put(src("items"), "items", s.items, Ok, &mut a.items)?;
        self.put(src("user_churn"), "user_churn", s.user_churn, Ok, &mut a.user_churn)?;

        let m = &job.model;
        for (key, set) in [
            ("components", m.components.is_some()),
            ("learn_every", m.learn_every.is_some()),
            ("mix_lr", m.mix_lr.is_some()),
            ("norm", m.norm.is_some()),
            ("objective", m.objective.is_some()),
        ] {
            if set {
                bail!(
                    "{}: {key} describes one ensemble and belongs in a [[variants]] entry with kind = \"ensemble\" ([model] with kind = \"ensemble\" runs the recommended ensemble)",
                    (self.at)("model", key)
                );
            }
        }
        if m.name.is_some() {
            bail!(
                "{}: name belongs in a [[variants]] entry; [model] holds every variant's defaults",
                (self.at)("model", "name")
            );
        }
        let model = |key| ("model", key);
        let kind = m.kind.as_deref();
        self.put(model("kind"), "model", kind, |v| parse_lib(v).map(Some), &mut a.model)?;
        self.put(model("dim"), "dim", m.dim, Ok, &mut a.dim)?;
        self.put(model("lr"), "lr", m.lr, Ok, &mut a.lr)?;
        self.put(model("reg"), "reg", m.reg, Ok, &mut a.reg)?;
        let opt = m.optimizer.as_deref();
        self.put(model("optimizer"), "optimizer", opt, parse_lib, &mut a.optimizer)?;
        self.put(model("negatives"), "negatives", m.negatives, Ok, &mut a.negatives)?;
        self.put(model("init_std"), "init_std", m.init_std, Ok, &mut a.init_std)?;
        let no_bias = m.item_bias.map(|b| !b);
        self.put(model("item_bias"), "no_item_bias", no_bias, Ok, &mut a.no_item_bias)?;
        self.put(model("sampler"), "sampler", m.sampler.clone(), Ok, &mut a.sampler)?;
        self.put(model("logq"), "logq", m.logq, Ok, &mut a.logq)?;
        self.put(model("history"), "history", m.history, Ok, &mut a.history)?;
        self.put(model("decay"), "decay", m.decay, Ok, &mut a.decay)?;
        self.put(model("pair_decay"), "pair_decay", m.pair_decay, Ok, &mut a.pair_decay)?;
        self.put(model("back"), "back", m.back, Ok, &mut a.back)?;
        self.put(model("alpha"), "alpha", m.alpha, Ok, &mut a.alpha)?;
        self.put(model("neighbours"), "neighbours", m.neighbours, Ok, &mut a.neighbours)?;
        let half_life = m.half_life.as_deref();
        let some_half_life = |v| parse_half_life(v).map(Some);
        self.put(model("half_life"), "half_life", half_life, some_half_life, &mut a.half_life)?;
        // --variant on the command line replaces the file's variants as a whole.
        let tables = (!job.variants.is_empty()).then(|| job.variants.clone());
        self.put(("variants", "name"), "variants", tables, Ok, &mut a.variant_tables)?;

        let e = &job.eval;
        let eval = |key| ("eval", key);
        self.put(eval("warmup"), "warmup", e.warmup, check_fraction, &mut a.warmup)?;
        self.put(eval("eval_every"), "eval_every", e.eval_every, Ok, &mut a.eval_every)?;
        self.put(eval("k"), "k", e.k, Ok, &mut a.k)?;
        let window = e.window.as_deref();
        self.put(eval("window"), "metrics_window", window, duration, &mut a.metrics_window)?;

        let r = &job.run;
        let run = |key| ("run", key);
        self.put(run("workers"), "workers", r.workers, Ok, &mut a.workers)?;
        self.put(run("seed"), "seed", r.seed, Ok, &mut a.seed)?;
        self.put(run("tick"), "tick", r.tick.as_deref(), duration, &mut a.tick)?;
        let rif = r.rounds_in_flight;
        self.put(run("rounds_in_flight"), "rounds_in_flight", rif, Ok, &mut a.rounds_in_flight)?;
        let lateness = r.allowed_lateness.as_deref();
        let slot = &mut a.allowed_lateness;
        self.put(run("allowed_lateness"), "allowed_lateness", lateness, duration, slot)?;
        self.put(run("late"), "late", r.late.as_deref(), parse_lib, &mut a.late)?;
        let skew = r.max_skew.as_deref();
        let some_skew = |v| parse_half_life(v).map(Some);
        self.put(run("max_skew"), "max_skew", skew, some_skew, &mut a.max_skew)?;
        let window = r.popularity_window.as_deref();
        let slot = &mut a.pop_window;
        self.put(run("popularity_window"), "pop_window", window, parse_duration, slot)?;
        self.put(run("quiet"), "quiet", r.quiet, Ok, &mut a.quiet)?;

        let c = &job.cluster;
        let cluster = |key| ("cluster", key);
        self.put(cluster("processes"), "processes", c.processes, Ok, &mut a.processes)?;
        self.put(cluster("process"), "process", c.process, Ok, &mut a.process)?;
        let hostfile = c.hostfile.as_deref().map(|h| Some(self.path(h)));
        self.put(cluster("hostfile"), "hostfile", hostfile, Ok, &mut a.hostfile)?;

        let p = &job.pool;
        let pool = |key| ("pool", key);
        self.put(pool("enabled"), "pool", p.enabled, Ok, &mut a.pool)?;
        self.put(pool("floor"), "pool_floor", p.floor.as_deref(), parse_size, &mut a.pool_floor)?;
        let ceiling = p.ceiling.as_deref();
        self.put(pool("ceiling"), "pool_ceiling", ceiling, parse_size, &mut a.pool_ceiling)?;
        let retain = p.retain.as_deref();
        self.put(pool("retain"), "pool_retain", retain, parse_size, &mut a.pool_retain)?;
        self.put(pool("shards"), "pool_shards", p.shards, Ok, &mut a.pool_shards)?;
        self.put(pool("poison"), "pool_poison", p.poison, Ok, &mut a.pool_poison)?;
        let reserve = p.reserve.map(Some);
        self.put(pool("reserve"), "pool_reserve", reserve, Ok, &mut a.pool_reserve)?;

        let g = &job.gc;
        let gc = |key| ("gc", key);
        // A percentage or "off": TOML writes the first as a number, the second as a string.
        let percent = g.gc_percent.as_ref().map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let some_percent = |v: String| parse_gc_percent(&v).map(Some);
        self.put(gc("gc_percent"), "gc_percent", percent, some_percent, &mut a.gc_percent)?;
        let min_heap = g.min_heap.as_deref();
        self.put(gc("min_heap"), "gc_min_heap", min_heap, parse_size, &mut a.gc_min_heap)?;
        let limit = g.memory_limit.as_deref();
        let some_size = |v| parse_size(v).map(Some);
        self.put(gc("memory_limit"), "memory_limit", limit, some_size, &mut a.memory_limit)?;
        let force = g.force_interval.as_deref();
        let slot = &mut a.gc_force_interval;
        self.put(gc("force_interval"), "gc_force_interval", force, parse_duration, slot)?;
        self.put(gc("trace"), "gctrace", g.trace, Ok, &mut a.gctrace)?;

        let st = &job.state;
        let state = |key| ("state", key);
        let ttl = st.user_ttl.as_deref();
        self.put(state("user_ttl"), "user_ttl", ttl, duration, &mut a.user_ttl)?;
        let ttl = st.item_ttl.as_deref();
        self.put(state("item_ttl"), "item_ttl", ttl, duration, &mut a.item_ttl)?;

        let o = &job.output;
        let path = |p: &Option<String>| p.as_deref().map(|p| Some(self.path(p)));
        let out = |key| ("output", key);
        let summary = path(&o.summary_json);
        self.put(out("summary_json"), "summary_json", summary, Ok, &mut a.summary_json)?;
        let metrics = path(&o.metrics_out);
        self.put(out("metrics_out"), "metrics_out", metrics, Ok, &mut a.metrics_out)?;
        let dead = path(&o.dead_letters);
        self.put(out("dead_letters"), "dead_letters", dead, Ok, &mut a.dead_letters)?;
        self.put(out("report"), "report", path(&o.report), Ok, &mut a.report)?;
        let model_dir = path(&o.save_model);
        self.put(out("save_model"), "save_model", model_dir, Ok, &mut a.save_model)?;
        Ok(())
    }

    /// The Kafka settings of a `kind = "kafka"` job: connection, payload mapping,
    /// checkpoints and what is published. One line per key, as a table.
    #[rustfmt::skip]
    fn kafka(&self, job: &Job, t: &mut TrainArgs) -> anyhow::Result<()> {
        let s = &job.source;
        let k = &mut t.kafka;
        let src = |key| ("source", key);
        self.put(src("brokers"), "brokers", s.brokers.clone(), Ok, &mut k.brokers)?;
        self.put(src("topic"), "topic", s.topic.clone(), Ok, &mut k.topic)?;
        self.put(src("group"), "group", s.group.clone(), Ok, &mut k.group)?;
        self.put(src("partitions"), "partitions", s.partitions, Ok, &mut k.partitions)?;
        let stop = s.stop_at.as_deref();
        self.put(src("stop_at"), "stop_at", stop, |v| parse_stop(v).map(Some), &mut t.stop_at)?;
        let rewind = s.on_rewind.as_deref();
        self.put(src("on_rewind"), "on_rewind", rewind, str::parse, &mut k.on_rewind)?;
        let field = s.user_field.clone();
        self.put(src("user_field"), "user_field", field, Ok, &mut k.user_field)?;
        let field = s.item_field.clone();
        self.put(src("item_field"), "item_field", field, Ok, &mut k.item_field)?;
        let field = s.time_field.clone();
        self.put(src("time_field"), "time_field", field, Ok, &mut k.time_field)?;
        let field = s.type_field.clone();
        self.put(src("type_field"), "type_field", field, Ok, &mut k.type_field)?;
        let types = |v: &Vec<String>| v.iter().map(|t| parse_event_type(t)).collect();
        self.put(src("types"), "types", s.types.as_ref(), types, &mut k.types)?;
        let config = s.config.clone().map(|c| c.into_iter().collect());
        self.put(src("config"), "kafka_config", config, Ok, &mut k.kafka_config)?;

        let c = &job.checkpoint;
        let ckpt = |key| ("checkpoint", key);
        let dir = c.dir.as_deref().map(|d| Some(self.path(d)));
        self.put(ckpt("dir"), "checkpoint_dir", dir, Ok, &mut t.checkpoint_dir)?;
        let every = c.interval.as_deref();
        let slot = &mut t.checkpoint_interval;
        self.put(ckpt("interval"), "checkpoint_interval", every, parse_duration, slot)?;
        self.put(ckpt("keep"), "keep_checkpoints", c.keep, Ok, &mut t.keep_checkpoints)?;

        let o = &job.output;
        let out = |key| ("output", key);
        let topic = o.dead_letter_topic.clone().map(Some);
        let slot = &mut t.dead_letter_topic;
        self.put(out("dead_letter_topic"), "dead_letter_topic", topic, Ok, slot)?;
        let topic = o.publish_topic.clone().map(Some);
        self.put(out("publish_topic"), "publish_topic", topic, Ok, &mut t.publish_topic)?;
        let dir = o.publish_dir.as_deref().map(|d| Some(self.path(d)));
        self.put(out("publish_dir"), "publish_dir", dir, Ok, &mut t.publish_dir)?;
        let every = o.publish_interval.as_deref();
        let slot = &mut t.publish_interval;
        self.put(out("publish_interval"), "publish_interval", every, duration, slot)?;
        Ok(())
    }
}

/// An optional duration option.
fn duration(v: &str) -> Result<Option<Duration>, String> {
    parse_duration(v).map(Some)
}

/// The command a job describes: the subcommand's arguments as clap reads them from the
/// flags after the file and the environment (over its defaults), with the file's keys
/// layered in between. `at` locates a key for error messages.
fn build(
    job: &Job,
    base: &Path,
    overrides: &[String],
    at: &dyn Fn(&str, &str) -> String,
) -> anyhow::Result<Command> {
    let s = &job.source;
    let kafka = match s.kind.as_str() {
        "generator" | "parquet" => false,
        "kafka" => true,
        other => bail!(
            "{}: unknown source kind {other:?}; valid: generator, parquet, kafka",
            at("source", "kind")
        ),
    };
    check_applies(job, &s.kind, at)?;
    let sub = if kafka { "train" } else { "backtest" };
    // The brokers may come from the file: clap must not insist on the flag.
    let cli = Cli::command().mut_subcommand("train", |c| {
        c.mut_arg("brokers", |a| a.required(false).default_value(""))
    });
    let argv = ["tidepool", sub]
        .into_iter()
        .map(String::from)
        .chain(overrides.iter().cloned());
    let matches = cli.clone().try_get_matches_from(argv).map_err(|e| {
        let msg = e.to_string();
        let first = msg
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        anyhow::anyhow!("{}: {first}", at("", ""))
    })?;
    let mut command = Cli::from_arg_matches(&matches)?.command;
    let (Some(sub_matches), Some(sub_command)) =
        (matches.subcommand_matches(sub), cli.find_subcommand(sub))
    else {
        bail!("{}: not a runnable job", at("", ""));
    };
    let layer = FileLayer {
        matches: sub_matches,
        command: sub_command,
        at,
        base,
    };
    match &mut command {
        Command::Backtest(args) => {
            layer.run(job, args)?;
            if s.kind == "parquet" && args.inputs.is_empty() {
                bail!("{}: a parquet source needs inputs", at("source", "kind"));
            }
        }
        Command::Train(args) => {
            layer.kafka(job, args)?;
            layer.run(job, &mut args.run)?;
            if args.kafka.brokers.is_empty() {
                bail!("{}: a kafka source needs brokers", at("source", "kind"));
            }
        }
        _ => bail!("{}: not a runnable job", at("", "")),
    }
    Ok(command)
}

/// `tidepool validate`: checks a job file and says what it would run.
pub fn validate(path: &Path, overrides: &[String]) -> anyhow::Result<()> {
    let command = load(path, overrides)?;
    let what = match &command {
        Command::Backtest(args) => {
            let config = args.config()?;
            config.validate()?;
            format!(
                "a backtest with {} variant(s) on {}",
                config.variants.len(),
                shape(&args.cluster()?, config.workers)
            )
        }
        Command::Train(args) => {
            let config = crate::stream::check(args)?;
            format!(
                "Kafka retraining from {} with {} variant(s) on {}",
                args.kafka.brokers,
                config.variants.len(),
                shape(&args.run.cluster()?, config.workers)
            )
        }
        _ => "nothing runnable".into(),
    };
    println!("{}: ok ({what})", path.display());
    Ok(())
}

fn shape(cluster: &Option<tidepool_operators::cluster::Cluster>, workers: usize) -> String {
    match cluster {
        Some(c) => format!(
            "process {} of a {}-process cluster ({}), {workers} worker(s) each",
            c.process,
            c.processes,
            c.addresses.join(", ")
        ),
        None => format!("{workers} worker(s)"),
    }
}

/// `tidepool run`: runs the job.
pub fn run(path: &Path, overrides: &[String]) -> anyhow::Result<()> {
    match load(path, overrides)? {
        Command::Backtest(args) => crate::commands::backtest(&args).map(drop),
        Command::Train(args) => crate::stream::train(&args).map(drop),
        _ => bail!("{}: not a runnable job", path.display()),
    }
}
