//! Reading models back out of checkpoints: `tidepool recommend`.
//!
//! The checkpoint is restored into a one-worker learner, so recommendations use exactly
//! the scoring code (and tie rule) the prequential evaluator ranks with.

use tidepool_pipeline::{Error, Result};

use crate::checkpoint::Loaded;
use crate::learner::{Learner, Protocol};
use crate::model::Model;

/// One recommended item.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Recommendation {
    /// Item id.
    pub item: u64,
    /// The model's score.
    pub score: f32,
}

/// A checkpoint's models, ready to score.
pub struct Recommender {
    learner: Learner,
    names: Vec<String>,
}

impl std::fmt::Debug for Recommender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recommender")
            .field("variants", &self.names)
            .finish()
    }
}

impl Recommender {
    /// Rebuilds the models of `loaded` (which must carry its configuration).
    pub fn new(loaded: &Loaded) -> Result<Self> {
        let config = loaded.manifest.config.clone().ok_or_else(|| {
            Error::Config(
                "this checkpoint does not record its configuration (written by an older tidepool)"
                    .into(),
            )
        })?;
        let tables: Vec<_> = config
            .variants
            .iter()
            .map(|v| Model::table_for(&v.model, config.seed))
            .collect();
        for (table, rows) in tables.iter().zip(&loaded.items) {
            if let (Some(table), Some(rows)) = (table, rows) {
                table.import(rows, loaded.shared.catalogue.alive());
            }
        }
        let protocol = Protocol::new(&config.eval, 0, 0, 0);
        let mut learner = Learner::new(
            0,
            1,
            protocol,
            config.seed,
            &config.variants,
            &tables,
            config.state.clone(),
        );
        learner.restore(&loaded.shared, loaded.parts.clone(), config.seed);
        Ok(Self {
            learner,
            names: config.variants.iter().map(|v| v.name.clone()).collect(),
        })
    }

    /// Variant names, in order.
    pub fn variants(&self) -> &[String] {
        &self.names
    }

    /// The `k` best items for `user` under `variant` (the first when `None`); `None` for a
    /// user the checkpoint does not hold.
    pub fn recommend(
        &mut self,
        variant: Option<&str>,
        user: u64,
        k: usize,
    ) -> Result<Option<Vec<Recommendation>>> {
        let index = match variant {
            None => 0,
            Some(name) => self.names.iter().position(|n| n == name).ok_or_else(|| {
                Error::Config(format!(
                    "no variant {name:?}; this checkpoint has {:?}",
                    self.names
                ))
            })?,
        };
        Ok(self.learner.top_k(index, user, k).map(|items| {
            items
                .into_iter()
                .map(|(item, score)| Recommendation { item, score })
                .collect()
        }))
    }
}
