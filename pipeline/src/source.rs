//! Sources of events: the trait every connector implements to feed a replay or a stream.
//!
//! A source is opened once per timely worker. Each worker reads its own share (row groups,
//! partitions) and hands back Arrow batches with canonical column names plus the
//! [`BatchOrigin`] that positions them. Connectors live in their own crates and depend on
//! this trait, never the other way round.

use arrow_array::RecordBatch;

use crate::error::Result;
use crate::event::BatchOrigin;

/// What a source knows about itself before it is read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceInfo {
    /// A short human description (file names, generator settings).
    pub description: String,
    /// Total number of rows, when known up front (Parquet metadata, generator).
    pub rows: Option<u64>,
    /// Smallest event time in milliseconds, when known.
    pub min_ts: Option<i64>,
    /// Largest event time in milliseconds, when known.
    pub max_ts: Option<i64>,
}

/// One batch from a source.
#[derive(Clone, Debug)]
pub struct SourceBatch {
    /// Rows with canonical column names (see [`crate::event`]); empty when the source
    /// delivers [`SourceBatch::events`] instead.
    pub records: RecordBatch,
    /// Events the source decoded and validated itself, in a pooled batch: a source
    /// that parses records one by one (Kafka's JSON) hands them over like this rather than
    /// building Arrow columns only for them to be decoded back.
    pub events: Option<crate::EventBatch>,
    /// Where they came from.
    pub origin: BatchOrigin,
    /// For sources with resumable positions (Kafka): `(partition, next offset)` after
    /// this batch, for every partition the batch advanced. A checkpoint stores the
    /// latest of these so a restart resumes exactly after what the model has trained.
    pub positions: Vec<(i32, i64)>,
    /// Records the source itself rejected (and sent to its dead-letter sink) while
    /// building this batch; they count as rows read and as dead letters.
    pub rejected: u64,
    /// Records read and deliberately not used (an event-type filter): positions the
    /// batch advanced past without a row.
    pub skipped: u64,
    /// Positions the source found gone (a Kafka retention deleted them before they were
    /// read): data lost upstream, counted so that it is never lost silently.
    pub lost: u64,
    /// For sources that merge several ordered lanes (Kafka partitions): the newest event
    /// time read from the lane that is furthest behind, among the lanes still delivering
    /// (`i64::MIN` while one has delivered nothing yet, `i64::MAX` when none is behind).
    /// The ingest holds events back
    /// until every lane has passed them, so lanes read one after another still replay in
    /// event-time order. `None`: the source does not say (files and generators are read
    /// in order).
    pub low_watermark_ms: Option<i64>,
}

impl SourceBatch {
    /// A batch without positions or rejections (files, generators).
    pub fn new(records: RecordBatch, origin: BatchOrigin) -> Self {
        Self {
            records,
            events: None,
            origin,
            positions: Vec::new(),
            rejected: 0,
            skipped: 0,
            lost: 0,
            low_watermark_ms: None,
        }
    }

    /// Rows the batch carries (events, or records to decode).
    pub fn rows(&self) -> usize {
        self.events
            .as_ref()
            .map_or(self.records.num_rows(), crate::EventBatch::len)
    }

    /// Appends the batch's events to `out`; records that fail validation go to `dead`
    /// and are counted in the result (see [`crate::event::decode_events`]).
    pub fn decode(
        &self,
        out: &mut Vec<crate::Event>,
        dead: &mut dyn FnMut(crate::DeadLetter),
    ) -> Result<u64> {
        match &self.events {
            Some(events) => {
                events.extend_into(out);
                Ok(0)
            }
            None => crate::event::decode_events(&self.records, &self.origin, out, dead),
        }
    }
}

/// A worker's share of a source: batches in the order the worker should replay them.
///
/// A live source with nothing to deliver right now yields a batch with no rows (an
/// *idle* batch) instead of blocking, so that the driver can keep the dataflow and its
/// GC cycles moving; the iterator ends only when the source is finished.
pub type EventReader = Box<dyn Iterator<Item = Result<SourceBatch>>>;

/// A source of behaviour events that can be split over timely workers.
pub trait EventSource: Send + Sync {
    /// What is known about the source without reading it.
    fn info(&self) -> SourceInfo;

    /// Opens the share of worker `worker` out of `workers`. Shares are disjoint and
    /// together cover the source; each share yields batches in non-decreasing event time
    /// when the source is sorted.
    fn open(&self, worker: usize, workers: usize) -> Result<EventReader>;
}

/// A source whose readers end early once a flag is set (SIGINT/SIGTERM): the run then
/// drains what was read, reports it and exits normally, instead of dying mid-round.
pub struct Stoppable {
    inner: std::sync::Arc<dyn EventSource>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stoppable {
    /// Wraps `inner`; readers stop before their next batch once `stop` is set.
    pub fn new(
        inner: std::sync::Arc<dyn EventSource>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self { inner, stop }
    }
}

impl EventSource for Stoppable {
    fn info(&self) -> SourceInfo {
        self.inner.info()
    }

    fn open(&self, worker: usize, workers: usize) -> Result<EventReader> {
        Ok(Box::new(StoppableReader {
            reader: self.inner.open(worker, workers)?,
            stop: std::sync::Arc::clone(&self.stop),
        }))
    }
}

/// A [`Stoppable`] source's reader.
struct StoppableReader {
    reader: EventReader,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Iterator for StoppableReader {
    type Item = Result<SourceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        // The flag is checked before a batch is pulled, so nothing read is dropped.
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            None
        } else {
            self.reader.next()
        }
    }

    /// At most what the inner reader has (the ingest reserves nothing for a reader
    /// that says it is empty).
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, self.reader.size_hint().1)
    }
}
