//! Model deltas as Parquet files: the file side of publishing changed embedding rows for
//! serving (the Kafka side is `tidepool-connector-kafka`'s `KafkaDeltaSink`).
//!
//! Every publication (one worker's changed rows at one checkpoint) becomes one file,
//! `deltas-<checkpoint, 10 digits>-<run start, ns>-<sequence, 6 digits>.parquet`, written
//! atomically (temporary file, fsync, rename, fsync of the directory). Reading every file
//! in name order and keeping the last row per `(variant, entity, id)` (dropping keys whose
//! last row is `deleted`) gives the published model. The run-start part of the name orders
//! a republication after a crash (same checkpoint id, new run) after the first attempt,
//! so its rows win.
//!
//! Columns: `variant` (utf8), `entity` (utf8, `user` or `item`), `id` (uint64), `vector`
//! (list of float32, null for tombstones), `bias` (float32, null unless the model has item
//! biases), `checkpoint` (uint64), `deleted` (bool), `neighbours` (list of uint64:
//! `itemknn` neighbour item ids parallel to `vector`; empty for embeddings).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow_array::builder::{Float32Builder, ListBuilder, UInt64Builder};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, ListArray, RecordBatch, StringArray, UInt64Array,
};
use arrow_schema::{Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tidepool_pipeline::delta::{DeltaSink, Entity, ModelDelta};
use tidepool_pipeline::{Error, Result};

use crate::writer::{EventWriter, DEFAULT_ROW_GROUP_ROWS};

/// Writes every publication into its own Parquet file in a directory.
#[derive(Debug)]
pub struct ParquetDeltaSink {
    dir: PathBuf,
    run: u128,
    seq: AtomicU64,
}

impl ParquetDeltaSink {
    /// A sink writing into `dir` (created if missing).
    pub fn new(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            dir,
            run,
            seq: AtomicU64::new(0),
        })
    }
}

fn to_batch(deltas: &[ModelDelta]) -> Result<RecordBatch> {
    let mut vectors = ListBuilder::new(Float32Builder::new());
    let mut neighbours = ListBuilder::new(UInt64Builder::new());
    for d in deltas {
        neighbours.values().append_slice(&d.neighbours);
        neighbours.append(true);
        if d.deleted {
            vectors.append(false);
        } else {
            vectors.values().append_slice(&d.vector);
            vectors.append(true);
        }
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "variant",
            Arc::new(StringArray::from_iter_values(
                deltas.iter().map(|d| d.variant.as_str()),
            )),
        ),
        (
            "entity",
            Arc::new(StringArray::from_iter_values(
                deltas.iter().map(|d| d.entity.name()),
            )),
        ),
        (
            "id",
            Arc::new(UInt64Array::from_iter_values(deltas.iter().map(|d| d.id))),
        ),
        ("vector", Arc::new(vectors.finish())),
        (
            "bias",
            Arc::new(Float32Array::from_iter(deltas.iter().map(|d| d.bias))),
        ),
        (
            "checkpoint",
            Arc::new(UInt64Array::from_iter_values(
                deltas.iter().map(|d| d.checkpoint),
            )),
        ),
        (
            "deleted",
            Arc::new(BooleanArray::from_iter(
                deltas.iter().map(|d| Some(d.deleted)),
            )),
        ),
        ("neighbours", Arc::new(neighbours.finish())),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, a)| {
                // Tombstones have no vector; only models with item biases have a bias.
                let nullable = matches!(*name, "vector" | "bias");
                Field::new(*name, a.data_type().clone(), nullable)
            })
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(|e| Error::Internal(format!("building a delta batch: {e}")))
}

impl DeltaSink for ParquetDeltaSink {
    fn publish(&self, deltas: &[ModelDelta]) -> Result<()> {
        let Some(first) = deltas.first() else {
            return Ok(());
        };
        let batch = to_batch(deltas)?;
        let seq = self.seq.fetch_add(1, Ordering::AcqRel);
        let path = self.dir.join(format!(
            "deltas-{:010}-{}-{seq:06}.parquet",
            first.checkpoint, self.run
        ));
        let mut writer = EventWriter::create(&path, batch.schema(), DEFAULT_ROW_GROUP_ROWS)?;
        writer.write(&batch)?;
        writer.finish()?;
        // The rename is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))
    }
}

/// Every delta in `dir`'s files, in publication order (file name, then row): keep the
/// last per key for the current model.
pub fn read_deltas(dir: &Path) -> Result<Vec<ModelDelta>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("deltas-") && n.ends_with(".parquet"))
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let bad = |reason: String| Error::BadInput {
            location: path.display().to_string(),
            reason,
        };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| bad(format!("not a delta file: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| bad(format!("reading: {e}")))?;
            read_batch(&batch, &mut out).map_err(bad)?;
        }
    }
    Ok(out)
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
) -> std::result::Result<&'a T, String> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| format!("column {name} is missing or has the wrong type"))
}

fn read_batch(batch: &RecordBatch, out: &mut Vec<ModelDelta>) -> std::result::Result<(), String> {
    let variant = column::<StringArray>(batch, "variant")?;
    let entity = column::<StringArray>(batch, "entity")?;
    let id = column::<UInt64Array>(batch, "id")?;
    let vector = column::<ListArray>(batch, "vector")?;
    let bias = column::<Float32Array>(batch, "bias")?;
    let checkpoint = column::<UInt64Array>(batch, "checkpoint")?;
    let deleted = column::<BooleanArray>(batch, "deleted")?;
    let neighbours = column::<ListArray>(batch, "neighbours")?;
    for r in 0..batch.num_rows() {
        let entity = match entity.value(r) {
            "user" => Entity::User,
            "item" => Entity::Item,
            other => return Err(format!("row {r}: unknown entity {other:?}")),
        };
        let values = if vector.is_null(r) {
            Vec::new()
        } else {
            let row = vector.value(r);
            let floats = row
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| format!("row {r}: vector is not float32"))?;
            floats.values().to_vec()
        };
        let row = neighbours.value(r);
        let ids = row
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| format!("row {r}: neighbours are not uint64"))?;
        out.push(ModelDelta {
            variant: variant.value(r).to_string(),
            entity,
            id: id.value(r),
            vector: values,
            neighbours: ids.values().to_vec(),
            bias: (!bias.is_null(r)).then(|| bias.value(r)),
            checkpoint: checkpoint.value(r),
            deleted: deleted.value(r),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, v: f32, checkpoint: u64) -> ModelDelta {
        ModelDelta {
            variant: "bpr".into(),
            entity: Entity::Item,
            id,
            vector: vec![v, -v],
            neighbours: Vec::new(),
            bias: Some(v / 2.0),
            checkpoint,
            deleted: false,
        }
    }

    #[test]
    fn publications_read_back_in_order_with_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ParquetDeltaSink::new(dir.path().join("deltas")).unwrap();
        sink.publish(&[]).unwrap();
        sink.publish(&[row(1, 0.5, 1), row(2, 1.5, 1)]).unwrap();
        let gone = ModelDelta::tombstone("bpr", Entity::User, 7, 2);
        sink.publish(&[gone.clone(), row(2, 2.5, 2)]).unwrap();
        let back = read_deltas(&dir.path().join("deltas")).unwrap();
        assert_eq!(
            back,
            vec![row(1, 0.5, 1), row(2, 1.5, 1), gone, row(2, 2.5, 2)]
        );
        let files = std::fs::read_dir(dir.path().join("deltas"))
            .unwrap()
            .count();
        assert_eq!(files, 2, "an empty publication writes no file");
    }
}
