//! The Kafka event source: a topic's partitions spread over timely workers, JSON payloads
//! decoded into pooled Arrow batches, bad records to the dead letters.
//!
//! ## Partitions and offsets
//!
//! Partition `p` is read by worker `p % workers`, each worker with its own consumer and
//! an explicit assignment (no group rebalancing: the assignment must match the
//! checkpoint's offsets). Every batch carries the next offset of each partition it
//! advanced ([`SourceBatch::positions`]); a checkpoint stores them and a restart seeks
//! there, so every record is trained exactly once relative to the model. The consumer
//! group is used to commit those offsets after each checkpoint, for monitoring only.
//!
//! ## Backpressure
//!
//! The dataflow pulls batches: while it lags (see the driver's flow control) the reader
//! is not polled, librdkafka's prefetch queue fills up to `queued.max.messages.kbytes`
//! (16 MiB per consumer here unless overridden) and fetching stops. Memory stays bounded
//! when training is slower than the topic.
//!
//! ## Idle and end
//!
//! With nothing to read the reader yields empty (idle) batches. It ends when asked to
//! stop, or per [`StopAt`]: never, once every partition has reached the end offset it had
//! when the reader was opened, or after an idle period.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tidepool_pipeline::dead_letter::DeadLetterSink;
use tidepool_pipeline::EventBatch;
use tidepool_pipeline::{
    BatchOrigin, BufferPool, DeadLetter, Error, Event, EventReader, EventSource, Result,
    SourceBatch, SourceInfo,
};

use crate::json::{Decoded, JsonMapping};
use crate::KafkaSettings;

/// When a reader ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StopAt {
    /// Only when stopped.
    #[default]
    Never,
    /// Once every partition has reached the end offset it had when the reader opened.
    End,
    /// After this long without a message.
    Idle(Duration),
}

/// Counters shared by a source's readers.
#[derive(Debug, Default)]
pub struct KafkaCounters {
    /// Messages read (good, skipped and rejected).
    pub messages: Arc<AtomicU64>,
    /// Messages skipped by the event-type filter.
    pub skipped: AtomicU64,
    /// Messages sent to the dead letters.
    pub rejected: AtomicU64,
    /// Offsets skipped because the broker no longer had them (retention deleted them
    /// before they were read): data lost upstream, counted and logged, never silent.
    pub offsets_lost: AtomicU64,
    /// Consumer lag per partition (messages between the next offset read and the
    /// partition's end), from librdkafka's statistics (every second).
    pub lag: std::sync::Mutex<BTreeMap<i32, i64>>,
    /// Times a partition handed back an offset below the next one expected.
    pub offsets_rewound: AtomicU64,
    /// Each partition's end (high watermark) as librdkafka last reported it.
    pub high: std::sync::Mutex<BTreeMap<i32, i64>>,
}

/// Receives librdkafka's statistics and keeps the consumer lag of the source's topic.
struct LagContext {
    topic: String,
    counters: Arc<KafkaCounters>,
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut lag = self
            .counters
            .lag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut high = self
            .counters
            .high
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (&p, partition) in &topic.partitions {
            if p >= 0 && partition.hi_offset >= 0 {
                high.insert(p, partition.hi_offset);
            }
            // librdkafka's own `consumer_lag` is measured from the *committed* offset,
            // which tidepool commits only at checkpoints; the lag of what was read is
            // the partition's end minus the next offset handed to the application.
            // -1 is the internal "unassigned" partition; negative offsets are unknown.
            if p >= 0 && partition.hi_offset >= 0 && partition.app_offset >= 0 {
                lag.insert(p, (partition.hi_offset - partition.app_offset).max(0));
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

impl KafkaCounters {
    /// Consumer lag per partition, as last reported.
    pub fn lag(&self) -> BTreeMap<i32, i64> {
        self.lag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Messages per batch at most.
const MAX_BATCH: usize = 8192;
/// How long a reader waits for the first message of a batch. Short: a worker blocked in
/// a poll does not step timely, and a round in flight waits for every worker's share of
/// it. An empty batch sends the worker to `step_or_park` instead, which wakes for
/// dataflow work at once. (The Kafka bench, whose readers always have data, runs at the
/// same rate with 1 ms as with 50 ms.)
const POLL_WAIT: Duration = Duration::from_millis(1);
/// Timeout of metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start-up waits, retrying, for brokers that do not answer: a broker restarting
/// (or a rolling restart) must not fail a job that is starting, while a wrong address
/// still fails within a minute.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// Runs a start-up request, retrying while the brokers are unreachable or time out.
pub(crate) fn patiently<T>(what: &str, mut request: impl FnMut() -> KafkaResult<T>) -> Result<T> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let deadline = Instant::now() + STARTUP_PATIENCE;
    loop {
        match request() {
            Ok(v) => return Ok(v),
            Err(e) => {
                let transient = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        Code::OperationTimedOut
                            | Code::AllBrokersDown
                            | Code::BrokerTransportFailure
                            | Code::BrokerNotAvailable
                            | Code::LeaderNotAvailable
                            | Code::NotLeaderForPartition
                            | Code::RequestTimedOut
                            | Code::NetworkException
                    )
                );
                if !transient || Instant::now() >= deadline {
                    return Err(kafka_error(what, e));
                }
                tracing::warn!(error = %e, "{what}: the brokers do not answer yet; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// The event source over one topic.
pub struct KafkaSource {
    settings: KafkaSettings,
    mapping: JsonMapping,
    partitions: Vec<i32>,
    start: BTreeMap<i32, i64>,
    stop_at: StopAt,
    rewind: Rewind,
    stop: Arc<AtomicBool>,
    dead: Arc<dyn DeadLetterSink>,
    pool: BufferPool,
    counters: Arc<KafkaCounters>,
}

/// What a reader does when a partition hands back an offset below the next one it
/// expects: the topic was deleted and recreated, or its offsets were reset. Reading on
/// would train again on records the model may already hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rewind {
    /// Stop with an error naming the partition and both offsets (the default).
    #[default]
    Fail,
    /// Log it, count it (`offsets_rewound`), and go on from the offset the broker gave.
    Continue,
}

impl std::str::FromStr for Rewind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fail" => Ok(Rewind::Fail),
            "continue" => Ok(Rewind::Continue),
            other => Err(format!(
                "unknown rewind policy {other:?}; valid: fail, continue"
            )),
        }
    }
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("settings", &self.settings)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    Error::connector(format!("kafka: {what}"), e)
}

impl KafkaSource {
    /// A source over `settings.topic`, whose partitions are looked up now. Records that
    /// fail to decode go to `dead`.
    pub fn new(
        settings: KafkaSettings,
        mapping: JsonMapping,
        dead: Arc<dyn DeadLetterSink>,
    ) -> Result<Self> {
        let partitions = settings.partitions()?;
        Ok(Self {
            settings,
            mapping,
            partitions,
            start: BTreeMap::new(),
            stop_at: StopAt::Never,
            rewind: Rewind::default(),
            stop: Arc::new(AtomicBool::new(false)),
            dead,
            pool: BufferPool::new(Default::default()),
            counters: Arc::default(),
        })
    }

    /// What to do when a partition's offsets go backwards.
    pub fn on_rewind(mut self, rewind: Rewind) -> Self {
        self.rewind = rewind;
        self
    }

    /// Starts each listed partition at its offset (from a checkpoint); the others start
    /// at the beginning.
    pub fn starting_at(mut self, offsets: BTreeMap<i32, i64>) -> Self {
        self.start = offsets;
        self
    }

    /// When readers end.
    pub fn stop_at(mut self, stop_at: StopAt) -> Self {
        self.stop_at = stop_at;
        self
    }

    /// Builds batches in `pool`.
    pub fn with_pool(mut self, pool: BufferPool) -> Self {
        self.pool = pool;
        self
    }

    /// The flag that ends every reader at its next poll (for SIGTERM).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// The topic's partitions.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Counters over all readers.
    pub fn counters(&self) -> Arc<KafkaCounters> {
        Arc::clone(&self.counters)
    }
}

impl EventSource for KafkaSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            description: format!("kafka {}/{}", self.settings.brokers, self.settings.topic),
            rows: None,
            min_ts: None,
            max_ts: None,
        }
    }

    fn open(&self, worker: usize, workers: usize) -> Result<EventReader> {
        let mine: Vec<i32> = self
            .partitions
            .iter()
            .copied()
            .filter(|p| (*p as usize) % workers.max(1) == worker)
            .collect();
        let context = LagContext {
            topic: self.settings.topic.clone(),
            counters: Arc::clone(&self.counters),
        };
        let consumer: BaseConsumer<LagContext> = self
            .settings
            .client_config()
            .set("group.id", &self.settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set_if_absent("queued.max.messages.kbytes", "16384")
            // The reader drains the prefetch queue in bursts, between dataflow steps, so
            // the queue often holds more than `queued.min.messages`; librdkafka then
            // postpones the next fetch by `fetch.queue.backoff.ms`, 1 s by default, and
            // the burst after it finds the queue empty. Measured on the Kafka bench: the
            // workers waited in empty polls for most of the run (220 k events/s); with
            // 50 ms, 1 M events train in half the time.
            .set_if_absent("fetch.queue.backoff.ms", "50")
            // Statistics carry the per-partition lag the metrics endpoint shows.
            .set_if_absent("statistics.interval.ms", "1000")
            .create_with_context(context)
            .map_err(|e| kafka_error("creating a consumer", e))?;
        let mut tpl = TopicPartitionList::new();
        let mut next = BTreeMap::new();
        for &p in &mine {
            let start = self.start.get(&p).copied();
            let offset = start.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&self.settings.topic, p, offset)
                .map_err(|e| kafka_error("assigning partitions", e))?;
            next.insert(p, start.unwrap_or(0));
        }
        // Partition leaders known before the assignment: otherwise librdkafka finds no
        // leader for the first offset lookup and retries it on a 500 ms timer, which
        // was a fifth of the Kafka bench's run.
        patiently("reading topic metadata", || {
            consumer.fetch_metadata(Some(&self.settings.topic), METADATA_TIMEOUT)
        })?;
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("assigning partitions", e))?;
        let end = match self.stop_at {
            StopAt::End => {
                let mut end = BTreeMap::new();
                for &p in &mine {
                    let (_, high) = patiently("reading end offsets", || {
                        consumer.fetch_watermarks(&self.settings.topic, p, METADATA_TIMEOUT)
                    })?;
                    end.insert(p, high);
                }
                Some(end)
            }
            _ => None,
        };
        Ok(Box::new(Reader {
            consumer,
            topic: Arc::from(self.settings.topic.as_str()),
            mapping: self.mapping.clone(),
            next,
            end,
            stop_at: self.stop_at,
            rewind: self.rewind,
            stop: Arc::clone(&self.stop),
            dead: Arc::clone(&self.dead),
            pool: self.pool.clone(),
            counters: Arc::clone(&self.counters),
            last_message: Instant::now(),
            events: Vec::with_capacity(MAX_BATCH),
            empty: arrow_array::RecordBatch::new_empty(tidepool_pipeline::event::event_schema()),
            done: mine.is_empty() && self.stop_at != StopAt::Never,
            newest: BTreeMap::new(),
            reader: worker,
            readers: workers.max(1),
            refreshed: Instant::now(),
        }))
    }
}

trait SetIfAbsent {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetIfAbsent for ClientConfig {
    fn set_if_absent(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

struct Reader {
    consumer: BaseConsumer<LagContext>,
    topic: Arc<str>,
    mapping: JsonMapping,
    /// Next offset to read, per assigned partition.
    next: BTreeMap<i32, i64>,
    /// End offsets to stop at ([`StopAt::End`]).
    end: Option<BTreeMap<i32, i64>>,
    stop_at: StopAt,
    rewind: Rewind,
    stop: Arc<AtomicBool>,
    dead: Arc<dyn DeadLetterSink>,
    pool: BufferPool,
    counters: Arc<KafkaCounters>,
    last_message: Instant,
    events: Vec<Event>,
    /// The records of every batch: empty, the events travel pre-decoded.
    empty: arrow_array::RecordBatch,
    done: bool,
    /// The newest event time read from each partition.
    newest: BTreeMap<i32, i64>,
    /// This reader's place among all readers: partition p is read by reader
    /// `p % readers`, also for partitions added while the job runs.
    reader: usize,
    readers: usize,
    /// When the topic's partitions were last looked up (following a topic only).
    refreshed: Instant,
}

/// How often a reader following a topic looks for partitions added to it.
const PARTITION_REFRESH: Duration = Duration::from_secs(1);

/// A replay position unique per record, ordered by partition, then offset (up to 1024
/// partitions and 2^54 offsets each): with the event time in front, `(ts, pos)` is the
/// total replay order every worker and process agrees on, whoever read the record and
/// when it arrived.
fn position(partition: i32, offset: i64) -> u64 {
    ((partition as u64 & 0x3ff) << 54) | (offset.max(0) as u64 & ((1 << 54) - 1))
}

impl Reader {
    fn at_end(&self) -> bool {
        match (&self.end, self.stop_at) {
            (Some(end), _) => end
                .iter()
                .all(|(p, high)| self.next.get(p).is_some_and(|n| n >= high)),
            (None, StopAt::Idle(d)) => self.last_message.elapsed() >= d,
            _ => false,
        }
    }

    fn next_batch(&mut self) -> Option<Result<SourceBatch>> {
        if self.done || self.stop.load(Ordering::Relaxed) {
            return None;
        }
        if self.at_end() {
            self.done = true;
            return None;
        }
        if self.stop_at != StopAt::End && self.refreshed.elapsed() >= PARTITION_REFRESH {
            self.refreshed = Instant::now();
            if let Err(e) = self.pick_up_new_partitions() {
                tracing::warn!(error = %e, "looking for partitions added to the topic");
            }
        }
        self.events.clear();
        let mut advanced: BTreeMap<i32, i64> = BTreeMap::new();
        let (mut rejected, mut skipped, mut lost_here) = (0u64, 0u64, 0u64);
        let mut first_pos = None;
        let mut wait = POLL_WAIT;
        while self.events.len() + (rejected as usize) < MAX_BATCH {
            let Some(polled) = self.consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let msg = match polled {
                Ok(msg) => msg,
                Err(e) => {
                    // Transport errors (a broker down, a leader moving) are retried by
                    // librdkafka; the reader keeps polling and reports them.
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    break;
                }
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            self.counters.messages.fetch_add(1, Ordering::Relaxed);
            let expected = self.next.get(&partition).copied().unwrap_or(0);
            if offset < expected {
                self.counters
                    .offsets_rewound
                    .fetch_add(1, Ordering::Relaxed);
                match self.rewind {
                    Rewind::Fail => {
                        self.done = true;
                        return Some(Err(Error::Config(format!(
                            "kafka: offsets of {}/{partition} went backwards: expected {expected} or later, got {offset} (was the topic recreated or its offsets reset?); nothing was trained from it. Start from a fresh checkpoint directory, or pass --on-rewind continue to train on from the broker's offset",
                            self.topic
                        ))));
                    }
                    Rewind::Continue => tracing::warn!(
                        topic = %self.topic, partition, expected, got = offset,
                        "offsets went backwards (topic recreated or offsets reset); training on from the broker's offset"
                    ),
                }
            }
            if offset > expected {
                let lost = (offset - expected) as u64;
                lost_here += lost;
                self.counters
                    .offsets_lost
                    .fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(
                    topic = %self.topic, partition, expected, got = offset, lost,
                    "offsets skipped: the broker no longer has them (retention); those events are lost upstream"
                );
            }
            advanced.insert(partition, offset + 1);
            self.next.insert(partition, offset + 1);
            let pos = position(partition, offset);
            first_pos.get_or_insert(pos);
            match self
                .mapping
                .decode(msg.payload(), msg.timestamp().to_millis())
            {
                Decoded::Event(mut e) => {
                    e.pos = pos;
                    let newest = self.newest.entry(partition).or_insert(i64::MIN);
                    *newest = (*newest).max(e.ts);
                    self.events.push(e);
                }
                Decoded::Skipped => {
                    skipped += 1;
                    self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                }
                Decoded::Rejected(reason) => {
                    rejected += 1;
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    let letter = DeadLetter {
                        location: format!("{}/{partition}@{offset}", self.topic),
                        reason,
                        raw: msg
                            .payload()
                            .map(|b| String::from_utf8_lossy(b).into_owned()),
                    };
                    if let Err(e) = self.dead.send(letter) {
                        return Some(Err(e));
                    }
                }
            }
        }
        if !advanced.is_empty() {
            self.last_message = Instant::now();
        }
        // The events go over as they are (decoded and validated above), in a pooled
        // batch: no Arrow columns to build and decode back.
        // In the class of full batches, whatever this poll's length, so every block
        // returned fits the next poll's batch.
        let events = EventBatch::from_events_in(&self.events, EventBatch::BATCH_EVENTS, &self.pool);
        let pos = first_pos.unwrap_or(0);
        Some(Ok(SourceBatch {
            records: self.empty.clone(),
            events: Some(events),
            origin: BatchOrigin {
                source: Arc::clone(&self.topic),
                first_row: pos,
                first_pos: pos,
            },
            positions: advanced.into_iter().collect(),
            rejected,
            skipped,
            lost: lost_here,
            low_watermark_ms: self.low_watermark(),
        }))
    }

    /// Assigns the partitions added to the topic since the start that belong to this
    /// reader, from their beginning (a `--stop-at end` run reads the partitions the topic
    /// had when it started).
    fn pick_up_new_partitions(&mut self) -> Result<()> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(1))
            .map_err(|e| kafka_error("reading topic metadata", e))?;
        let added: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == &*self.topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .filter(|&p| p >= 0 && p as usize % self.readers == self.reader)
            .filter(|p| !self.next.contains_key(p))
            .collect();
        if added.is_empty() {
            return Ok(());
        }
        for &p in &added {
            self.next.insert(p, 0);
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &next) in &self.next {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(next))
                .map_err(|e| kafka_error("assigning partitions", e))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("assigning partitions", e))?;
        tracing::info!(topic = %self.topic, partitions = ?added, "reading partitions added to the topic");
        eprintln!(
            "kafka: reading partitions {added:?} added to {}",
            self.topic
        );
        Ok(())
    }

    /// The newest event time of the partition furthest behind, among those that still
    /// have records to deliver (`i64::MAX` when none does): a partition caught up with its high watermark (as
    /// librdkafka last saw it) or past its end does not hold the others back.
    fn low_watermark(&self) -> Option<i64> {
        // Followed partitions: caught up by the ends of librdkafka's latest statistics
        // (a second old at most; a partition wrongly taken as caught up only lets its
        // next events arrive late, which the allowed lateness absorbs).
        let high = self
            .counters
            .high
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut low = None::<i64>;
        for (&p, &next) in &self.next {
            let finished = match &self.end {
                Some(end) => end.get(&p).is_none_or(|&e| next >= e),
                None => high.get(&p).is_some_and(|&h| next >= h),
            };
            if finished {
                continue;
            }
            let newest = self.newest.get(&p).copied().unwrap_or(i64::MIN);
            low = Some(low.map_or(newest, |l| l.min(newest)));
        }
        // i64::MAX: no partition holds the others back now (all caught up or done).
        Some(low.unwrap_or(i64::MAX))
    }
}

impl Iterator for Reader {
    type Item = Result<SourceBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

/// The consume path's ceiling: `threads` bare consumers (no decoding, no dataflow), each
/// assigned every `threads`-th partition from the beginning, read `settings.topic` to its
/// current end. Returns the messages read and the seconds taken; benchmarks compare the
/// pipeline's rate with it.
pub fn consume_baseline(settings: &KafkaSettings, threads: usize) -> Result<(u64, f64)> {
    let partitions = settings.partitions()?;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let mine: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| *p as usize % threads.max(1) == t)
                .collect();
            let settings = settings.clone();
            std::thread::spawn(move || -> Result<u64> {
                let consumer: BaseConsumer = settings
                    .client_config()
                    .set("group.id", format!("{}-baseline", settings.group))
                    .set("enable.auto.commit", "false")
                    .set_if_absent("queued.max.messages.kbytes", "16384")
                    .create()
                    .map_err(|e| kafka_error("creating a consumer", e))?;
                let mut tpl = TopicPartitionList::new();
                let mut end = 0i64;
                for &p in &mine {
                    tpl.add_partition_offset(&settings.topic, p, Offset::Beginning)
                        .map_err(|e| kafka_error("assigning partitions", e))?;
                    let (_, high) = consumer
                        .fetch_watermarks(&settings.topic, p, METADATA_TIMEOUT)
                        .map_err(|e| kafka_error("reading end offsets", e))?;
                    end += high;
                }
                consumer
                    .assign(&tpl)
                    .map_err(|e| kafka_error("assigning partitions", e))?;
                let mut read = 0i64;
                let mut bytes = 0usize;
                while read < end {
                    match consumer.poll(POLL_WAIT) {
                        Some(Ok(m)) => {
                            read += 1;
                            bytes += m.payload().map_or(0, <[u8]>::len);
                        }
                        Some(Err(e)) => return Err(kafka_error("reading", e)),
                        None => {}
                    }
                }
                std::hint::black_box(bytes);
                Ok(read as u64)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| Error::Internal("a baseline consumer panicked".into()))??;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}
