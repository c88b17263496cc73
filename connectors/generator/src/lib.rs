//! Synthetic behaviour streams with structure an online recommender can learn.
//!
//! The model behind the data:
//! - users and items have latent taste vectors (unit vectors in `latent_dim` dimensions);
//! - item popularity follows a Zipf law over a random permutation of the items, user
//!   activity another one, so a few users and items dominate as in real logs;
//! - 30 % of users and items exist from the start, the rest arrive uniformly over the
//!   first 80 % of the stream (cold start keeps happening);
//! - each event draws a handful of candidate items by popularity and picks one with
//!   probability ∝ exp(affinity · ⟨user, item⟩) (Gumbel-max), or, with probability
//!   `noise`, the first candidate regardless of taste;
//! - a user's taste drifts a little with every event (random walk on the sphere);
//! - gaps between events are exponential; event types are 70 % views, 20 % clicks,
//!   7 % carts, 3 % purchases.
//!
//! Popularity alone explains part of the stream; the rest needs the latent factors, so a
//! learned model beats `mostpop` clearly. Everything follows from the seed.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::sync::Arc;

use arrow_array::RecordBatch;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::weighted::WeightedAliasIndex;
use rand_distr::{Distribution, Exp, StandardNormal};
use tidepool_pipeline::event::events_batch;
use tidepool_pipeline::{
    BatchOrigin, Error, Event, EventReader, EventSource, EventType, Result, SourceBatch, SourceInfo,
};
use tidepool_pipeline::{BufferPool, EventBatch};

/// 2024-01-01T00:00:00Z, where generated streams start by default.
pub const DEFAULT_START_MS: i64 = 1_704_067_200_000;

/// Settings of a synthetic stream.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GeneratorConfig {
    /// Number of events.
    pub events: u64,
    /// Number of distinct users (some may never act).
    pub users: u64,
    /// Number of distinct items.
    pub items: u64,
    /// Seed; the same seed gives the same stream.
    pub seed: u64,
    /// Dimension of the latent tastes.
    pub latent_dim: usize,
    /// Zipf exponent of item popularity.
    pub item_zipf: f64,
    /// Zipf exponent of user activity.
    pub user_zipf: f64,
    /// How strongly taste decides among candidates.
    pub affinity: f32,
    /// Candidates drawn by popularity per event.
    pub candidates: usize,
    /// Share of events that ignore taste.
    pub noise: f64,
    /// Standard deviation of the per-event taste drift.
    pub drift: f32,
    /// Event time of the first event.
    pub start_ms: i64,
    /// Mean gap between events in milliseconds.
    pub mean_gap_ms: f64,
    /// Rows per generated batch.
    pub batch_rows: usize,
    /// How many times the user population is replaced by new ids over the stream (0 =
    /// never): user `u` of epoch `e` is emitted as `u + e * users`, with `u`'s tastes.
    /// Gives a stream of ever-new users (unbounded cardinality) while the generator's own
    /// memory stays fixed.
    pub user_churn: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            events: 100_000,
            users: 2_000,
            items: 2_000,
            seed: 42,
            latent_dim: 16,
            item_zipf: 0.5,
            user_zipf: 0.6,
            affinity: 10.0,
            candidates: 64,
            noise: 0.1,
            drift: 0.01,
            start_ms: DEFAULT_START_MS,
            mean_gap_ms: 50.0,
            batch_rows: 65_536,
            user_churn: 0,
        }
    }
}

impl GeneratorConfig {
    /// Checks the values once.
    pub fn validate(&self) -> Result<()> {
        if self.users == 0 || self.items == 0 {
            return Err(Error::Config("users and items must be at least 1".into()));
        }
        if self.items > u32::MAX as u64 || self.users > u32::MAX as u64 {
            return Err(Error::Config("users and items must be below 2^32".into()));
        }
        if self.latent_dim == 0 || self.candidates == 0 || self.batch_rows == 0 {
            return Err(Error::Config(
                "latent_dim, candidates and batch_rows must be at least 1".into(),
            ));
        }
        if !(self.mean_gap_ms.is_finite() && self.mean_gap_ms > 0.0) {
            return Err(Error::Config("mean_gap_ms must be positive".into()));
        }
        if !(0.0..=1.0).contains(&self.noise) {
            return Err(Error::Config("noise must be in [0, 1]".into()));
        }
        if !(self.item_zipf >= 0.0 && self.user_zipf >= 0.0) {
            return Err(Error::Config(
                "zipf exponents must be zero or positive".into(),
            ));
        }
        Ok(())
    }
}

/// Entities (users or items) with a Zipf popularity over a random order and arrival times.
struct Population {
    alias: WeightedAliasIndex<f64>,
    /// Entity at each popularity rank.
    by_rank: Vec<u32>,
    /// Share of the stream after which each entity exists.
    arrival: Vec<f32>,
    /// Entities present from the start, for the fallback draw.
    initial: Vec<u32>,
    vectors: Vec<f32>,
}

impl Population {
    fn new(n: usize, zipf: f64, dim: usize, rng: &mut Xoshiro256PlusPlus) -> Result<Self> {
        let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-zipf)).collect();
        let alias = WeightedAliasIndex::new(weights)
            .map_err(|e| Error::Config(format!("popularity weights: {e}")))?;
        let mut by_rank: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            by_rank.swap(i, rng.random_range(0..=i));
        }
        let arrival: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f32>() < 0.3 {
                    0.0
                } else {
                    rng.random::<f32>() * 0.8
                }
            })
            .collect();
        let mut initial: Vec<u32> = (0..n as u32)
            .filter(|&e| arrival[e as usize] == 0.0)
            .collect();
        if initial.is_empty() {
            initial.push(0);
        }
        let mut vectors = vec![0.0f32; n * dim];
        for row in vectors.chunks_mut(dim) {
            for v in row.iter_mut() {
                *v = StandardNormal.sample(rng);
            }
            normalise(row);
        }
        Ok(Self {
            alias,
            by_rank,
            arrival,
            initial,
            vectors,
        })
    }

    /// An entity that exists at stream share `now`, by popularity.
    #[inline]
    fn draw(&self, now: f32, rng: &mut Xoshiro256PlusPlus) -> u32 {
        for _ in 0..64 {
            let e = self.by_rank[self.alias.sample(rng)];
            if self.arrival[e as usize] <= now {
                return e;
            }
        }
        self.initial[rng.random_range(0..self.initial.len())]
    }
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// A synthetic stream, produced batch by batch.
pub struct Generator {
    cfg: GeneratorConfig,
    rng: Xoshiro256PlusPlus,
    users: Population,
    items: Population,
    gap: Exp<f64>,
    produced: u64,
    clock: f64,
    candidates: Vec<u32>,
    noise: Vec<f32>,
    pool: BufferPool,
    /// Events of the batch being built, kept to reuse the allocation.
    scratch: Vec<Event>,
}

impl Generator {
    /// A generator for `cfg` whose batches are built in a private pool.
    pub fn new(cfg: GeneratorConfig) -> Result<Self> {
        Self::with_pool(cfg, BufferPool::new(Default::default()))
    }

    /// A generator for `cfg` whose column buffers come from `pool`.
    pub fn with_pool(cfg: GeneratorConfig, pool: BufferPool) -> Result<Self> {
        cfg.validate()?;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
        let users = Population::new(cfg.users as usize, cfg.user_zipf, cfg.latent_dim, &mut rng)?;
        let items = Population::new(cfg.items as usize, cfg.item_zipf, cfg.latent_dim, &mut rng)?;
        let gap =
            Exp::new(1.0 / cfg.mean_gap_ms).map_err(|e| Error::Config(format!("mean gap: {e}")))?;
        Ok(Self {
            clock: cfg.start_ms as f64,
            candidates: Vec::with_capacity(cfg.candidates),
            noise: vec![0.0; cfg.latent_dim],
            cfg,
            rng,
            users,
            items,
            gap,
            produced: 0,
            pool,
            scratch: Vec::new(),
        })
    }

    /// The next batch, or `None` when all events have been produced.
    pub fn next_batch(&mut self) -> Option<RecordBatch> {
        let events = self.generate()?;
        let batch = events_batch(&events, &self.pool);
        self.scratch = events;
        // `events_batch` builds the columns for the schema it names: a mismatch is a bug, and
        // ending the stream quietly would lose events, so it panics with the reason.
        match batch {
            Ok(batch) => Some(batch),
            Err(e) => panic!("generator columns do not match the event schema (a bug): {e}"),
        }
    }

    /// The next batch as the dataflow's own [`EventBatch`], in a block of the size class
    /// full batches take ([`EventBatch::BATCH_EVENTS`]), or `None` at the end: what the
    /// generator source hands the ingest, without Arrow columns to decode back.
    pub fn next_events(&mut self) -> Option<EventBatch> {
        let events = self.generate()?;
        let batch = EventBatch::from_events_in(&events, EventBatch::BATCH_EVENTS, &self.pool);
        self.scratch = events;
        Some(batch)
    }

    /// The next `batch_rows` events (fewer at the end), in the scratch vector (give it
    /// back), or `None` when all have been produced.
    fn generate(&mut self) -> Option<Vec<Event>> {
        let remaining = self.cfg.events - self.produced;
        if remaining == 0 {
            return None;
        }
        let n = remaining.min(self.cfg.batch_rows as u64) as usize;
        let mut events = std::mem::take(&mut self.scratch);
        events.clear();
        let dim = self.cfg.latent_dim;
        for _ in 0..n {
            let now = self.produced as f32 / self.cfg.events as f32;
            self.produced += 1;
            self.clock += self.gap.sample(&mut self.rng);
            let user = self.users.draw(now, &mut self.rng) as usize;
            self.candidates.clear();
            for _ in 0..self.cfg.candidates {
                let c = self.items.draw(now, &mut self.rng);
                self.candidates.push(c);
            }
            let item = if self.rng.random::<f64>() < self.cfg.noise {
                self.candidates[0]
            } else {
                let u = &self.users.vectors[user * dim..(user + 1) * dim];
                let mut best = (f32::NEG_INFINITY, self.candidates[0]);
                for &c in &self.candidates {
                    let v = &self.items.vectors[c as usize * dim..(c as usize + 1) * dim];
                    let dot: f32 = u.iter().zip(v).map(|(a, b)| a * b).sum();
                    // Gumbel-max: argmax(logit + Gumbel noise) samples softmax(logits).
                    let uniform: f32 = self.rng.random::<f32>().max(f32::MIN_POSITIVE);
                    let score = self.cfg.affinity * dot - (-uniform.ln()).ln();
                    if score > best.0 {
                        best = (score, c);
                    }
                }
                best.1
            };
            if self.cfg.drift > 0.0 {
                for x in self.noise.iter_mut() {
                    let z: f32 = StandardNormal.sample(&mut self.rng);
                    *x = z * self.cfg.drift;
                }
                let u = &mut self.users.vectors[user * dim..(user + 1) * dim];
                u.iter_mut().zip(&self.noise).for_each(|(a, z)| *a += z);
                normalise(u);
            }
            let r: f32 = self.rng.random();
            let kind = if r < 0.7 {
                EventType::View
            } else if r < 0.9 {
                EventType::Click
            } else if r < 0.97 {
                EventType::Cart
            } else {
                EventType::Purchase
            };
            let epoch = (now as f64 * self.cfg.user_churn as f64) as u64;
            events.push(Event {
                ts: self.clock as i64,
                pos: self.produced - 1,
                user: user as u64 + epoch * self.cfg.users,
                item: item as u64,
                weight: 1.0,
                kind,
            });
        }
        Some(events)
    }
}

impl Iterator for Generator {
    type Item = RecordBatch;
    fn next(&mut self) -> Option<RecordBatch> {
        self.next_batch()
    }
}

/// A generator as an [`EventSource`]: worker 0 produces the whole stream (it is one
/// sequential random process), the others get an empty share.
#[derive(Clone, Debug)]
pub struct GeneratorSource {
    cfg: GeneratorConfig,
    pool: BufferPool,
}

impl GeneratorSource {
    /// A source for `cfg`.
    pub fn new(cfg: GeneratorConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            pool: BufferPool::new(Default::default()),
        })
    }

    /// Builds batches in `pool`.
    pub fn with_pool(mut self, pool: BufferPool) -> Self {
        self.pool = pool;
        self
    }
}

impl EventSource for GeneratorSource {
    fn info(&self) -> SourceInfo {
        let c = &self.cfg;
        SourceInfo {
            description: format!(
                "synthetic stream ({} events, {} users, {} items, seed {})",
                c.events, c.users, c.items, c.seed
            ),
            rows: Some(c.events),
            min_ts: Some(c.start_ms),
            // Expected end; only sizes ticks and metric windows, never filters events.
            max_ts: Some(c.start_ms + (c.events as f64 * c.mean_gap_ms) as i64),
        }
    }

    fn open(&self, worker: usize, _workers: usize) -> Result<EventReader> {
        if worker != 0 {
            return Ok(Box::new(std::iter::empty()));
        }
        // Batches of the dataflow's own size and class (the chunking changes no event):
        // the blocks the ingest reserves and recycles serve the source's batches too.
        let cfg = GeneratorConfig {
            batch_rows: EventBatch::BATCH_EVENTS,
            ..self.cfg.clone()
        };
        let mut generator = Generator::with_pool(cfg, self.pool.clone())?;
        let source: Arc<str> = "generator".into();
        // No columns: the events travel in `SourceBatch::events`. A batch with none
        // clones without allocating.
        let empty = RecordBatch::try_new_with_options(
            Arc::new(arrow_schema::Schema::empty()),
            Vec::new(),
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(0)),
        )
        .map_err(|e| Error::Internal(format!("an empty batch: {e}")))?;
        let mut row = 0u64;
        Ok(Box::new(std::iter::from_fn(move || {
            let events = generator.next_events()?;
            let origin = BatchOrigin {
                source: Arc::clone(&source),
                first_row: row,
                first_pos: row,
            };
            row += events.len() as u64;
            Some(Ok(SourceBatch {
                events: Some(events),
                ..SourceBatch::new(empty.clone(), origin)
            }))
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;

    fn small() -> GeneratorConfig {
        GeneratorConfig {
            events: 20_000,
            users: 200,
            items: 300,
            batch_rows: 1000,
            ..GeneratorConfig::default()
        }
    }

    fn column(batches: &[RecordBatch], i: usize) -> Vec<u64> {
        batches
            .iter()
            .flat_map(|b| b.column(i).as_primitive::<UInt64Type>().values().to_vec())
            .collect()
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<_> = Generator::new(small()).unwrap().collect();
        let b: Vec<_> = Generator::new(small()).unwrap().collect();
        assert_eq!(a, b);
        assert_eq!(a.iter().map(|b| b.num_rows()).sum::<usize>(), 20_000);
        let c: Vec<_> = Generator::new(GeneratorConfig { seed: 7, ..small() })
            .unwrap()
            .collect();
        assert_ne!(column(&a, 1), column(&c, 1));
    }

    #[test]
    fn ids_in_range_times_increase_popularity_skewed() {
        let batches: Vec<_> = Generator::new(small()).unwrap().collect();
        let users = column(&batches, 0);
        let items = column(&batches, 1);
        assert!(users.iter().all(|&u| u < 200) && items.iter().all(|&i| i < 300));
        let times: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                b.column(3)
                    .as_primitive::<arrow_array::types::TimestampMillisecondType>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let mut counts = vec![0u32; 300];
        items.iter().for_each(|&i| counts[i as usize] += 1);
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top10: u32 = counts[..10].iter().sum();
        assert!(
            top10 as f64 > 0.1 * 20_000.0,
            "top 10 items hold {top10} events"
        );
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(Generator::new(GeneratorConfig {
            items: 0,
            ..small()
        })
        .is_err());
        assert!(GeneratorSource::new(GeneratorConfig {
            noise: 2.0,
            ..small()
        })
        .is_err());
    }
}
