//! What a running dataflow shows while it runs (the metrics endpoint reads it): quality
//! counters per variant as they grow, the newest event time read, and the watermark
//! (the event time before which everything is trained).
//!
//! Workers add a round's counters at the end of the round (one short lock per variant),
//! so the hot per-event path touches nothing shared.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use tidepool_pipeline::Quality;

use crate::config::BacktestConfig;

/// Live counters of one run.
#[derive(Debug)]
pub struct LiveMetrics {
    names: Vec<String>,
    k: usize,
    quality: Vec<Mutex<Quality>>,
    newest_ms: AtomicI64,
    watermark_ms: AtomicI64,
    rows: AtomicU64,
    /// Per variant: an ensemble's component names (empty for other models).
    components: Vec<Vec<String>>,
    /// Per variant: the latest mixing weights some worker reported.
    weights: Vec<Mutex<Option<Vec<f32>>>>,
    /// Bytes of one worker's replica of the `itemknn` state.
    cooccurrence_bytes: AtomicU64,
}

/// No event time yet.
const NONE: i64 = i64::MIN;

impl LiveMetrics {
    /// Counters for `config`'s variants.
    pub fn new(config: &BacktestConfig) -> Self {
        Self {
            names: config.variants.iter().map(|v| v.name.clone()).collect(),
            k: config.eval.k,
            quality: config
                .variants
                .iter()
                .map(|_| Mutex::new(Quality::default()))
                .collect(),
            newest_ms: AtomicI64::new(NONE),
            watermark_ms: AtomicI64::new(NONE),
            rows: AtomicU64::new(0),
            components: config
                .variants
                .iter()
                .map(|v| match v.model.kind {
                    crate::config::ModelKind::Ensemble => v.model.ensemble.components.clone(),
                    _ => Vec::new(),
                })
                .collect(),
            weights: config.variants.iter().map(|_| Mutex::new(None)).collect(),
            cooccurrence_bytes: AtomicU64::new(0),
        }
    }

    /// Each ensemble's name, component names and latest weights (those of the worker
    /// that reported last; workers learn their own).
    pub fn weights(&self) -> Vec<(String, Vec<String>, Vec<f32>)> {
        self.names
            .iter()
            .zip(&self.components)
            .zip(&self.weights)
            .filter_map(|((name, components), w)| {
                let w = w.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
                Some((name.clone(), components.clone(), w))
            })
            .collect()
    }

    /// Bytes of one worker's replica of the `itemknn` co-occurrence state.
    pub fn cooccurrence_bytes(&self) -> u64 {
        self.cooccurrence_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_weights(&self, variant: usize, weights: &[f32]) {
        if let Some(slot) = self.weights.get(variant) {
            // Every round sets them: the vector is reused, not reallocated.
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_mut() {
                Some(kept) => {
                    kept.clear();
                    kept.extend_from_slice(weights);
                }
                None => *slot = Some(weights.to_vec()),
            }
        }
    }

    pub(crate) fn set_cooccurrence_bytes(&self, bytes: u64) {
        self.cooccurrence_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The cut-off K of the recall and NDCG counters.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Each variant's name and counters so far (events owned by this process's workers).
    pub fn quality(&self) -> Vec<(String, Quality)> {
        self.names
            .iter()
            .zip(&self.quality)
            .map(|(name, q)| (name.clone(), *q.lock().unwrap_or_else(|p| p.into_inner())))
            .collect()
    }

    /// The newest event time read from the source (ms), once there is one.
    pub fn newest_event_ms(&self) -> Option<i64> {
        Some(self.newest_ms.load(Ordering::Relaxed)).filter(|&t| t != NONE)
    }

    /// The event time (ms) before which every event read has been scored and trained.
    pub fn watermark_ms(&self) -> Option<i64> {
        Some(self.watermark_ms.load(Ordering::Relaxed)).filter(|&t| t != NONE)
    }

    /// Rows read from the source by this process (events and rejected records).
    pub fn rows_read(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    pub(crate) fn add_rows(&self, n: u64) {
        self.rows.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, round: &[Quality]) {
        for (slot, q) in self.quality.iter().zip(round) {
            if *q != Quality::default() {
                slot.lock().unwrap_or_else(|p| p.into_inner()).merge(q);
            }
        }
    }

    pub(crate) fn saw_event_time(&self, ms: i64) {
        self.newest_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub(crate) fn set_watermark(&self, ms: i64) {
        self.watermark_ms.fetch_max(ms, Ordering::Relaxed);
    }
}
