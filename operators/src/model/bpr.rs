//! Matrix factorisation trained online with the BPR pairwise loss.
//!
//! `score(u, i) = p_u · q_i + b_i`. For a positive `i` and a negative `j`,
//! `x = score(u, i) - score(u, j)` and the loss is `-ln σ(x) = softplus(-x)`
//! (Rendle et al., UAI 2009), plus `reg/2 · ‖θ‖²` on the rows the step touches. Each
//! event takes one step per negative, in the order the sampler drew them.
//!
//! User rows are local to the worker that owns the user; item rows live in the shared
//! [`ItemTable`](crate::item_table::ItemTable). A step copies the rows it needs into
//! scratch buffers, computes in plain `f32` (which the compiler vectorises), and writes
//! them back.

use std::sync::Arc;

use tidepool_samplers::Negative;

use crate::config::{ModelConfig, Optimizer};
use crate::item_table::{ItemRows, ItemTable, RowLayout, ITEM_SALT};

/// Salt that keeps user initialisation independent of item initialisation.
const USER_SALT: u64 = 0x05e7;

/// `ln(1 + e^z)` without overflow.
#[inline]
pub(crate) fn softplus(z: f32) -> f32 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// The pair loss `softplus(-x)` and the slope `σ(-x)` from one exponential.
#[inline]
pub(crate) fn loss_and_slope(x: f32) -> (f32, f32) {
    if x >= 0.0 {
        let e = (-x).exp();
        (e.ln_1p(), e / (1.0 + e))
    } else {
        let e = x.exp();
        (e.ln_1p() - x, 1.0 / (1.0 + e))
    }
}

/// `1 / (1 + e^-z)`.
#[inline]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Gradients of one BPR pair's loss with respect to every parameter it touches.
#[derive(Debug, PartialEq)]
pub(crate) struct PairGradient {
    pub(crate) loss: f32,
    pub(crate) p: Vec<f32>,
    pub(crate) qi: Vec<f32>,
    pub(crate) qj: Vec<f32>,
    pub(crate) bi: f32,
    pub(crate) bj: f32,
}

/// The loss and gradient of one pair: a reference implementation for tests (the training
/// loop fuses the same arithmetic with the update).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn pair_gradient(
    p: &[f32],
    qi: &[f32],
    qj: &[f32],
    bi: f32,
    bj: f32,
    reg: f32,
) -> PairGradient {
    let x: f32 = p
        .iter()
        .zip(qi)
        .zip(qj)
        .map(|((p, i), j)| p * (i - j))
        .sum::<f32>()
        + bi
        - bj;
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
    let loss = softplus(-x) + 0.5 * reg * (norm(p) + norm(qi) + norm(qj) + bi * bi + bj * bj);
    let g = sigmoid(-x);
    PairGradient {
        loss,
        p: p.iter()
            .zip(qi)
            .zip(qj)
            .map(|((p, i), j)| -g * (i - j) + reg * p)
            .collect(),
        qi: p.iter().zip(qi).map(|(p, i)| -g * p + reg * i).collect(),
        qj: p.iter().zip(qj).map(|(p, j)| g * p + reg * j).collect(),
        bi: -g + reg * bi,
        bj: g + reg * bj,
    }
}

/// `p · (a - b)` with eight independent partial sums: a single running sum is a chain of
/// dependent float additions that the compiler may not reorder, and so cannot vectorise.
#[inline]
pub(crate) fn diff_dot(p: &[f32], a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (pc, ac, bc) = (p.chunks_exact(8), a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = pc
        .remainder()
        .iter()
        .zip(ac.remainder())
        .zip(bc.remainder())
        .map(|((p, a), b)| p * (a - b))
        .sum();
    for ((p, a), b) in pc.zip(ac).zip(bc) {
        for l in 0..8 {
            lanes[l] += p[l] * (a[l] - b[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `p · a` with eight independent partial sums (see [`diff_dot`]).
#[inline]
pub(crate) fn dot(p: &[f32], a: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (pc, ac) = (p.chunks_exact(8), a.chunks_exact(8));
    let tail: f32 = pc
        .remainder()
        .iter()
        .zip(ac.remainder())
        .map(|(p, a)| p * a)
        .sum();
    for (p, a) in pc.zip(ac) {
        for l in 0..8 {
            lanes[l] += p[l] * a[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Adagrad's step for one coordinate.
#[inline(always)]
fn adagrad(lr: f32, theta: &mut f32, acc: &mut f32, g: f32) {
    *acc += g * g;
    *theta -= lr * g / acc.sqrt();
}

/// One BPR step on a pair with slope `g`: the user row `p`, the positive `qi` and the
/// negative `qj`, each `[embedding; dim] [bias]` beside its optimizer state (Adagrad's
/// accumulators, empty for SGD). Shared by the engine and the reference kernel, so that
/// the bench compares the same arithmetic.
#[inline(always)]
fn pair_step(
    cfg: &ModelConfig,
    dim: usize,
    g: f32,
    (p, pacc): (&mut [f32], &mut [f32]),
    (qi, iacc): (&mut [f32], &mut [f32]),
    (qj, jacc): (&mut [f32], &mut [f32]),
) {
    let (lr, reg, bias) = (cfg.lr, cfg.reg, cfg.item_bias);
    // Two loops rather than a branch per coordinate, so each one vectorises.
    match cfg.optimizer {
        Optimizer::Adagrad => {
            for k in 0..dim {
                let (pk, ik, jk) = (p[k], qi[k], qj[k]);
                adagrad(lr, &mut p[k], &mut pacc[k], -g * (ik - jk) + reg * pk);
                adagrad(lr, &mut qi[k], &mut iacc[k], -g * pk + reg * ik);
                adagrad(lr, &mut qj[k], &mut jacc[k], g * pk + reg * jk);
            }
            if bias {
                let (bi, bj) = (qi[dim], qj[dim]);
                adagrad(lr, &mut qi[dim], &mut iacc[dim], -g + reg * bi);
                adagrad(lr, &mut qj[dim], &mut jacc[dim], g + reg * bj);
            }
        }
        Optimizer::Sgd => {
            for k in 0..dim {
                let (pk, ik, jk) = (p[k], qi[k], qj[k]);
                p[k] -= lr * (-g * (ik - jk) + reg * pk);
                qi[k] -= lr * (-g * pk + reg * ik);
                qj[k] -= lr * (g * pk + reg * jk);
            }
            if bias {
                qi[dim] -= lr * (-g + reg * qi[dim]);
                qj[dim] -= lr * (g + reg * qj[dim]);
            }
        }
    }
}

/// A xorshift64 step: the reference kernels' generator (cheap, and enough for picking
/// negatives and test values).
#[inline(always)]
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The per-worker half of a BPR model: owned user rows plus a handle on the shared items.
pub(crate) struct Bpr {
    cfg: ModelConfig,
    seed: u64,
    layout: RowLayout,
    items: ItemRows,
    /// Row-major user rows, `layout.stride()` values each, indexed by dense user index.
    users: Vec<f32>,
    /// Users trained since the last delta publication, by dense index.
    dirty: Vec<bool>,
    qi: Vec<f32>,
    qj: Vec<f32>,
}

impl Bpr {
    pub(crate) fn new(cfg: ModelConfig, seed: u64, table: Arc<ItemTable>) -> Self {
        let items = ItemRows::new(table);
        let layout = items.layout();
        let stride = layout.stride();
        Self {
            seed,
            layout,
            items,
            users: Vec::new(),
            dirty: Vec::new(),
            qi: vec![0.0; stride],
            qj: vec![0.0; stride],
            cfg,
        }
    }

    /// Records item-row changes for the other processes of a cluster.
    pub(crate) fn record_item_changes(&mut self) {
        self.items.record_changes();
    }

    /// Item-row changes since the last call, and the row stride.
    pub(crate) fn take_item_changes(&mut self) -> (Vec<(u32, Vec<f32>)>, usize) {
        (self.items.take_changes(), self.layout.stride())
    }

    /// Adds another process's change to an item row.
    pub(crate) fn add_to_item(&mut self, item: u32, delta: &[f32]) {
        self.items.add(item, delta);
    }

    /// The layout a table for this configuration needs.
    pub(crate) fn layout_for(cfg: &ModelConfig) -> RowLayout {
        RowLayout {
            dim: cfg.dim,
            adagrad: cfg.optimizer == Optimizer::Adagrad,
        }
    }

    /// Makes sure dense user `user` (raw id `id`) has a row. Users arrive in dense order.
    #[inline]
    pub(crate) fn ensure_user(&mut self, user: u32, id: u64) {
        let stride = self.layout.stride();
        let start = user as usize * stride;
        if start >= self.users.len() {
            self.users.resize(start + stride, 0.0);
            self.layout.init(
                self.seed,
                USER_SALT,
                id,
                self.cfg.init_std,
                &mut self.users[start..start + stride],
            );
        }
    }

    /// Scores of user `user` against items `0..alive.len()` (expired: negative infinity).
    pub(crate) fn score_all(&mut self, user: u32, alive: &[bool], out: &mut Vec<f32>) {
        let stride = self.layout.stride();
        let start = user as usize * stride;
        let p = &self.users[start..start + self.layout.dim];
        self.items.score_all(p, self.cfg.item_bias, alive, out);
    }

    /// Moves user rows to their new dense indices after an eviction (`remap[old]`, order
    /// kept) and gives the evicted rows' memory back. Returns the bytes freed.
    pub(crate) fn remap_users(&mut self, remap: &[Option<u32>]) -> u64 {
        let stride = self.layout.stride();
        let before = self.users.capacity();
        let mut kept = 0;
        for (old, new) in remap.iter().enumerate() {
            let Some(new) = new else { continue };
            let (from, to) = (old * stride, *new as usize * stride);
            // Rows only move towards the front, so a forward copy never overwrites a row
            // that is still to be moved.
            if from != to && from + stride <= self.users.len() {
                self.users.copy_within(from..from + stride, to);
            }
            kept += 1;
        }
        self.users.truncate(kept * stride);
        self.users.shrink_to_fit();
        let mut dirty = vec![false; kept];
        for (old, new) in remap.iter().enumerate() {
            if let (Some(new), Some(true)) = (new, self.dirty.get(old)) {
                dirty[*new as usize] = true;
            }
        }
        self.dirty = dirty;
        (before.saturating_sub(self.users.capacity()) * std::mem::size_of::<f32>()) as u64
    }

    /// The embeddings of users trained since the last call, clearing the marks.
    pub(crate) fn take_dirty_users(&mut self) -> Vec<(u32, Vec<f32>)> {
        let (dim, stride) = (self.layout.dim, self.layout.stride());
        let mut out = Vec::new();
        for (u, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                let start = u * stride;
                if let Some(row) = self.users.get(start..start + dim) {
                    out.push((u as u32, row.to_vec()));
                }
            }
        }
        out
    }

    /// Whether items carry a bias term.
    pub(crate) fn has_item_bias(&self) -> bool {
        self.cfg.item_bias
    }

    /// The shared item table.
    pub(crate) fn table(&self) -> &Arc<ItemTable> {
        self.items.table()
    }

    /// The user rows, `stride` values per dense user.
    pub(crate) fn user_rows(&self) -> &[f32] {
        &self.users
    }

    /// Appends user rows (restored from a checkpoint).
    pub(crate) fn extend_user_rows(&mut self, rows: &[f32]) {
        self.users.extend_from_slice(rows);
    }

    /// Releases item chunks whose items all expired; returns the bytes taken out.
    pub(crate) fn release_items(&mut self, alive: &[bool]) -> u64 {
        self.items.release_expired(alive)
    }

    /// Heap bytes of this worker's own state: user rows and its scoring copy of items.
    pub(crate) fn user_bytes(&self) -> u64 {
        (self.users.capacity() * std::mem::size_of::<f32>()) as u64 + self.items.copy_bytes()
    }

    /// Hints the rows of a user and an item that a later event will train.
    #[inline]
    pub(crate) fn prefetch(&mut self, user: Option<u32>, item: Option<u32>) {
        if let Some(u) = user {
            let stride = self.layout.stride();
            let start = u as usize * stride;
            if let Some(row) = self.users.get(start..start + stride) {
                crate::prefetch::values(row);
            }
        }
        if let Some(i) = item {
            self.items.prefetch(i);
        }
    }

    /// `p_u · q_i (+ b_i)` for one item.
    #[inline]
    pub(crate) fn score(&mut self, user: u32, item: u32) -> f32 {
        let (dim, stride) = (self.layout.dim, self.layout.stride());
        self.items.load(item, &mut self.qj[..=dim]);
        let start = user as usize * stride;
        let p = &self.users[start..start + dim];
        let s = dot(p, &self.qj[..dim]);
        if self.cfg.item_bias {
            s + self.qj[dim]
        } else {
            s
        }
    }

    /// One BPR step per negative for the positive `pos`. Returns the summed pair loss
    /// (before the steps, without the regulariser). With `logq`, a negative's score is
    /// corrected by `-ln(q * candidates)`: relative to uniform sampling (q = 1/n, no
    /// correction), a negative drawn more often than uniform pushes less, so that the
    /// expected gradient is that of uniform negatives (the sampled-softmax logQ
    /// correction of Bengio & Senécal 2008 and Yi et al. 2019, in pairwise form).
    ///
    /// `ahead` are the items the next step will most likely train as negatives: one of
    /// their rows is hinted per pair, so that their misses spread over this step's
    /// arithmetic instead of arriving all at once at the start of the next.
    pub(crate) fn train(
        &mut self,
        user: u32,
        pos: u32,
        negatives: &[Negative],
        ahead: &[u32],
        candidates: usize,
    ) -> f64 {
        if negatives.is_empty() {
            return 0.0;
        }
        let (dim, stride) = (self.layout.dim, self.layout.stride());
        let bias = self.cfg.item_bias;
        let start = user as usize * stride;
        if self.dirty.len() <= user as usize {
            self.dirty.resize(user as usize + 1, false);
        }
        self.dirty[user as usize] = true;
        // Rows are [embedding, bias | accumulators]; with SGD the second half is empty.
        // The negatives' rows are misses of their own: start them all now, so they are
        // served side by side rather than one after another in the loop below.
        for neg in negatives {
            self.items.prefetch(neg.item);
        }
        let (p, pacc) = self.users[start..start + stride].split_at_mut(dim + 1);
        self.items.load(pos, &mut self.qi);
        let mut loss = 0.0f64;
        let mut ahead = ahead.iter();
        let cfg = &self.cfg;
        let (qi, iacc) = self.qi.split_at_mut(dim + 1);
        for neg in negatives {
            if let Some(&next) = ahead.next() {
                self.items.prefetch(next);
            }
            // The negative is trained where it lies (one hold, no copies); the positive,
            // trained against every negative, stays in `qi` and is stored once, so a
            // worker never holds two rows.
            loss += self.items.update(neg.item, |qj| {
                let (qj, jacc) = qj.split_at_mut(dim + 1);
                let mut x = diff_dot(&p[..dim], &qi[..dim], &qj[..dim]);
                if bias {
                    x += qi[dim] - qj[dim];
                }
                if cfg.logq && neg.q > 0.0 {
                    x += (neg.q * candidates as f32).ln();
                }
                let (pair_loss, g) = loss_and_slope(x);
                pair_step(
                    cfg,
                    dim,
                    g,
                    (&mut *p, &mut *pacc),
                    (&mut *qi, &mut *iacc),
                    (qj, jacc),
                );
                pair_loss as f64
            });
        }
        self.items.store(pos, &self.qi);
        loss
    }
}

/// What [`reference_kernel`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelRun {
    /// Events trained.
    pub events: u64,
    /// Wall time of the loop.
    pub seconds: f64,
    /// Summed pair loss (kept, so the loop cannot be optimised away).
    pub loss: f64,
}

impl KernelRun {
    /// Events per second.
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// The tightest single-thread BPR loop for a shape: what `tidepool bench` divides the
/// engine's throughput by. Plain row-major tables (rows laid out as the engine's, with
/// Adagrad's accumulators after the embedding and bias), `negatives` uniform negatives
/// per event from a xorshift generator, the engine's arithmetic (the same `diff_dot`,
/// fused loss and slope, and update loops), rows started on first sight with the
/// engine's initialisation (the model's own work: a stream's users and items are not
/// known up front), and nothing else: no dataflow, no evaluation, no exclusion, no
/// shared-table copies, no id mapping. `events` are dense `(user, item)` indices below
/// `users` and `items`.
pub fn reference_kernel(
    cfg: &ModelConfig,
    users: usize,
    items: usize,
    events: &[(u32, u32)],
    seed: u64,
) -> KernelRun {
    reference_loop(cfg, users, items, events, seed, || {})
}

/// [`reference_kernel`] on `threads` threads at once, each over its own contiguous share
/// of `events` with tables of its own, all starting their loops together: what this
/// machine gives the tightest loop with that many threads (shared caches, memory
/// bandwidth, and whether its cores are whole cores), so that a worker count's
/// throughput can be read against the machine's scaling as well as against `threads` x
/// one thread. `seconds` is the slowest thread's.
pub fn reference_kernel_parallel(
    cfg: &ModelConfig,
    users: usize,
    items: usize,
    events: &[(u32, u32)],
    seed: u64,
    threads: usize,
) -> KernelRun {
    let threads = threads.max(1);
    let share = events.len().div_ceil(threads).max(1);
    let chunks: Vec<&[(u32, u32)]> = events.chunks(share).collect();
    let start = std::sync::Barrier::new(chunks.len());
    let runs: Vec<KernelRun> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(t, chunk)| {
                let start = &start;
                s.spawn(move || {
                    reference_loop(
                        cfg,
                        users,
                        items,
                        chunk,
                        seed.wrapping_add(t as u64),
                        || {
                            start.wait();
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    KernelRun {
        events: runs.iter().map(|r| r.events).sum(),
        seconds: runs.iter().map(|r| r.seconds).fold(0.0, f64::max),
        loss: runs.iter().map(|r| r.loss).sum(),
    }
}

/// The reference loop; `ready` runs once the tables are built, just before the clock
/// starts.
fn reference_loop(
    cfg: &ModelConfig,
    users: usize,
    items: usize,
    events: &[(u32, u32)],
    seed: u64,
    ready: impl FnOnce(),
) -> KernelRun {
    let layout = Bpr::layout_for(cfg);
    let (dim, stride) = (layout.dim, layout.stride());
    let bias = cfg.item_bias;
    let mut rng = seed | 1;
    // Rows start as the engine's do, on first sight and with the engine's draw: an
    // online learner meets its users and items in the stream and cannot lay them out
    // before the clock starts (tables of fresh zero pages, which the loop touches first,
    // as the engine's growing tables are).
    let mut p_table = vec![0.0f32; users * stride];
    let mut q_table = vec![0.0f32; items * stride];
    let (mut p_seen, mut q_seen) = (vec![false; users], vec![false; items]);
    let first_sight = |table: &mut [f32], seen: &mut [bool], r: usize, salt: u64| {
        if !seen[r] {
            seen[r] = true;
            let row = &mut table[r * stride..(r + 1) * stride];
            layout.init(seed, salt, r as u64, cfg.init_std, row);
        }
    };
    let mut loss = 0.0f64;
    let mut drawn = Vec::with_capacity(cfg.negatives);
    ready();
    let started = std::time::Instant::now();
    for (e, &(u, i)) in events.iter().enumerate() {
        // The same cache hints the engine gives: the rows of an event a few places
        // ahead, and this event's negatives before the first is trained.
        if let Some(&(au, ai)) = events.get(e + crate::learner::PREFETCH_AHEAD) {
            crate::prefetch::values(&p_table[au as usize * stride..(au as usize + 1) * stride]);
            crate::prefetch::values(&q_table[ai as usize * stride..(ai as usize + 1) * stride]);
        }
        drawn.clear();
        drawn.extend((0..cfg.negatives).map(|_| (xorshift(&mut rng) % items as u64) as usize));
        for &j in &drawn {
            crate::prefetch::values(&q_table[j * stride..(j + 1) * stride]);
        }
        let (u, i) = (u as usize, i as usize);
        first_sight(&mut p_table, &mut p_seen, u, USER_SALT);
        first_sight(&mut q_table, &mut q_seen, i, ITEM_SALT);
        for &j in &drawn {
            first_sight(&mut q_table, &mut q_seen, j, ITEM_SALT);
        }
        let p = &mut p_table[u * stride..(u + 1) * stride];
        let (p, pacc) = p.split_at_mut(dim + 1);
        for &j in &drawn {
            if j == i {
                continue;
            }
            // Both rows at once, whichever comes first in the table.
            let (qi, qj) = if i < j {
                let (a, b) = q_table.split_at_mut(j * stride);
                (&mut a[i * stride..(i + 1) * stride], &mut b[..stride])
            } else {
                let (a, b) = q_table.split_at_mut(i * stride);
                (&mut b[..stride], &mut a[j * stride..(j + 1) * stride])
            };
            let (qi, iacc) = qi.split_at_mut(dim + 1);
            let (qj, jacc) = qj.split_at_mut(dim + 1);
            let mut x = diff_dot(&p[..dim], &qi[..dim], &qj[..dim]);
            if bias {
                x += qi[dim] - qj[dim];
            }
            let (pair_loss, g) = loss_and_slope(x);
            loss += pair_loss as f64;
            pair_step(cfg, dim, g, (p, pacc), (qi, iacc), (qj, jacc));
        }
    }
    KernelRun {
        events: events.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        loss,
    }
}

/// The plain loop that ranks a held-out item against a whole catalogue: what `tidepool
/// bench` divides the engine's scoring rate by. A row-major table of `items` rows
/// (embedding and bias, `dim + 1` values, random), and per event a random user vector and
/// target: every item scored with the engine's 8-lane `dot`, and the items scoring above
/// the target counted. No atomics, no exclusion, no dataflow.
pub fn reference_scoring_kernel(dim: usize, items: usize, events: usize, seed: u64) -> KernelRun {
    let stride = dim + 1;
    let mut rng = seed | 1;
    let mut uniform = move || (xorshift(&mut rng) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    let table: Vec<f32> = (0..items.max(1) * stride).map(|_| uniform()).collect();
    let users: Vec<f32> = (0..64 * dim).map(|_| uniform()).collect();
    let mut above = 0u64;
    let started = std::time::Instant::now();
    for e in 0..events {
        let p = &users[(e % 64) * dim..(e % 64 + 1) * dim];
        let target = (e * 7919) % items.max(1);
        let t = &table[target * stride..(target + 1) * stride];
        let ts = dot(p, &t[..dim]) + t[dim];
        for row in table.chunks_exact(stride) {
            let s = dot(p, &row[..dim]) + row[dim];
            above += u64::from(s > ts);
        }
    }
    KernelRun {
        events: events as u64,
        seconds: started.elapsed().as_secs_f64(),
        loss: above as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss_at(p: &[f32], qi: &[f32], qj: &[f32], bi: f32, bj: f32, reg: f32) -> f64 {
        pair_gradient(p, qi, qj, bi, bj, reg).loss as f64
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let p = vec![0.3, -0.2, 0.5, 0.1];
        let qi = vec![0.1, 0.4, -0.3, 0.2];
        let qj = vec![-0.2, 0.1, 0.3, 0.05];
        let (bi, bj, reg) = (0.2, -0.1, 0.01);
        let g = pair_gradient(&p, &qi, &qj, bi, bj, reg);
        let h = 1e-3f32;
        let check = |analytic: f32, plus: f64, minus: f64| {
            let numeric = (plus - minus) / (2.0 * h as f64);
            assert!(
                (analytic as f64 - numeric).abs() < 2e-3,
                "analytic {analytic} vs numeric {numeric}"
            );
        };
        for k in 0..4 {
            let bump = |v: &[f32], d: f32| {
                let mut v = v.to_vec();
                v[k] += d;
                v
            };
            check(
                g.p[k],
                loss_at(&bump(&p, h), &qi, &qj, bi, bj, reg),
                loss_at(&bump(&p, -h), &qi, &qj, bi, bj, reg),
            );
            check(
                g.qi[k],
                loss_at(&p, &bump(&qi, h), &qj, bi, bj, reg),
                loss_at(&p, &bump(&qi, -h), &qj, bi, bj, reg),
            );
            check(
                g.qj[k],
                loss_at(&p, &qi, &bump(&qj, h), bi, bj, reg),
                loss_at(&p, &qi, &bump(&qj, -h), bi, bj, reg),
            );
        }
        check(
            g.bi,
            loss_at(&p, &qi, &qj, bi + h, bj, reg),
            loss_at(&p, &qi, &qj, bi - h, bj, reg),
        );
        check(
            g.bj,
            loss_at(&p, &qi, &qj, bi, bj + h, reg),
            loss_at(&p, &qi, &qj, bi, bj - h, reg),
        );
    }

    #[test]
    fn fused_loss_and_slope_match_the_definitions() {
        for x in [-30.0f32, -3.0, -0.5, 0.0, 0.7, 4.0, 40.0] {
            let (l, g) = loss_and_slope(x);
            assert!((l - softplus(-x)).abs() <= 1e-6 * (1.0 + l.abs()), "{x}");
            assert!((g - sigmoid(-x)).abs() <= 1e-6, "{x}");
        }
    }

    #[test]
    fn softplus_is_stable() {
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-6);
        assert_eq!(softplus(100.0), 100.0);
        assert!(softplus(-100.0) >= 0.0 && softplus(-100.0) < 1e-30);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    fn model(opt: Optimizer) -> Bpr {
        let cfg = ModelConfig {
            dim: 8,
            lr: 0.1,
            optimizer: opt,
            ..ModelConfig::default()
        };
        let table = Arc::new(ItemTable::new(Bpr::layout_for(&cfg), 1, cfg.init_std));
        Bpr::new(cfg, 1, table)
    }

    #[test]
    fn training_moves_the_positive_above_the_negative() {
        for opt in [Optimizer::Sgd, Optimizer::Adagrad] {
            let mut m = model(opt);
            m.ensure_user(0, 77);
            let negs = [Negative { item: 1, q: 0.5 }];
            let first = m.train(0, 0, &negs, &[], 4);
            let mut last = first;
            for _ in 0..50 {
                last = m.train(0, 0, &negs, &[], 4);
            }
            assert!(last < first * 0.5, "{opt:?}: loss {first} -> {last}");
            let mut scores = Vec::new();
            m.score_all(0, &[true, true], &mut scores);
            assert!(scores[0] > scores[1], "{opt:?}: {scores:?}");
        }
    }

    #[test]
    fn the_training_step_is_gradient_descent() {
        // One SGD step must move every parameter by -lr * gradient of pair_gradient.
        let mut m = model(Optimizer::Sgd);
        m.cfg.reg = 0.01;
        m.ensure_user(0, 5);
        let stride = m.layout.stride();
        let p0 = m.users[..8].to_vec();
        let (mut qi0, mut qj0) = (vec![0.0; stride], vec![0.0; stride]);
        m.items.load(0, &mut qi0);
        m.items.load(1, &mut qj0);
        let g = pair_gradient(&p0, &qi0[..8], &qj0[..8], qi0[8], qj0[8], 0.01);
        m.train(0, 0, &[Negative { item: 1, q: 0.5 }], &[], 2);
        let (mut qi1, mut qj1) = (vec![0.0; stride], vec![0.0; stride]);
        m.items.load(0, &mut qi1);
        m.items.load(1, &mut qj1);
        for k in 0..8 {
            assert!((m.users[k] - (p0[k] - 0.1 * g.p[k])).abs() < 1e-6);
            assert!((qi1[k] - (qi0[k] - 0.1 * g.qi[k])).abs() < 1e-6);
            assert!((qj1[k] - (qj0[k] - 0.1 * g.qj[k])).abs() < 1e-6);
        }
        assert!((qi1[8] - (qi0[8] - 0.1 * g.bi)).abs() < 1e-6);
        assert!((qj1[8] - (qj0[8] - 0.1 * g.bj)).abs() < 1e-6);
    }

    #[test]
    fn remapping_users_keeps_rows_and_frees_the_rest() {
        let mut m = model(Optimizer::Adagrad);
        let stride = m.layout.stride();
        for u in 0..4 {
            m.ensure_user(u, 100 + u as u64);
        }
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|u| m.users[u * stride..(u + 1) * stride].to_vec())
            .collect();
        let freed = m.remap_users(&[None, Some(0), None, Some(1)]);
        assert!(freed >= (2 * stride * 4) as u64, "{freed}");
        assert_eq!(m.users.len(), 2 * stride);
        assert_eq!(&m.users[..stride], &rows[1][..]);
        assert_eq!(&m.users[stride..], &rows[3][..]);
        // The next new user takes the next dense index with a fresh row.
        m.ensure_user(2, 500);
        assert_eq!(m.users.len(), 3 * stride);
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// The reference loop trains: its loss falls over repeated passes of a tiny stream.
    #[test]
    fn the_reference_kernel_learns() {
        let cfg = ModelConfig::default();
        let events: Vec<(u32, u32)> = (0..2_000).map(|n| (n % 20, (n % 20) / 2)).collect();
        let first = reference_kernel(&cfg, 20, 50, &events[..200], 7);
        let all = reference_kernel(&cfg, 20, 50, &events, 7);
        assert_eq!(all.events, 2_000);
        let late = all.loss / 2_000.0;
        assert!(
            late < first.loss / 200.0,
            "{late} vs {}",
            first.loss / 200.0
        );
        assert!(all.events_per_sec() > 0.0);
    }

    /// The parallel reference trains every event once, each thread its own share with
    /// tables of its own: its loss is the sum of single-thread runs over the shares.
    #[test]
    fn the_parallel_reference_splits_the_events_between_threads() {
        let cfg = ModelConfig::default();
        let events: Vec<(u32, u32)> = (0..1_001).map(|n| (n % 20, (n * 7) % 50)).collect();
        let both = reference_kernel_parallel(&cfg, 20, 50, &events, 7, 2);
        assert_eq!(both.events, 1_001);
        let first = reference_kernel(&cfg, 20, 50, &events[..501], 7);
        let second = reference_kernel(&cfg, 20, 50, &events[501..], 8);
        assert_eq!(both.loss, first.loss + second.loss);
        let one = reference_kernel_parallel(&cfg, 20, 50, &events, 7, 1);
        assert_eq!(one.loss, reference_kernel(&cfg, 20, 50, &events, 7).loss);
    }

    /// The scoring loop ranks: about half the catalogue scores above a random target.
    #[test]
    fn the_scoring_kernel_counts_items_above_the_target() {
        let run = reference_scoring_kernel(16, 1_000, 200, 3);
        assert_eq!(run.events, 200);
        let mean_above = run.loss / 200.0;
        assert!((200.0..800.0).contains(&mean_above), "{mean_above}");
    }
}
