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
//! ## Flow control
//!
//! Timely has no backpressure of its own. Before a worker advances its input to time
//! `t` it steps the dataflow until the probe has passed `t - rounds_in_flight`, so at
//! most that many rounds are buffered downstream, whatever the source's speed.

use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use tidepool_pipeline::dead_letter::DeadLetterSink;
use tidepool_pipeline::event::decode_events;
use tidepool_pipeline::memory::collector::{CycleTicket, GcController};
use tidepool_pipeline::{Event, EventReader, Result};
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Rows read from the source.
    pub rows: u64,
    /// Rows that became dead letters.
    pub dead: u64,
    /// Events that arrived after a later tick and were processed late.
    pub reordered: u64,
}

/// Events per `send_batch`: big enough to amortise channel costs.
const SEND_BATCH: usize = 4096;

pub(crate) type EventInput = InputHandle<u64, CapacityContainerBuilder<Vec<Event>>>;
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

    fn advance_to(&mut self, tick: u64) {
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

/// How a worker feeds its input: the clock, the flow-control bound, where dead letters
/// go, the flag another worker sets when it fails, and (on worker 0) the GC controller.
pub(crate) struct Feed<'a> {
    pub(crate) clock: Clock,
    pub(crate) rounds_in_flight: u64,
    pub(crate) dead: &'a dyn DeadLetterSink,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) gc: Option<&'a GcController>,
}

/// Reads `reader` to the end into `input`. Stops early (without error) when
/// `feed.cancel` is set by another worker that failed.
pub(crate) fn drive(
    worker: &mut Worker,
    input: &mut Inputs,
    probe: &ProbeHandle<u64>,
    reader: EventReader,
    feed: &Feed<'_>,
) -> Result<IngestStats> {
    let Feed {
        clock,
        rounds_in_flight,
        dead,
        cancel,
        gc,
    } = *feed;
    let mut stats = IngestStats::default();
    let mut decoded = Vec::new();
    let mut pending: Vec<Event> = Vec::with_capacity(SEND_BATCH);
    let mut open_round = false;
    for batch in reader {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let batch = batch?;
        input.poll_gc(gc);
        if batch.records.num_rows() == 0 {
            input.events.send_batch(&mut pending);
            pending.clear();
            // An idle source closes its open round, so the events it has delivered are
            // trained and counted now rather than when the next one arrives (and GC
            // cycles see them). A later event for the closed tick is processed late.
            if open_round {
                let next = *input.events.time() + 1;
                input.advance_to(next);
                open_round = false;
            }
            worker.step_or_park(Some(IDLE_PARK));
            continue;
        }
        open_round = true;
        stats.rows += batch.records.num_rows() as u64;
        decoded.clear();
        let mut sink_error = None;
        stats.dead += decode_events(&batch.records, &batch.origin, &mut decoded, &mut |letter| {
            if let Err(e) = dead.send(letter) {
                sink_error.get_or_insert(e);
            }
        })?;
        if let Some(e) = sink_error {
            return Err(e);
        }
        for event in decoded.drain(..) {
            let tick = clock.tick(event.ts);
            let now = *input.events.time();
            if tick > now {
                input.events.send_batch(&mut pending);
                pending.clear();
                input.advance_to(tick);
                let horizon = tick.saturating_sub(rounds_in_flight);
                while probe.less_than(&horizon) && !cancel.load(Ordering::Relaxed) {
                    worker.step();
                }
            } else if tick < now {
                stats.reordered += 1;
            }
            pending.push(event);
            if pending.len() >= SEND_BATCH {
                input.events.send_batch(&mut pending);
                pending.clear();
            }
        }
        // Keep channels moving between batches even when no round closed.
        worker.step();
    }
    input.events.send_batch(&mut pending);
    Ok(stats)
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
    fn auto_tick_targets_round_size() {
        assert_eq!(auto_tick(1000, 1_000_000, 100), 100_000);
        assert_eq!(auto_tick(0, 10, 5), 1);
        assert_eq!(auto_tick(10, 1, 1_000_000), 100_000);
    }
}
