//! The column chunks of one row group, read into memory whole before decoding.
//!
//! parquet-rs reading a `File` makes, for every data page, a buffered reader for the page
//! header (a duplicated descriptor and an 8 KiB buffer) and a vector for the page's bytes:
//! allocator calls by the page, which with another writer's small pages (parquet-rs's
//! default is 20 k rows) came to about 2 calls per 1,000 events. Reading the projected
//! chunks of a row group in one pass, with adjacent chunks merged into one read, costs
//! a call or two per row group; pages are then slices of that memory. What remains per
//! page is the decompression buffer parquet-rs allocates itself.
//!
//! The price is the row group's compressed projected bytes in memory while it is read;
//! above [`IN_MEMORY_LIMIT`] the source reads the file page by page as before.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use bytes::{Buf, Bytes};
use parquet::errors::ParquetError;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::reader::{ChunkReader, Length};

/// The largest row group (projected, compressed bytes) read into memory whole.
pub(crate) const IN_MEMORY_LIMIT: u64 = 64 << 20;

/// Reads closer than this apart are merged: reading the gap costs less than a call.
const MERGE_GAP: u64 = 64 << 10;

/// Byte ranges `[start, end)` of the file that hold the leaf columns `included` of `rg`,
/// sorted, with ranges closer than [`MERGE_GAP`] merged.
pub(crate) fn chunk_ranges(
    rg: &RowGroupMetaData,
    included: impl Fn(usize) -> bool,
) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = rg
        .columns()
        .iter()
        .enumerate()
        .filter(|(leaf, _)| included(*leaf))
        .map(|(_, col)| {
            let start = col
                .dictionary_page_offset()
                .unwrap_or_else(|| col.data_page_offset())
                .max(0) as u64;
            (start, start + col.compressed_size().max(0) as u64)
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 + MERGE_GAP => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Parts of a file held in memory, served to parquet-rs as if they were the file.
#[derive(Debug)]
pub(crate) struct RowGroupBytes {
    /// `(offset in the file, bytes)`, sorted by offset, not overlapping.
    parts: Vec<(u64, Bytes)>,
    file_len: u64,
}

impl RowGroupBytes {
    /// Reads `ranges` of `file` (whose length is `file_len`).
    pub(crate) fn read(
        file: &mut File,
        file_len: u64,
        ranges: &[(u64, u64)],
    ) -> std::io::Result<Self> {
        let mut parts = Vec::with_capacity(ranges.len());
        for &(start, end) in ranges {
            let mut buffer = vec![0u8; (end - start) as usize];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut buffer)?;
            parts.push((start, Bytes::from(buffer)));
        }
        Ok(Self { parts, file_len })
    }

    /// The bytes from `start` to the end of the part holding it.
    fn part_from(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let part = self
            .parts
            .iter()
            .find(|(offset, bytes)| *offset <= start && start < *offset + bytes.len() as u64);
        match part {
            Some((offset, bytes)) if (start - offset) as usize + length <= bytes.len() => {
                Ok(bytes.slice((start - offset) as usize..))
            }
            _ => Err(ParquetError::EOF(format!(
                "{length} bytes at offset {start} lie outside the column chunks read"
            ))),
        }
    }
}

impl Length for RowGroupBytes {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl ChunkReader for RowGroupBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.part_from(start, 0)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        Ok(self.part_from(start, length)?.slice(..length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> RowGroupBytes {
        RowGroupBytes {
            parts: vec![
                (100, Bytes::from_static(b"abcdef")),
                (200, Bytes::from_static(b"xyz")),
            ],
            file_len: 1000,
        }
    }

    #[test]
    fn serves_slices_of_the_parts_read() {
        let r = parts();
        assert_eq!(&r.get_bytes(102, 3).unwrap()[..], b"cde");
        assert_eq!(&r.get_bytes(200, 3).unwrap()[..], b"xyz");
        let mut rest = String::new();
        r.get_read(103).unwrap().read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "def");
        assert_eq!(r.len(), 1000);
    }

    #[test]
    fn bytes_outside_the_parts_are_an_error_not_a_panic() {
        let r = parts();
        assert!(r.get_bytes(104, 3).is_err(), "runs past its part");
        assert!(r.get_bytes(150, 1).is_err(), "between parts");
        assert!(r.get_read(99).is_err());
        assert!(r.get_read(2000).is_err());
    }
}
