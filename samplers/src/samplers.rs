//! The samplers themselves. Each keeps the contract stated in the crate docs.

use rand::{Rng, RngExt};

use crate::alias::AliasTable;
use crate::frequency::FrequencyEstimator;
use crate::{Catalogue, Exclusion, Negative, Refresh, Sampler, Scorer, MAX_REJECTIONS_PER_DRAW};

/// Draws by repeated proposals, skipping excluded items, within a rejection budget.
#[inline]
fn by_rejection<R: Rng + ?Sized>(
    count: usize,
    exclusion: &impl Exclusion,
    rng: &mut R,
    out: &mut Vec<Negative>,
    mut propose: impl FnMut(&mut R) -> Option<Negative>,
) -> usize {
    let mut drawn = 0;
    let mut budget = count * MAX_REJECTIONS_PER_DRAW;
    while drawn < count && budget > 0 {
        budget -= 1;
        match propose(rng) {
            Some(neg) if !exclusion.excludes(neg.item) => {
                out.push(neg);
                drawn += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    drawn
}

/// Whether the exclusion leaves nothing to draw.
#[inline]
fn exhausted(len: usize, exclusion: &impl Exclusion) -> bool {
    len == 0 || exclusion.excludes_all(len)
}

/// `q` of an alias-table sampler, uniform while the table has no mass.
fn weighted_probability(table: &AliasTable, item: u32, len: usize) -> f32 {
    if table.has_mass() {
        table.probability(item) as f32
    } else {
        1.0 / len.max(1) as f32
    }
}

/// Draws from an alias table by rejection; uniform while the table has no mass (before
/// any popularity arrived, or when the window is empty).
fn weighted_sample<R: Rng + ?Sized>(
    table: &AliasTable,
    catalogue: &impl Catalogue,
    exclusion: &impl Exclusion,
    count: usize,
    rng: &mut R,
    scorer: &mut Scorer<'_>,
    out: &mut Vec<Negative>,
) -> usize {
    if !table.has_mass() {
        return Uniform.sample(catalogue, exclusion, count, rng, scorer, out);
    }
    if exhausted(catalogue.len(), exclusion) {
        return 0;
    }
    by_rejection(count, exclusion, rng, out, |rng| {
        let item = table.draw(rng);
        Some(Negative {
            item,
            q: table.probability(item) as f32,
        })
    })
}

/// Uniform over the items seen so far, rejecting excluded items.
///
/// Each draw costs O(1) expected proposals while the user has seen a small share of the
/// catalogue (the common case); `q = 1 / len`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Uniform;

impl Sampler for Uniform {
    fn name(&self) -> String {
        "uniform".into()
    }

    fn probability(&self, _item: u32, len: usize) -> f32 {
        1.0 / len.max(1) as f32
    }

    #[inline]
    fn peek<R: Rng + Clone>(&self, len: usize, count: usize, rng: &R, out: &mut Vec<u32>) {
        if len == 0 {
            return;
        }
        let mut rng = rng.clone();
        out.extend((0..count).map(|_| rng.random_range(0..len as u32)));
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        _scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        let len = catalogue.len();
        if exhausted(len, exclusion) {
            return 0;
        }
        let q = 1.0 / len as f32;
        by_rejection(count, exclusion, rng, out, |rng| {
            Some(Negative {
                item: rng.random_range(0..len as u32),
                q,
            })
        })
    }
}

/// Live popularity to the power `alpha`: `q(i) ∝ count_i^alpha`, counts over the
/// popularity window as delivered by [`Sampler::refresh`].
///
/// Cost: the alias table is rebuilt once per round, O(items) with one `powf` per item
/// (about 20 ns), skipped when the counts did not change; a draw is O(1). With rounds of
/// tens of thousands of events that is a few nanoseconds per event. Before any counts
/// arrive, and when every count in the window is zero, it draws uniformly.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Popularity {
    alpha: f64,
    table: AliasTable,
    last_counts: Vec<u64>,
}

impl Popularity {
    /// Popularity to the power `alpha`.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha,
            table: AliasTable::default(),
            last_counts: Vec::new(),
        }
    }
}

impl Sampler for Popularity {
    fn name(&self) -> String {
        format!("pop:{}", self.alpha)
    }

    fn refresh(&mut self, live: &Refresh<'_>) {
        if self.last_counts.as_slice() == live.window_counts {
            return;
        }
        self.last_counts.clear();
        self.last_counts.extend_from_slice(live.window_counts);
        let alpha = self.alpha;
        self.table
            // An item outside the window has weight 0 even when alpha is 0.
            .rebuild(live.window_counts.iter().map(|&c| {
                if c == 0 {
                    0.0
                } else {
                    (c as f64).powf(alpha)
                }
            }));
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        weighted_probability(&self.table, item, len)
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        weighted_sample(&self.table, catalogue, exclusion, count, rng, scorer, out)
    }

    #[inline]
    fn peek<R: Rng + Clone>(&self, len: usize, count: usize, rng: &R, out: &mut Vec<u32>) {
        if !self.table.has_mass() {
            return Uniform.peek(len, count, rng, out);
        }
        let mut rng = rng.clone();
        out.extend((0..count).map(|_| self.table.draw(&mut rng)));
    }
}

/// Time-decayed popularity: each positive adds 1 to its item's weight, and weights halve
/// every `half_life_ms` of event time. Weights are decayed lazily (on update and at each
/// round's refresh), so observing costs O(1) and a refresh O(items).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Decay {
    half_life_ms: f64,
    values: Vec<f64>,
    stamps: Vec<i64>,
    table: AliasTable,
}

impl Decay {
    /// Decay with the given half-life in milliseconds.
    pub fn new(half_life_ms: f64) -> Self {
        Self {
            half_life_ms: half_life_ms.max(1.0),
            values: Vec::new(),
            stamps: Vec::new(),
            table: AliasTable::default(),
        }
    }

    #[inline]
    fn factor(&self, from: i64, to: i64) -> f64 {
        (-((to - from).max(0) as f64) / self.half_life_ms).exp2()
    }

    /// The decayed weight of `item` at event time `now_ms`.
    pub fn weight(&self, item: u32, now_ms: i64) -> f64 {
        match (
            self.values.get(item as usize),
            self.stamps.get(item as usize),
        ) {
            (Some(&v), Some(&t)) => v * self.factor(t, now_ms),
            _ => 0.0,
        }
    }
}

impl Sampler for Decay {
    fn name(&self) -> String {
        format!("decay:{}ms", self.half_life_ms)
    }

    fn observe(&mut self, item: u32, ts_ms: i64) {
        let i = item as usize;
        if i >= self.values.len() {
            self.values.resize(i + 1, 0.0);
            self.stamps.resize(i + 1, ts_ms);
        }
        let decayed = self.values[i] * self.factor(self.stamps[i], ts_ms);
        self.values[i] = decayed + 1.0;
        self.stamps[i] = self.stamps[i].max(ts_ms);
    }

    fn refresh(&mut self, live: &Refresh<'_>) {
        let (now, half_life) = (live.now_ms, self.half_life_ms);
        let weights = self
            .values
            .iter()
            .zip(&self.stamps)
            .map(|(&v, &t)| v * (-((now - t).max(0) as f64) / half_life).exp2());
        self.table.rebuild(weights);
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        weighted_probability(&self.table, item, len)
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        weighted_sample(&self.table, catalogue, exclusion, count, rng, scorer, out)
    }
}

/// Dynamic hard negatives: `m` candidates from a base sampler, scored by the current
/// model, the `count` best-scored kept. `q` is the base sampler's proposal probability.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Dns {
    base: Box<AnySampler>,
    m: usize,
    candidates: Vec<Negative>,
    scored: Vec<(f32, Negative)>,
}

impl Dns {
    /// `m` candidates per event from `base`.
    pub fn new(m: usize, base: AnySampler) -> Self {
        Self {
            base: Box::new(base),
            m: m.max(1),
            candidates: Vec::new(),
            scored: Vec::new(),
        }
    }
}

impl Sampler for Dns {
    fn name(&self) -> String {
        match self.base.as_ref() {
            AnySampler::Uniform(_) => format!("dns:{}", self.m),
            base => format!("dns:{}:{}", self.m, base.name()),
        }
    }

    fn observe(&mut self, item: u32, ts_ms: i64) {
        self.base.observe(item, ts_ms);
    }

    fn refresh(&mut self, live: &Refresh<'_>) {
        self.base.refresh(live);
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        self.base.probability(item, len)
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        self.candidates.clear();
        let want = self.m.max(count);
        self.base.sample(
            catalogue,
            exclusion,
            want,
            rng,
            scorer,
            &mut self.candidates,
        );
        self.scored.clear();
        self.scored
            .extend(self.candidates.iter().map(|&c| (scorer(c.item), c)));
        // Best score first; ties keep draw order (stable sort), so runs are reproducible.
        self.scored
            .sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        let before = out.len();
        for &(_, c) in &self.scored {
            if out.len() - before == count {
                break;
            }
            if !out[before..].iter().any(|n| n.item == c.item) {
                out.push(c);
            }
        }
        out.len() - before
    }
}

/// In-batch negatives: the positives of the other recent events (a ring of the last
/// `capacity`), so items are proposed in proportion to how often they are consumed.
/// The exact proposal probability would need per-item counts of the ring; `q` comes
/// instead from the streaming frequency estimator, as in Yi et al. (RecSys 2019).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct InBatch {
    ring: Vec<u32>,
    capacity: usize,
    next: usize,
    estimator: FrequencyEstimator,
}

impl InBatch {
    /// A ring of the last `capacity` positives.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            next: 0,
            estimator: FrequencyEstimator::new(1 << 16, 0.01),
        }
    }
}

impl Sampler for InBatch {
    fn name(&self) -> String {
        format!("inbatch:{}", self.capacity)
    }

    fn observe(&mut self, item: u32, _ts_ms: i64) {
        if self.ring.len() < self.capacity {
            self.ring.push(item);
        } else {
            self.ring[self.next] = item;
        }
        self.next = (self.next + 1) % self.capacity;
        self.estimator.update(item);
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        let q = self.estimator.estimate(item);
        if q > 0.0 {
            q
        } else {
            1.0 / len.max(1) as f32
        }
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        if self.ring.is_empty() {
            return Uniform.sample(catalogue, exclusion, count, rng, scorer, out);
        }
        if exhausted(catalogue.len(), exclusion) {
            return 0;
        }
        let (ring, estimator) = (&self.ring, &self.estimator);
        by_rejection(count, exclusion, rng, out, |rng| {
            let item = ring[rng.random_range(0..ring.len())];
            Some(Negative {
                item,
                q: estimator.estimate(item),
            })
        })
    }
}

/// A weighted mixture: each negative comes from component `c` with probability `π_c`,
/// and `q(i) = Σ π_c q_c(i)`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Mix {
    parts: Vec<(f64, AnySampler)>,
    table: AliasTable,
    one: Vec<Negative>,
}

impl Mix {
    /// A mixture of `(weight, sampler)` parts (weights need not sum to 1).
    pub fn new(parts: Vec<(f64, AnySampler)>) -> Self {
        let mut table = AliasTable::default();
        table.rebuild(parts.iter().map(|(w, _)| *w));
        Self {
            parts,
            table,
            one: Vec::with_capacity(1),
        }
    }
}

impl Sampler for Mix {
    fn name(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(w, s)| format!("{w}*{}", s.name()))
            .collect();
        format!("mix:{}", parts.join("+"))
    }

    fn observe(&mut self, item: u32, ts_ms: i64) {
        self.parts
            .iter_mut()
            .for_each(|(_, s)| s.observe(item, ts_ms));
    }

    fn refresh(&mut self, live: &Refresh<'_>) {
        self.parts.iter_mut().for_each(|(_, s)| s.refresh(live));
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        self.parts
            .iter()
            .enumerate()
            .map(|(c, (_, s))| self.table.probability(c as u32) as f32 * s.probability(item, len))
            .sum()
    }

    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        let mut drawn = 0;
        for _ in 0..count {
            let c = self.table.draw(rng) as usize;
            self.one.clear();
            if self.parts[c]
                .1
                .sample(catalogue, exclusion, 1, rng, scorer, &mut self.one)
                == 1
            {
                let mut neg = self.one[0];
                neg.q = self.probability(neg.item, catalogue.len());
                out.push(neg);
                drawn += 1;
            }
        }
        drawn
    }
}

/// Any sampler, as one type so variants can hold different samplers without dynamic
/// dispatch on the per-draw path.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum AnySampler {
    /// `uniform`
    Uniform(Uniform),
    /// `pop:ALPHA`
    Popularity(Popularity),
    /// `decay:HALF_LIFE`
    Decay(Decay),
    /// `dns:M[:BASE]`
    Dns(Dns),
    /// `inbatch[:B]`
    InBatch(InBatch),
    /// `mix:...`
    Mix(Mix),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnySampler::Uniform($s) => $e,
            AnySampler::Popularity($s) => $e,
            AnySampler::Decay($s) => $e,
            AnySampler::Dns($s) => $e,
            AnySampler::InBatch($s) => $e,
            AnySampler::Mix($s) => $e,
        }
    };
}

impl Sampler for AnySampler {
    fn name(&self) -> String {
        each!(self, s => s.name())
    }

    fn observe(&mut self, item: u32, ts_ms: i64) {
        each!(self, s => s.observe(item, ts_ms))
    }

    fn refresh(&mut self, live: &Refresh<'_>) {
        each!(self, s => s.refresh(live))
    }

    fn probability(&self, item: u32, len: usize) -> f32 {
        each!(self, s => s.probability(item, len))
    }

    #[inline]
    fn sample<R: Rng + ?Sized>(
        &mut self,
        catalogue: &impl Catalogue,
        exclusion: &impl Exclusion,
        count: usize,
        rng: &mut R,
        scorer: &mut Scorer<'_>,
        out: &mut Vec<Negative>,
    ) -> usize {
        each!(self, s => s.sample(catalogue, exclusion, count, rng, scorer, out))
    }

    #[inline]
    fn peek<R: Rng + Clone>(&self, len: usize, count: usize, rng: &R, out: &mut Vec<u32>) {
        each!(self, s => s.peek(len, count, rng, out))
    }
}

impl AnySampler {
    /// Whether the sampler reads the windowed popularity passed to [`Sampler::refresh`]
    /// (so callers can skip maintaining it).
    pub fn needs_window_counts(&self) -> bool {
        match self {
            AnySampler::Popularity(_) => true,
            AnySampler::Dns(d) => d.base.needs_window_counts(),
            AnySampler::Mix(m) => m.parts.iter().any(|(_, s)| s.needs_window_counts()),
            _ => false,
        }
    }

    /// Whether the sampler calls the scorer (so callers can skip building one).
    pub fn needs_scores(&self) -> bool {
        match self {
            AnySampler::Dns(_) => true,
            AnySampler::Mix(m) => m.parts.iter().any(|(_, s)| s.needs_scores()),
            _ => false,
        }
    }
}
