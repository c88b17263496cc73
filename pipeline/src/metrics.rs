//! Prequential quality and throughput counters, and the names they are reported under.
//!
//! [`Quality`] is a plain sum of counters, so per-worker and per-window values merge by
//! addition and the derived metrics (recall, NDCG, MRR, mean loss) are computed once at
//! the end from the sums: no averaging of averages.

use serde::{Deserialize, Serialize};

/// Summary JSON key for the events replayed.
pub const EVENTS: &str = "events";
/// Summary JSON key for the events scored.
pub const EVENTS_SCORED: &str = "events_scored";
/// Summary JSON key for the mean reciprocal rank.
pub const MRR: &str = "mrr";
/// Summary JSON key for the training throughput.
pub const TRAIN_EVENTS_PER_SEC: &str = "train_events_per_sec";
/// Summary JSON key for the wall time.
pub const TOTAL_SECONDS: &str = "total_seconds";

/// Summary JSON key for recall at `k`.
pub fn recall_key(k: usize) -> String {
    format!("recall@{k}")
}

/// Summary JSON key for NDCG at `k`.
pub fn ndcg_key(k: usize) -> String {
    format!("ndcg@{k}")
}

/// Additive quality counters over a set of events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Events seen.
    pub events: u64,
    /// Events scored (after warm-up, every N-th).
    pub scored: u64,
    /// Scored events whose item ranked within the top K.
    pub hits: u64,
    /// Sum of NDCG@K over scored events, in fixed point (units of 2^-64). Integer sums
    /// are exact in any order, so however the events are split over workers and
    /// processes, the merged metrics are the same bit for bit.
    pub ndcg_fixed: u128,
    /// Sum of reciprocal ranks over scored events (0 for items never seen before), in
    /// fixed point like `ndcg_fixed`.
    pub rr_fixed: u128,
    /// Training pairs (positive, negative) the model took a step on.
    pub pairs: u64,
    /// Sum of the pairwise training loss.
    pub loss_sum: f64,
}

impl Quality {
    /// Records one scored event. `rank` is the 0-based rank of the held-out item among
    /// the candidates, or `None` when the item could not be ranked (never seen before).
    #[inline]
    pub fn record_rank(&mut self, rank: Option<u64>, k: usize) {
        self.scored += 1;
        if let Some(rank) = rank {
            self.rr_fixed += to_fixed(1.0 / (rank as f64 + 1.0));
            if rank < k as u64 {
                self.hits += 1;
                self.ndcg_fixed += to_fixed(1.0 / (rank as f64 + 2.0).log2());
            }
        }
    }

    /// Adds another set of counters.
    pub fn merge(&mut self, other: &Quality) {
        self.events += other.events;
        self.scored += other.scored;
        self.hits += other.hits;
        self.ndcg_fixed += other.ndcg_fixed;
        self.rr_fixed += other.rr_fixed;
        self.pairs += other.pairs;
        self.loss_sum += other.loss_sum;
    }

    /// Sum of NDCG@K over scored events.
    pub fn ndcg_sum(&self) -> f64 {
        from_fixed(self.ndcg_fixed)
    }

    /// Sum of reciprocal ranks over scored events.
    pub fn rr_sum(&self) -> f64 {
        from_fixed(self.rr_fixed)
    }

    /// What was added since `earlier` (counters of the same stream, taken before).
    pub fn since(&self, earlier: &Quality) -> Quality {
        Quality {
            events: self.events.saturating_sub(earlier.events),
            scored: self.scored.saturating_sub(earlier.scored),
            hits: self.hits.saturating_sub(earlier.hits),
            ndcg_fixed: self.ndcg_fixed.saturating_sub(earlier.ndcg_fixed),
            rr_fixed: self.rr_fixed.saturating_sub(earlier.rr_fixed),
            pairs: self.pairs.saturating_sub(earlier.pairs),
            loss_sum: self.loss_sum - earlier.loss_sum,
        }
    }

    /// Share of scored events that hit (recall@K with one held-out item per event).
    pub fn recall(&self) -> f64 {
        ratio(self.hits as f64, self.scored)
    }

    /// Mean NDCG@K.
    pub fn ndcg(&self) -> f64 {
        ratio(self.ndcg_sum(), self.scored)
    }

    /// Mean reciprocal rank.
    pub fn mrr(&self) -> f64 {
        ratio(self.rr_sum(), self.scored)
    }

    /// Mean training loss per pair (0 when nothing was trained).
    pub fn loss(&self) -> f64 {
        ratio(self.loss_sum, self.pairs)
    }
}

/// One in the fixed-point sums.
const FIXED_ONE: f64 = 18_446_744_073_709_551_616.0; // 2^64

/// `x` in `[0, 1]` to fixed point (rounded; 2^-65 at most off).
#[inline]
fn to_fixed(x: f64) -> u128 {
    (x * FIXED_ONE).round() as u128
}

fn from_fixed(v: u128) -> f64 {
    v as f64 / FIXED_ONE
}

fn ratio(sum: f64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zero_is_a_full_hit() {
        let mut q = Quality::default();
        q.record_rank(Some(0), 10);
        assert_eq!(q.hits, 1);
        assert!((q.ndcg() - 1.0).abs() < 1e-12);
        assert!((q.mrr() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn misses_count_as_scored() {
        let mut q = Quality::default();
        q.record_rank(Some(2), 10);
        q.record_rank(Some(10), 10);
        q.record_rank(None, 10);
        assert_eq!(q.scored, 3);
        assert_eq!(q.hits, 1);
        assert!((q.recall() - 1.0 / 3.0).abs() < 1e-12);
        assert!((q.ndcg_sum() - 0.5).abs() < 1e-12);
        assert!((q.rr_sum() - (1.0 / 3.0 + 1.0 / 11.0)).abs() < 1e-12);
    }

    #[test]
    fn merge_adds() {
        let mut a = Quality {
            events: 1,
            scored: 1,
            hits: 1,
            ..Default::default()
        };
        let b = Quality {
            events: 2,
            scored: 3,
            pairs: 4,
            loss_sum: 2.0,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!((a.events, a.scored, a.hits, a.pairs), (3, 4, 1, 4));
        assert!((a.loss() - 0.5).abs() < 1e-12);
    }
}
