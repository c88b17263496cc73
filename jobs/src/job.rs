//! Job files: `tidepool run JOB.toml` and `tidepool validate JOB.toml`.
//!
//! A job file sets the same settings as the command line, under the same names and with
//! the same defaults: it is read into the subcommand's own arguments (a generated or
//! Parquet source runs as `backtest`, a Kafka source as `train`), starting from the
//! command line's defaults, so there is one set of names, defaults and checks. Unknown
//! keys are errors; every error names `file:line:column` and, for a bad value, the valid
//! forms.

use std::path::Path;

use anyhow::bail;
use clap::Parser;
use serde::Deserialize;

use crate::cli::{Cli, Command};

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

/// `[model]` (and each `[[variants]]`, which adds `name`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Variant name (variants only).
    pub name: Option<String>,
    /// `bpr`, `mostpop`, `itemknn` or `ensemble`.
    pub kind: Option<String>,
    /// Embedding dimension.
    pub dim: Option<usize>,
    /// Learning rate.
    pub lr: Option<f32>,
    /// L2 regularisation.
    pub reg: Option<f32>,
    /// `sgd` or `adagrad`.
    pub optimizer: Option<String>,
    /// Negatives per positive.
    pub negatives: Option<usize>,
    /// Initial embedding standard deviation.
    pub init_std: Option<f32>,
    /// Item bias on or off.
    pub item_bias: Option<bool>,
    /// Negative sampler spec.
    pub sampler: Option<String>,
    /// bpr: logQ correction of non-uniform negatives.
    pub logq: Option<bool>,
    /// itemknn: recent items per user.
    pub history: Option<usize>,
    /// itemknn: recency weight when scoring.
    pub decay: Option<f32>,
    /// itemknn: weight by sequence distance.
    pub pair_decay: Option<f32>,
    /// itemknn: backward pair weight.
    pub back: Option<f32>,
    /// itemknn: asymmetric cosine exponent.
    pub alpha: Option<f32>,
    /// itemknn: neighbours per item.
    pub neighbours: Option<usize>,
    /// itemknn: half-life in event time, or "off".
    pub half_life: Option<String>,
    /// ensemble (variants only): the variants mixed.
    pub components: Option<Vec<String>>,
    /// ensemble (variants only): learn from every N-th event.
    pub learn_every: Option<u64>,
    /// ensemble (variants only): the weights' learning rate.
    pub mix_lr: Option<f32>,
    /// ensemble (variants only): `rank` or `z`.
    pub norm: Option<String>,
    /// ensemble (variants only): `hedge`, `top` or `softmax`.
    pub objective: Option<String>,
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
    pub model: ModelSection,
    /// Models trained side by side.
    #[serde(default)]
    pub variants: Vec<ModelSection>,
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
    let base = path.parent().unwrap_or(Path::new("."));
    let command = to_command(&job, base, overrides, &|section: &str, key: &str| {
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

fn rel(base: &Path, p: &str) -> String {
    let path = Path::new(p);
    if path.is_absolute() {
        p.to_string()
    } else {
        base.join(path).display().to_string()
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

/// Builds argv for the subcommand, so clap applies its own parsers, defaults and
/// checks; `at` locates a key for error messages.
fn to_command(
    job: &Job,
    base: &Path,
    overrides: &[String],
    at: &dyn Fn(&str, &str) -> String,
) -> anyhow::Result<Command> {
    let mut argv: Vec<String> = vec!["tidepool".into()];
    // Each flag remembers the (section, key) it came from, for clap's errors.
    let mut origin: Vec<(String, String, String)> = Vec::new();
    let mut flag = |argv: &mut Vec<String>, section: &str, key: &str, name: &str, value: String| {
        // Layering: defaults < file < environment < flags. A `TIDEPOOL_*` variable set
        // for this option beats the file (clap reads it when no flag is given), and the
        // flags after the file beat both.
        if std::env::var_os(env_name(name)).is_some() {
            return;
        }
        origin.push((format!("--{name}"), section.to_string(), key.to_string()));
        argv.push(format!("--{name}"));
        argv.push(value);
    };
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
    argv.push(if kafka { "train" } else { "backtest" }.into());
    if kafka {
        let brokers = s.brokers.clone().ok_or_else(|| {
            anyhow::anyhow!("{}: a kafka source needs brokers", at("source", "kind"))
        })?;
        flag(&mut argv, "source", "brokers", "brokers", brokers);
        for (key, name, v) in [
            ("topic", "topic", &s.topic),
            ("group", "group", &s.group),
            ("stop_at", "stop-at", &s.stop_at),
            ("on_rewind", "on-rewind", &s.on_rewind),
            ("user_field", "user-field", &s.user_field),
            ("item_field", "item-field", &s.item_field),
            ("time_field", "time-field", &s.time_field),
            ("type_field", "type-field", &s.type_field),
        ] {
            if let Some(v) = v {
                flag(&mut argv, "source", key, name, v.clone());
            }
        }
        if let Some(p) = s.partitions {
            flag(
                &mut argv,
                "source",
                "partitions",
                "partitions",
                p.to_string(),
            );
        }
        for t in s.types.iter().flatten() {
            flag(&mut argv, "source", "types", "type", t.clone());
        }
        for (k, v) in s.config.iter().flatten() {
            flag(
                &mut argv,
                "source",
                "config",
                "kafka-config",
                format!("{k}={v}"),
            );
        }
        let c = &job.checkpoint;
        if let Some(d) = &c.dir {
            flag(
                &mut argv,
                "checkpoint",
                "dir",
                "checkpoint-dir",
                rel(base, d),
            );
        }
        if let Some(i) = &c.interval {
            flag(
                &mut argv,
                "checkpoint",
                "interval",
                "checkpoint-interval",
                i.clone(),
            );
        }
        if let Some(k) = c.keep {
            flag(
                &mut argv,
                "checkpoint",
                "keep",
                "keep-checkpoints",
                k.to_string(),
            );
        }
        if let Some(t) = &job.output.dead_letter_topic {
            flag(
                &mut argv,
                "output",
                "dead_letter_topic",
                "dead-letter-topic",
                t.clone(),
            );
        }
        if let Some(t) = &job.output.publish_topic {
            flag(
                &mut argv,
                "output",
                "publish_topic",
                "publish-topic",
                t.clone(),
            );
        }
        if let Some(d) = &job.output.publish_dir {
            flag(
                &mut argv,
                "output",
                "publish_dir",
                "publish-dir",
                rel(base, d),
            );
        }
        if let Some(i) = &job.output.publish_interval {
            flag(
                &mut argv,
                "output",
                "publish_interval",
                "publish-interval",
                i.clone(),
            );
        }
    }
    for (key, name, v) in [
        ("user_col", "user-col", &s.user_col),
        ("item_col", "item-col", &s.item_col),
        ("time_col", "time-col", &s.time_col),
        ("time_unit", "time-unit", &s.time_unit),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "source", key, name, v.clone());
        }
    }
    for (key, name, v) in [
        ("events", "events", s.events),
        ("users", "users", s.users),
        ("items", "items", s.items),
        ("user_churn", "user-churn", s.user_churn),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "source", key, name, v.to_string());
        }
    }
    let m = &job.model;
    let strings = [
        ("kind", "model", &m.kind),
        ("optimizer", "optimizer", &m.optimizer),
        ("sampler", "sampler", &m.sampler),
    ];
    for (key, name, v) in strings {
        if let Some(v) = v {
            flag(&mut argv, "model", key, name, v.clone());
        }
    }
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
                at("model", key)
            );
        }
    }
    if m.logq == Some(true) {
        argv.push("--logq".into());
    }
    let numbers = [
        ("dim", "dim", m.dim.map(|v| v.to_string())),
        ("lr", "lr", m.lr.map(|v| v.to_string())),
        ("reg", "reg", m.reg.map(|v| v.to_string())),
        ("negatives", "negatives", m.negatives.map(|v| v.to_string())),
        ("init_std", "init-std", m.init_std.map(|v| v.to_string())),
        ("history", "history", m.history.map(|v| v.to_string())),
        ("decay", "decay", m.decay.map(|v| v.to_string())),
        (
            "pair_decay",
            "pair-decay",
            m.pair_decay.map(|v| v.to_string()),
        ),
        ("back", "back", m.back.map(|v| v.to_string())),
        ("alpha", "alpha", m.alpha.map(|v| v.to_string())),
        (
            "neighbours",
            "neighbours",
            m.neighbours.map(|v| v.to_string()),
        ),
        ("half_life", "half-life", m.half_life.clone()),
    ];
    for (key, name, v) in numbers {
        if let Some(v) = v {
            flag(&mut argv, "model", key, name, v);
        }
    }
    if m.item_bias == Some(false) {
        argv.push("--no-item-bias".into());
    }
    for (i, v) in job.variants.iter().enumerate() {
        let name = v.name.clone().ok_or_else(|| {
            anyhow::anyhow!("{}: variant {} needs a name", at("variants", "name"), i + 1)
        })?;
        let mut spec = format!("{name}={}", v.sampler.clone().unwrap_or_default());
        for (k, val) in [
            ("model", v.kind.clone()),
            ("dim", v.dim.map(|x| x.to_string())),
            ("lr", v.lr.map(|x| x.to_string())),
            ("reg", v.reg.map(|x| x.to_string())),
            ("optimizer", v.optimizer.clone()),
            ("negatives", v.negatives.map(|x| x.to_string())),
            ("init_std", v.init_std.map(|x| x.to_string())),
            ("item_bias", v.item_bias.map(|x| x.to_string())),
            ("logq", v.logq.map(|x| x.to_string())),
            ("history", v.history.map(|x| x.to_string())),
            ("decay", v.decay.map(|x| x.to_string())),
            ("pair_decay", v.pair_decay.map(|x| x.to_string())),
            ("back", v.back.map(|x| x.to_string())),
            ("alpha", v.alpha.map(|x| x.to_string())),
            ("neighbours", v.neighbours.map(|x| x.to_string())),
            ("half_life", v.half_life.clone()),
            ("components", v.components.as_ref().map(|c| c.join("+"))),
            ("learn_every", v.learn_every.map(|x| x.to_string())),
            ("mix_lr", v.mix_lr.map(|x| x.to_string())),
            ("norm", v.norm.clone()),
            ("objective", v.objective.clone()),
        ] {
            if let Some(val) = val {
                spec.push_str(&format!(",{k}={val}"));
            }
        }
        flag(&mut argv, "variants", "name", "variant", spec);
    }
    let e = &job.eval;
    for (key, name, v) in [
        ("warmup", "warmup", e.warmup.map(|v| v.to_string())),
        (
            "eval_every",
            "eval-every",
            e.eval_every.map(|v| v.to_string()),
        ),
        ("k", "k", e.k.map(|v| v.to_string())),
        ("window", "metrics-window", e.window.clone()),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "eval", key, name, v);
        }
    }
    let r = &job.run;
    for (key, name, v) in [
        ("workers", "workers", r.workers.map(|v| v.to_string())),
        ("seed", "seed", r.seed.map(|v| v.to_string())),
        ("tick", "tick", r.tick.clone()),
        (
            "rounds_in_flight",
            "rounds-in-flight",
            r.rounds_in_flight.map(|v| v.to_string()),
        ),
        (
            "allowed_lateness",
            "allowed-lateness",
            r.allowed_lateness.clone(),
        ),
        ("late", "late", r.late.clone()),
        ("max_skew", "max-skew", r.max_skew.clone()),
        (
            "popularity_window",
            "pop-window",
            r.popularity_window.clone(),
        ),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "run", key, name, v);
        }
    }
    if r.quiet == Some(true) {
        argv.push("--quiet".into());
    }
    let c = &job.cluster;
    for (key, name, v) in [
        ("processes", "processes", c.processes.map(|v| v.to_string())),
        ("process", "process", c.process.map(|v| v.to_string())),
        (
            "hostfile",
            "hostfile",
            c.hostfile.as_deref().map(|h| rel(base, h)),
        ),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "cluster", key, name, v);
        }
    }
    let p = &job.pool;
    for (key, name, v) in [
        (
            "enabled",
            "pool",
            p.enabled.map(|b| if b { "on" } else { "off" }.to_string()),
        ),
        ("floor", "pool-floor", p.floor.clone()),
        ("ceiling", "pool-ceiling", p.ceiling.clone()),
        ("retain", "pool-retain", p.retain.clone()),
        ("shards", "pool-shards", p.shards.map(|v| v.to_string())),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "pool", key, name, v);
        }
    }
    if p.poison == Some(true) {
        argv.push("--pool-poison".into());
    }
    let g = &job.gc;
    let percent = g.gc_percent.as_ref().map(|v| match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    for (key, name, v) in [
        ("gc_percent", "gc", percent),
        ("min_heap", "gc-min-heap", g.min_heap.clone()),
        ("memory_limit", "memory-limit", g.memory_limit.clone()),
        (
            "force_interval",
            "gc-force-interval",
            g.force_interval.clone(),
        ),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "gc", key, name, v);
        }
    }
    if g.trace == Some(true) {
        argv.push("--gctrace".into());
    }
    for (key, name, v) in [
        ("user_ttl", "user-ttl", &job.state.user_ttl),
        ("item_ttl", "item-ttl", &job.state.item_ttl),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "state", key, name, v.clone());
        }
    }
    let o = &job.output;
    for (key, name, v) in [
        ("summary_json", "summary-json", &o.summary_json),
        ("metrics_out", "metrics-out", &o.metrics_out),
        ("dead_letters", "dead-letters", &o.dead_letters),
        ("report", "report", &o.report),
        ("save_model", "save-model", &o.save_model),
    ] {
        if let Some(v) = v {
            flag(&mut argv, "output", key, name, rel(base, v));
        }
    }
    if !kafka {
        for input in s.inputs.iter().flatten() {
            argv.push(rel(base, input));
        }
        if s.kind == "parquet" && s.inputs.as_ref().is_none_or(Vec::is_empty) {
            bail!("{}: a parquet source needs inputs", at("source", "kind"));
        }
    }
    // Flags after the file name win over the file (clap keeps the last occurrence).
    argv.extend(overrides.iter().cloned());
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        // Point at the key the offending flag came from.
        let msg = e.to_string();
        let first = msg
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_string();
        let place = origin
            .iter()
            .find(|(f, _, _)| msg.contains(&format!("'{f} ")) || msg.contains(&format!("'{f}'")))
            .map(|(_, section, key)| at(section, key))
            .unwrap_or_else(|| at("", ""));
        anyhow::anyhow!("{place}: {first}")
    })?;
    Ok(cli.command)
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
            let config = args.run.config()?;
            config.validate()?;
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
