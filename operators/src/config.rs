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
    /// Item-to-item co-occurrence over each user's recent sequence (see [`KnnConfig`]).
    Itemknn,
    /// A mix of other variants' normalised scores, weights learned online (see
    /// [`EnsembleConfig`]).
    Ensemble,
}

impl std::str::FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bpr" => Ok(ModelKind::Bpr),
            "mostpop" => Ok(ModelKind::Mostpop),
            "itemknn" => Ok(ModelKind::Itemknn),
            "ensemble" => Ok(ModelKind::Ensemble),
            other => Err(Error::Config(format!(
                "unknown model {other:?}; valid: bpr, mostpop, itemknn, ensemble"
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
            ModelKind::Itemknn => "itemknn",
            ModelKind::Ensemble => "ensemble",
        }
    }

    /// Whether the model learns from sampled negatives.
    pub fn takes_negatives(self) -> bool {
        self == ModelKind::Bpr
    }
}

/// Default value for [`KnnConfig::history`].
pub const DEFAULT_KNN_HISTORY: usize = 30;
/// Default value for [`KnnConfig::decay`].
pub const DEFAULT_KNN_DECAY: f32 = 0.85;
/// Default value for [`KnnConfig::pair_decay`].
pub const DEFAULT_KNN_PAIR_DECAY: f32 = 0.9;
/// Default value for [`KnnConfig::back`].
pub const DEFAULT_KNN_BACK: f32 = 0.5;
/// Default value for [`KnnConfig::alpha`].
pub const DEFAULT_KNN_ALPHA: f32 = 0.75;
/// Default value for [`KnnConfig::neighbours`].
pub const DEFAULT_KNN_NEIGHBOURS: usize = 500;
/// Default value for [`KnnConfig::half_life_ms`]: 1000 days.
pub const DEFAULT_KNN_HALF_LIFE_MS: Option<i64> = Some(1000 * 86_400_000);

/// `itemknn`'s hyper-parameters (see docs/models.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnnConfig {
    /// How many of a user's most recent items pair with a new one and score candidates.
    pub history: usize,
    /// Weight of the k-th most recent item when scoring: `decay^k`.
    pub decay: f32,
    /// Weight of a pair at sequence distance d: `pair_decay^(d-1)`.
    pub pair_decay: f32,
    /// Weight of the backward pair (new item -> earlier item) relative to the forward one.
    pub back: f32,
    /// Asymmetric cosine: `co(h, j) / (count_h^alpha * count_j^(1-alpha))`.
    pub alpha: f32,
    /// Neighbours kept per item (lists are pruned to the strongest).
    pub neighbours: usize,
    /// Half-life of co-occurrence in event time (ms); `None`: nothing fades.
    pub half_life_ms: Option<i64>,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            history: DEFAULT_KNN_HISTORY,
            decay: DEFAULT_KNN_DECAY,
            pair_decay: DEFAULT_KNN_PAIR_DECAY,
            back: DEFAULT_KNN_BACK,
            alpha: DEFAULT_KNN_ALPHA,
            neighbours: DEFAULT_KNN_NEIGHBOURS,
            half_life_ms: DEFAULT_KNN_HALF_LIFE_MS,
        }
    }
}

impl KnnConfig {
    /// Checks the values once, naming the valid range.
    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, v: f32, zero_ok: bool| {
            let ok = v.is_finite() && v <= 1.0 && if zero_ok { v >= 0.0 } else { v > 0.0 };
            if ok {
                Ok(())
            } else {
                let range = if zero_ok { "[0, 1]" } else { "(0, 1]" };
                Err(Error::Config(format!("{name} must be in {range}, got {v}")))
            }
        };
        unit("decay", self.decay, false)?;
        unit("pair_decay", self.pair_decay, false)?;
        unit("back", self.back, true)?;
        unit("alpha", self.alpha, true)?;
        if !(1..=1000).contains(&self.history) {
            return Err(Error::Config(format!(
                "history must be between 1 and 1000, got {}",
                self.history
            )));
        }
        if !(1..=100_000).contains(&self.neighbours) {
            return Err(Error::Config(format!(
                "neighbours must be between 1 and 100000, got {}",
                self.neighbours
            )));
        }
        if self.half_life_ms.is_some_and(|h| h <= 0) {
            return Err(Error::Config("half_life must be positive".into()));
        }
        Ok(())
    }
}

/// Default value for [`EnsembleConfig::learn_every`].
pub const DEFAULT_ENSEMBLE_LEARN_EVERY: u64 = 10;
/// Default value for [`EnsembleConfig::lr`].
pub const DEFAULT_ENSEMBLE_LR: f32 = 0.05;

/// `ensemble`'s settings: which variants it mixes and how it learns the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnsembleConfig {
    /// Names of the variants of the same run whose scores are mixed.
    pub components: Vec<String>,
    /// The weights learn from every N-th event (the events at the phase of the
    /// protocol's scored events, so with N = `eval_every` they reuse scoring's work).
    pub learn_every: u64,
    /// Adagrad learning rate of the mixing weights.
    pub lr: f32,
    /// How component scores are put on one scale: `rank` or `z`.
    pub norm: crate::model::Norm,
    /// What the weights minimise: `top` or `softmax`.
    pub objective: crate::model::Objective,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        Self {
            components: Vec::new(),
            learn_every: DEFAULT_ENSEMBLE_LEARN_EVERY,
            lr: DEFAULT_ENSEMBLE_LR,
            norm: crate::model::Norm::default(),
            objective: crate::model::Objective::default(),
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

impl Optimizer {
    /// The name the flags take (`sgd`, `adagrad`).
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Adagrad => "adagrad",
        }
    }
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
    /// `bpr`: subtract `ln(q * n)` from a negative's score, where q is the probability
    /// its sampler drew it with and n the candidates (the sampled-softmax logQ
    /// correction), so that non-uniform negatives do not bias the model.
    #[serde(default)]
    pub logq: bool,
    /// `itemknn`'s hyper-parameters.
    #[serde(default)]
    pub knn: KnnConfig,
    /// `ensemble`'s settings.
    #[serde(default)]
    pub ensemble: EnsembleConfig,
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
            logq: false,
            knn: KnnConfig::default(),
            ensemble: EnsembleConfig::default(),
        }
    }
}

impl ModelConfig {
    /// Checks the values once, before a run starts.
    pub fn validate(&self) -> Result<()> {
        match self.kind {
            ModelKind::Mostpop => return Ok(()),
            ModelKind::Itemknn => return self.knn.validate(),
            ModelKind::Ensemble => {
                let n = self.ensemble.components.len();
                if !(2..=crate::model::MAX_COMPONENTS).contains(&n) {
                    return Err(Error::Config(format!(
                        "an ensemble mixes between 2 and {} components (components=a+b), got {n}",
                        crate::model::MAX_COMPONENTS
                    )));
                }
                if self.ensemble.learn_every == 0 {
                    return Err(Error::Config("learn_every must be at least 1".into()));
                }
                if !(self.ensemble.lr.is_finite() && self.ensemble.lr > 0.0) {
                    return Err(Error::Config(format!(
                        "the ensemble's lr must be a positive number, got {}",
                        self.ensemble.lr
                    )));
                }
                return Ok(());
            }
            ModelKind::Bpr => {}
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

/// A configuration error's message without the "invalid configuration" prefix, for
/// wrapping in another.
fn message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

/// The keys a variant spec accepts after its sampler.
pub const VARIANT_KEYS: &[&str] = &[
    "model",
    "dim",
    "lr",
    "reg",
    "optimizer",
    "negatives",
    "init_std",
    "item_bias",
    "logq",
    "history",
    "decay",
    "pair_decay",
    "back",
    "alpha",
    "neighbours",
    "half_life",
    "components",
    "learn_every",
    "mix_lr",
    "norm",
    "objective",
];

/// A duration as humans write it (`90s`, `7days`) in milliseconds.
pub fn parse_duration_ms(s: &str) -> std::result::Result<i64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .map_err(|e| format!("{e} (examples: 90s, 2min, 1h, 7days)"))
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
        check_variant_name(name)?;
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
                "logq" => model.logq = value.parse().map_err(|_| bad("true or false"))?,
                "history" => model.knn.history = value.parse().map_err(|_| bad("an integer"))?,
                "decay" => model.knn.decay = value.parse().map_err(|_| bad("a number"))?,
                "pair_decay" => {
                    model.knn.pair_decay = value.parse().map_err(|_| bad("a number"))?
                }
                "back" => model.knn.back = value.parse().map_err(|_| bad("a number"))?,
                "alpha" => model.knn.alpha = value.parse().map_err(|_| bad("a number"))?,
                "neighbours" => {
                    model.knn.neighbours = value.parse().map_err(|_| bad("an integer"))?
                }
                "half_life" => {
                    model.knn.half_life_ms = match value.trim() {
                        "off" | "none" => None,
                        v => Some(parse_duration_ms(v).map_err(|e| {
                            Error::Config(format!("variant {name}: half_life={v:?}: {e}"))
                        })?),
                    }
                }
                "components" => {
                    model.ensemble.components =
                        value.split('+').map(|c| c.trim().to_string()).collect()
                }
                "learn_every" => {
                    model.ensemble.learn_every = value.parse().map_err(|_| bad("an integer"))?
                }
                "mix_lr" => model.ensemble.lr = value.parse().map_err(|_| bad("a number"))?,
                "norm" => {
                    model.ensemble.norm = value.trim().parse().map_err(|_| bad("rank or z"))?
                }
                "objective" => {
                    model.ensemble.objective = value
                        .trim()
                        .parse()
                        .map_err(|_| bad("top, softmax or hedge"))?
                }
                other => {
                    return Err(Error::Config(format!(
                        "variant {name}: unknown key {other:?}; valid: {}",
                        VARIANT_KEYS.join(", ")
                    )))
                }
            }
        }
        Self::new(name, model)
    }

    /// A variant from a name and a complete model, both checked: the typed counterpart
    /// of [`VariantConfig::parse`] (job files build their `[[variants]]` this way).
    pub fn new(name: &str, model: ModelConfig) -> Result<Self> {
        check_variant_name(name)?;
        model
            .validate()
            .map_err(|e| Error::Config(format!("variant {name}: {}", message(e))))?;
        Ok(Self {
            name: name.to_string(),
            model,
        })
    }
}

/// Names appear in reports, metric labels and file names: keep them plain.
fn check_variant_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::Config(format!(
            "variant name {name:?} must be letters, digits, '_', '-' or '.'"
        )));
    }
    Ok(())
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

/// The sampler of the recommended configuration's `bpr`: hard negatives.
pub const RECOMMENDED_BPR_SAMPLER: &str = "dns:32";

/// The recommended configuration (what runs without model flags): an `ensemble` that
/// mixes `itemknn`, `bpr` with hard negatives and `mostpop` by Hedge, listed first so
/// that it is the run's headline, then its components, each reported on its own.
/// `base` supplies every parameter not named here. Chosen on ml-latest-small only (the
/// docs/models.md has the grid).
pub fn recommended_variants(base: &ModelConfig) -> Vec<VariantConfig> {
    let with = |kind: ModelKind| ModelConfig {
        kind,
        ..base.clone()
    };
    let mut bpr = with(ModelKind::Bpr);
    if bpr.sampler == "uniform" {
        bpr.sampler = RECOMMENDED_BPR_SAMPLER.into();
    }
    let mut ensemble = with(ModelKind::Ensemble);
    ensemble.ensemble.components = vec!["itemknn".into(), "bpr".into(), "mostpop".into()];
    vec![
        VariantConfig {
            name: "ensemble".into(),
            model: ensemble,
        },
        VariantConfig {
            name: "itemknn".into(),
            model: with(ModelKind::Itemknn),
        },
        VariantConfig {
            name: "bpr".into(),
            model: bpr,
        },
        VariantConfig {
            name: "mostpop".into(),
            model: with(ModelKind::Mostpop),
        },
    ]
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
    /// An event whose time lies more than this ahead of the wall clock (ms) goes to the
    /// dead letters with reason `skew` instead of moving the watermark; `None`: no bound.
    #[serde(default)]
    pub max_skew_ms: Option<i64>,
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
            max_skew_ms: None,
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
                .map_err(|e| Error::Config(format!("variant {}: {}", v.name, message(e))))?;
        }
        for v in &self.variants {
            if v.model.kind != ModelKind::Ensemble {
                continue;
            }
            let mut seen = std::collections::HashSet::new();
            for c in &v.model.ensemble.components {
                let component = self.variants.iter().find(|o| &o.name == c);
                let why = match component {
                    None => Some("is not a variant of this run"),
                    Some(o) if o.model.kind == ModelKind::Ensemble => Some("is an ensemble itself"),
                    Some(_) if !seen.insert(c) => Some("is named twice"),
                    Some(_) => None,
                };
                if let Some(why) = why {
                    let names: Vec<&str> = self
                        .variants
                        .iter()
                        .filter(|o| o.model.kind != ModelKind::Ensemble)
                        .map(|o| o.name.as_str())
                        .collect();
                    return Err(Error::Config(format!(
                        "variant {}: component {c:?} {why}; variants to mix: {}",
                        v.name,
                        names.join(", ")
                    )));
                }
            }
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
        if self.max_skew_ms.is_some_and(|s| s <= 0) {
            return Err(Error::Config("the maximum skew must be positive".into()));
        }
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
            err.contains("invalid configuration: variant bpr: dim must be between 1 and 4096"),
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
    fn model_hyper_parameters_are_checked_with_their_ranges() {
        let base = ModelConfig::default();
        for (spec, reason) in [
            (
                "k=,model=itemknn,decay=-0.5",
                "decay must be in (0, 1], got -0.5",
            ),
            (
                "k=,model=itemknn,alpha=1.5",
                "alpha must be in [0, 1], got 1.5",
            ),
            ("k=,model=itemknn,back=-1", "back must be in [0, 1]"),
            (
                "k=,model=itemknn,pair_decay=0",
                "pair_decay must be in (0, 1]",
            ),
            (
                "k=,model=itemknn,history=0",
                "history must be between 1 and 1000",
            ),
            (
                "k=,model=itemknn,neighbours=0",
                "neighbours must be between 1",
            ),
            ("k=,model=itemknn,half_life=soon", "half_life=\"soon\""),
            (
                "k=,model=itemknn,radius=3",
                "unknown key \"radius\"; valid: model,",
            ),
            (
                "e=,model=ensemble,components=a",
                "between 2 and 16 components",
            ),
            (
                "e=,model=ensemble,components=a+b,norm=max",
                "is not rank or z",
            ),
            (
                "e=,model=ensemble,components=a+b,objective=x",
                "top, softmax or hedge",
            ),
        ] {
            let err = VariantConfig::parse(spec, &base).unwrap_err().to_string();
            assert!(err.contains(reason), "{spec}: {err}");
        }
        let v = VariantConfig::parse("k=,model=itemknn,half_life=off,history=7", &base).unwrap();
        assert_eq!((v.model.knn.half_life_ms, v.model.knn.history), (None, 7));
        // Components must be other, non-ensemble variants of the same run.
        let mut cfg = BacktestConfig {
            variants: ["k=,model=itemknn", "e=,model=ensemble,components=k+nope"]
                .iter()
                .map(|s| VariantConfig::parse(s, &base).unwrap())
                .collect(),
            ..BacktestConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("component \"nope\" is not a variant of this run; variants to mix: k"),
            "{err}"
        );
        cfg.variants[1].model.ensemble.components = vec!["k".into(), "e".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("is an ensemble itself"), "{err}");
        cfg.variants[1].model.ensemble.components = vec!["k".into(), "k".into()];
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("named twice"));
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
