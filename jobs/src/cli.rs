//! Command-line arguments, and the library configuration they describe
//! ([`BacktestArgs::config`], the source, the pool, the cluster). Every default comes
//! from the library crates' `DEFAULT_*` constants, so the CLI and the libraries cannot
//! disagree. This module depends on the library crates only: the other `jobs` modules
//! build on it, never the other way round.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tidepool_connector_generator::GeneratorConfig;
use tidepool_connector_generator::GeneratorSource;
use tidepool_connector_parquet::{ColRef, IntTimeUnit, Preset};
use tidepool_connector_parquet::{ColumnMapping, ParquetSource};
use tidepool_operators::cluster::Cluster;
use tidepool_operators::config::{recommended_variants, KnnConfig};
use tidepool_operators::config::{
    DEFAULT_DIM, DEFAULT_EVAL_EVERY, DEFAULT_INIT_STD, DEFAULT_K, DEFAULT_KNN_ALPHA,
    DEFAULT_KNN_BACK, DEFAULT_KNN_DECAY, DEFAULT_KNN_HISTORY, DEFAULT_KNN_NEIGHBOURS,
    DEFAULT_KNN_PAIR_DECAY, DEFAULT_LR, DEFAULT_NEGATIVES, DEFAULT_REG, DEFAULT_ROUNDS_IN_FLIGHT,
    DEFAULT_SEED, DEFAULT_WARMUP,
};
use tidepool_operators::{
    BacktestConfig, EvalConfig, LatePolicy, ModelConfig, ModelKind, Optimizer, StateConfig,
    VariantConfig,
};
use tidepool_pipeline::memory::gc::GcConfig;
use tidepool_pipeline::{BufferPool, EventSource, PoolConfig};

/// tidepool: streaming online learning for recommenders.
#[derive(Debug, Parser)]
#[command(
    name = "tidepool",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay history (Parquet, or a generated stream when no INPUT is given) and score
    /// the model prequentially: every event is ranked before it is trained on.
    Backtest(Box<BacktestArgs>),
    /// Convert a CSV/TSV export into Parquet sorted by event time.
    Import(ImportArgs),
    /// Write a synthetic behaviour stream to Parquet.
    Generate(GenerateArgs),
    /// Measure training throughput (run with --release).
    Bench(BenchArgs),
    /// Follow a Kafka topic: score then train every event, checkpoint tied to offsets.
    /// `--brokers embedded` starts an in-process cluster filled with a generated stream.
    Train(Box<TrainArgs>),
    /// Load events (Parquet, or CSV with --preset) into a Kafka topic as JSON.
    Produce(ProduceArgs),
    /// Print a user's top items from a checkpoint, scored as the evaluator scores.
    Recommend(RecommendArgs),
    /// Run a job file (TOML): source, models, evaluation, pool, gc, state, checkpoints,
    /// outputs.
    Run(JobArgs),
    /// Check a job file without running it.
    Validate(JobArgs),
}

/// Arguments of `tidepool recommend`.
#[derive(Debug, Clone, Args)]
pub struct RecommendArgs {
    /// A checkpoint directory (`ckpt-N`), or a checkpoint root (its newest is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// User id.
    #[arg(long)]
    pub user: u64,
    /// How many items.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: usize,
    /// Which variant (default: the first).
    #[arg(long)]
    pub variant: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A half-life: a duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfLife(pub Option<Duration>);

pub(crate) fn parse_half_life(s: &str) -> Result<HalfLife, String> {
    match s {
        "off" | "none" => Ok(HalfLife(None)),
        s => parse_duration(s).map(|d| HalfLife(Some(d))),
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 2min, 1h, 7days)"))
}

/// Parses with the library's `FromStr`, whose errors already list the valid choices.
pub(crate) fn parse_lib<T: std::str::FromStr<Err = tidepool_pipeline::Error>>(
    s: &str,
) -> Result<T, String> {
    s.parse()
        .map_err(|e: tidepool_pipeline::Error| e.to_string())
}

/// Parses sizes as humans write them: `4096`, `64KiB`, `512MiB`, `2GiB`, `10MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    tidepool_pipeline::memory::gc::parse_bytes(s)
        .map(|b| b as usize)
        .map_err(|e| e.to_string())
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

fn parse_delimiter(s: &str) -> Result<u8, String> {
    match s {
        "\\t" | "tab" => Ok(b'\t'),
        _ if s.len() == 1 && s.is_ascii() => Ok(s.as_bytes()[0]),
        _ => Err(format!(
            "the delimiter must be one ASCII character or \\t, got {s:?}"
        )),
    }
}

pub(crate) fn parse_fraction(s: &str) -> Result<f64, String> {
    check_fraction(s.parse().map_err(|_| format!("{s:?} is not a number"))?)
}

pub(crate) fn check_fraction(v: f64) -> Result<f64, String> {
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1), got {v}"))
    }
}

/// Arguments of `tidepool backtest`.
#[derive(Debug, Clone, Args)]
pub struct BacktestArgs {
    /// Parquet files, directories or globs. Without any, a synthetic stream is generated
    /// in memory (see --events, --users, --items).
    pub inputs: Vec<String>,
    /// Model: bpr, mostpop, itemknn or ensemble. Without --model and --variant (or with
    /// --model ensemble) the recommended configuration runs: an ensemble over itemknn,
    /// bpr with dns:32 negatives and mostpop, each also reported on its own.
    #[arg(long, env = "TIDEPOOL_MODEL", value_parser = parse_lib::<ModelKind>)]
    pub model: Option<ModelKind>,
    /// Timely worker threads (per process in a cluster).
    #[arg(long, env = "TIDEPOOL_WORKERS", short = 'w', default_value_t = 1)]
    pub workers: usize,
    /// Processes of a timely cluster running this job together; start each with the
    /// same arguments and its own --process.
    #[arg(long, env = "TIDEPOOL_PROCESSES", short = 'n', default_value_t = 1)]
    pub processes: usize,
    /// This process's index in the cluster, 0..processes.
    #[arg(long, env = "TIDEPOOL_PROCESS", short = 'p', default_value_t = 0)]
    pub process: usize,
    /// `host:port` of every process, one per line in process order (default: 127.0.0.1
    /// ports 2101, 2102, ...).
    #[arg(long, env = "TIDEPOOL_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
    /// Give up (exit 3) when the cluster's processes have not all connected by then.
    #[arg(long, env = "TIDEPOOL_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Embedding dimension.
    #[arg(long, env = "TIDEPOOL_DIM", default_value_t = DEFAULT_DIM)]
    pub dim: usize,
    /// Learning rate.
    #[arg(long, env = "TIDEPOOL_LR", default_value_t = DEFAULT_LR)]
    pub lr: f32,
    /// L2 regularisation.
    #[arg(long, env = "TIDEPOOL_REG", default_value_t = DEFAULT_REG)]
    pub reg: f32,
    /// Optimiser: sgd or adagrad.
    #[arg(long, env = "TIDEPOOL_OPTIMIZER", default_value = "adagrad", value_parser = parse_lib::<Optimizer>)]
    pub optimizer: Optimizer,
    /// Train without an item bias term.
    #[arg(long, env = "TIDEPOOL_NO_ITEM_BIAS")]
    pub no_item_bias: bool,
    /// Standard deviation of the initial embeddings.
    #[arg(long, env = "TIDEPOOL_INIT_STD", default_value_t = DEFAULT_INIT_STD)]
    pub init_std: f32,
    /// Negative sampler: uniform, pop[:ALPHA], decay:HALF_LIFE, dns:M[:BASE],
    /// inbatch[:B], mix:W*SPEC+W*SPEC...
    #[arg(long, env = "TIDEPOOL_SAMPLER", default_value = "uniform")]
    pub sampler: String,
    /// Train several models side by side in one pass: NAME=SAMPLER[,key=value...]
    /// (keys: model, dim, lr, reg, optimizer, negatives, init_std, item_bias, logq,
    /// history, decay, pair_decay, back, alpha, neighbours, half_life, components,
    /// learn_every, mix_lr, norm, objective); repeatable. The other flags are each
    /// variant's defaults.
    #[arg(long = "variant", value_name = "NAME=SPEC")]
    pub variants: Vec<String>,
    /// Variants as typed tables (a job file's `[[variants]]`), used when no --variant is
    /// given.
    #[arg(skip)]
    pub variant_tables: Vec<ModelTable>,
    /// bpr: correct negatives' scores by their sampling probability (logQ).
    #[arg(long, env = "TIDEPOOL_LOGQ")]
    pub logq: bool,
    /// itemknn: how many of a user's most recent items pair with a new one and score.
    #[arg(long, env = "TIDEPOOL_HISTORY", default_value_t = DEFAULT_KNN_HISTORY)]
    pub history: usize,
    /// itemknn: weight of the k-th most recent item when scoring, decay^k, in (0, 1].
    #[arg(long, env = "TIDEPOOL_DECAY", default_value_t = DEFAULT_KNN_DECAY, allow_negative_numbers = true)]
    pub decay: f32,
    /// itemknn: weight of a pair at sequence distance d, pair_decay^(d-1), in (0, 1].
    #[arg(long, env = "TIDEPOOL_PAIR_DECAY", default_value_t = DEFAULT_KNN_PAIR_DECAY, allow_negative_numbers = true)]
    pub pair_decay: f32,
    /// itemknn: weight of the backward pair relative to the forward one, in [0, 1].
    #[arg(long, env = "TIDEPOOL_BACK", default_value_t = DEFAULT_KNN_BACK, allow_negative_numbers = true)]
    pub back: f32,
    /// itemknn: asymmetric cosine exponent, in [0, 1].
    #[arg(long, env = "TIDEPOOL_ALPHA", default_value_t = DEFAULT_KNN_ALPHA, allow_negative_numbers = true)]
    pub alpha: f32,
    /// itemknn: neighbours kept per item.
    #[arg(long, env = "TIDEPOOL_NEIGHBOURS", default_value_t = DEFAULT_KNN_NEIGHBOURS)]
    pub neighbours: usize,
    /// itemknn: half-life of co-occurrence in event time, or `off` (default: 1000days).
    #[arg(long, env = "TIDEPOOL_HALF_LIFE", value_parser = parse_half_life)]
    pub half_life: Option<HalfLife>,
    /// Width of the sliding event-time window over which popularity samplers count.
    #[arg(long, env = "TIDEPOOL_POP_WINDOW", default_value = "30days", value_parser = parse_duration)]
    pub pop_window: Duration,
    /// Negatives per positive.
    #[arg(long, env = "TIDEPOOL_NEGATIVES", default_value_t = DEFAULT_NEGATIVES)]
    pub negatives: usize,
    /// Seed for initialisation and sampling.
    #[arg(long, env = "TIDEPOOL_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Share of the events (from the start) trained on but never scored.
    #[arg(long, env = "TIDEPOOL_WARMUP", default_value_t = DEFAULT_WARMUP, value_parser = parse_fraction)]
    pub warmup: f64,
    /// Score every N-th event after warm-up; 1 = all, 0 = no evaluation.
    #[arg(long, env = "TIDEPOOL_EVAL_EVERY", default_value_t = DEFAULT_EVAL_EVERY)]
    pub eval_every: u64,
    /// Cut-off K of recall@K and NDCG@K.
    #[arg(long, env = "TIDEPOOL_K", short = 'k', default_value_t = DEFAULT_K)]
    pub k: usize,
    /// Width of one timely round in event time (default: derived from the input).
    #[arg(long, env = "TIDEPOOL_TICK", value_parser = parse_duration)]
    pub tick: Option<Duration>,
    /// Width of a metrics window in event time (default: about 100 windows).
    #[arg(long, env = "TIDEPOOL_METRICS_WINDOW", value_parser = parse_duration)]
    pub metrics_window: Option<Duration>,
    /// Rounds a source may run ahead of the learner.
    #[arg(long, env = "TIDEPOOL_ROUNDS_IN_FLIGHT", default_value_t = DEFAULT_ROUNDS_IN_FLIGHT)]
    pub rounds_in_flight: u64,
    /// Write the summary as one JSON object here.
    #[arg(long, env = "TIDEPOOL_SUMMARY_JSON")]
    pub summary_json: Option<PathBuf>,
    /// Write per-window metrics here (.parquet for Parquet, anything else CSV).
    #[arg(long, env = "TIDEPOOL_METRICS_OUT")]
    pub metrics_out: Option<PathBuf>,
    /// Write dead letters (rejected rows, with reasons) here as JSON lines.
    #[arg(long, env = "TIDEPOOL_DEAD_LETTERS")]
    pub dead_letters: Option<PathBuf>,
    /// Input column holding the user id.
    #[arg(long, env = "TIDEPOOL_USER_COL", default_value = "user_id")]
    pub user_col: String,
    /// Input column holding the item id.
    #[arg(long, env = "TIDEPOOL_ITEM_COL", default_value = "item_id")]
    pub item_col: String,
    /// Input column holding the event time.
    #[arg(long, env = "TIDEPOOL_TIME_COL", default_value = "ts")]
    pub time_col: String,
    /// Unit of an integer time column: s or ms.
    #[arg(long, env = "TIDEPOOL_TIME_UNIT", default_value = "ms", value_parser = parse_lib::<IntTimeUnit>)]
    pub time_unit: IntTimeUnit,
    /// Generated stream (no INPUT): events.
    #[arg(long, env = "TIDEPOOL_EVENTS", default_value_t = GeneratorConfig::default().events)]
    pub events: u64,
    /// Generated stream (no INPUT): users.
    #[arg(long, env = "TIDEPOOL_USERS", default_value_t = GeneratorConfig::default().users)]
    pub users: u64,
    /// Generated stream (no INPUT): items.
    #[arg(long, env = "TIDEPOOL_ITEMS", default_value_t = GeneratorConfig::default().items)]
    pub items: u64,
    /// Do not draw a progress bar.
    #[arg(long, env = "TIDEPOOL_QUIET")]
    pub quiet: bool,
    /// The sharded Arrow buffer pool: on or off (to compare).
    #[arg(long, env = "TIDEPOOL_POOL", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub pool: bool,
    /// Smallest pooled size class.
    #[arg(long, env = "TIDEPOOL_POOL_FLOOR", default_value = "4KiB", value_parser = parse_size)]
    pub pool_floor: usize,
    /// Largest pooled size class; bigger buffers are allocated unpooled (and counted).
    #[arg(long, env = "TIDEPOOL_POOL_CEILING", default_value = "64MiB", value_parser = parse_size)]
    pub pool_ceiling: usize,
    /// Bytes the pool keeps per size class.
    #[arg(long, env = "TIDEPOOL_POOL_RETAIN", default_value = "256MiB", value_parser = parse_size)]
    pub pool_retain: usize,
    /// Overwrite returned buffers with a poison pattern (catches use after return).
    #[arg(long, env = "TIDEPOOL_POOL_POISON")]
    pub pool_poison: bool,
    /// Pool shards; 0 means one per worker.
    #[arg(long, env = "TIDEPOOL_POOL_SHARDS", default_value_t = 0)]
    pub pool_shards: usize,
    /// Batch blocks each reading worker allocates into the pool before its first read
    /// (default: three per round in flight plus two rounds, at most what the input fills;
    /// 0 for none).
    #[arg(long, env = "TIDEPOOL_POOL_RESERVE")]
    pub pool_reserve: Option<usize>,
    /// Generated stream (no INPUT): replace the user population with new ids this many
    /// times over the stream (ever-new users).
    #[arg(long, env = "TIDEPOOL_USER_CHURN", default_value_t = 0)]
    pub user_churn: u64,
    /// GC trigger: compact state when the live heap grows by this many percent over the
    /// heap after the last cycle, or off (default: $TIDEPOOL_GC, else 100).
    #[arg(long = "gc", value_name = "off|PERCENT", value_parser = parse_gc_percent)]
    pub gc_percent: Option<GcPercent>,
    /// No ratio-triggered cycle below this live heap.
    #[arg(long, env = "TIDEPOOL_GC_MIN_HEAP", default_value = "64MiB", value_parser = parse_size)]
    pub gc_min_heap: usize,
    /// Soft memory limit: compact earlier as the live heap approaches it (default:
    /// $TIDEPOOL_MEMORY_LIMIT, else none).
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<usize>,
    /// A cycle runs when none ran for this long (wall time), also while input is idle.
    #[arg(long, env = "TIDEPOOL_GC_FORCE_INTERVAL", default_value = "2min", value_parser = parse_duration)]
    pub gc_force_interval: Duration,
    /// Print one line per GC cycle on stderr (also $TIDEPOOL_GCTRACE=1).
    #[arg(long)]
    pub gctrace: bool,
    /// Evict users idle this long in event time (history and embedding); default: keep.
    #[arg(long, env = "TIDEPOOL_USER_TTL", value_parser = parse_duration)]
    pub user_ttl: Option<Duration>,
    /// Expire items idle this long in event time (catalogue entry and embedding row);
    /// default: keep.
    #[arg(long, env = "TIDEPOOL_ITEM_TTL", value_parser = parse_duration)]
    pub item_ttl: Option<Duration>,
    /// How far behind the newest event time an event may arrive and still be processed
    /// in its place (default: 0 for backtest, 5min for train).
    #[arg(long, env = "TIDEPOOL_ALLOWED_LATENESS", value_parser = parse_duration)]
    pub allowed_lateness: Option<Duration>,
    /// Events later than that: train (in the current round, counted as reordered) or
    /// dead-letter (reason `late`).
    #[arg(long, env = "TIDEPOOL_LATE", default_value = "train", value_parser = parse_lib::<LatePolicy>)]
    pub late: LatePolicy,
    /// Events whose time lies more than this ahead of the wall clock go to the dead
    /// letters (reason `skew`); `off` for no bound. Default: off for backtests, 1h for train.
    #[arg(long, env = "TIDEPOOL_MAX_SKEW", value_parser = parse_half_life)]
    pub max_skew: Option<HalfLife>,
    /// Serve /metrics (Prometheus), /healthz and the admin endpoints (POST
    /// /admin/gc?percent=N|off, /admin/compact, /admin/checkpoint) here: a port (bound to
    /// 127.0.0.1) or an explicit IP:PORT; port 0 picks a free one (printed on stderr).
    #[arg(long, env = "TIDEPOOL_METRICS_ADDR", value_name = "[IP:]PORT")]
    pub metrics_addr: Option<String>,
    /// Token the admin calls must send (`Authorization: Bearer TOKEN`); required when
    /// --metrics-addr is not loopback. Also read from TIDEPOOL_ADMIN_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,
    /// Write a report directory: heap.svg (live heap over time, GC cycles marked).
    #[arg(long, env = "TIDEPOOL_REPORT", value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Backtest: save the final model as a checkpoint under DIR, to serve it with
    /// `tidepool recommend --checkpoint DIR` (train checkpoints with --checkpoint-dir).
    #[arg(long, env = "TIDEPOOL_SAVE_MODEL", value_name = "DIR")]
    pub save_model: Option<PathBuf>,
}

/// Where and how to reach Kafka, and how payloads map to events.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, or `embedded` for an in-process cluster (librdkafka's mock
    /// cluster: the real protocol on a loopback port).
    #[arg(long, env = "TIDEPOOL_BROKERS")]
    pub brokers: String,
    /// Topic.
    #[arg(long, env = "TIDEPOOL_TOPIC", default_value = "events")]
    pub topic: String,
    /// Consumer group (offsets are committed there after each checkpoint).
    #[arg(long, env = "TIDEPOOL_GROUP", default_value = "tidepool")]
    pub group: String,
    /// Partitions of the topic created in an embedded cluster.
    #[arg(long, env = "TIDEPOOL_PARTITIONS", default_value_t = 4)]
    pub partitions: i32,
    /// When a partition's offsets go backwards (topic recreated, offsets reset): `fail`
    /// (stop with an error, the default) or `continue` (warn, count, train on).
    #[arg(long, env = "TIDEPOOL_ON_REWIND", default_value = "fail")]
    pub on_rewind: tidepool_connector_kafka::Rewind,
    /// librdkafka setting passed through, KEY=VALUE (repeatable): SASL, SSL, timeouts.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_config: Vec<(String, String)>,
    /// JSON field holding the user id.
    #[arg(long, env = "TIDEPOOL_USER_FIELD", default_value = "user_id")]
    pub user_field: String,
    /// JSON field holding the item id.
    #[arg(long, env = "TIDEPOOL_ITEM_FIELD", default_value = "item_id")]
    pub item_field: String,
    /// JSON field holding the event time, or `kafka` for the message timestamp.
    #[arg(long, env = "TIDEPOOL_TIME_FIELD", default_value = "ts")]
    pub time_field: String,
    /// Unit of the time field: s or ms.
    #[arg(long, env = "TIDEPOOL_FIELD_TIME_UNIT", default_value = "ms", value_parser = parse_lib::<tidepool_connector_kafka::TimeUnit>)]
    pub field_time_unit: tidepool_connector_kafka::TimeUnit,
    /// JSON field holding the event type.
    #[arg(long, env = "TIDEPOOL_TYPE_FIELD", default_value = "event_type")]
    pub type_field: String,
    /// Train only on these event types (repeatable); others are skipped and counted.
    #[arg(long = "type", value_parser = parse_event_type)]
    pub types: Vec<tidepool_pipeline::EventType>,
    /// Messages larger than this are dead letters.
    #[arg(long, env = "TIDEPOOL_MAX_MESSAGE_BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub max_message_bytes: usize,
}

pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub(crate) fn parse_event_type(s: &str) -> Result<tidepool_pipeline::EventType, String> {
    tidepool_pipeline::EventType::from_name(s).ok_or_else(|| {
        format!("unknown event type {s:?}; valid: view, click, cart, purchase, rating")
    })
}

/// When `train` stops by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhen {
    /// Never (until SIGINT/SIGTERM).
    Never,
    /// At the end offsets the topic had at start.
    End,
    /// After this long without a message.
    Idle(Duration),
}

pub(crate) fn parse_stop(s: &str) -> Result<StopWhen, String> {
    match s {
        "never" => Ok(StopWhen::Never),
        "end" => Ok(StopWhen::End),
        _ => match s.strip_prefix("idle:") {
            Some(d) => parse_duration(d).map(StopWhen::Idle),
            None => Err(format!(
                "{s:?}: valid: never, end, idle:DURATION (e.g. idle:30s)"
            )),
        },
    }
}

/// Arguments of `tidepool train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Kafka connection and payload mapping.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Directory for checkpoints; without it nothing survives a restart.
    #[arg(long, env = "TIDEPOOL_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Time between periodic checkpoints (a final one is always written).
    #[arg(long, env = "TIDEPOOL_CHECKPOINT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// Checkpoints kept.
    #[arg(long, env = "TIDEPOOL_KEEP_CHECKPOINTS", default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Load a checkpoint even if it was written by a different model configuration.
    #[arg(long, env = "TIDEPOOL_FORCE_CHECKPOINT")]
    pub force_checkpoint: bool,
    /// Send dead letters to this topic (JSON, keyed by the record's location) instead of
    /// --dead-letters or memory.
    #[arg(long, env = "TIDEPOOL_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Publish changed embedding rows to this topic at every checkpoint (needs
    /// --checkpoint-dir); key `variant/entity/id`, value JSON.
    #[arg(long, env = "TIDEPOOL_PUBLISH_TOPIC")]
    pub publish_topic: Option<String>,
    /// Also (or instead) write changed embedding rows at every checkpoint as Parquet files
    /// into this directory (needs --checkpoint-dir); see docs/kafka.md for the columns.
    #[arg(long, env = "TIDEPOOL_PUBLISH_DIR")]
    pub publish_dir: Option<PathBuf>,
    /// Publish changed rows this often between checkpoints too (default: at checkpoints
    /// only); needs --publish-topic or --publish-dir.
    #[arg(long, env = "TIDEPOOL_PUBLISH_INTERVAL", value_parser = parse_duration)]
    pub publish_interval: Option<Duration>,
    /// When to stop: never, end (the end offsets at start), idle:DURATION. Default: end
    /// with --brokers embedded, never otherwise.
    #[arg(long, env = "TIDEPOOL_STOP_AT", value_parser = parse_stop)]
    pub stop_at: Option<StopWhen>,
    /// The model, sampler, evaluation, GC and output settings (as for backtest; the
    /// generated-stream settings fill an embedded cluster).
    #[command(flatten)]
    pub run: BacktestArgs,
}

/// Arguments of `tidepool produce`.
#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    /// Parquet file (canonical columns), or CSV with --preset.
    pub input: PathBuf,
    /// Bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Topic.
    #[arg(long, default_value = "events")]
    pub topic: String,
    /// Known CSV format: movielens-100k or movielens-csv.
    #[arg(long, value_parser = parse_lib::<Preset>)]
    pub preset: Option<Preset>,
    /// Events per second at most (default: as fast as the brokers take them).
    #[arg(long)]
    pub rate: Option<f64>,
    /// librdkafka setting passed through, KEY=VALUE (repeatable).
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_config: Vec<(String, String)>,
}

/// A `--gc` value: a percentage, or `None` for off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPercent(pub Option<u32>);

pub(crate) fn parse_gc_percent(s: &str) -> Result<GcPercent, String> {
    tidepool_pipeline::memory::gc::parse_gc_percent(s)
        .map(GcPercent)
        .map_err(|e| e.to_string())
}

/// Arguments of `tidepool import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// CSV or TSV file.
    pub input: PathBuf,
    /// Parquet file to write.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Known format: movielens-100k (u.data) or movielens-csv (ratings.csv).
    #[arg(long, value_parser = parse_lib::<Preset>)]
    pub preset: Option<Preset>,
    /// Field delimiter (one character, or \t).
    #[arg(long, value_parser = parse_delimiter)]
    pub delimiter: Option<u8>,
    /// The first line is data, not a header.
    #[arg(long)]
    pub no_header: bool,
    /// User id column: header name or 0-based index.
    #[arg(long, value_parser = parse_lib::<ColRef>)]
    pub user: Option<ColRef>,
    /// Item id column: header name or 0-based index.
    #[arg(long, value_parser = parse_lib::<ColRef>)]
    pub item: Option<ColRef>,
    /// Event time column: header name or 0-based index.
    #[arg(long, value_parser = parse_lib::<ColRef>)]
    pub time: Option<ColRef>,
    /// Unit of the time column: s or ms.
    #[arg(long, value_parser = parse_lib::<IntTimeUnit>)]
    pub time_unit: Option<IntTimeUnit>,
    /// Rating column (becomes the weight).
    #[arg(long, value_parser = parse_lib::<ColRef>)]
    pub rating: Option<ColRef>,
    /// Leave out rows rated below this.
    #[arg(long)]
    pub min_rating: Option<f64>,
    /// Keep only the first occurrence of each (user, item) pair.
    #[arg(long)]
    pub dedup: bool,
    /// Skip malformed rows (to the dead-letter file) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Where skipped rows go (default: OUTPUT with .dead-letters.jsonl appended).
    #[arg(long)]
    pub dead_letters: Option<PathBuf>,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = tidepool_connector_parquet::DEFAULT_ROW_GROUP_ROWS)]
    pub row_group_rows: usize,
}

/// Arguments of `tidepool generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Parquet file to write.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Events.
    #[arg(long, default_value_t = GeneratorConfig::default().events)]
    pub events: u64,
    /// Users.
    #[arg(long, default_value_t = GeneratorConfig::default().users)]
    pub users: u64,
    /// Items.
    #[arg(long, default_value_t = GeneratorConfig::default().items)]
    pub items: u64,
    /// Seed.
    #[arg(long, default_value_t = GeneratorConfig::default().seed)]
    pub seed: u64,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = tidepool_connector_parquet::DEFAULT_ROW_GROUP_ROWS)]
    pub row_group_rows: usize,
}

/// Arguments of `tidepool bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Synthetic events for the throughput runs.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Events of the large-catalogue throughput runs, 1 M users x 1 M items (0: skip).
    #[arg(long, default_value_t = 5_000_000)]
    pub large_events: u64,
    /// Directory holding ml-latest-small/ratings.csv (default: $TIDEPOOL_DATA_DIR or ../shared/data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Worker counts to measure.
    #[arg(long, default_values_t = vec![1usize, 2])]
    pub workers: Vec<usize>,
    /// Rounds of the training throughput runs: each round measures the reference kernel
    /// and then every worker count; the table reports the median of the rounds' ratios
    /// and their range (two-worker runs on a shared VM vary by tens of percent).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also compare the negative samplers (quality in one pass, speed one by one).
    #[arg(long)]
    pub samplers: bool,
    /// Compare the models instead: quality and speed of each alone and of the default,
    /// itemknn's training speed and scoring cost, the ensemble's overhead.
    #[arg(long)]
    pub models: bool,
    /// Skip the 10 M-event throughput runs.
    #[arg(long)]
    pub no_throughput: bool,
    /// Run the GC soak instead: a stream of ever-new users under a user TTL, for
    /// gc_percent 25, 50, 100, 200 and off, each without and with a memory limit, every
    /// run in its own process (peak RSS is per process).
    #[arg(long)]
    pub gc: bool,
    /// GC soak: events per run.
    #[arg(long, default_value_t = 20_000_000)]
    pub gc_events: u64,
    /// GC soak: the soft memory limit of the limited runs.
    #[arg(long, default_value = "96MiB", value_parser = parse_size)]
    pub gc_limit: usize,
    /// GC soak: run itemknn over a million items with 50 neighbours each (instead of
    /// bpr over ever-new users), to show its co-occurrence state bounded.
    #[arg(long)]
    pub gc_knn: bool,
    /// GC soak: workers per run.
    #[arg(long, default_value_t = 2)]
    pub gc_workers: usize,
    /// Run the Kafka benchmark instead: produce into the embedded cluster, train with
    /// checkpoints on, and the cost of checkpointing 1 M users x 64 dims.
    #[arg(long)]
    pub kafka: bool,
    /// Kafka benchmark: events produced and trained.
    #[arg(long, default_value_t = 1_000_000)]
    pub kafka_events: u64,
    /// Kafka benchmark: librdkafka setting for the consumers, KEY=VALUE (repeatable), to
    /// measure fetch tuning.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_config: Vec<(String, String)>,
    /// GC soak: write each run's heap plot into DIR/gc-<percent>[-limit]/heap.svg.
    #[arg(long, value_name = "DIR")]
    pub gc_report: Option<PathBuf>,
}

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
        let no_variants = self.variants.is_empty() && self.variant_tables.is_empty();
        let kind = self.model.unwrap_or(if no_variants {
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
        let variants = if !self.variants.is_empty() {
            self.variants
                .iter()
                .map(|spec| VariantConfig::parse(spec, &model))
                .collect::<Result<_, _>>()?
        } else if !self.variant_tables.is_empty() {
            self.variant_tables
                .iter()
                .map(|table| table.variant(&model))
                .collect::<Result<_, _>>()?
        } else if kind == ModelKind::Ensemble {
            recommended_variants(&model)
        } else {
            vec![VariantConfig {
                name: kind.name().into(),
                model,
            }]
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
            reserve: self.pool_reserve,
        })
    }

    /// The source: the Parquet inputs, or the generated default stream, building its
    /// batches in `pool`.
    pub fn source(&self, pool: &BufferPool) -> anyhow::Result<Arc<dyn EventSource>> {
        if self.inputs.is_empty() {
            let source = GeneratorSource::new(self.generator())?.with_pool(pool.clone());
            return Ok(Arc::new(source));
        }
        Ok(Arc::new(
            ParquetSource::open(&self.inputs, self.mapping())?.with_pool(pool.clone()),
        ))
    }

    /// The generated stream these arguments size (used without inputs, and to fill an
    /// embedded Kafka cluster).
    pub fn generator(&self) -> GeneratorConfig {
        GeneratorConfig {
            events: self.events,
            users: self.users,
            items: self.items,
            user_churn: self.user_churn,
            ..GeneratorConfig::default()
        }
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

/// A model as a job file writes it: `[model]` (each variant's defaults) and each
/// `[[variants]]` entry, which adds `name` and the ensemble keys. Lives here rather than
/// in [`crate::job`] because [`BacktestArgs`] carries a job's variants typed.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
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

impl ModelTable {
    /// The variant this `[[variants]]` table describes over the defaults `base`. Errors
    /// start with `variant NAME: KEY` so the job loader can point at the key.
    pub fn variant(&self, base: &ModelConfig) -> anyhow::Result<VariantConfig> {
        let name = self.name.as_deref().unwrap_or_default();
        let bad = |key: &str, value: &str, e: String| {
            let e = e.trim_start_matches("invalid configuration: ");
            anyhow::anyhow!("variant {name}: {key} = {value:?}: {e}")
        };
        let mut m = base.clone();
        if let Some(v) = &self.kind {
            m.kind = parse_lib(v).map_err(|e| bad("kind", v, e))?;
        }
        if let Some(v) = &self.optimizer {
            m.optimizer = parse_lib(v).map_err(|e| bad("optimizer", v, e))?;
        }
        if let Some(v) = &self.half_life {
            let HalfLife(d) = parse_half_life(v).map_err(|e| bad("half_life", v, e))?;
            m.knn.half_life_ms = d.map(millis);
        }
        if let Some(v) = &self.norm {
            m.ensemble.norm = parse_lib(v).map_err(|e| bad("norm", v, e))?;
        }
        if let Some(v) = &self.objective {
            m.ensemble.objective = parse_lib(v).map_err(|e| bad("objective", v, e))?;
        }
        if let Some(v) = &self.sampler {
            m.sampler = v.clone();
        }
        if let Some(v) = &self.components {
            m.ensemble.components = v.clone();
        }
        let set = |slot: &mut f32, v: Option<f32>| *slot = v.unwrap_or(*slot);
        set(&mut m.lr, self.lr);
        set(&mut m.reg, self.reg);
        set(&mut m.init_std, self.init_std);
        set(&mut m.knn.decay, self.decay);
        set(&mut m.knn.pair_decay, self.pair_decay);
        set(&mut m.knn.back, self.back);
        set(&mut m.knn.alpha, self.alpha);
        set(&mut m.ensemble.lr, self.mix_lr);
        m.dim = self.dim.unwrap_or(m.dim);
        m.negatives = self.negatives.unwrap_or(m.negatives);
        m.knn.history = self.history.unwrap_or(m.knn.history);
        m.knn.neighbours = self.neighbours.unwrap_or(m.knn.neighbours);
        m.ensemble.learn_every = self.learn_every.unwrap_or(m.ensemble.learn_every);
        m.item_bias = self.item_bias.unwrap_or(m.item_bias);
        m.logq = self.logq.unwrap_or(m.logq);
        Ok(VariantConfig::new(name, m)?)
    }
}

/// Arguments of `tidepool run` and `tidepool validate`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// The job file.
    pub job: PathBuf,
    /// Flags of the job's subcommand that override the file, e.g. `--process 1` for one
    /// process of a cluster or `--workers 4`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "FLAGS"
    )]
    pub overrides: Vec<String>,
}
