//! Windowed item popularity as a differential collection.
//!
//! An event for item `i` in round `t` is the update `(i, t, +1)` and, `window` rounds
//! later, its retraction `(i, t + window, -1)`; differential's `count` turns the stream
//! of updates into the collection `(item, count in the window)`, maintained
//! incrementally and keyed (exchanged) by item. Its output changes are broadcast to the
//! learners, which keep a dense replica for the samplers' alias tables.
//!
//! The window is measured in rounds (ticks) of event time, so its resolution is one
//! tick; [`crate::run_backtest`] keeps ticks at most a sixteenth of the window when a
//! sampler reads popularity.
//!
//! ## Compaction
//!
//! The updates are arranged explicitly and the dataflow keeps a handle on the trace, so
//! the trace's logical compaction is held back until a GC cycle advances it
//! ([`compact_trace`]): between cycles the trace keeps the history of updates (two per
//! event), and a cycle lets the spine fold everything before the cycle's round into at
//! most one update per item. The GC trigger therefore decides when that work is done,
//! the way it does for the other state owners.

use differential_dataflow::collection::{AsCollection, VecCollection};
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::operators::CountTotal;
use differential_dataflow::trace::cursor::Cursor;
use differential_dataflow::trace::implementations::KeySpine;
use differential_dataflow::trace::{Navigable, TraceReader};
use rustc_hash::FxHashMap;
use tidepool_pipeline::EventBatch;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concat;
use timely::dataflow::Stream;
use timely::progress::frontier::AntichainRef;

/// A change of an item's windowed count: `((item, count), time, diff)`.
pub type CountChange = ((u64, isize), u64, isize);

/// The arranged window updates: `(item, ())` at round times, `isize` diffs.
pub type PopularityTrace = TraceAgent<KeySpine<u64, u64, isize>>;

/// The round of a window record that counts from the round it arrives in.
const THIS_ROUND: u64 = u64::MAX;

/// Approximate bytes of one arranged update (key, time, diff).
pub const TRACE_UPDATE_BYTES: u64 = 24;

/// Extension trait: the windowed popularity of a stream of events.
pub trait WindowedPopularity<'scope> {
    /// `(item, count)` over the last `window_ticks` rounds, as a differential collection.
    fn windowed_counts(self, window_ticks: u64) -> VecCollection<'scope, u64, (u64, isize), isize>;

    /// As [`windowed_counts`](Self::windowed_counts), plus a handle on the arranged
    /// updates that holds their compaction back until [`compact_trace`] advances it.
    fn windowed_counts_traced(
        self,
        window_ticks: u64,
    ) -> (
        VecCollection<'scope, u64, (u64, isize), isize>,
        PopularityTrace,
    );

    /// As [`windowed_counts_traced`](Self::windowed_counts_traced), with `replay`: events
    /// of earlier rounds `(item, round, n)` (a restored checkpoint's window), counted from
    /// the round they arrive in until their original round's retraction.
    fn windowed_counts_replayed(
        self,
        replay: Stream<'scope, u64, Vec<(u64, u64, isize)>>,
        window_ticks: u64,
    ) -> (
        VecCollection<'scope, u64, (u64, isize), isize>,
        PopularityTrace,
    );
}

impl<'scope> WindowedPopularity<'scope> for Stream<'scope, u64, Vec<EventBatch>> {
    fn windowed_counts(self, window_ticks: u64) -> VecCollection<'scope, u64, (u64, isize), isize> {
        // Without an outside handle the trace compacts as the count operator goes.
        self.windowed_counts_traced(window_ticks).0
    }

    fn windowed_counts_traced(
        self,
        window_ticks: u64,
    ) -> (
        VecCollection<'scope, u64, (u64, isize), isize>,
        PopularityTrace,
    ) {
        let scope = self.scope();
        self.windowed_counts_replayed(
            timely::dataflow::operators::generic::operator::empty(scope),
            window_ticks,
        )
    }

    fn windowed_counts_replayed(
        self,
        replay: Stream<'scope, u64, Vec<(u64, u64, isize)>>,
        window_ticks: u64,
    ) -> (
        VecCollection<'scope, u64, (u64, isize), isize>,
        PopularityTrace,
    ) {
        let window = window_ticks.max(1);
        // Live events count from their own round; replayed ones carry theirs.
        let updates = self
            .flat_map(|batch| (0..batch.len()).map(move |i| (batch.items()[i], THIS_ROUND, 1isize)))
            .concat(replay)
            .unary::<timely::container::CapacityContainerBuilder<Vec<(u64, u64, isize)>>, _, _, _>(
                Pipeline,
                "WindowUpdates",
                move |_, _| {
                    move |input, output| {
                        input.for_each_stamp(|cap, data| {
                            let Some(cap) = cap.retain_least(output.output_index()) else {
                                return;
                            };
                            let t = *cap.time();
                            let mut session = output.session(&cap);
                            for (item, round, n) in data.flat_map(|d| d.drain(..)) {
                                let round = if round == THIS_ROUND { t } else { round };
                                // Only what is still inside the window from here on.
                                if round + window > t {
                                    session.give((item, t, n));
                                    session.give((item, round + window, -n));
                                }
                            }
                        });
                    }
                },
            )
            .as_collection();
        let arranged: Arranged<'scope, PopularityTrace> = updates.arrange_by_self();
        let trace = arranged.trace.clone();
        (arranged.count_total(), trace)
    }
}

/// Updates in the trace right now, and how many of them are redundant once everything
/// before `time` is folded together (per item, all updates before `time` become one, or
/// none when they cancel).
pub fn trace_redundancy(trace: &mut PopularityTrace, time: u64) -> (u64, u64) {
    let mut total = 0u64;
    let mut old = 0u64;
    let mut sums: FxHashMap<u64, isize> = FxHashMap::default();
    trace.map_spans(|span| {
        let Some(batch) = span.inner.as_ref() else {
            return;
        };
        let mut cursor = batch.cursor();
        while cursor.key_valid(batch) {
            let key = *cursor.key(batch);
            while cursor.val_valid(batch) {
                cursor.map_times(batch, |t, d| {
                    total += 1;
                    if *t < time {
                        old += 1;
                        *sums.entry(key).or_default() += *d;
                    }
                });
                cursor.step_val(batch);
            }
            cursor.step_key(batch);
        }
    });
    let survivors = sums.values().filter(|&&s| s != 0).count() as u64;
    (total, old.saturating_sub(survivors))
}

/// Lets the trace fold every update before `time`; returns the bytes of the updates that
/// this makes redundant (released as the spine merges, which it does as rounds arrive
/// and, with idle merge effort configured, while the input is idle).
pub fn compact_trace(trace: &mut PopularityTrace, time: u64) -> u64 {
    let (_, redundant) = trace_redundancy(trace, time);
    let frontier = [time];
    trace.set_logical_compaction(AntichainRef::new(&frontier));
    trace.set_physical_compaction(AntichainRef::new(&frontier));
    redundant * TRACE_UPDATE_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};
    use tidepool_pipeline::{BufferPool, Event, EventType};
    use timely::dataflow::operators::{Input, Inspect, Probe};
    use timely::dataflow::{InputHandle, ProbeHandle};

    /// The differential counts, accumulated up to each time, equal a from-scratch recount
    /// of the events in `(t - window, t]` at every time, on one and two workers.
    #[test]
    fn windowed_counts_match_a_recount_at_every_time() {
        for workers in [1, 2] {
            let window = 5u64;
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(17);
            // (tick, item) events over 60 ticks and 12 items.
            let events: Vec<(u64, u64)> = (0..3000)
                .map(|_| (rng.random_range(0..60u64), rng.random_range(0..12u64)))
                .collect();
            let mut sorted = events.clone();
            sorted.sort_unstable();
            let changes: Arc<Mutex<Vec<CountChange>>> = Arc::default();
            let sink = Arc::clone(&changes);
            let sorted = Arc::new(sorted);
            timely::execute(timely::Config::process(workers), move |worker| {
                let mut input = InputHandle::<
                    u64,
                    timely::container::CapacityContainerBuilder<Vec<EventBatch>>,
                >::new();
                let probe = ProbeHandle::new();
                let sink = Arc::clone(&sink);
                worker.dataflow::<u64, _, _>(|scope| {
                    scope
                        .input_from(&mut input)
                        .windowed_counts(window)
                        .inner
                        .inspect(move |c| sink.lock().unwrap().push(*c))
                        .probe_with(&probe);
                });
                if worker.index() == 0 {
                    for &(t, item) in sorted.iter() {
                        if t > *input.time() {
                            input.advance_to(t);
                        }
                        // One event per batch: rounds mix batches of any size.
                        input.send(EventBatch::from_events(
                            &[Event {
                                ts: t as i64,
                                pos: 0,
                                user: 0,
                                item,
                                weight: 1.0,
                                kind: EventType::View,
                            }],
                            &BufferPool::current(),
                        ));
                    }
                }
                input.advance_to(100);
                while probe.less_than(input.time()) {
                    worker.step();
                }
            })
            .unwrap();
            let changes = changes.lock().unwrap().clone();
            for t in 0..70u64 {
                let mut dd: BTreeMap<u64, isize> = BTreeMap::new();
                // At any time the collection holds one (item, count) per item, so summing
                // count * diff over the changes up to t gives the count at t.
                for &((item, count), time, diff) in &changes {
                    if time <= t {
                        *dd.entry(item).or_default() += count * diff;
                    }
                }
                dd.retain(|_, c| *c != 0);
                let mut recount: BTreeMap<u64, isize> = BTreeMap::new();
                for &(tick, item) in &events {
                    if tick <= t && tick + window > t {
                        *recount.entry(item).or_default() += 1;
                    }
                }
                assert_eq!(dd, recount, "time {t}, {workers} worker(s)");
            }
        }
    }
}
