//! Writing events to Parquet, atomically: a file appears complete or not at all.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tidepool_pipeline::{Error, Result};

/// Default value for the rows per row group of written files: large enough for good
/// compression, small enough that several workers can share a file's replay.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 1 << 20;

/// Rows per data page at most (see [`EventWriter::create`]).
const DATA_PAGE_ROWS: usize = 1 << 18;

/// Bytes per data page at most, encoded.
const DATA_PAGE_BYTES: usize = 4 << 20;

/// Writes record batches to `path` through a temporary file that is renamed into place on
/// [`EventWriter::finish`]; dropping the writer unfinished removes the temporary file.
pub struct EventWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows: u64,
}

impl EventWriter {
    /// Starts a Parquet file with `schema`, Snappy-compressed.
    pub fn create(
        path: impl AsRef<Path>,
        schema: arrow_schema::SchemaRef,
        row_group_rows: usize,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(row_group_rows.max(1)))
            // A replay reads every page of the columns it projects, and parquet-rs
            // allocates a few times per page it decodes: pages of up to 256 k rows (and
            // 4 MiB) instead of the default 20 k rows (1 MiB) make that per-page cost
            // small per event; filters and point reads, which smaller pages help, are not
            // what these files are for.
            .set_data_page_row_count_limit(DATA_PAGE_ROWS)
            .set_data_page_size_limit(DATA_PAGE_BYTES)
            .build();
        let writer = ArrowWriter::try_new(file, schema, Some(props))
            .map_err(|e| Error::connector(format!("writing {}", path.display()), e))?;
        Ok(Self {
            path,
            tmp,
            writer: Some(writer),
            rows: 0,
        })
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| Error::Internal("write after finish".into()))?;
        writer
            .write(batch)
            .map_err(|e| Error::connector(format!("writing {}", self.path.display()), e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes the file, syncs it and moves it into place. Returns the rows written.
    pub fn finish(mut self) -> Result<u64> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::Internal("finish twice".into()))?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::connector(format!("closing {}", self.path.display()), e))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.rows)
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Unfinished: leave no half-written file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
