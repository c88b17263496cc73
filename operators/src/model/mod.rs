//! The models a variant can train, behind one enum so the per-event loop stays
//! monomorphic: `mostpop` (counts so far), `bpr` (matrix factorisation), `itemknn`
//! (co-occurrence over recent sequences) and `ensemble` (a learned mix of the others;
//! the learner drives it, since it reads the other variants' scores).

pub(crate) mod bpr;
pub(crate) mod ensemble;
mod itemknn;
mod knn_lists;

use crate::history::History;
use std::sync::Arc;

pub(crate) use bpr::Bpr;
pub use bpr::{reference_kernel, reference_kernel_parallel, reference_scoring_kernel, KernelRun};
pub(crate) use ensemble::Ensemble;
pub use ensemble::{Norm, Objective, MAX_COMPONENTS, RANK_DEPTH, TOP_PAIRS};
pub(crate) use itemknn::ItemKnn;
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
    /// Co-occurrence over recent sequences (a full replica on every worker).
    ItemKnn(Box<ItemKnn>),
    /// A learned mix of other variants' scores.
    Ensemble(Box<Ensemble>),
}

impl Model {
    /// The worker's half of a model; `table` is the process-wide item table for BPR.
    /// `components` are the variant indices an ensemble mixes.
    pub(crate) fn new(
        cfg: &ModelConfig,
        seed: u64,
        table: Option<Arc<ItemTable>>,
        components: Vec<usize>,
    ) -> Self {
        match (cfg.kind, table) {
            (ModelKind::Bpr, Some(table)) => {
                Model::Bpr(Box::new(Bpr::new(cfg.clone(), seed, table)))
            }
            (ModelKind::Itemknn, _) => Model::ItemKnn(Box::new(ItemKnn::new(cfg.knn.clone()))),
            (ModelKind::Ensemble, _) => {
                Model::Ensemble(Box::new(Ensemble::new(&cfg.ensemble, components)))
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
            _ => None,
        }
    }

    /// The co-occurrence state, for `itemknn`.
    pub(crate) fn knn_mut(&mut self) -> Option<&mut ItemKnn> {
        match self {
            Model::ItemKnn(m) => Some(m),
            _ => None,
        }
    }

    /// The co-occurrence state, for `itemknn`.
    pub(crate) fn knn(&self) -> Option<&ItemKnn> {
        match self {
            Model::ItemKnn(m) => Some(m),
            _ => None,
        }
    }

    /// Learns from an event of any user (counting models learn from every event on
    /// every worker; the others only from their owned events, in [`Model::train`]).
    #[inline]
    pub(crate) fn observe(&mut self, user: u64, item: u32, ts: i64) {
        if let Model::ItemKnn(m) = self {
            m.observe(user, item, ts);
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

    /// Rank of `target` for `user` (dense `user`, raw `raw`) among the first
    /// `catalogue.len()` items minus history. Ensembles are ranked by the learner.
    pub(crate) fn rank(
        &mut self,
        user: u32,
        raw: u64,
        target: u32,
        catalogue: &ItemCatalogue,
        history: History<'_>,
        scratch: &mut Vec<f32>,
    ) -> u64 {
        match self {
            Model::MostPop => rank_of(catalogue.counts(), target, history.iter()),
            Model::Bpr(m) => {
                m.score_all(user, catalogue.alive(), scratch);
                rank_of(scratch, target, history.iter())
            }
            Model::ItemKnn(m) => {
                m.rank(raw, target, catalogue.alive(), catalogue.expired(), history)
            }
            Model::Ensemble(_) => catalogue.len() as u64,
        }
    }

    /// Dense scores of every item for a user (expired items: negative infinity, or 0 for
    /// `mostpop`, which the callers mask). Not for ensembles.
    pub(crate) fn score_all(
        &mut self,
        user: u32,
        raw: u64,
        catalogue: &ItemCatalogue,
        out: &mut Vec<f32>,
    ) {
        match self {
            Model::MostPop => {
                out.clear();
                out.extend(catalogue.counts().iter().map(|&c| c as f32));
            }
            Model::Bpr(m) => m.score_all(user, catalogue.alive(), out),
            Model::ItemKnn(m) => m.score_all(raw, catalogue.alive(), out),
            Model::Ensemble(_) => {
                out.clear();
                out.resize(catalogue.len(), 0.0);
            }
        }
    }

    /// Moves user state after an eviction; returns the bytes freed.
    pub(crate) fn remap_users(&mut self, remap: &[Option<u32>]) -> u64 {
        match self {
            Model::Bpr(m) => m.remap_users(remap),
            _ => 0,
        }
    }

    /// Releases the rows of expired items; returns the bytes taken out of the table.
    pub(crate) fn release_items(&mut self, alive: &[bool]) -> u64 {
        match self {
            Model::Bpr(m) => m.release_items(alive),
            _ => 0,
        }
    }

    /// The user rows (empty for models without user state).
    pub(crate) fn user_rows(&self) -> &[f32] {
        match self {
            Model::Bpr(m) => m.user_rows(),
            _ => &[],
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
            Model::Bpr(m) => m.user_bytes(),
            _ => 0,
        }
    }

    /// The model's score of one item for a user (for hard-negative samplers).
    #[inline]
    pub(crate) fn score(&mut self, user: u32, item: u32) -> f32 {
        match self {
            Model::Bpr(m) => m.score(user, item),
            // The others train no negatives; a constant keeps samplers well defined.
            _ => 0.0,
        }
    }

    /// Learns from one positive; returns the summed pair loss. `candidates` is the
    /// number of items negatives were drawn from (for the logQ correction).
    #[inline]
    pub(crate) fn train(
        &mut self,
        user: u32,
        item: u32,
        negatives: &[Negative],
        ahead: &[u32],
        candidates: usize,
    ) -> f64 {
        match self {
            Model::Bpr(m) => m.train(user, item, negatives, ahead, candidates),
            _ => 0.0,
        }
    }
}
