//! The models a variant can train, behind one enum so the per-event loop stays
//! monomorphic: `mostpop` (counts so far) and `bpr` (matrix factorisation).

mod bpr;

use std::sync::Arc;

pub(crate) use bpr::Bpr;
use rustc_hash::FxHashSet;
use tidepool_samplers::Negative;

use crate::config::{ModelConfig, ModelKind};
use crate::eval::rank_of;
use crate::item_table::ItemTable;
use crate::state::ItemCatalogue;

/// One variant's model on one worker.
pub(crate) enum Model {
    /// Scores items by how often they were interacted with so far; learns nothing else.
    MostPop,
    /// Matrix factorisation with BPR.
    Bpr(Box<Bpr>),
}

impl Model {
    /// The worker's half of a model; `table` is the process-wide item table for BPR.
    pub(crate) fn new(cfg: &ModelConfig, seed: u64, table: Option<Arc<ItemTable>>) -> Self {
        match (cfg.kind, table) {
            (ModelKind::Bpr, Some(table)) => {
                Model::Bpr(Box::new(Bpr::new(cfg.clone(), seed, table)))
            }
            _ => Model::MostPop,
        }
    }

    /// The item table a process needs for this configuration, if any.
    pub(crate) fn table_for(cfg: &ModelConfig, seed: u64) -> Option<Arc<ItemTable>> {
        (cfg.kind == ModelKind::Bpr)
            .then(|| Arc::new(ItemTable::new(Bpr::layout_for(cfg), seed, cfg.init_std)))
    }

    /// The BPR half of this model, if it has one.
    pub(crate) fn bpr_mut(&mut self) -> Option<&mut Bpr> {
        match self {
            Model::Bpr(m) => Some(m),
            Model::MostPop => None,
        }
    }

    /// Whether training takes negatives.
    pub(crate) fn wants_negatives(&self) -> bool {
        matches!(self, Model::Bpr(_))
    }

    #[inline]
    pub(crate) fn ensure_user(&mut self, user: u32, id: u64) {
        if let Model::Bpr(m) = self {
            m.ensure_user(user, id);
        }
    }

    /// Rank of `target` for `user` among the first `catalogue.len()` items minus history.
    pub(crate) fn rank(
        &mut self,
        user: u32,
        target: u32,
        catalogue: &ItemCatalogue,
        history: &FxHashSet<u32>,
        scratch: &mut Vec<f32>,
    ) -> u64 {
        match self {
            Model::MostPop => rank_of(catalogue.counts(), target, history.iter().copied()),
            Model::Bpr(m) => {
                m.score_all(user, catalogue.alive(), scratch);
                rank_of(scratch, target, history.iter().copied())
            }
        }
    }

    /// Moves user state after an eviction; returns the bytes freed.
    pub(crate) fn remap_users(&mut self, remap: &[Option<u32>]) -> u64 {
        match self {
            Model::MostPop => 0,
            Model::Bpr(m) => m.remap_users(remap),
        }
    }

    /// Releases the rows of expired items; returns the bytes taken out of the table.
    pub(crate) fn release_items(&mut self, alive: &[bool]) -> u64 {
        match self {
            Model::MostPop => 0,
            Model::Bpr(m) => m.release_items(alive),
        }
    }

    /// The user rows (empty for models without user state).
    pub(crate) fn user_rows(&self) -> &[f32] {
        match self {
            Model::MostPop => &[],
            Model::Bpr(m) => m.user_rows(),
        }
    }

    /// Appends restored user rows.
    pub(crate) fn extend_user_rows(&mut self, rows: &[f32]) {
        if let Model::Bpr(m) = self {
            m.extend_user_rows(rows);
        }
    }

    /// Heap bytes of the user state this worker holds for the model.
    pub(crate) fn user_bytes(&self) -> u64 {
        match self {
            Model::MostPop => 0,
            Model::Bpr(m) => m.user_bytes(),
        }
    }

    /// The model's score of one item for a user (for hard-negative samplers).
    #[inline]
    pub(crate) fn score(&mut self, user: u32, item: u32) -> f32 {
        match self {
            // Mostpop trains no negatives; a constant keeps samplers well defined.
            Model::MostPop => 0.0,
            Model::Bpr(m) => m.score(user, item),
        }
    }

    /// Learns from one positive; returns the summed pair loss.
    #[inline]
    pub(crate) fn train(&mut self, user: u32, item: u32, negatives: &[Negative]) -> f64 {
        match self {
            Model::MostPop => 0.0,
            Model::Bpr(m) => m.train(user, item, negatives),
        }
    }
}
