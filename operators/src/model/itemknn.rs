//! `itemknn`: streaming item-to-item co-occurrence over each user's recent sequence,
//! scored by asymmetric cosine (the sequence-aware neighbourhood models of the
//! session-based literature: SKNN, sequential rules; Ludewig & Jannach 2018).
//!
//! ## The model
//! When user u's event on item i arrives, each of u's last `history` items h at sequence
//! distance d (1 for the previous event) adds `pair_decay^(d-1)` to co(h -> i) and
//! `back * pair_decay^(d-1)` to co(i -> h); `count_i` grows by one. The score of a
//! candidate j for u is
//! `sum over u's last items h (k = 0 for the newest) of decay^k * co(h, j) / (count_h^alpha * count_j^(1-alpha))`.
//! With a `half_life`, every increment is weighted by `2^(t / half_life)` of its event
//! time: old co-occurrence fades relative to new. Because co-occurrences and counts fade
//! together and the score is a ratio, this is kept as one global inflation factor instead
//! of per-entry timestamps; values are renormalised before the factor could overflow.
//!
//! ## Bounded state, and why compaction never changes a score
//! A neighbour list holds at most `neighbours * 3/2` entries; when it overflows it is
//! pruned, on the insert that overflowed it, to the `neighbours` entries with the largest
//! co-occurrence weight (ties: the earlier item). Pruning by weight rather than by the
//! normalised contribution measured better on ml-latest-small (recall@10 0.069 against
//! 0.047 at 50 neighbours): a young entry of a rare item, which the normalisation
//! favours, displaced established ones before they could prove themselves. An entry whose
//! faded weight is below [`FLOOR`] counts as absent, both when scoring and when it is
//! incremented (it restarts from the increment). The heap-ratio GC cycle
//! ([`ItemKnn::compact`]) physically removes such entries, the lists of expired items
//! and entries pointing at them, and gives surplus capacity back. All of that is
//! invisible to scores, so *when* a cycle runs (it is triggered by the heap, i.e. by
//! timing) never changes a metric; pruning, which does, happens at fixed points of the
//! replay.
//!
//! ## Replicated, not partitioned
//! Every worker of every process sees every event in the same replay order (the stream
//! is broadcast, see `crate::learner`), and each keeps a full replica of this state: the
//! recent sequence of *every* user and every neighbour list. Scoring an event needs the
//! state exactly as it was just before that event, built from all earlier events of all
//! users; a partitioned state would have to be consulted across workers once per scored
//! event and would make the result depend on message timing. A replica costs memory per
//! worker but makes the state a pure function of the replay order, so metrics are
//! identical bit for bit on any number of workers and processes. Only scoring (of the
//! events whose user a worker owns) is split.

use super::knn_lists::Lists;
use crate::history::History;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::config::KnnConfig;

/// Faded weights below this count as absent (a co-occurrence worth a thousandth of one
/// adjacent pair).
pub(crate) const FLOOR: f32 = 1e-3;

/// Renormalise once the inflation factor passes this: counts then stay far below
/// `f32::MAX` even after 10^15 increments at the factor.
const MAX_INFLATION: f64 = 1e15;

/// The recent sequences of every user, newest last, `history` slots per user.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct Sequences {
    index: FxHashMap<u64, u32>,
    ids: Vec<u64>,
    /// `history` slots per user, a ring: slot `(head + k) % history` is the k-th oldest.
    ring: Vec<u32>,
    head: Vec<u16>,
    len: Vec<u16>,
    last_seen: Vec<i64>,
    evicted: u64,
}

/// The co-occurrence state of one `itemknn` variant (one replica per worker).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct ItemKnn {
    cfg: KnnConfig,
    /// `pair_decay^d` for d in `0..history`.
    pair_pows: Vec<f32>,
    /// `decay^k` for k in `0..history`.
    recency_pows: Vec<f32>,
    /// One neighbour list per dense item, in an arena (see `knn_lists`).
    lists: Lists,
    /// Inflated interaction counts by dense item.
    counts: Vec<f32>,
    /// `counts^(1 - alpha)` by dense item, kept with the counts: scoring divides by it
    /// once per neighbour entry, and a power per entry would dominate the cost.
    norms: Vec<f32>,
    seqs: Sequences,
    /// Event time the inflation factor is measured from (ms).
    origin_ms: i64,
    /// Newest event time observed (ms).
    now_ms: i64,
    /// Lists changed since the last delta publication (dense item indices).
    #[serde(skip)]
    dirty: Option<Vec<bool>>,
    /// Scratch: sparse score accumulator, the items it touched, pruning keys.
    #[serde(skip)]
    acc: Vec<f32>,
    #[serde(skip)]
    touched: Vec<u32>,
    #[serde(skip)]
    prune: Vec<(f32, u32, u32)>,
}

impl ItemKnn {
    pub(crate) fn new(cfg: KnnConfig) -> Self {
        let pows = |base: f32| -> Vec<f32> {
            (0..cfg.history)
                .scan(1.0f32, |p, _| {
                    let out = *p;
                    *p *= base;
                    Some(out)
                })
                .collect()
        };
        Self {
            pair_pows: pows(cfg.pair_decay),
            recency_pows: pows(cfg.decay),
            cfg,
            lists: Lists::default(),
            counts: Vec::new(),
            norms: Vec::new(),
            seqs: Sequences::default(),
            origin_ms: i64::MIN,
            now_ms: i64::MIN,
            dirty: None,
            acc: Vec::new(),
            touched: Vec::new(),
            prune: Vec::new(),
        }
    }

    /// The weight of an increment made now, in the inflated units.
    #[inline]
    fn inflation(&self) -> f32 {
        match self.cfg.half_life_ms {
            None => 1.0,
            Some(hl) => (((self.now_ms - self.origin_ms) as f64) / hl as f64).exp2() as f32,
        }
    }

    /// Advances the clock; renormalises when the inflation factor grew too large.
    fn advance(&mut self, ts: i64) {
        if self.origin_ms == i64::MIN {
            self.origin_ms = ts;
        }
        self.now_ms = self.now_ms.max(ts);
        let Some(hl) = self.cfg.half_life_ms else {
            return;
        };
        let factor = (((self.now_ms - self.origin_ms) as f64) / hl as f64).exp2();
        if factor > MAX_INFLATION {
            let shrink = (1.0 / factor) as f32;
            self.lists.scale_weights(shrink);
            self.counts.iter_mut().for_each(|c| *c *= shrink);
            let one_minus = 1.0 - self.cfg.alpha;
            for (n, &c) in self.norms.iter_mut().zip(&self.counts) {
                *n = c.powf(one_minus);
            }
            self.origin_ms = self.now_ms;
        }
    }

    /// Starts recording which lists change, for delta publication.
    pub(crate) fn track_changes(&mut self) {
        self.dirty = Some(vec![false; self.lists.count()]);
    }

    /// Whether changes are recorded.
    pub(crate) fn tracks_changes(&self) -> bool {
        self.dirty.is_some()
    }

    /// Learns from user `user`'s event on dense item `item` at event time `ts`. Called for
    /// every event of the replay on every worker, after the event was scored.
    pub(crate) fn observe(&mut self, user: u64, item: u32, ts: i64) {
        self.advance(ts);
        let g = self.inflation();
        let n = item as usize + 1;
        if self.counts.len() < n {
            self.lists.ensure(n);
            self.counts.resize(n, 0.0);
            self.norms.resize(n, 0.0);
        }
        let slot = self.seqs.slot(user, ts, self.cfg.history);
        let h = self.cfg.history;
        let (head, len) = (self.seqs.head[slot] as usize, self.seqs.len[slot] as usize);
        let base = slot * h;
        let back = self.cfg.back;
        // The updates below walk a chain of dependent loads per list (header, index slot,
        // entry), each likely a cache miss; touching every list's chain first, in
        // independent loads, lets the core overlap those misses.
        let mut touched = 0u32;
        for d in 0..len {
            let prev = self.seqs.ring[base + (head + len - 1 - d) % h] as usize;
            touched ^= self.lists.peek(prev, item);
        }
        std::hint::black_box(touched);
        for d in 0..len {
            // Newest first: distance d + 1.
            let prev = self.seqs.ring[base + (head + len - 1 - d) % h];
            if prev == item {
                continue;
            }
            let w = self.pair_pows[d] * g;
            self.add(prev, item, w, g);
            if back > 0.0 {
                self.add(item, prev, back * w, g);
            }
        }
        self.counts[item as usize] += g;
        self.norms[item as usize] = self.counts[item as usize].powf(1.0 - self.cfg.alpha);
        self.seqs.push(slot, item, h);
    }

    /// Adds `w` to co(from -> to).
    #[inline]
    fn add(&mut self, from: u32, to: u32, w: f32, g: f32) {
        let list = from as usize;
        let floor = FLOOR * g;
        match self.lists.find(list, to) {
            Some(p) => {
                let old = &mut self.lists.entries_mut(list).1[p];
                *old = if *old < floor { w } else { *old + w };
            }
            None => {
                self.lists.push(list, to, w);
                if self.lists.len(list) > self.cfg.neighbours + self.cfg.neighbours / 2 {
                    self.prune(from, g);
                }
            }
        }
        if let Some(dirty) = &mut self.dirty {
            if dirty.len() <= from as usize {
                dirty.resize(from as usize + 1, false);
            }
            dirty[from as usize] = true;
        }
    }

    /// Handles an overflowing list of item `from`: entries faded below the floor are
    /// dropped first (they count as absent anyway); if more than the cap remain, the list
    /// is cut to the `neighbours` strongest. Deciding on the live entries only is what
    /// keeps a GC cycle, which drops faded entries at times of its own, from changing
    /// when and what this prunes.
    fn prune(&mut self, from: u32, g: f32) {
        let floor = FLOOR * g;
        let cap = self.cfg.neighbours + self.cfg.neighbours / 2;
        let list = from as usize;
        retain_pairs(&mut self.lists, list, |_, w| w >= floor);
        if self.lists.len(list) <= cap {
            return;
        }
        self.prune.clear();
        let (items, weights) = self.lists.entries_mut(list);
        for (p, (&j, &w)) in items.iter().zip(weights.iter()).enumerate() {
            self.prune.push((w, j, p as u32));
        }
        let keep = self.cfg.neighbours;
        // Strongest first; equal strength: the earlier item wins. A total order, so every
        // replica keeps the same entries whatever their physical order.
        self.prune
            .select_nth_unstable_by(keep, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.prune.truncate(keep);
        self.prune.sort_unstable_by_key(|e| e.2);
        for (k, &(_, _, p)) in self.prune.iter().enumerate() {
            items[k] = items[p as usize];
            weights[k] = weights[p as usize];
        }
        self.lists.truncate(list, keep);
    }

    /// Accumulates the scores of every item with a positive score for `user` into the
    /// scratch accumulator; returns the touched items (each once).
    fn accumulate(&mut self, user: u64, catalogue_len: usize) {
        if self.acc.len() < catalogue_len {
            self.acc.resize(catalogue_len, 0.0);
        }
        for &j in &self.touched {
            self.acc[j as usize] = 0.0;
        }
        self.touched.clear();
        let Some(&slot) = self.seqs.index.get(&user) else {
            return;
        };
        let slot = slot as usize;
        let h = self.cfg.history;
        let (head, len) = (self.seqs.head[slot] as usize, self.seqs.len[slot] as usize);
        let floor = FLOOR * self.inflation();
        let alpha = self.cfg.alpha;
        for k in 0..len {
            let prev = self.seqs.ring[slot * h + (head + len - 1 - k) % h] as usize;
            if prev >= self.lists.count() {
                continue;
            }
            let ch = self.counts[prev].powf(alpha);
            let wk = self.recency_pows[k] / ch;
            for (&j, &w) in self.lists.items(prev).iter().zip(self.lists.weights(prev)) {
                if w < floor {
                    continue;
                }
                let j = j as usize;
                if j >= catalogue_len {
                    continue;
                }
                let s = wk * w / self.norms[j];
                if self.acc[j] == 0.0 {
                    self.touched.push(j as u32);
                }
                self.acc[j] += s;
            }
        }
    }

    /// Rank of `target` for `user` under the evaluator's rule, in O(history x
    /// neighbours + history set): candidates without similarity tie at 0 and break by
    /// first appearance. `alive_before(t)` counts the live items with index below t.
    pub(crate) fn rank(
        &mut self,
        user: u64,
        target: u32,
        alive: &[bool],
        expired: usize,
        history: History<'_>,
    ) -> u64 {
        self.accumulate(user, alive.len());
        let t = target as usize;
        let st = self.acc.get(t).copied().unwrap_or(0.0);
        let is_candidate = |j: u32| -> bool {
            j != target && alive.get(j as usize).copied().unwrap_or(false) && !history.contains(j)
        };
        let mut rank = 0u64;
        for &j in &self.touched {
            if !is_candidate(j) {
                continue;
            }
            let s = self.acc[j as usize];
            if s > st || (s == st && j < target) {
                rank += 1;
            }
        }
        if st == 0.0 {
            // Every untouched live candidate that appeared before the target ties with it
            // and wins: the live items before it, minus those touched or in the history.
            let alive_before = if expired == 0 {
                t
            } else {
                alive[..t].iter().filter(|&&a| a).count()
            };
            let mut excluded = self
                .touched
                .iter()
                .filter(|&&j| (j as usize) < t && alive[j as usize])
                .count();
            excluded += history
                .iter()
                .filter(|&h| (h as usize) < t && alive[h as usize] && self.acc[h as usize] == 0.0)
                .count();
            rank += (alive_before - excluded) as u64;
        }
        rank
    }

    /// Dense scores for `user` over items `0..alive.len()` (expired: negative infinity).
    pub(crate) fn score_all(&mut self, user: u64, alive: &[bool], out: &mut Vec<f32>) {
        self.accumulate(user, alive.len());
        out.clear();
        out.extend(
            alive
                .iter()
                .map(|&a| if a { 0.0 } else { f32::NEG_INFINITY }),
        );
        for &j in &self.touched {
            if alive[j as usize] {
                out[j as usize] = self.acc[j as usize];
            }
        }
    }

    /// The user's recent items, oldest first (tests).
    #[cfg(test)]
    pub(crate) fn recent(&self, user: u64) -> Vec<u32> {
        let Some(&slot) = self.seqs.index.get(&user) else {
            return Vec::new();
        };
        let (slot, h) = (slot as usize, self.cfg.history);
        let (head, len) = (self.seqs.head[slot] as usize, self.seqs.len[slot] as usize);
        (0..len)
            .map(|k| self.seqs.ring[slot * h + (head + k) % h])
            .collect()
    }

    /// Whether the user has a recent sequence here.
    #[cfg(test)]
    pub(crate) fn knows(&self, user: u64) -> bool {
        self.seqs.index.contains_key(&user)
    }

    /// co(from -> to) as faded, floored weight relative to one fresh increment (tests).
    #[cfg(test)]
    pub(crate) fn co(&self, from: u32, to: u32) -> f32 {
        let g = self.inflation();
        let from = from as usize;
        self.lists
            .items(from)
            .iter()
            .position(|&j| j == to)
            .map(|p| self.lists.weights(from)[p])
            .filter(|&w| w >= FLOOR * g)
            .map_or(0.0, |w| w / g)
    }

    /// The interaction count of an item, faded, relative to one fresh event (tests).
    #[cfg(test)]
    pub(crate) fn count(&self, item: u32) -> f32 {
        self.counts.get(item as usize).copied().unwrap_or(0.0) / self.inflation()
    }

    /// Entries held in the neighbour list of `item` (tests).
    #[cfg(test)]
    pub(crate) fn list_len(&self, item: u32) -> usize {
        self.lists.len(item as usize)
    }

    /// One GC cycle's share: removes entries faded below the floor and entries of
    /// expired items, empties expired items' lists, evicts sequences of users idle since
    /// before `user_cutoff`, and returns surplus capacity. Scores are unchanged (see the
    /// module docs). Returns the bytes freed.
    pub(crate) fn compact(&mut self, alive: &[bool], user_cutoff: Option<i64>) -> u64 {
        let before = self.bytes();
        let floor = FLOOR * self.inflation();
        for list in 0..self.lists.count() {
            if !alive.get(list).copied().unwrap_or(true) {
                self.lists.clear(list);
                continue;
            }
            retain_pairs(&mut self.lists, list, |j, w| {
                w >= floor && alive.get(j as usize).copied().unwrap_or(true)
            });
        }
        // Every list in the smallest class that holds it; the old arena goes back.
        self.lists = std::mem::take(&mut self.lists).compacted();
        for (i, (c, n)) in self.counts.iter_mut().zip(&mut self.norms).enumerate() {
            if !alive.get(i).copied().unwrap_or(true) {
                *c = 0.0;
                *n = 0.0;
            }
        }
        if let Some(cutoff) = user_cutoff {
            self.seqs.evict_before(cutoff, self.cfg.history);
        }
        before.saturating_sub(self.bytes())
    }

    /// Heap bytes held (lists, counts, sequences).
    pub(crate) fn bytes(&self) -> u64 {
        self.lists.bytes()
            + ((self.counts.capacity() + self.norms.capacity()) * 4) as u64
            + self.seqs.bytes()
    }

    /// Neighbour lists changed since the last call, as `(item, [(neighbour, weight)])`
    /// with weights relative to one fresh increment, clearing the marks.
    pub(crate) fn take_dirty(&mut self) -> Vec<(u32, Vec<(u32, f32)>)> {
        let g = self.inflation();
        let floor = FLOOR * g;
        let Some(dirty) = &mut self.dirty else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, d) in dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                let mut entries: Vec<(u32, f32)> = self
                    .lists
                    .items(i)
                    .iter()
                    .zip(self.lists.weights(i))
                    .filter(|(_, &w)| w >= floor)
                    .map(|(&j, &w)| (j, w / g))
                    .collect();
                entries.sort_unstable_by_key(|e| e.0);
                out.push((i as u32, entries));
            }
        }
        out
    }

    /// Users held (with a recent sequence).
    #[cfg(test)]
    pub(crate) fn users(&self) -> usize {
        self.seqs.ids.len()
    }
}

/// Keeps the entries `keep(item, weight)` accepts in list `list`, in order.
fn retain_pairs(lists: &mut Lists, list: usize, keep: impl Fn(u32, f32) -> bool) {
    let (items, weights) = lists.entries_mut(list);
    let mut k = 0;
    for p in 0..items.len() {
        let (j, w) = (items[p], weights[p]);
        if keep(j, w) {
            items[k] = j;
            weights[k] = w;
            k += 1;
        }
    }
    lists.truncate(list, k);
}

impl Sequences {
    /// The slot of `user`, created on first sight.
    #[inline]
    fn slot(&mut self, user: u64, ts: i64, history: usize) -> usize {
        let next = self.ids.len() as u32;
        let slot = *self.index.entry(user).or_insert(next) as usize;
        if slot == next as usize {
            self.ids.push(user);
            self.ring.resize(self.ring.len() + history, 0);
            self.head.push(0);
            self.len.push(0);
            self.last_seen.push(ts);
        }
        self.last_seen[slot] = self.last_seen[slot].max(ts);
        slot
    }

    #[inline]
    fn push(&mut self, slot: usize, item: u32, history: usize) {
        let (head, len) = (self.head[slot] as usize, self.len[slot] as usize);
        if len < history {
            self.ring[slot * history + (head + len) % history] = item;
            self.len[slot] += 1;
        } else {
            self.ring[slot * history + head] = item;
            self.head[slot] = ((head + 1) % history) as u16;
        }
    }

    fn evict_before(&mut self, cutoff: i64, history: usize) {
        if !self.last_seen.iter().any(|&t| t < cutoff) {
            return;
        }
        let old = std::mem::take(self);
        self.evicted = old.evicted;
        for (slot, id) in old.ids.iter().enumerate() {
            if old.last_seen[slot] < cutoff {
                self.evicted += 1;
                continue;
            }
            self.index.insert(*id, self.ids.len() as u32);
            self.ids.push(*id);
            self.ring
                .extend_from_slice(&old.ring[slot * history..(slot + 1) * history]);
            self.head.push(old.head[slot]);
            self.len.push(old.len[slot]);
            self.last_seen.push(old.last_seen[slot]);
        }
    }

    fn bytes(&self) -> u64 {
        (self.index.capacity() * 13
            + self.ids.capacity() * 8
            + self.ring.capacity() * 4
            + self.head.capacity() * 2
            + self.len.capacity() * 2
            + self.last_seen.capacity() * 8) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    /// A seeded stream of `(user, item, ts)` with repeats and bursts.
    fn stream(n: usize, users: u64, items: u32, seed: u64) -> Vec<(u64, u32, i64)> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut ts = 0i64;
        (0..n)
            .map(|_| {
                ts += rng.random_range(0..3_600_000i64);
                (rng.random_range(0..users), rng.random_range(0..items), ts)
            })
            .collect()
    }

    fn config(history: usize, half_life_ms: Option<i64>, neighbours: usize) -> KnnConfig {
        KnnConfig {
            history,
            decay: 0.8,
            pair_decay: 0.7,
            back: 0.4,
            alpha: 0.6,
            neighbours,
            half_life_ms,
        }
    }

    /// The model's definition, computed from scratch in f64 over the events so far: every
    /// pair's increments in order, each weighted `2^(t / half_life)`, a sum that faded
    /// below the floor restarting from the next increment (the documented semantics).
    struct Oracle {
        co: FxHashMap<(u32, u32), f64>,
        counts: FxHashMap<u32, f64>,
        recent: FxHashMap<u64, Vec<u32>>,
    }

    fn oracle(cfg: &KnnConfig, events: &[(u64, u32, i64)]) -> Oracle {
        let now = events.last().map_or(0, |e| e.2);
        // Faded from event time `from` to `to`.
        let fade = |from: i64, to: i64| {
            cfg.half_life_ms
                .map_or(1.0, |hl| (-((to - from) as f64) / hl as f64).exp2())
        };
        let mut increments: FxHashMap<(u32, u32), Vec<(i64, f64)>> = FxHashMap::default();
        let mut o = Oracle {
            co: FxHashMap::default(),
            counts: FxHashMap::default(),
            recent: FxHashMap::default(),
        };
        for &(u, i, t) in events {
            let seq = o.recent.entry(u).or_default();
            for (d, &h) in seq.iter().rev().enumerate() {
                if h == i {
                    continue;
                }
                let w = (cfg.pair_decay as f64).powi(d as i32);
                increments.entry((h, i)).or_default().push((t, w));
                increments
                    .entry((i, h))
                    .or_default()
                    .push((t, cfg.back as f64 * w));
            }
            *o.counts.entry(i).or_default() += fade(t, now);
            seq.push(i);
            if seq.len() > cfg.history {
                seq.remove(0);
            }
        }
        for (pair, incs) in increments {
            let (mut value, mut at) = (0.0f64, i64::MIN);
            for (t, w) in incs {
                let faded = if at == i64::MIN {
                    0.0
                } else {
                    value * fade(at, t)
                };
                value = if faded < FLOOR as f64 { w } else { faded + w };
                at = t;
            }
            o.co.insert(pair, value * fade(at, now));
        }
        o
    }

    impl Oracle {
        fn score(&self, cfg: &KnnConfig, user: u64, j: u32) -> f64 {
            let Some(seq) = self.recent.get(&user) else {
                return 0.0;
            };
            let alpha = cfg.alpha as f64;
            seq.iter()
                .rev()
                .enumerate()
                .map(|(k, &h)| {
                    let co = self.co.get(&(h, j)).copied().unwrap_or(0.0);
                    if co < FLOOR as f64 {
                        return 0.0;
                    }
                    (cfg.decay as f64).powi(k as i32) * co
                        / (self.counts[&h].powf(alpha) * self.counts[&j].powf(1.0 - alpha))
                })
                .sum()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-3 * a.abs().max(b.abs()).max(1e-3)
    }

    #[test]
    fn oracle_incremental_state_equals_a_recomputation() {
        for half_life in [None, Some(20 * 3_600_000)] {
            let cfg = config(6, half_life, 1_000_000);
            let events = stream(3_000, 40, 60, 7);
            let mut knn = ItemKnn::new(cfg.clone());
            for (n, &(u, i, t)) in events.iter().enumerate() {
                knn.observe(u, i, t);
                if n % 250 != 249 {
                    continue;
                }
                let o = oracle(&cfg, &events[..=n]);
                for (&(h, j), &want) in &o.co {
                    let want = if want < FLOOR as f64 { 0.0 } else { want };
                    assert!(
                        close(knn.co(h, j) as f64, want),
                        "{half_life:?} after {n}: co({h},{j}) = {} want {want}",
                        knn.co(h, j)
                    );
                }
                for (&i, &want) in &o.counts {
                    assert!(close(knn.count(i) as f64, want), "count({i})");
                }
                let alive = vec![true; 60];
                for u in 0..40 {
                    let mut got = Vec::new();
                    knn.score_all(u, &alive, &mut got);
                    for (j, &s) in got.iter().enumerate() {
                        let want = o.score(&cfg, u, j as u32);
                        assert!(close(s as f64, want), "score({u},{j}) = {s} want {want}");
                    }
                    let seq = o.recent.get(&u).cloned().unwrap_or_default();
                    assert_eq!(knn.recent(u), seq);
                }
            }
        }
    }

    #[test]
    fn sparse_rank_equals_the_dense_rank() {
        let cfg = config(5, None, 8);
        let events = stream(4_000, 30, 200, 3);
        let mut knn = ItemKnn::new(cfg);
        let mut seen = [false; 200];
        let mut alive = Vec::new();
        let mut dense_index: FxHashMap<u32, u32> = FxHashMap::default();
        for (n, &(u, i, t)) in events.iter().enumerate() {
            // Dense indices in order of first appearance, as the catalogue assigns them.
            let next = dense_index.len() as u32;
            let d = *dense_index.entry(i).or_insert(next);
            if n % 7 == 0 && seen[i as usize] {
                let recent: Vec<u32> = knn
                    .recent(u)
                    .into_iter()
                    .filter(|&h| h != d)
                    .take(2)
                    .collect();
                let arena = crate::history::arena_of(&recent);
                let history = arena.get(0);
                let mut scores = Vec::new();
                knn.score_all(u, &alive, &mut scores);
                let want = crate::eval::rank_of(&scores, d, history.iter());
                assert_eq!(knn.rank(u, d, &alive, 0, history), want, "event {n}");
            }
            seen[i as usize] = true;
            if alive.len() <= d as usize {
                alive.push(true);
            }
            knn.observe(u, d, t);
        }
    }

    #[test]
    fn lists_stay_bounded_and_keep_the_strongest() {
        let cfg = config(10, None, 10);
        let mut knn = ItemKnn::new(cfg);
        // Item 0 follows every other item once, and item 1 many times.
        for rep in 0..50u64 {
            knn.observe(1000 + rep, 1, rep as i64);
            knn.observe(1000 + rep, 0, rep as i64);
        }
        for j in 2..200u32 {
            knn.observe(j as u64, j, 0);
            knn.observe(j as u64, 0, 0);
            assert!(knn.list_len(j) <= 15);
        }
        for i in 0..200 {
            assert!(knn.list_len(i) <= 15, "item {i}: {}", knn.list_len(i));
        }
        // Item 1 -> 0 is the strongest pair of 1's list and survives every pruning.
        assert!((knn.co(1, 0) - 50.0).abs() < 1e-3);
        assert!(knn.co(0, 1) > 0.0, "0's strongest backward pair is kept");
    }

    #[test]
    fn compaction_never_changes_a_score() {
        let cfg = config(8, Some(3 * 3_600_000), 12);
        let events = stream(6_000, 50, 120, 11);
        let mut plain = ItemKnn::new(cfg.clone());
        let mut compacted = ItemKnn::new(cfg);
        let alive = vec![true; 120];
        let mut freed = 0;
        for (n, &(u, i, t)) in events.iter().enumerate() {
            plain.observe(u, i, t);
            compacted.observe(u, i, t);
            if n % 97 == 0 {
                freed += compacted.compact(&alive, None);
            }
            if n % 500 == 0 {
                for user in 0..50 {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    plain.score_all(user, &alive, &mut a);
                    compacted.score_all(user, &alive, &mut b);
                    assert_eq!(a, b, "event {n}, user {user}");
                }
            }
        }
        assert!(freed > 0, "faded entries were dropped");
        assert!(compacted.bytes() < plain.bytes());
    }

    #[test]
    fn idle_users_are_evicted_and_expired_items_emptied() {
        let mut knn = ItemKnn::new(config(4, None, 100));
        knn.observe(1, 0, 0);
        knn.observe(1, 1, 0);
        knn.observe(2, 2, 100);
        knn.observe(2, 1, 100);
        assert_eq!(knn.users(), 2);
        let alive = [true, false, true];
        assert!(knn.compact(&alive, Some(50)) > 0);
        assert_eq!(knn.users(), 1);
        assert!(!knn.knows(1) && knn.knows(2));
        assert_eq!(knn.list_len(1), 0, "the expired item's list is gone");
        assert_eq!(knn.co(2, 1), 0.0, "entries pointing at it too");
    }
}
