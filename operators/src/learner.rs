//! The prequential learner of one worker: score first, then train, event by event in
//! replay order.
//!
//! Every worker receives every event of a round (see [`crate::backtest`]), sorts them by
//! `(ts, pos)` and walks them in that order. For each event it advances the shared
//! replay index and its replica of the item catalogue; for events whose user it owns it
//! also scores (when the protocol says so) and trains. Because the replay order, the
//! catalogue and the scored positions are the same on every worker, the metrics do not
//! depend on how many workers there are, except through the Hogwild! item updates of
//! learned models (see [`crate::item_table`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::Xoshiro256PlusPlus;
use rand::SeedableRng;
use serde::Serialize;
use tidepool_pipeline::delta::{Entity, ModelDelta};
use tidepool_pipeline::memory::collector::Freed;
use tidepool_pipeline::{Event, Quality};
use tidepool_samplers::{AnySampler, Negative, Refresh, Sampler, SamplerSpec};

use crate::cluster::{Replication, RowBatch};
use crate::config::{EvalConfig, StateConfig, VariantConfig};
use crate::eval::rank_of;
use crate::ingest::Clock;
use crate::item_table::ItemTable;
use crate::model::Model;
use crate::popularity::CountChange;
use crate::series::{Series, WeightTrace};
use crate::state::{owner, splitmix64, Excluding, ItemCatalogue, Users};

/// Which events are scored and how metrics are bucketed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Protocol {
    /// Events (by replay index) trained on and never scored.
    pub warmup: u64,
    /// Score every N-th post-warm-up event; 0 = never.
    pub eval_every: u64,
    /// Cut-off for recall and NDCG.
    pub k: usize,
    /// Metric window width in event time (ms).
    pub window_ms: i64,
    /// Event time at which window 0 starts.
    pub origin_ms: i64,
}

impl Protocol {
    /// The protocol for a source of `rows` events spanning `[min_ts, max_ts]`.
    pub fn new(eval: &EvalConfig, rows: u64, min_ts: i64, max_ts: i64) -> Self {
        Self {
            warmup: (rows as f64 * eval.warmup).floor() as u64,
            eval_every: eval.eval_every,
            k: eval.k,
            window_ms: eval
                .window_ms
                .unwrap_or_else(|| auto_window(max_ts.saturating_sub(min_ts))),
            origin_ms: min_ts,
        }
    }

    /// Whether the event at replay index `index` is scored.
    #[inline]
    pub fn scores(&self, index: u64) -> bool {
        self.eval_every > 0
            && index >= self.warmup
            && (index - self.warmup).is_multiple_of(self.eval_every)
    }

    /// The window an event time falls in.
    #[inline]
    pub fn window(&self, ts: i64) -> i64 {
        ts.saturating_sub(self.origin_ms).div_euclid(self.window_ms)
    }

    /// Start of window `w` in event time (ms).
    pub fn window_start(&self, w: i64) -> i64 {
        self.origin_ms
            .saturating_add(w.saturating_mul(self.window_ms))
    }
}

/// The smallest human unit that cuts a span into at most 200 windows.
pub fn auto_window(span_ms: i64) -> i64 {
    const MIN: i64 = 60_000;
    const UNITS: [i64; 10] = [
        MIN,
        5 * MIN,
        15 * MIN,
        60 * MIN,
        6 * 60 * MIN,
        24 * 60 * MIN,
        7 * 24 * 60 * MIN,
        30 * 24 * 60 * MIN,
        91 * 24 * 60 * MIN,
        365 * 24 * 60 * MIN,
    ];
    UNITS
        .into_iter()
        .find(|u| span_ms / u < 200)
        .unwrap_or_else(|| (span_ms / 200).max(1))
}

/// How many events ahead the learner hints the rows training will touch: far enough for
/// the misses to be served before the event comes up, near enough to stay in cache.
pub(crate) const PREFETCH_AHEAD: usize = 4;

/// Slots of the ring of looked-up ids: an event's entry, written `PREFETCH_AHEAD` events
/// before it, must survive until the event itself is processed.
const LOOKED_RING: usize = 2 * PREFETCH_AHEAD;

/// The dense ids the hints found for an event: the user's if this worker owns it and has
/// seen them, the item's if the catalogue holds it.
#[derive(Clone, Copy, Debug, Default)]
struct Looked {
    user: Option<u32>,
    item: Option<u32>,
}

/// One variant's model, sampler and metrics on one worker.
struct Variant {
    name: String,
    model: Model,
    sampler: AnySampler,
    negatives: usize,
    rng: Xoshiro256PlusPlus,
    /// The window events are being added to; flushed into `windows` when it changes, so
    /// the per-event path touches no map while event time stays in one window.
    current: (i64, Quality),
    windows: Series<Quality>,
    /// Counters since the last [`Learner::take_live`], for the live metrics.
    live: Quality,
    /// Whether an ensemble of the run mixes this variant's scores.
    mixed_in: bool,
    /// This event's dense scores, when an ensemble needs them.
    dense: Vec<f32>,
    /// Ensembles: per metrics window, learning steps and the sum of the weights after
    /// each, so that windows merge across workers into mean weights.
    mixing: WeightTrace,
}

impl Variant {
    /// Applies `f` to the window's counters and the live ones.
    #[inline]
    fn record(&mut self, window: i64, f: impl Fn(&mut Quality)) {
        f(self.window(window));
        f(&mut self.live);
    }

    #[inline]
    fn window(&mut self, window: i64) -> &mut Quality {
        if self.current.0 != window {
            self.flush();
            self.current.0 = window;
        }
        &mut self.current.1
    }

    fn flush(&mut self) {
        let (w, q) = std::mem::take(&mut self.current);
        if q != Quality::default() {
            self.windows.entry(w).merge(&q);
        }
    }

    /// Totals and per-window counters; the totals are the sum of the windows.
    fn finish(mut self) -> (String, Quality, BTreeMap<i64, Quality>) {
        self.flush();
        let mut total = Quality::default();
        self.windows.values().for_each(|q| total.merge(q));
        (self.name, total, self.windows.into_map())
    }

    /// Adds the ensemble's weights after a learning step to the window's trace.
    fn trace_weights(&mut self, window: i64, weights: &[f32]) {
        self.mixing.step(window, weights);
    }
}

/// Per metrics window: an ensemble's learning steps and summed weights.
pub(crate) type MixingTrace = BTreeMap<i64, (u64, Vec<f64>)>;

/// Adds `from`'s steps and weight sums to `into`, window by window (workers' traces
/// merge into one, as their quality counters do).
pub(crate) fn merge_traces(into: &mut MixingTrace, from: &MixingTrace) {
    for (w, (steps, sums)) in from {
        let entry = into.entry(*w).or_insert_with(|| (0, vec![0.0; sums.len()]));
        entry.0 += steps;
        entry.1.iter_mut().zip(sums).for_each(|(a, b)| *a += b);
    }
}

/// What a worker hands back at the end of a replay.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct WorkerResult {
    /// Events inside the popularity window as the last round saw it (every worker's
    /// replica agrees).
    pub(crate) window_events: u64,
    /// Per variant: name, totals and per-window counters of the events this worker owned.
    pub(crate) variants: Vec<(String, Quality, BTreeMap<i64, Quality>)>,
    /// Events whose sampler could not draw all negatives (user has seen nearly everything).
    pub(crate) sampler_shortfalls: u64,
    /// Per variant: an ensemble's mixing weights over time (empty for the others).
    pub(crate) mixing: Vec<MixingTrace>,
    /// Bytes of replicated co-occurrence state (`itemknn`) this worker holds.
    pub(crate) knn_bytes: u64,
    /// Users this worker owned.
    pub(crate) users: u64,
    /// Live items in the catalogue at the end.
    pub(crate) items: u64,
    /// Users evicted past their TTL.
    pub(crate) users_evicted: u64,
    /// Items expired past their TTL.
    pub(crate) items_expired: u64,
    /// Approximate bytes of user state (histories, user rows) held at the end.
    pub(crate) user_bytes: u64,
}

/// A worker's state in a checkpoint: the users it owns and its metrics.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub(crate) struct WorkerPart {
    pub(crate) worker: usize,
    pub(crate) users: Users,
    /// Per variant: user rows (`stride` values per user, in `users` order) and windows.
    pub(crate) variants: Vec<(Vec<f32>, BTreeMap<i64, Quality>)>,
    pub(crate) sampler_shortfalls: u64,
    /// Per variant: an ensemble's weights and accumulators on this worker, and its
    /// mixing trace (empty for other models).
    pub(crate) ensembles: Vec<(Vec<f32>, Vec<f32>, MixingTrace)>,
}

/// The state every worker shares (the replicated catalogue and samplers), taken from one.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub(crate) struct SharedPart {
    pub(crate) seen: u64,
    pub(crate) now_ms: i64,
    pub(crate) catalogue: ItemCatalogue,
    pub(crate) window_counts: Vec<u64>,
    pub(crate) samplers: Vec<AnySampler>,
    /// The events still inside the popularity window, by round: `(start of the round in
    /// event time (ms), [(item id, events)])`; empty unless a sampler reads popularity.
    pub(crate) window_log: Vec<(i64, Vec<(u64, u32)>)>,
    /// Per variant: the `itemknn` state, which every worker holds whole.
    pub(crate) knn: Vec<Option<crate::model::ItemKnn>>,
}

/// The events of the popularity window by round, so that a checkpoint can rebuild the
/// differential window (its pending retractions live in the dataflow, not in any state a
/// checkpoint can read) by replaying them.
#[derive(Debug)]
struct WindowLog {
    window_ticks: u64,
    clock: Clock,
    rounds: std::collections::VecDeque<(u64, rustc_hash::FxHashMap<u64, u32>)>,
}

/// The per-worker prequential learner.
pub(crate) struct Learner {
    worker: usize,
    peers: usize,
    protocol: Protocol,
    catalogue: ItemCatalogue,
    users: Users,
    variants: Vec<Variant>,
    /// Replay index of the next event.
    seen: u64,
    scores: Vec<f32>,
    negatives: Vec<Negative>,
    /// The items the sampler will most likely propose for the next owned event, whose
    /// rows the current step hints one by one (see [`Sampler::peek`]).
    ahead: Vec<u32>,
    /// What the hints looked up `PREFETCH_AHEAD` events ahead, by event index in the
    /// round modulo [`LOOKED_RING`]: for the nearer hint of where the item goes in the
    /// user's history, and so that the event itself need not look its ids up again.
    looked_ahead: [Looked; LOOKED_RING],
    sampler_shortfalls: u64,
    /// Windowed interaction counts by dense item, replicated from the differential
    /// popularity collection.
    window_counts: Vec<u64>,
    /// How long user and item state is kept.
    retention: StateConfig,
    /// The newest event time processed: the clock state ages are measured against.
    now_ms: i64,
    /// Set in a cluster of several processes: item-row changes are sent to the others.
    replication: Option<Replication>,
    /// Set when checkpoints must carry the popularity window.
    window_log: Option<WindowLog>,
    /// Events in the popularity window as the last round saw it (when a sampler reads
    /// popularity; the counts are final only after the end retracts everything).
    window_events: Option<u64>,
    /// Set when deltas are published: who was removed since the last publication, to
    /// be tombstoned.
    removed: Option<Removed>,
}

/// Users evicted (this worker's) and items expired (tracked by the worker that publishes
/// items) since the last publication.
#[derive(Debug, Default)]
struct Removed {
    users: Vec<u64>,
    items: Option<Vec<u64>>,
}

impl Learner {
    /// `tables[v]` is the process-wide item table of variant `v` (for learned models).
    pub(crate) fn new(
        worker: usize,
        peers: usize,
        protocol: Protocol,
        seed: u64,
        variants: &[VariantConfig],
        tables: &[Option<Arc<ItemTable>>],
        retention: StateConfig,
    ) -> Self {
        let index_of = |name: &String| variants.iter().position(|o| &o.name == name);
        let mixed_in: Vec<bool> = variants
            .iter()
            .map(|v| {
                variants.iter().any(|o| {
                    o.model.kind == crate::config::ModelKind::Ensemble
                        && o.model.ensemble.components.contains(&v.name)
                })
            })
            .collect();
        let variants = variants
            .iter()
            .zip(tables)
            .enumerate()
            .map(|(v, (cfg, table))| Variant {
                name: cfg.name.clone(),
                // Configurations are validated first: every component names a variant.
                model: Model::new(
                    &cfg.model,
                    seed,
                    table.clone(),
                    cfg.model
                        .ensemble
                        .components
                        .iter()
                        .filter_map(index_of)
                        .collect(),
                ),
                // Specs are validated with the configuration; uniform is the safe fallback.
                sampler: SamplerSpec::parse(&cfg.model.sampler)
                    .map(|s| s.build())
                    .unwrap_or(AnySampler::Uniform(tidepool_samplers::Uniform)),
                negatives: cfg.model.negatives,
                rng: Xoshiro256PlusPlus::seed_from_u64(splitmix64(
                    seed ^ splitmix64(((v as u64) << 32) | worker as u64),
                )),
                current: (0, Quality::default()),
                windows: Series::default(),
                live: Quality::default(),
                mixed_in: mixed_in[v],
                dense: Vec::new(),
                mixing: WeightTrace::default(),
            })
            .collect();
        Self {
            worker,
            peers,
            protocol,
            catalogue: ItemCatalogue::default(),
            users: Users::default(),
            variants,
            seen: 0,
            scores: Vec::new(),
            negatives: Vec::new(),
            ahead: Vec::new(),
            looked_ahead: [Looked::default(); LOOKED_RING],
            sampler_shortfalls: 0,
            window_counts: Vec::new(),
            retention,
            now_ms: i64::MIN,
            replication: None,
            window_log: None,
            window_events: None,
            removed: None,
        }
    }

    /// Records removals for tombstones: users always, items when this worker publishes
    /// them.
    pub(crate) fn track_removals(&mut self, items: bool) {
        self.removed = Some(Removed {
            users: Vec::new(),
            items: items.then(Vec::new),
        });
        if items {
            for v in &mut self.variants {
                if let Some(knn) = v.model.knn_mut() {
                    knn.track_changes();
                }
            }
        }
    }

    /// Keeps the events of the last `window_ticks` rounds for checkpoints.
    pub(crate) fn keep_window(&mut self, window_ticks: u64, clock: Clock) {
        self.window_log = Some(WindowLog {
            window_ticks,
            clock,
            rounds: Default::default(),
        });
    }

    /// What a restored run feeds into its popularity window: `(item, round, events)` for
    /// the rounds of `shared`'s window log, in this run's rounds.
    pub(crate) fn window_replay(shared: &SharedPart, clock: Clock) -> Vec<(u64, u64, isize)> {
        shared
            .window_log
            .iter()
            .flat_map(|(start_ms, items)| {
                let tick = clock.tick(*start_ms);
                items.iter().map(move |&(item, n)| (item, tick, n as isize))
            })
            .collect()
    }

    /// Makes this learner one of a cluster's: its item-row changes are recorded for
    /// [`Learner::take_row_changes`] (see [`crate::cluster`]).
    pub(crate) fn replicate(&mut self, replication: Replication) {
        if replication.processes < 2 {
            return;
        }
        self.replication = Some(replication);
        for v in &mut self.variants {
            if let Some(m) = v.model.bpr_mut() {
                m.record_item_changes();
            }
        }
    }

    /// The item-row changes this worker made since the last call, batched per target
    /// worker in the other processes.
    pub(crate) fn take_row_changes(&mut self) -> Vec<RowBatch> {
        let Some(replication) = self.replication else {
            return Vec::new();
        };
        let mut out: BTreeMap<(usize, u32), RowBatch> = BTreeMap::new();
        for (v, variant) in self.variants.iter_mut().enumerate() {
            let Some(m) = variant.model.bpr_mut() else {
                continue;
            };
            let (changes, stride) = m.take_item_changes();
            for (item, delta) in changes {
                for target in replication.targets(item) {
                    let batch = out.entry((target, v as u32)).or_insert_with(|| RowBatch {
                        target: target as u64,
                        variant: v as u32,
                        items: Vec::new(),
                        values: Vec::with_capacity(stride),
                    });
                    batch.items.push(item);
                    batch.values.extend_from_slice(&delta);
                }
            }
        }
        out.into_values().collect()
    }

    /// Adds another process's item-row changes to this process's replica. Expired items
    /// are skipped: they are never read again (and their storage may be released).
    pub(crate) fn apply_rows(&mut self, batch: &RowBatch) {
        let alive = self.catalogue.alive();
        let Some(m) = self
            .variants
            .get_mut(batch.variant as usize)
            .and_then(|v| v.model.bpr_mut())
        else {
            return;
        };
        let stride = batch.values.len() / batch.items.len().max(1);
        for (item, delta) in batch.items.iter().zip(batch.values.chunks_exact(stride)) {
            // An item this replica has not reached yet is alive: its row initialises
            // deterministically and takes the change.
            if alive.get(*item as usize).is_some_and(|a| !a) {
                continue;
            }
            m.add_to_item(*item, delta);
        }
    }

    /// One worker's share of a compaction cycle: evicts users and expires items idle
    /// past their TTL (measured from the newest event time processed) and releases the
    /// memory they held. Every worker runs it between the same two rounds, so the
    /// catalogue replicas expire the same items.
    pub(crate) fn compact(&mut self) -> Freed {
        let mut freed = Freed::default();
        if self.now_ms == i64::MIN {
            return freed;
        }
        if let Some(ttl) = self.retention.user_ttl_ms {
            let evicted = self.removed.as_mut().map(|r| &mut r.users);
            if let Some((remap, history)) = self
                .users
                .evict_before(self.now_ms.saturating_sub(ttl), evicted)
            {
                freed.history += history;
                for v in &mut self.variants {
                    freed.embeddings += v.model.remap_users(&remap);
                }
            }
        }
        if let Some(ttl) = self.retention.item_ttl_ms {
            if self.catalogue.expire_before(
                self.now_ms.saturating_sub(ttl),
                self.removed.as_mut().and_then(|r| r.items.as_mut()),
            ) > 0
            {
                for v in &mut self.variants {
                    freed.embeddings += v.model.release_items(self.catalogue.alive());
                }
            }
        }
        let user_cutoff = self
            .retention
            .user_ttl_ms
            .map(|ttl| self.now_ms.saturating_sub(ttl));
        for v in &mut self.variants {
            if let Some(knn) = v.model.knn_mut() {
                freed.cooccurrence += knn.compact(self.catalogue.alive(), user_cutoff);
            }
        }
        freed
    }

    /// This worker's part of a checkpoint.
    pub(crate) fn part(&self) -> WorkerPart {
        WorkerPart {
            worker: self.worker,
            users: self.users.clone(),
            variants: self
                .variants
                .iter()
                .map(|v| {
                    let mut windows = v.windows.to_map();
                    let (w, q) = &v.current;
                    if *q != Quality::default() {
                        windows.entry(*w).or_default().merge(q);
                    }
                    (v.model.user_rows().to_vec(), windows)
                })
                .collect(),
            sampler_shortfalls: self.sampler_shortfalls,
            ensembles: self
                .variants
                .iter()
                .map(|v| match &v.model {
                    Model::Ensemble(e) => (
                        e.weights().to_vec(),
                        e.accumulators().to_vec(),
                        v.mixing.to_map(),
                    ),
                    _ => Default::default(),
                })
                .collect(),
        }
    }

    /// The replicated state, identical on every worker.
    pub(crate) fn shared(&self) -> SharedPart {
        SharedPart {
            seen: self.seen,
            now_ms: self.now_ms,
            catalogue: self.catalogue.clone(),
            window_counts: self.window_counts.clone(),
            samplers: self.variants.iter().map(|v| v.sampler.clone()).collect(),
            window_log: self
                .window_log
                .as_ref()
                .map(|log| {
                    log.rounds
                        .iter()
                        .map(|(tick, items)| {
                            let start = log.clock.origin_ms + *tick as i64 * log.clock.tick_ms;
                            let mut items: Vec<(u64, u32)> =
                                items.iter().map(|(&i, &n)| (i, n)).collect();
                            items.sort_unstable();
                            (start, items)
                        })
                        .collect()
                })
                .unwrap_or_default(),
            knn: self
                .variants
                .iter()
                .map(|v| v.model.knn().cloned())
                .collect(),
        }
    }

    /// Restores a checkpoint written by any number of workers: the shared state, the
    /// users of every part that this worker owns now, and the metrics of the parts
    /// `w` with `w % peers == worker` (so the totals add up once).
    pub(crate) fn restore(&mut self, shared: &SharedPart, parts: Vec<WorkerPart>, seed: u64) {
        self.seen = shared.seen;
        self.now_ms = shared.now_ms;
        self.catalogue = shared.catalogue.clone();
        // A checkpoint with a window log rebuilds the counts through the dataflow (the
        // replay's changes arrive before the first round); counting them here as well
        // would double them.
        self.window_counts = if shared.window_log.is_empty() {
            shared.window_counts.clone()
        } else {
            vec![0; shared.window_counts.len()]
        };
        for (v, knn) in self.variants.iter_mut().zip(&shared.knn) {
            if let (Some(mine), Some(saved)) = (v.model.knn_mut(), knn) {
                let tracking = mine.tracks_changes();
                *mine = saved.clone();
                if tracking {
                    mine.track_changes();
                }
            }
        }
        // Each worker takes the weights its namesake had (or worker 0's when the cluster
        // grew): weights are per worker, and any of them is a trained mix.
        if let Some(part) = parts
            .iter()
            .find(|p| p.worker == self.worker)
            .or_else(|| parts.iter().find(|p| p.worker == 0))
        {
            for (v, (weights, acc, _)) in self.variants.iter_mut().zip(&part.ensembles) {
                if let Model::Ensemble(e) = &mut v.model {
                    e.set_weights(weights, acc);
                }
            }
        }
        for (v, sampler) in self.variants.iter_mut().zip(&shared.samplers) {
            v.sampler = sampler.clone();
            // A fresh stream per restart: negatives need not repeat the lost run's.
            v.rng = Xoshiro256PlusPlus::seed_from_u64(splitmix64(
                seed ^ splitmix64(shared.seen ^ ((self.worker as u64) << 48)),
            ));
        }
        for mut part in parts {
            let (worker, peers) = (self.worker, self.peers);
            let remap = part.users.retain(|id| owner(id, peers) == worker);
            let mine_metrics = part.worker % peers == worker;
            for (v, (rows, windows)) in self.variants.iter_mut().zip(&part.variants) {
                let stride = rows.len().checked_div(remap.len()).unwrap_or(0);
                for (old, new) in remap.iter().enumerate() {
                    if new.is_some() && stride > 0 {
                        v.model
                            .extend_user_rows(&rows[old * stride..(old + 1) * stride]);
                    }
                }
                if mine_metrics {
                    for (w, q) in windows {
                        v.windows.entry(*w).merge(q);
                    }
                }
            }
            if mine_metrics {
                for (v, (_, _, trace)) in self.variants.iter_mut().zip(&part.ensembles) {
                    v.mixing.merge(trace);
                }
            }
            if mine_metrics {
                self.sampler_shortfalls += part.sampler_shortfalls;
                self.users.add_evicted(part.users.evicted());
            }
            self.users.absorb(part.users);
        }
    }

    /// The `k` best items for `user` under variant `variant`, with the evaluator's
    /// scoring and tie rule (earlier first appearance wins), the user's known items and
    /// expired items left out. `None` when the user is not held (never seen, or evicted).
    pub(crate) fn top_k(&mut self, variant: usize, user: u64, k: usize) -> Option<Vec<(u64, f32)>> {
        let dense = self.users.lookup(user)?;
        let mut scores = Vec::new();
        let components = match &self.variants.get(variant)?.model {
            Model::Ensemble(e) => e.components.clone(),
            _ => vec![variant],
        };
        for &c in &components {
            let v = &mut self.variants[c];
            v.model
                .score_all(dense, user, &self.catalogue, &mut v.dense);
        }
        match std::mem::replace(&mut self.variants[variant].model, Model::MostPop) {
            Model::Ensemble(mut e) => {
                let slices: Vec<&[f32]> = components
                    .iter()
                    .map(|&c| self.variants[c].dense.as_slice())
                    .collect();
                e.mix(&slices, self.catalogue.alive());
                scores.extend_from_slice(e.mixed());
                self.variants[variant].model = Model::Ensemble(e);
            }
            model => {
                self.variants[variant].model = model;
                scores = std::mem::take(&mut self.variants[variant].dense);
            }
        }
        let history = self.users.history(dense);
        let mut ranked: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let i = *i as u32;
                s.is_finite() && self.catalogue.is_alive(i) && !history.contains(i)
            })
            .map(|(i, s)| (i as u32, *s))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(k);
        Some(
            ranked
                .into_iter()
                .map(|(i, s)| (self.catalogue.id(i), s))
                .collect(),
        )
    }

    /// Rows changed since the last call: this worker's users, and (when `items`) the
    /// shared item tables, which one worker publishes for all.
    pub(crate) fn take_deltas(&mut self, checkpoint: u64, items: bool) -> Vec<ModelDelta> {
        let mut out = Vec::new();
        let removed = self.removed.as_mut().map(|r| {
            (
                std::mem::take(&mut r.users),
                r.items.as_mut().map(std::mem::take).unwrap_or_default(),
            )
        });
        for v in &mut self.variants {
            if let (Some(knn), true) = (v.model.knn_mut(), items) {
                // The lists are replicated: the worker that publishes items publishes them.
                for (item, entries) in knn.take_dirty() {
                    if !self.catalogue.is_alive(item) {
                        continue;
                    }
                    out.push(ModelDelta {
                        variant: v.name.clone(),
                        entity: Entity::Item,
                        id: self.catalogue.id(item),
                        neighbours: entries.iter().map(|&(j, _)| self.catalogue.id(j)).collect(),
                        vector: entries.iter().map(|&(_, w)| w).collect(),
                        bias: None,
                        checkpoint,
                        deleted: false,
                    });
                }
                if let Some((_, items)) = &removed {
                    out.extend(
                        items
                            .iter()
                            .map(|&i| ModelDelta::tombstone(&v.name, Entity::Item, i, checkpoint)),
                    );
                }
                continue;
            }
            let Model::Bpr(m) = &mut v.model else {
                continue;
            };
            // Tombstones first: a user evicted and seen again since is dirty, and its
            // new row must come after (last value wins).
            if let Some((users, items)) = &removed {
                out.extend(
                    users
                        .iter()
                        .map(|&u| ModelDelta::tombstone(&v.name, Entity::User, u, checkpoint)),
                );
                out.extend(
                    items
                        .iter()
                        .map(|&i| ModelDelta::tombstone(&v.name, Entity::Item, i, checkpoint)),
                );
            }
            for (dense, vector) in m.take_dirty_users() {
                out.push(ModelDelta {
                    variant: v.name.clone(),
                    entity: Entity::User,
                    id: self.users.id(dense),
                    vector,
                    neighbours: Vec::new(),
                    bias: None,
                    checkpoint,
                    deleted: false,
                });
            }
            if items {
                let bias = m.has_item_bias();
                for (dense, vector, b) in m.table().take_dirty(self.catalogue.len()) {
                    if !self.catalogue.is_alive(dense) {
                        continue;
                    }
                    out.push(ModelDelta {
                        variant: v.name.clone(),
                        entity: Entity::Item,
                        id: self.catalogue.id(dense),
                        vector,
                        neighbours: Vec::new(),
                        bias: bias.then_some(b),
                        checkpoint,
                        deleted: false,
                    });
                }
            }
        }
        out
    }

    /// Heap bytes of this worker's replicas of `itemknn` state.
    pub(crate) fn knn_bytes(&self) -> u64 {
        self.variants
            .iter()
            .filter_map(|v| v.model.knn())
            .map(|m| m.bytes())
            .sum()
    }

    /// Approximate heap bytes of this worker's user state (histories and user rows).
    pub(crate) fn user_bytes(&self) -> u64 {
        self.users.bytes()
            + self
                .variants
                .iter()
                .map(|v| v.model.user_bytes())
                .sum::<u64>()
    }

    /// Applies changes of the windowed counts (all of them at times before the round
    /// about to be processed).
    pub(crate) fn apply_counts(&mut self, changes: &mut [CountChange]) {
        // Per item and time, the retraction of the old count comes before the new one.
        changes.sort_unstable_by_key(|&((item, _), time, diff)| (item, time, diff));
        for &((item, count), _, diff) in changes.iter() {
            let Some(dense) = self.catalogue.lookup(item) else {
                continue;
            };
            let dense = dense as usize;
            if dense >= self.window_counts.len() {
                self.window_counts.resize(dense + 1, 0);
            }
            let count = count.max(0) as u64;
            if diff > 0 {
                self.window_counts[dense] = count;
            } else if self.window_counts[dense] == count {
                self.window_counts[dense] = 0;
            }
        }
    }

    /// Processes one round (all events of one timely time, from every worker). Returns
    /// how many of them this worker owned.
    pub(crate) fn process_round(&mut self, time: u64, events: &mut [Event]) -> u64 {
        // A round from one sorted source arrives in order; checking is linear, sorting not.
        if !events.is_sorted_by_key(Event::key) {
            events.sort_unstable_by_key(Event::key);
        }
        if let Some(log) = &mut self.window_log {
            // Rounds whose retraction has happened by now are out of the window.
            while log
                .rounds
                .front()
                .is_some_and(|(t, _)| t + log.window_ticks <= time)
            {
                log.rounds.pop_front();
            }
            if !events.is_empty() {
                let mut items = rustc_hash::FxHashMap::default();
                for e in events.iter() {
                    *items.entry(e.item).or_insert(0u32) += 1;
                }
                log.rounds.push_back((time, items));
            }
        }
        if let Some(first) = events.first() {
            self.window_counts.resize(self.catalogue.len(), 0);
            if self
                .variants
                .iter()
                .any(|v| v.sampler.needs_window_counts())
            {
                self.window_events = Some(self.window_counts.iter().sum());
            }
            let live = Refresh {
                window_counts: &self.window_counts,
                now_ms: first.ts,
            };
            self.variants
                .iter_mut()
                .for_each(|v| v.sampler.refresh(&live));
        }
        let mut owned = 0;
        // Dense indices hold within a round (only compaction, between rounds, moves
        // them); what an earlier round looked up is not this round's.
        self.looked_ahead = [Looked::default(); LOOKED_RING];
        for (i, event) in events.iter().enumerate() {
            self.prefetch(events, i);
            let index = self.seen;
            self.seen += 1;
            self.now_ms = self.now_ms.max(event.ts);
            let looked = self.looked_ahead[i % LOOKED_RING];
            if owner(event.user, self.peers) == self.worker {
                owned += 1;
                self.learn(event, index, looked);
            } else {
                let item = match looked.item {
                    Some(d) => self.catalogue.observe_known(d, event.ts),
                    None => self.catalogue.observe(event.item, event.ts),
                };
                for v in &mut self.variants {
                    v.sampler.observe(item, event.ts);
                    v.model.observe(event.user, item, event.ts);
                }
            }
        }
        owned
    }

    /// Hints what later events will touch, in stages, so that each stage's reads find
    /// what the stage before hinted in cache instead of stalling on a chain of misses:
    /// `2 * PREFETCH_AHEAD` events ahead the id index slots; `PREFETCH_AHEAD` ahead
    /// (looked up now) the user's and item's rows, the line holding where the user's
    /// history lies and its filter, and the item's counters; `PREFETCH_AHEAD / 2` ahead
    /// the history slot the item goes into. Negatives need no more of the history: the
    /// filter rules out most of them (see `history`). Only for events this worker owns,
    /// except the item's index slot and counters, which every worker's catalogue updates.
    #[inline]
    fn prefetch(&mut self, events: &[Event], i: usize) {
        if let Some(far) = events.get(i + 2 * PREFETCH_AHEAD) {
            self.catalogue.prefetch(far.item);
            if owner(far.user, self.peers) == self.worker {
                self.users.prefetch(far.user);
            }
        }
        if let Some(mid) = events.get(i + PREFETCH_AHEAD) {
            // Every worker counts every event's item.
            let item = self.catalogue.lookup(mid.item);
            if let Some(d) = item {
                self.catalogue.prefetch_counters(d);
            }
            let mut user = None;
            if owner(mid.user, self.peers) == self.worker {
                user = self.users.lookup(mid.user);
                if let Some(u) = user {
                    self.users.prefetch_history(u);
                }
                for v in &mut self.variants {
                    if let Some(m) = v.model.bpr_mut() {
                        m.prefetch(user, item);
                    }
                }
            }
            self.looked_ahead[(i + PREFETCH_AHEAD) % LOOKED_RING] = Looked { user, item };
        }
        if let Looked {
            user: Some(u),
            item: Some(d),
        } = self.looked_ahead[(i + PREFETCH_AHEAD / 2) % LOOKED_RING]
        {
            self.users.prefetch_history_slot(u, d);
        }
    }

    /// Score (if due), then train on one owned event; `looked` is what the hints found
    /// of its ids.
    fn learn(&mut self, event: &Event, index: u64, looked: Looked) {
        let user = match looked.user {
            Some(u) => self.users.touch(u, event.ts),
            None => self.users.get_or_insert(event.user, event.ts),
        };
        let window = self.protocol.window(event.ts);
        let scored = self.protocol.scores(index);
        let target = looked.item.or_else(|| self.catalogue.lookup(event.item));
        let warmup = self.protocol.warmup;
        let mixing = target.is_some()
            && self.variants.iter().any(|v| match &v.model {
                Model::Ensemble(e) => scored || e.learns(index, warmup),
                _ => false,
            });
        for v in &mut self.variants {
            v.model.ensure_user(user, event.user);
        }
        // Ensembles read their components' dense scores of this event, before training.
        if let (true, Some(t)) = (mixing, target) {
            for v in self.variants.iter_mut().filter(|v| v.mixed_in) {
                v.model
                    .score_all(user, event.user, &self.catalogue, &mut v.dense);
                debug_assert!(v.dense.len() > t as usize);
            }
        }
        let k = self.protocol.k;
        for e in 0..self.variants.len() {
            let rank = match (&self.variants[e].model, target) {
                (Model::Ensemble(_), Some(t)) if mixing => {
                    self.mix(e, index, window, t, user, scored)
                }
                (Model::Ensemble(_), _) => None,
                (_, Some(t)) if scored => {
                    let history = self.users.history(user);
                    let v = &mut self.variants[e];
                    // A factor model's dense scores for an ensemble serve its own rank.
                    Some(if mixing && v.mixed_in && v.model.bpr_mut().is_some() {
                        rank_of(&v.dense, t, history.iter())
                    } else {
                        v.model.rank(
                            user,
                            event.user,
                            t,
                            &self.catalogue,
                            history,
                            &mut self.scores,
                        )
                    })
                }
                _ => None,
            };
            self.variants[e].record(window, |q| {
                q.events += 1;
                if scored {
                    q.record_rank(rank, k);
                }
            });
        }

        let item = match target {
            Some(d) => self.catalogue.observe_known(d, event.ts),
            None => self.catalogue.observe(event.item, event.ts),
        };
        let candidates = self.catalogue.live();
        for v in &mut self.variants {
            self.negatives.clear();
            self.ahead.clear();
            v.sampler.observe(item, event.ts);
            if v.model.wants_negatives() {
                let exclusion = Excluding {
                    history: self.users.history(user),
                    positive: item,
                    catalogue: &self.catalogue,
                };
                let Variant {
                    model,
                    sampler,
                    rng,
                    negatives,
                    ..
                } = v;
                let drawn = sampler.sample(
                    &self.catalogue,
                    &exclusion,
                    *negatives,
                    rng,
                    &mut |candidate| model.score(user, candidate),
                    &mut self.negatives,
                );
                if drawn < *negatives {
                    self.sampler_shortfalls += 1;
                }
                sampler.peek(self.catalogue.len(), *negatives, rng, &mut self.ahead);
            }
            let loss = v
                .model
                .train(user, item, &self.negatives, &self.ahead, candidates);
            v.model.observe(event.user, item, event.ts);
            let pairs = self.negatives.len() as u64;
            if pairs > 0 {
                v.record(window, |q| {
                    q.pairs += pairs;
                    q.loss_sum += loss;
                });
            }
        }
        self.users.remember(user, item);
    }

    /// Ensemble `e` on a scoring or learning event: mixes its components' dense scores,
    /// ranks the target when the event is scored, and learns when it is a learning event.
    fn mix(
        &mut self,
        e: usize,
        index: u64,
        window: i64,
        target: u32,
        user: u32,
        scored: bool,
    ) -> Option<u64> {
        let Model::Ensemble(mut ens) =
            std::mem::replace(&mut self.variants[e].model, Model::MostPop)
        else {
            return None;
        };
        let history = self.users.history(user);
        // The components' score slices, on the stack for the usual few components: this
        // runs for every scored event, which must not allocate.
        let mut on_stack: [&[f32]; crate::model::MAX_COMPONENTS] =
            [&[]; crate::model::MAX_COMPONENTS];
        let on_heap: Vec<&[f32]>;
        let scores: &[&[f32]] = if ens.components.len() <= on_stack.len() {
            for (slot, &c) in on_stack.iter_mut().zip(&ens.components) {
                *slot = self.variants[c].dense.as_slice();
            }
            &on_stack[..ens.components.len()]
        } else {
            on_heap = ens
                .components
                .iter()
                .map(|&c| self.variants[c].dense.as_slice())
                .collect();
            &on_heap
        };
        ens.mix(scores, self.catalogue.alive());
        let rank = scored.then(|| rank_of(ens.mixed(), target, history.iter()));
        let learned = ens
            .learns(index, self.protocol.warmup)
            .then(|| ens.learn(scores, target, history, self.protocol.k));
        let v = &mut self.variants[e];
        if let Some(loss) = learned {
            v.trace_weights(window, ens.weights());
            v.record(window, |q| {
                q.pairs += 1;
                q.loss_sum += loss;
            });
        }
        v.model = Model::Ensemble(ens);
        rank
    }

    /// Each ensemble's current weights, by variant index (a call per ensemble: this runs
    /// every round, which must not allocate).
    pub(crate) fn each_weights(&self, mut f: impl FnMut(usize, &[f32])) {
        for (i, v) in self.variants.iter().enumerate() {
            if let Model::Ensemble(e) = &v.model {
                f(i, e.weights());
            }
        }
    }

    /// Each variant's counters since the last call, into `out` (cleared first; its
    /// capacity is reused round after round).
    pub(crate) fn take_live(&mut self, out: &mut Vec<Quality>) {
        out.clear();
        out.extend(
            self.variants
                .iter_mut()
                .map(|v| std::mem::take(&mut v.live)),
        );
    }

    pub(crate) fn finish(mut self) -> WorkerResult {
        let mixing = self
            .variants
            .iter_mut()
            .map(|v| v.mixing.to_map())
            .collect();
        WorkerResult {
            window_events: self.window_events.unwrap_or(0),
            user_bytes: self.user_bytes(),
            knn_bytes: self.knn_bytes(),
            mixing,
            variants: self.variants.into_iter().map(Variant::finish).collect(),
            sampler_shortfalls: self.sampler_shortfalls,
            users: self.users.len() as u64,
            items: self.catalogue.live() as u64,
            users_evicted: self.users.evicted(),
            items_expired: self.catalogue.expired() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, ModelKind};
    use tidepool_pipeline::EventType;

    fn ev(ts: i64, user: u64, item: u64) -> Event {
        Event {
            ts,
            pos: ts as u64,
            user,
            item,
            weight: 1.0,
            kind: EventType::View,
        }
    }

    fn mostpop() -> Vec<VariantConfig> {
        vec![VariantConfig {
            name: "mostpop".into(),
            model: ModelConfig {
                kind: ModelKind::Mostpop,
                ..ModelConfig::default()
            },
        }]
    }

    #[test]
    fn protocol_scores_every_nth_after_warmup() {
        let p = Protocol {
            warmup: 3,
            eval_every: 2,
            k: 10,
            window_ms: 10,
            origin_ms: 0,
        };
        let scored: Vec<u64> = (0..9).filter(|&i| p.scores(i)).collect();
        assert_eq!(scored, vec![3, 5, 7]);
        assert_eq!(p.window(25), 2);
        assert_eq!(auto_window(0), 60_000);
        assert_eq!(auto_window(100 * 24 * 3_600_000), 24 * 3_600_000);
    }

    #[test]
    fn mostpop_scores_before_it_counts() {
        let p = Protocol {
            warmup: 0,
            eval_every: 1,
            k: 1,
            window_ms: 1000,
            origin_ms: 0,
        };
        let mut learner = Learner::new(0, 1, p, 1, &mostpop(), &[None], StateConfig::default());
        // Item 10 twice, item 20 once; then user 3 sees item 10 (rank 0: hit) and
        // user 4 sees item 30 (never seen: miss).
        let mut events = vec![
            ev(1, 1, 10),
            ev(2, 2, 10),
            ev(3, 1, 20),
            ev(4, 3, 10),
            ev(5, 4, 30),
        ];
        assert_eq!(learner.process_round(0, &mut events), 5);
        let result = learner.finish();
        let q = result.variants[0].1;
        assert_eq!(q.scored, 5);
        // ev1: item 10 unseen -> miss; ev2: user 2, candidates {10} -> hit;
        // ev3: user 1 history {10}, 20 unseen -> miss; ev4: user 3, 10 first -> hit;
        // ev5: unseen -> miss.
        assert_eq!(q.hits, 2);
        assert_eq!(result.items, 3);
    }

    #[test]
    fn workers_split_users_but_agree_on_the_catalogue() {
        let p = Protocol {
            warmup: 2,
            eval_every: 1,
            k: 2,
            window_ms: 1000,
            origin_ms: 0,
        };
        let events: Vec<Event> = (0..200)
            .map(|i| ev(i, (i * 7 % 13) as u64, (i * i % 17) as u64))
            .collect();
        let mut one = Learner::new(0, 1, p, 1, &mostpop(), &[None], StateConfig::default());
        one.process_round(0, &mut events.clone());
        let single = one.finish().variants[0].1;
        let mut merged = Quality::default();
        for w in 0..3 {
            let mut l = Learner::new(w, 3, p, 1, &mostpop(), &[None], StateConfig::default());
            // Two rounds, shuffled inside: the learner sorts.
            let mut a: Vec<Event> = events[..90].iter().rev().copied().collect();
            let mut b: Vec<Event> = events[90..].to_vec();
            l.process_round(0, &mut a);
            l.process_round(1, &mut b);
            merged.merge(&l.finish().variants[0].1);
        }
        // Rank metrics are fixed-point sums: exact whatever the split.
        assert_eq!(merged, single);
        assert_eq!(single.events, 200);
        assert_eq!(single.scored, 198);
    }
}
