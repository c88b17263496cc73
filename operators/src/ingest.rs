//! Feeding a source into a timely input: decode, dead-letter, stamp with event time,
//! and hold back when the dataflow falls behind.
//!
//! Timely times are *ticks* of event time: `(ts - origin) / tick_ms`. A round (one
//! timely time) therefore holds every event of one slice of event time, and an
//! operator that waits for the frontier to pass a time has all of that slice. Inside a
//! round, operators order events by `(ts, pos)` themselves, so the tick width changes
//! how much is batched, never the order of processing.
//!
//! ## Unsorted input
//!
//! A worker's input time only moves forward. An event whose tick is earlier than the
//! worker's current time is *late*: it is stamped with the current time (processed
//! with the current round, after everything it should have preceded) and counted as
//! reordered. Sorted input (what `tidepool import` writes) has no late events.
//!
//! ## Idle sources and GC cycles
//!
//! A source that has nothing to deliver right now yields an empty batch; the driver then
//! parks the worker briefly instead of spinning. Worker 0's driver also asks the GC
//! controller, after every batch (empty or not), whether a compaction cycle is due, and
//! if so stamps a [`CycleTicket`] into the control input at its current time: every
//! worker then compacts between the same two rounds (see [`crate::backtest`]). An idle
//! input therefore still gets its forced cycles. When a source turns idle, its open round
//! is closed (the input advances one tick), so what it delivered is processed at once;
//! an event that later arrives for the closed tick is processed late and counted as
//! reordered.
//!
//! ## Watermark and late events
//!
//! Events are held back by tick until the watermark (the newest tick seen minus the
//! allowed lateness) passes them, so events that arrive out of order within the allowed
//! lateness still take their place in event time (across Kafka partitions, for
//! instance). An event behind the watermark is late: by default it is trained in the
//! current round and counted as reordered; with [`LatePolicy::DeadLetter`] it goes to the
//! dead letters with reason `late`.
//!
//! ## Flow control
//!
//! Timely has no backpressure of its own. Before a worker advances its input to time
//! `t` it steps the dataflow until the probe has passed `t - rounds_in_flight`, so at
//! most that many rounds are buffered downstream, whatever the source's speed. A step
//! with nothing to do parks the worker (until a message arrives, at most
//! [`FLOW_PARK`]): what it waits for is usually another worker's learner, and spinning
//! on its core would only take cycles from that worker or from the rest of the machine.

use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::BTreeMap;
use std::time::Duration;

use tidepool_pipeline::dead_letter::DeadLetterSink;
use tidepool_pipeline::DeadLetter;

use crate::config::{LatePolicy, TARGET_EVENTS_PER_ROUND};
use tidepool_pipeline::memory::collector::{CycleTicket, GcController};
use tidepool_pipeline::{BufferPool, Event, EventBatch, EventReader, Result};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;

/// Maps event time to timely time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Event time of tick 0.
    pub origin_ms: i64,
    /// Width of one tick in milliseconds.
    pub tick_ms: i64,
}

impl Clock {
    /// The tick of an event time; times before the origin fall into tick 0.
    #[inline]
    pub fn tick(&self, ts: i64) -> u64 {
        (ts.saturating_sub(self.origin_ms).max(0) / self.tick_ms) as u64
    }
}

/// The tick width that gives rounds of about `target` events for `rows` events spread
/// over `span_ms`.
pub fn auto_tick(rows: u64, span_ms: i64, target: u64) -> i64 {
    if rows == 0 || span_ms <= 0 {
        return 1;
    }
    let tick = (span_ms as f64 * target as f64 / rows as f64).ceil();
    (tick as i64).max(1)
}

/// What one worker's ingest saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestStats {
    /// Rows read from the source.
    pub rows: u64,
    /// Rows that became dead letters.
    pub dead: u64,
    /// Events that arrived after a later tick and were processed late.
    pub reordered: u64,
    /// Records the source skipped on purpose (event-type filter): read, not rows.
    pub skipped: u64,
    /// Positions lost upstream before they could be read (Kafka retention).
    pub lost: u64,
    /// Next position per partition, for sources that have them (Kafka).
    pub positions: std::collections::BTreeMap<i32, i64>,
}

/// Called between batches with everything read so far sent: where checkpoints happen.
/// The last argument says whether nothing read is held back (so a checkpoint may start).
pub(crate) type BatchHook<'h> =
    dyn FnMut(&mut Worker, Option<&mut Inputs>, &IngestStats, bool) -> Result<()> + 'h;

/// Events per batch sent into the dataflow ([`EventBatch::BATCH_EVENTS`]: as many as fill
/// a 512 KiB pool class). A round longer than that goes as several
/// batches of this one class, so every block returned fits the next batch and the
/// blocks a worker reserves serve any round; a batch costs one pool get and no
/// allocator call, and the rounds' messages (timely's containers) are shared by all
/// the batches of a round.
const SEND_BATCH: usize = EventBatch::BATCH_EVENTS;

/// Blocks a reading worker reserves when the pool's `reserve` is not set: a round's
/// worth of batches for every round flow control lets it run ahead, and for the round
/// being read and the one being trained, at the automatic tick's round size
/// ([`TARGET_EVENTS_PER_ROUND`]: 32 k events, three batches); never more than a
/// bounded input fills. Measured on generated Parquet with the
/// default 8 rounds in flight (docs/memory.md): one reader feeding two workers peaked
/// between 20 and 30 blocks in flight, and 30 reserved left no miss.
fn auto_reserve(rounds_in_flight: u64, rows: Option<u64>) -> usize {
    let per_round =
        usize::try_from(TARGET_EVENTS_PER_ROUND.div_ceil(SEND_BATCH as u64)).unwrap_or(usize::MAX);
    let window = usize::try_from(rounds_in_flight)
        .unwrap_or(usize::MAX)
        .saturating_add(2)
        .saturating_mul(per_round);
    match rows {
        Some(rows) => {
            let fills = usize::try_from(rows.div_ceil(SEND_BATCH as u64)).unwrap_or(usize::MAX);
            window.min(fills.saturating_add(1))
        }
        None => window,
    }
}

/// Emptied per-tick vectors kept for reuse.
const SPARE_TICKS: usize = 64;

pub(crate) type EventInput = InputHandle<u64, CapacityContainerBuilder<Vec<EventBatch>>>;
pub(crate) type ControlInput = InputHandle<u64, CapacityContainerBuilder<Vec<CycleTicket>>>;

/// A worker's two inputs, advanced together: events and control commands.
pub(crate) struct Inputs {
    pub(crate) events: EventInput,
    pub(crate) control: ControlInput,
}

impl Inputs {
    pub(crate) fn new() -> Self {
        Self {
            events: EventInput::new(),
            control: ControlInput::new(),
        }
    }

    pub(crate) fn advance_to(&mut self, tick: u64) {
        self.events.advance_to(tick);
        self.control.advance_to(tick);
    }

    /// Starts a cycle if the controller says one is due.
    fn poll_gc(&mut self, gc: Option<&GcController>) {
        if let Some(ticket) = gc.and_then(GcController::poll) {
            self.control.send(ticket);
            // An input handle buffers until it is flushed or advanced; an idle input is
            // not advanced, and the cycle must not wait for the next event.
            self.control.flush();
        }
    }
}

/// How long an idle worker parks before asking its source again.
const IDLE_PARK: Duration = Duration::from_millis(5);

/// The longest a worker held back by flow control parks before looking again; another
/// worker's message wakes it sooner. Bounded so that cancellation and a pending
/// checkpoint, which send no message to this worker, are still noticed promptly.
const FLOW_PARK: Duration = Duration::from_millis(1);

/// How a worker feeds its input: the clock, the flow-control bound, where dead letters
/// go, the flag another worker sets when it fails, and (on worker 0) the GC controller.
pub(crate) struct Feed<'a> {
    pub(crate) clock: Clock,
    pub(crate) rounds_in_flight: u64,
    pub(crate) dead: &'a dyn DeadLetterSink,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) gc: Option<&'a GcController>,
    /// What happens to events behind the watermark.
    pub(crate) late: LatePolicy,
    /// How far behind the newest event time an event may be and still take its place.
    pub(crate) allowed_lateness_ms: i64,
    /// How far ahead of the wall clock an event time may be (see
    /// [`crate::config::BacktestConfig::max_skew_ms`]).
    pub(crate) max_skew_ms: Option<i64>,
    /// Whether everything read must be sent before the next hook (a checkpoint is due).
    /// On worker 0 this is also where periodic checkpoints are decided.
    pub(crate) must_flush: &'a dyn Fn() -> bool,
    /// Whether a checkpoint is waiting for this worker (read only).
    pub(crate) checkpoint_pending: &'a dyn Fn() -> bool,
    /// Where the newest event time and the watermark are shown.
    pub(crate) live: Option<&'a crate::live::LiveMetrics>,
    /// Where the batches sent into the dataflow are built.
    pub(crate) pool: &'a BufferPool,
    /// At most how many events this worker will read, when the source knows (it bounds
    /// the blocks reserved).
    pub(crate) rows_hint: Option<u64>,
}

/// Reads `reader` to the end into `input`, counting into `stats` and calling `hook`
/// after every batch. Stops early (without error) when `feed.cancel` is set by another
/// worker that failed.
pub(crate) fn drive(
    worker: &mut Worker,
    input: &mut Inputs,
    probe: &ProbeHandle<u64>,
    reader: EventReader,
    feed: &Feed<'_>,
    stats: &mut IngestStats,
    hook: &mut BatchHook<'_>,
) -> Result<()> {
    let Feed {
        clock,
        dead,
        cancel,
        gc,
        late,
        allowed_lateness_ms,
        max_skew_ms,
        must_flush,
        live,
        ..
    } = *feed;
    // The probe's frontier is the first round not yet trained everywhere.
    let show_watermark = |probe: &ProbeHandle<u64>| {
        if let Some(live) = live {
            if let Some(t) = probe.with_frontier(|f| f.first().copied()) {
                live.set_watermark(clock.origin_ms + t as i64 * clock.tick_ms);
            }
        }
    };
    let lateness_ticks = (allowed_lateness_ms.max(0) as u64).div_ceil(clock.tick_ms.max(1) as u64);
    let mut decoded = Vec::new();
    let mut out = Outbox {
        pending: Vec::with_capacity(SEND_BATCH),
        held: BTreeMap::new(),
        spare: Vec::new(),
        max_tick: None,
        low_watermark_ms: None,
        pool: feed.pool,
        gc,
    };
    // Blocks this worker will have in flight, allocated before its first read rather
    // than one miss at a time as the first rounds fill the flow-control window; a reader
    // that knows its share is empty (the generator's other workers) reserves nothing.
    if reader.size_hint().1 != Some(0) {
        let blocks = feed
            .pool
            .config()
            .reserve
            .unwrap_or_else(|| auto_reserve(feed.rounds_in_flight, feed.rows_hint));
        feed.pool
            .reserve(EventBatch::block_bytes(SEND_BATCH), blocks);
    }
    let mut open_round = false;
    let mut time = Timings::default();
    let begun = std::time::Instant::now();
    let mut reader = reader;
    loop {
        let started = std::time::Instant::now();
        let Some(batch) = reader.next() else { break };
        time.read += started.elapsed();
        time.batches += 1;
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let batch = batch?;
        if let Some(live) = live {
            live.add_rows(batch.rejected + batch.rows() as u64);
        }
        input.poll_gc(gc);
        stats.rows += batch.rejected;
        stats.dead += batch.rejected;
        stats.skipped += batch.skipped;
        if batch.low_watermark_ms.is_some() {
            out.low_watermark_ms = batch.low_watermark_ms;
        }
        stats.lost += batch.lost;
        stats.positions.extend(batch.positions.iter().copied());
        if batch.rows() == 0 {
            // An idle source lets the watermark catch up and closes its open round, so
            // the events it has delivered are trained and counted now rather than when
            // the next one arrives (and GC cycles see them). A later event for a closed
            // tick is late.
            // A source that merges lanes (Kafka partitions) and still has one behind is
            // waiting for it, not idle: only what every lane has passed is released.
            let merging = out.low_watermark_ms.is_some_and(|l| l != i64::MAX);
            let bound = if merging {
                out.watermark(clock, lateness_ticks)
            } else {
                u64::MAX
            };
            out.release(bound, worker, input, probe, feed);
            out.send(input);
            if open_round && !merging {
                let next = *input.events.time() + 1;
                input.advance_to(next);
                open_round = false;
            }
            let parked = std::time::Instant::now();
            worker.step_or_park(Some(IDLE_PARK));
            time.idle += parked.elapsed();
            time.empty += 1;
            let flushed = must_flush();
            if flushed {
                out.release(u64::MAX, worker, input, probe, feed);
                out.send(input);
            }
            show_watermark(probe);
            hook(worker, Some(input), stats, flushed)?;
            continue;
        }
        open_round = true;
        time.first_data.get_or_insert_with(|| begun.elapsed());
        stats.rows += batch.rows() as u64;
        decoded.clear();
        let mut sink_error = None;
        stats.dead += batch.decode(&mut decoded, &mut |letter| {
            if let Err(e) = dead.send(letter) {
                sink_error.get_or_insert(e);
            }
        })?;
        if let Some(e) = sink_error {
            return Err(e);
        }
        if let (Some(live), Some(newest)) = (live, decoded.iter().map(|e| e.ts).max()) {
            live.saw_event_time(newest);
        }
        show_watermark(probe);
        // Far-future timestamps (a producer's broken clock, a unit mix-up) would drag the
        // watermark ahead and open metric windows years away: bounded against the wall
        // clock, which a replay of history never comes near.
        let horizon = max_skew_ms.map(|skew| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
                .saturating_add(skew)
        });
        for event in decoded.drain(..) {
            if let Some(horizon) = horizon.filter(|&h| event.ts > h) {
                stats.dead += 1;
                dead.send(DeadLetter {
                    location: format!("{} position {}", batch.origin.source, event.pos),
                    reason: format!(
                        "skew: event time {} ms is {} ms ahead of the wall clock (at most {} ms allowed)",
                        event.ts,
                        event.ts - (horizon - max_skew_ms.unwrap_or(0)),
                        max_skew_ms.unwrap_or(0)
                    ),
                    raw: Some(format!(
                        "{{\"user_id\":{},\"item_id\":{},\"ts\":{}}}",
                        event.user, event.item, event.ts
                    )),
                })?;
                continue;
            }
            let tick = clock.tick(event.ts);
            if tick < *input.events.time() {
                match late {
                    LatePolicy::Train => {
                        stats.reordered += 1;
                        out.pending.push(event);
                    }
                    LatePolicy::DeadLetter => {
                        stats.dead += 1;
                        dead.send(DeadLetter {
                            location: format!("{} position {}", batch.origin.source, event.pos),
                            reason: format!(
                                "late: event time {} ms is behind the watermark by more than the {} ms allowed",
                                event.ts, allowed_lateness_ms
                            ),
                            raw: Some(format!(
                                "{{\"user_id\":{},\"item_id\":{},\"ts\":{}}}",
                                event.user, event.item, event.ts
                            )),
                        })?;
                    }
                }
                continue;
            }
            out.max_tick = out.max_tick.max(Some(tick));
            out.hold(tick, event);
        }
        let watermark = out.watermark(clock, lateness_ticks);
        let released = std::time::Instant::now();
        out.release(watermark, worker, input, probe, feed);
        time.release += released.elapsed();
        let flushed = must_flush();
        if flushed {
            // A checkpoint's positions must match what the dataflow has: nothing held.
            out.release(u64::MAX, worker, input, probe, feed);
        }
        out.send(input);
        // Keep channels moving between batches even when no round closed.
        let stepped = std::time::Instant::now();
        worker.step();
        time.step += stepped.elapsed();
        let hooked = std::time::Instant::now();
        hook(worker, Some(input), stats, flushed)?;
        time.hook += hooked.elapsed();
    }
    tracing::debug!(
        worker = worker.index(),
        batches = time.batches,
        empty = time.empty,
        read_s = time.read.as_secs_f64(),
        idle_s = time.idle.as_secs_f64(),
        release_s = time.release.as_secs_f64(),
        step_s = time.step.as_secs_f64(),
        hook_s = time.hook.as_secs_f64(),
        first_data_s = time.first_data.map_or(0.0, |d| d.as_secs_f64()),
        "ingest time by phase"
    );
    out.release(u64::MAX, worker, input, probe, feed);
    out.send(input);
    Ok(())
}

/// Where a worker's ingest loop spends its wall time (logged at debug level at the
/// end): reading the source, parked while it is idle, releasing rounds (flow control
/// included), stepping the dataflow, and in checkpoint hooks.
#[derive(Default)]
struct Timings {
    batches: u64,
    empty: u64,
    read: std::time::Duration,
    idle: std::time::Duration,
    release: std::time::Duration,
    step: std::time::Duration,
    hook: std::time::Duration,
    /// From the first read to the first events (a consumer's connection and first
    /// fetch).
    first_data: Option<std::time::Duration>,
}

/// Events on their way into the input: held back by tick until the watermark passes
/// them, then queued for sending at the input's time, as pooled [`EventBatch`]es.
struct Outbox<'p> {
    pending: Vec<Event>,
    held: BTreeMap<u64, Vec<Event>>,
    /// Emptied per-tick vectors, reused so that holding events allocates nothing once
    /// warm.
    spare: Vec<Vec<Event>>,
    max_tick: Option<u64>,
    /// The source's low watermark, when it merges lanes (see [`SourceBatch`]).
    low_watermark_ms: Option<i64>,
    pool: &'p BufferPool,
    /// Polled after every batch sent (worker 0 only): one source batch may hold many
    /// rounds and batches, and cycles must keep up with the heap between source batches.
    gc: Option<&'p GcController>,
}

impl Outbox<'_> {
    fn hold(&mut self, tick: u64, event: Event) {
        let spare = &mut self.spare;
        self.held
            .entry(tick)
            .or_insert_with(|| {
                spare
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(SEND_BATCH))
            })
            .push(event);
    }

    /// The newest tick seen, or (for sources that merge lanes) the tick of the lane
    /// furthest behind, whichever is earlier, minus the allowed lateness.
    fn watermark(&self, clock: Clock, lateness_ticks: u64) -> u64 {
        let newest = match (self.max_tick, self.low_watermark_ms) {
            (Some(_), Some(i64::MIN)) => Some(0),
            (Some(t), Some(i64::MAX)) | (Some(t), None) => Some(t),
            (Some(t), Some(low)) => Some(t.min(clock.tick(low))),
            (None, _) => None,
        };
        newest.map_or(0, |t| t.saturating_sub(lateness_ticks))
    }

    /// Sends every pending event.
    fn send(&mut self, input: &mut Inputs) {
        self.send_batches(input, self.pending.len());
    }

    /// Sends the pending events that fill whole batches, keeping the rest to fill the
    /// next one.
    fn send_full(&mut self, input: &mut Inputs) {
        self.send_batches(input, self.pending.len() / SEND_BATCH * SEND_BATCH);
    }

    fn send_batches(&mut self, input: &mut Inputs, upto: usize) {
        if upto == 0 {
            return;
        }
        for chunk in self.pending[..upto].chunks(SEND_BATCH) {
            // Every batch takes a block of the full batches' class (laid out for its
            // own length), so the blocks reserved and returned serve any batch.
            input
                .events
                .send(EventBatch::from_events_in(chunk, SEND_BATCH, self.pool));
        }
        self.pending.drain(..upto);
        input.poll_gc(self.gc);
    }

    /// Releases every held tick up to `watermark`, advancing the input through them
    /// (with flow control: at most `rounds_in_flight` rounds beyond the probe).
    fn release(
        &mut self,
        watermark: u64,
        worker: &mut Worker,
        input: &mut Inputs,
        probe: &ProbeHandle<u64>,
        feed: &Feed<'_>,
    ) {
        while let Some(entry) = self.held.first_entry() {
            let tick = *entry.key();
            if tick > watermark {
                break;
            }
            let mut events = entry.remove();
            if tick > *input.events.time() {
                self.send(input);
                input.advance_to(tick);
                let horizon = tick.saturating_sub(feed.rounds_in_flight);
                // A pending checkpoint holds the other workers' inputs where they are, so
                // the probe will not move until this worker joins: flow control waits.
                while probe.less_than(&horizon)
                    && !feed.cancel.load(Ordering::Relaxed)
                    && !(feed.checkpoint_pending)()
                {
                    worker.step_or_park(Some(FLOW_PARK));
                }
            }
            self.pending.append(&mut events);
            // A few emptied vectors are plenty to reuse (ticks are held a handful at a
            // time); fine ticks must not leave thousands of them behind.
            if self.spare.len() < SPARE_TICKS {
                self.spare.push(events);
            }
            if self.pending.len() >= SEND_BATCH {
                self.send_full(input);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_event_time() {
        let c = Clock {
            origin_ms: 1000,
            tick_ms: 100,
        };
        assert_eq!(c.tick(1000), 0);
        assert_eq!(c.tick(1099), 0);
        assert_eq!(c.tick(1100), 1);
        assert_eq!(c.tick(5), 0, "before the origin clamps to 0");
    }

    #[test]
    fn a_full_batch_fills_its_class_exactly() {
        assert!(EventBatch::block_bytes(SEND_BATCH) <= 512 << 10);
        assert!(EventBatch::block_bytes(SEND_BATCH + 1) > 512 << 10);
    }

    #[test]
    fn the_reserve_covers_flow_control_within_the_input() {
        assert_eq!(auto_reserve(8, None), 30);
        assert_eq!(auto_reserve(8, Some(100_000_000)), 30);
        assert_eq!(auto_reserve(1, None), 9);
        assert_eq!(auto_reserve(8, Some(50_000)), 5, "four batches and a tail");
        assert_eq!(auto_reserve(8, Some(0)), 1);
        assert_eq!(auto_reserve(u64::MAX, None), usize::MAX);
    }

    #[test]
    fn auto_tick_targets_round_size() {
        assert_eq!(auto_tick(1000, 1_000_000, 100), 100_000);
        assert_eq!(auto_tick(0, 10, 5), 1);
        assert_eq!(auto_tick(10, 1, 1_000_000), 100_000);
    }
}
