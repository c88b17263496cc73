//! Model deltas: embedding rows that changed, handed to serving.
//!
//! Deltas are published at every checkpoint, so what serving sees includes a state the
//! model can restart from, and optionally at an interval between checkpoints. Keys are `variant/entity/id`: on a compacted Kafka topic the
//! last value per key wins and the topic holds the whole model. A user evicted past its
//! TTL or an item expired past its TTL is published as a *tombstone* (`deleted`; on Kafka
//! a message with the key and no value, which compaction removes the key for), so the
//! published model shrinks with the trained one.
//!
//! `itemknn` publishes its changed neighbour lists as `item` rows whose `neighbours` are
//! the neighbour item ids and whose `vector` holds the weights co(item -> neighbour); a
//! serving side scores a user's candidates with them as the model does (see docs/kafka.md).

use serde::Serialize;

use crate::error::Result;

/// Which table a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// A user embedding.
    User,
    /// An item embedding.
    Item,
}

impl Entity {
    /// `user` or `item`.
    pub fn name(self) -> &'static str {
        match self {
            Entity::User => "user",
            Entity::Item => "item",
        }
    }
}

/// One changed row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelDelta {
    /// Variant name.
    pub variant: String,
    /// User or item.
    pub entity: Entity,
    /// Raw id.
    pub id: u64,
    /// The embedding (without optimiser state); empty for a tombstone. For an `itemknn`
    /// neighbour list: the weights, parallel to `neighbours`.
    pub vector: Vec<f32>,
    /// `itemknn` items: the neighbours' item ids (`vector` holds their co-occurrence
    /// weights, in units of one fresh adjacent pair); empty for embeddings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub neighbours: Vec<u64>,
    /// The item bias (items of models with a bias only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<f32>,
    /// The checkpoint this row belongs to.
    pub checkpoint: u64,
    /// The row is gone (user evicted, item expired): serving drops the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl ModelDelta {
    /// The tombstone of `entity` `id` of `variant`.
    pub fn tombstone(variant: &str, entity: Entity, id: u64, checkpoint: u64) -> Self {
        Self {
            variant: variant.to_string(),
            entity,
            id,
            vector: Vec::new(),
            neighbours: Vec::new(),
            bias: None,
            checkpoint,
            deleted: true,
        }
    }

    /// The message key: `variant/entity/id`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.variant, self.entity.name(), self.id)
    }
}

/// Somewhere deltas go (a Kafka topic, files). Shared by all workers.
pub trait DeltaSink: Send + Sync + std::fmt::Debug {
    /// Publishes deltas (in order: a tombstone before a later row of the same key) and
    /// returns once they are durable (acknowledged).
    fn publish(&self, deltas: &[ModelDelta]) -> Result<()>;
}

/// Publishes to several sinks (a topic and files), each in turn.
#[derive(Debug)]
pub struct DeltaSinks(pub Vec<std::sync::Arc<dyn DeltaSink>>);

impl DeltaSink for DeltaSinks {
    fn publish(&self, deltas: &[ModelDelta]) -> Result<()> {
        self.0.iter().try_for_each(|s| s.publish(deltas))
    }
}
