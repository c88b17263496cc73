//! Configuration of the prequential learner: models, evaluation protocol, replay.
//!
//! Plain structs with `Default` and documented `DEFAULT_*` constants; `jobs` composes
//! them from the command line and job files, validates once, and passes them down.

use serde::{Deserialize, Serialize};
use tidepool_pipeline::memory::gc::GcConfig;
use tidepool_pipeline::{Error, Result};

/// Default value for [`ModelConfig::dim`].
pub const DEFAULT_DIM: usize = 64;
/// Default value for [`ModelConfig::lr`].
pub const DEFAULT_LR: f32 = 0.05;
/// Default value for [`ModelConfig::reg`].
pub const DEFAULT_REG: f32 = 0.01;
/// Default value for [`ModelConfig::negatives`].
pub const DEFAULT_NEGATIVES: usize = 4;
/// Default value for [`ModelConfig::init_std`].
pub const DEFAULT_INIT_STD: f32 = 0.01;
/// Default value for [`EvalConfig::warmup`].
pub const DEFAULT_WARMUP: f64 = 0.1;
/// Default value for [`EvalConfig::eval_every`].
pub const DEFAULT_EVAL_EVERY: u64 = 10;
/// Default value for [`EvalConfig::k`].
pub const DEFAULT_K: usize = 10;
/// Default value for [`BacktestConfig::seed`].
pub const DEFAULT_SEED: u64 = 42;
/// Default value for [`BacktestConfig::rounds_in_flight`].
pub const DEFAULT_ROUNDS_IN_FLIGHT: u64 = 8;
/// Default value for [`BacktestConfig::popularity_window_ms`]: 30 days.
pub const DEFAULT_POPULARITY_WINDOW_MS: i64 = 30 * 86_400_000;
/// Events per timely round that the automatic tick aims for.
pub const TARGET_EVENTS_PER_ROUND: u64 = 32_768;

/// Which model a variant trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Matrix factorisation trained with the BPR pairwise loss.
    #[default]
    Bpr,
    /// Most popular items so far (counts), the baseline.
    Mostpop,
}

impl std::str::FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bpr" => Ok(ModelKind::Bpr),
            "mostpop" => Ok(ModelKind::Mostpop),
            other => Err(Error::Config(format!(
                "unknown model {other:?}; valid: bpr, mostpop"
            ))),
        }
    }
}

impl ModelKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Bpr => "bpr",
            ModelKind::Mostpop => "mostpop",
        }
    }
}

/// The optimiser for embedding updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Plain stochastic gradient descent.
    Sgd,
    /// Adagrad: per-coordinate step sizes from the accumulated squared gradients.
    #[default]
    Adagrad,
}

impl std::str::FromStr for Optimizer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sgd" => Ok(Optimizer::Sgd),
            "adagrad" => Ok(Optimizer::Adagrad),
            other => Err(Error::Config(format!(
                "unknown optimizer {other:?}; valid: sgd, adagrad"
            ))),
        }
    }
}

/// A model and how it learns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which model.
    pub kind: ModelKind,
    /// Embedding dimension.
    pub dim: usize,
    /// Learning rate.
    pub lr: f32,
    /// L2 regularisation applied on every step to the rows it touches.
    pub reg: f32,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Whether items have a learned bias term.
    pub item_bias: bool,
    /// Negatives drawn per positive.
    pub negatives: usize,
    /// Standard deviation of the initial embedding values.
    pub init_std: f32,
    /// Negative sampler spec (see [`tidepool_samplers::SamplerSpec`]), e.g. `pop:0.75`.
    pub sampler: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::default(),
            dim: DEFAULT_DIM,
            lr: DEFAULT_LR,
            reg: DEFAULT_REG,
            optimizer: Optimizer::default(),
            item_bias: true,
            negatives: DEFAULT_NEGATIVES,
            init_std: DEFAULT_INIT_STD,
            sampler: "uniform".to_string(),
        }
    }
}

impl ModelConfig {
    /// Checks the values once, before a run starts.
    pub fn validate(&self) -> Result<()> {
        if self.kind == ModelKind::Mostpop {
            return Ok(());
        }
        if self.dim == 0 || self.dim > 4096 {
            return Err(Error::Config(format!(
                "dim must be between 1 and 4096, got {}",
                self.dim
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Config(format!(
                "lr must be a positive number, got {}",
                self.lr
            )));
        }
        if !(self.reg.is_finite() && self.reg >= 0.0) {
            return Err(Error::Config(format!(
                "reg must be zero or positive, got {}",
                self.reg
            )));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(Error::Config(format!(
                "init_std must be zero or positive, got {}",
                self.init_std
            )));
        }
        if self.negatives == 0 || self.negatives > 1024 {
            return Err(Error::Config(format!(
                "negatives must be between 1 and 1024, got {}",
                self.negatives
            )));
        }
        tidepool_samplers::SamplerSpec::parse(&self.sampler).map_err(Error::Config)?;
        Ok(())
    }
}

/// One model trained in a backtest, under a name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariantConfig {
    /// Name in reports.
    pub name: String,
    /// The model.
    pub model: ModelConfig,
}

impl VariantConfig {
    /// Parses `NAME=SAMPLER[,key=value...]` on top of `base`. Keys: `model`, `dim`, `lr`,
    /// `reg`, `optimizer`, `negatives`, `init_std`, `item_bias`. `SAMPLER` may be empty to
    /// keep the base sampler.
    pub fn parse(spec: &str, base: &ModelConfig) -> Result<Self> {
        let (name, rest) = spec.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "variant {spec:?} must be NAME=SAMPLER[,key=value...]"
            ))
        })?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(Error::Config(format!(
                "variant name {name:?} must be letters, digits, '_', '-' or '.'"
            )));
        }
        let mut model = base.clone();
        let mut parts = rest.split(',');
        if let Some(sampler) = parts.next().map(str::trim).filter(|s| !s.is_empty()) {
            model.sampler = sampler.to_string();
        }
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                Error::Config(format!("variant {name}: {part:?} must be key=value"))
            })?;
            let bad = |what: &str| {
                Error::Config(format!("variant {name}: {key}={value:?} is not {what}"))
            };
            match key.trim() {
                "model" => model.kind = value.parse()?,
                "dim" => model.dim = value.parse().map_err(|_| bad("an integer"))?,
                "lr" => model.lr = value.parse().map_err(|_| bad("a number"))?,
                "reg" => model.reg = value.parse().map_err(|_| bad("a number"))?,
                "optimizer" => model.optimizer = value.parse()?,
                "negatives" => model.negatives = value.parse().map_err(|_| bad("an integer"))?,
                "init_std" => model.init_std = value.parse().map_err(|_| bad("a number"))?,
                "item_bias" => model.item_bias = value.parse().map_err(|_| bad("true or false"))?,
                other => {
                    return Err(Error::Config(format!(
                        "variant {name}: unknown key {other:?}; valid: model, dim, lr, reg, optimizer, negatives, init_std, item_bias"
                    )))
                }
            }
        }
        let variant = VariantConfig {
            name: name.to_string(),
            model,
        };
        variant
            .model
            .validate()
            .map_err(|e| Error::Config(format!("variant {name}: {e}")))?;
        Ok(variant)
    }
}

/// The prequential protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Share of the events, from the start, that are trained on and never scored.
    pub warmup: f64,
    /// Score every N-th event after warm-up (counted from the first post-warm-up event);
    /// 1 scores all, 0 turns evaluation off.
    pub eval_every: u64,
    /// Cut-off for recall@K and NDCG@K.
    pub k: usize,
    /// Width of the metric windows in event time (ms); `None` picks about 100 windows.
    pub window_ms: Option<i64>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            warmup: DEFAULT_WARMUP,
            eval_every: DEFAULT_EVAL_EVERY,
            k: DEFAULT_K,
            window_ms: None,
        }
    }
}

impl EvalConfig {
    /// Checks the values once, before a run starts.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(Error::Config(format!(
                "warmup must be in [0, 1), got {}",
                self.warmup
            )));
        }
        if self.k == 0 {
            return Err(Error::Config("k must be at least 1".into()));
        }
        if self.window_ms.is_some_and(|w| w <= 0) {
            return Err(Error::Config("the metrics window must be positive".into()));
        }
        Ok(())
    }
}

/// A whole backtest: what to train, how to score, how to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BacktestConfig {
    /// Models trained side by side over one pass of the history.
    pub variants: Vec<VariantConfig>,
    /// The prequential protocol.
    pub eval: EvalConfig,
    /// Timely worker threads.
    pub workers: usize,
    /// Seed for every random choice (initialisation, negatives).
    pub seed: u64,
    /// Width of one timely round in event time (ms); `None` derives it from the source so
    /// that a round carries about [`TARGET_EVENTS_PER_ROUND`] events.
    pub tick_ms: Option<i64>,
    /// How many rounds a source may run ahead of the slowest operator (memory bound).
    pub rounds_in_flight: u64,
    /// Width of the sliding window of event time over which item popularity is counted
    /// for popularity samplers.
    pub popularity_window_ms: i64,
    /// How far behind the newest event time an event may arrive and still be processed
    /// in its place (ms); 0 for sorted input.
    #[serde(default)]
    pub allowed_lateness_ms: i64,
    /// What happens to events later than that.
    #[serde(default)]
    pub late: LatePolicy,
    /// How long state is kept (`[state]`).
    #[serde(default)]
    pub state: StateConfig,
    /// When state is compacted (`[gc]`).
    #[serde(default)]
    pub gc: GcConfig,
}

/// What happens to an event behind the watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LatePolicy {
    /// Train it in the current round, after events it should have preceded (counted as
    /// reordered).
    #[default]
    Train,
    /// Send it to the dead letters with reason `late`.
    DeadLetter,
}

impl std::str::FromStr for LatePolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(LatePolicy::Train),
            "dead-letter" => Ok(LatePolicy::DeadLetter),
            other => Err(Error::Config(format!(
                "unknown late policy {other:?}; valid: train, dead-letter"
            ))),
        }
    }
}

/// `[state]`: how long per-entity state is kept. Ages are measured in event time against
/// the newest event time the dataflow has processed, so a replay compacts exactly as the
/// live stream it replays would have; `None` keeps state forever.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateConfig {
    /// A user idle this long loses history and embedding (with optimiser state); a
    /// returning user starts afresh (Monolith-style expiry).
    pub user_ttl_ms: Option<i64>,
    /// An item idle this long leaves the catalogue (it is no longer a candidate or a
    /// negative) and its embedding row is released; a returning item starts afresh.
    pub item_ttl_ms: Option<i64>,
}

impl StateConfig {
    /// Checks the values once, before a run starts.
    pub fn validate(&self) -> Result<()> {
        for (name, ttl) in [
            ("user_ttl", self.user_ttl_ms),
            ("item_ttl", self.item_ttl_ms),
        ] {
            if ttl.is_some_and(|t| t <= 0) {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        Ok(())
    }
}

impl Default for BacktestConfig {
    fn default() -> Self {
        Self {
            variants: vec![VariantConfig {
                name: "bpr".into(),
                model: ModelConfig::default(),
            }],
            eval: EvalConfig::default(),
            workers: 1,
            seed: DEFAULT_SEED,
            tick_ms: None,
            rounds_in_flight: DEFAULT_ROUNDS_IN_FLIGHT,
            popularity_window_ms: DEFAULT_POPULARITY_WINDOW_MS,
            allowed_lateness_ms: 0,
            late: LatePolicy::default(),
            state: StateConfig::default(),
            gc: GcConfig::default(),
        }
    }
}

impl BacktestConfig {
    /// Checks the values once, before a run starts.
    pub fn validate(&self) -> Result<()> {
        if self.variants.is_empty() {
            return Err(Error::Config("at least one model variant is needed".into()));
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.variants {
            if !names.insert(v.name.as_str()) {
                return Err(Error::Config(format!(
                    "variant name {:?} is used twice",
                    v.name
                )));
            }
            v.model
                .validate()
                .map_err(|e| Error::Config(format!("variant {}: {e}", v.name)))?;
        }
        self.eval.validate()?;
        if self.workers == 0 || self.workers > 1024 {
            return Err(Error::Config(format!(
                "workers must be between 1 and 1024, got {}",
                self.workers
            )));
        }
        if self.tick_ms.is_some_and(|t| t <= 0) {
            return Err(Error::Config("the tick must be positive".into()));
        }
        if self.popularity_window_ms <= 0 {
            return Err(Error::Config(
                "the popularity window must be positive".into(),
            ));
        }
        if self.rounds_in_flight == 0 {
            return Err(Error::Config("rounds_in_flight must be at least 1".into()));
        }
        self.state.validate()?;
        if self.allowed_lateness_ms < 0 {
            return Err(Error::Config(
                "allowed lateness must not be negative".into(),
            ));
        }
        if self.gc.force_interval_ms == 0 {
            return Err(Error::Config("gc force_interval must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        BacktestConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let mut cfg = BacktestConfig::default();
        cfg.variants[0].model.dim = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("variant bpr: invalid configuration: dim"),
            "{err}"
        );
        let mut cfg = BacktestConfig::default();
        cfg.eval.warmup = 1.0;
        assert!(cfg.validate().unwrap_err().to_string().contains("warmup"));
        assert!("xyz"
            .parse::<ModelKind>()
            .unwrap_err()
            .to_string()
            .contains("bpr, mostpop"));
        let mut cfg = BacktestConfig::default();
        cfg.variants[0].model.sampler = "zipf".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("valid: uniform | pop"));
    }

    #[test]
    fn variants_parse_with_overrides() {
        let base = ModelConfig::default();
        let v = VariantConfig::parse("hard=dns:32,lr=0.1,negatives=2", &base).unwrap();
        assert_eq!(v.name, "hard");
        assert_eq!(v.model.sampler, "dns:32");
        assert_eq!((v.model.lr, v.model.negatives), (0.1, 2));
        let v = VariantConfig::parse("pop=model=mostpop", &base);
        assert!(v.is_err(), "a bare key=value is read as the sampler");
        let v = VariantConfig::parse("base=,model=mostpop", &base).unwrap();
        assert_eq!(
            (v.model.kind, v.model.sampler.as_str()),
            (ModelKind::Mostpop, "uniform")
        );
        for (spec, reason) in [
            ("noequals", "NAME=SAMPLER"),
            ("a b=uniform", "letters, digits"),
            ("x=pop,dim=big", "not an integer"),
            ("x=pop,colour=red", "unknown key"),
            ("x=zipf", "unknown sampler"),
        ] {
            let err = VariantConfig::parse(spec, &base).unwrap_err().to_string();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }
}
