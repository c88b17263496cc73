//! The replay dataflow: source → broadcast → prequential learner → probe, on timely
//! workers, and the report it produces.
//!
//! ```text
//!  source share (per worker) ──decode──► dead letters
//!        │ timely time = event-time tick
//!        ▼
//!  broadcast: every worker gets every event of a round
//!        │
//!        ▼
//!  Prequential (unary_frontier): stash per time; once the frontier passes t,
//!  sort round t by (ts, pos) and, event by event, score-then-train the events of the
//!  users this worker owns, while keeping the shared catalogue replica
//!        │ per round: events owned
//!        ▼
//!  probe ──► flow control of the sources
//! ```
//!
//! ## Compaction cycles
//!
//! A second input carries control commands: when the GC controller decides on a cycle,
//! worker 0 stamps a [`CycleTicket`] at its current input time `t`; it is broadcast and
//! merged with the popularity changes into the learner's second input. A learner runs
//! the cycle once every round before `t` is processed and before round `t`, so every
//! worker compacts between the same two rounds (the catalogue replicas expire the same
//! items) and an idle input, whose frontier stays at `t`, still compacts. The cycle
//! evicts users and expires items past their TTL, advances the popularity trace's
//! compaction to `t`, and reports what it freed to the controller, whose last report
//! closes the cycle.
//!
//! Why broadcast rather than exchange by user: the protocol's candidates ("every item
//! seen before t"), the replay index that decides which events are scored, and
//! `mostpop`'s counts are functions of the *global* replay order. Giving each worker the
//! whole (compact, 40-byte) stream lets it keep exact replicas of those without any
//! further coordination, and user state (histories, user embeddings) still lives only on
//! the worker that owns the user. Within a process the broadcast costs one copy of the
//! stream per worker, which is small next to training.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidepool_pipeline::dead_letter::DeadLetterSink;
use tidepool_pipeline::delta::DeltaSink;
use tidepool_pipeline::memory::collector::{CycleTicket, Freed, GcController, GcStats};
use tidepool_pipeline::memory::heap::{AllocMeter, AllocWindow};
use tidepool_pipeline::{BufferPool, Error, Event, EventBatch, EventSource, Quality, Result};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::{Concat, ConnectLoop, Exchange, Feedback, Input, Inspect, Probe};
use timely::dataflow::ProbeHandle;

use crate::checkpoint::{part_events, CheckpointStats, Checkpointer, Deposit, Loaded};
use crate::cluster::{Cluster, Replication, RowBatch};
use crate::config::{BacktestConfig, ModelConfig, TARGET_EVENTS_PER_ROUND};
use crate::coord::{forward_requests, Coordinator, Handlers, Stage};
use crate::ingest::{auto_tick, drive, Clock, Feed, IngestStats, Inputs};
use crate::item_table::ItemTable;
use crate::learner::{Learner, Protocol, WorkerResult};
use crate::live::LiveMetrics;
use crate::model::Model;
use crate::popularity::{compact_trace, CountChange, PopularityTrace, WindowedPopularity};
use tidepool_samplers::SamplerSpec;

/// Quality of one metrics window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowReport {
    /// Window start, event time ms (inclusive).
    pub start_ms: i64,
    /// Window end, event time ms (exclusive).
    pub end_ms: i64,
    /// Counters of the window.
    pub quality: Quality,
    /// Ensembles: the mean mixing weight of each component over the window's learning
    /// steps (and over workers), in the order of [`VariantReport::components`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
}

/// One variant's results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantReport {
    /// Variant name.
    pub name: String,
    /// Its model configuration.
    pub model: ModelConfig,
    /// Counters over the whole replay.
    pub total: Quality,
    /// Counters per window of event time, in time order (windows without events left out).
    pub windows: Vec<WindowReport>,
    /// Norm of this process's item table (embeddings and biases) at the end, for learned
    /// models: replicas of a cluster agree on it.
    pub item_table_norm: Option<f64>,
    /// Ensembles: the variants mixed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// Ensembles: the mixing weights of the last window with learning steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
}

/// The outcome of a backtest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BacktestReport {
    /// Processes of the cluster that ran it (`config.workers` each).
    pub processes: usize,
    /// Events inside the popularity window as the last round saw it, when a sampler reads
    /// popularity.
    pub popularity_window_events: Option<u64>,
    /// The configuration that ran.
    pub config: BacktestConfig,
    /// The protocol derived from it and the source.
    pub protocol: Protocol,
    /// Width of a timely round in event time.
    pub tick_ms: i64,
    /// Events replayed (scored or not, trained on).
    pub events: u64,
    /// Rows read from the source.
    pub rows: u64,
    /// Rows rejected as dead letters.
    pub dead_letters: u64,
    /// Events processed later than their timestamp because the input was not sorted.
    pub reordered: u64,
    /// Events for which fewer negatives than configured could be drawn.
    pub sampler_shortfalls: u64,
    /// Users held at the end (distinct users, unless a TTL evicted some).
    pub users: u64,
    /// Live items at the end (distinct items, unless a TTL expired some).
    pub items: u64,
    /// Users evicted past their TTL (a returning user counts again).
    pub users_evicted: u64,
    /// Items expired past their TTL.
    pub items_expired: u64,
    /// Approximate bytes of user state (histories and user embedding rows) at the end.
    pub user_state_bytes: u64,
    /// Bytes of one worker's replica of the `itemknn` co-occurrence state at the end
    /// (every worker holds one).
    pub cooccurrence_bytes: u64,
    /// Compaction cycles, pauses, bytes freed, heap.
    pub gc: GcStats,
    /// Checkpoints written (when checkpointing).
    pub checkpoints: Option<CheckpointStats>,
    /// Wall time of the replay.
    pub seconds: f64,
    /// Per-variant results.
    pub variants: Vec<VariantReport>,
    /// Allocator calls over the steady state (past the warm-up, before the final
    /// report), when the counting allocator is installed.
    pub allocs: Option<AllocWindow>,
    /// The buffer pool over the same steady state: `(gets, misses)` counted from the
    /// moment the allocation window opens (the pool fills while the first batches are in
    /// flight; this is how it serves once filled).
    pub pool_steady: Option<(u64, u64)>,
}

impl BacktestReport {
    /// Events per second over the whole replay (decode, score, train).
    pub fn events_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Records stashed by timely time until the frontiers pass it, each time with the
/// capability that lets the operator emit at it. Vectors of past times are kept for
/// reuse ([`Stash::recycle`]): a stash takes rounds in and out all run long.
struct Stash<D> {
    by_time: BTreeMap<u64, (Option<Capability<u64>>, Vec<D>)>,
    spare: Vec<Vec<D>>,
}

impl<D> Default for Stash<D> {
    fn default() -> Self {
        Self {
            by_time: BTreeMap::new(),
            spare: Vec::new(),
        }
    }
}

impl<D> Stash<D> {
    fn stash(&mut self, cap: Option<Capability<u64>>, data: &mut Vec<D>) {
        let Some(cap) = cap else { return };
        let spare = &mut self.spare;
        let entry = self
            .by_time
            .entry(*cap.time())
            .or_insert_with(|| (None, spare.pop().unwrap_or_default()));
        entry.0.get_or_insert(cap);
        entry.1.append(data);
    }

    /// Stashes data without a capability (data that is never emitted at its time).
    fn stash_at(&mut self, time: Option<u64>, data: &mut Vec<D>) {
        let Some(time) = time else { return };
        self.by_time
            .entry(time)
            .or_insert_with(|| (None, Vec::new()))
            .1
            .append(data);
    }

    /// Stashes one item at `time`, without a capability.
    fn push_at(&mut self, time: u64, item: D) {
        self.by_time
            .entry(time)
            .or_insert_with(|| (None, Vec::new()))
            .1
            .push(item);
    }

    fn first_time(&self) -> Option<u64> {
        self.by_time.keys().next().copied()
    }

    fn take(&mut self, time: u64) -> Option<(Capability<u64>, Vec<D>)> {
        let (cap, data) = self.by_time.remove(&time)?;
        cap.map(|c| (c, data))
    }

    /// Gives back a vector [`Stash::take`] returned, emptied, for reuse.
    fn recycle(&mut self, mut data: Vec<D>) {
        data.clear();
        self.spare.push(data);
    }

    /// Everything stashed at times before `time`, releasing those capabilities.
    fn take_before(&mut self, time: u64) -> Vec<D> {
        let later = self.by_time.split_off(&time);
        let earlier = std::mem::replace(&mut self.by_time, later);
        earlier.into_values().flat_map(|(_, data)| data).collect()
    }
}

/// Tick width when the source cannot tell its time range.
const DEFAULT_TICK_WITHOUT_STATS_MS: i64 = 3_600_000;

/// Metrics window when the source cannot tell its time range.
const DEFAULT_WINDOW_WITHOUT_STATS_MS: i64 = 86_400_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerOutcome {
    ingest: IngestStats,
    learner: WorkerResult,
}

/// The learner's second input: popularity changes, compaction commands, and (in a
/// cluster) other processes' item-row changes.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Side {
    Count(CountChange),
    Cycle(CycleTicket),
    Rows(RowBatch),
}

/// Merge effort differential spends per idle activation, so compacted traces shrink
/// even when no new updates arrive.
const IDLE_MERGE_EFFORT: isize = 100_000;

/// Replays `source` through the prequential dataflow on `config.workers` threads, with a
/// GC controller built from `config.gc`.
///
/// `progress` is called about ten times a second from the calling thread with the number
/// of events processed so far. Dead letters go to `dead`. Fails when the source fails
/// (I/O, schema) or a worker panics; every worker is stopped and joined first.
pub fn run_backtest(
    source: Arc<dyn EventSource>,
    config: &BacktestConfig,
    dead: Arc<dyn DeadLetterSink>,
    progress: &dyn Fn(u64),
) -> Result<BacktestReport> {
    let gc = Arc::new(GcController::new(config.gc.clone(), config.workers));
    run_backtest_with(source, config, dead, gc, progress)
}

/// As [`run_backtest`], with a GC controller of the caller's (to change settings while
/// running, request cycles, or rotate a buffer pool). `gc` must have been made for
/// `config.workers` workers.
pub fn run_backtest_with(
    source: Arc<dyn EventSource>,
    config: &BacktestConfig,
    dead: Arc<dyn DeadLetterSink>,
    gc: Arc<GcController>,
    progress: &dyn Fn(u64),
) -> Result<BacktestReport> {
    let options = RunOptions {
        gc,
        checkpoints: None,
        restore: None,
        deltas: None,
        publish_every: None,
        cluster: None,
        live: None,
    };
    run_dataflow(source, config, dead, options, progress)
}

/// What a run shares with its caller besides the configuration.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The GC controller (made for `config.workers` workers).
    pub gc: Arc<GcController>,
    /// Checkpoint coordinator: periodic and requested checkpoints, and a final one.
    pub checkpoints: Option<Arc<Checkpointer>>,
    /// State to start from.
    pub restore: Option<Arc<Loaded>>,
    /// Where changed embedding rows go at every checkpoint (before it commits, so a
    /// crash republishes rather than loses them).
    pub deltas: Option<Arc<dyn DeltaSink>>,
    /// Also publish changed rows this often between checkpoints (each worker its users,
    /// worker 0 the item tables, at its next batch boundary).
    pub publish_every: Option<Duration>,
    /// This process's place in a multi-process cluster (`config.workers` is then the
    /// number of workers per process); `None` runs in this process alone.
    pub cluster: Option<Cluster>,
    /// Counters the caller reads while the run goes on (metrics endpoint).
    pub live: Option<Arc<LiveMetrics>>,
}

/// Events before the allocation window opens: a fifth of what this process will see
/// when the source says, else 100,000 (a live stream). The first rounds grow every
/// table, history and pool class from nothing; the target is the steady state after.
fn alloc_warm_up(rows: Option<u64>, processes: usize) -> u64 {
    rows.map_or(100_000, |r| r / processes.max(1) as u64 / 5)
}

/// What a run's timing rests on, from the source's statistics and the configuration:
/// the tick (a timely round's width in event time), the evaluation protocol, and the
/// popularity window in ticks.
#[derive(Clone, Copy)]
struct Plan {
    clock: Clock,
    protocol: Protocol,
    tick_ms: i64,
    window_ticks: u64,
    /// Whether a sampler needs the windowed popularity counts.
    needs_counts: bool,
    /// Rows the source says it holds (a bounded source).
    rows: Option<u64>,
}

/// Stage 1 of [`run_dataflow`]: the plan.
fn plan(config: &BacktestConfig, info: &tidepool_pipeline::SourceInfo) -> Plan {
    let rows = info.rows.unwrap_or(0);
    let needs_counts = config.variants.iter().any(|v| {
        SamplerSpec::parse(&v.model.sampler).is_ok_and(|s| s.build().needs_window_counts())
    });
    let (min_ts, max_ts, tick_ms) = match (info.min_ts, info.max_ts) {
        (Some(lo), Some(hi)) => {
            let hi = hi.max(lo);
            let tick = config.tick_ms.unwrap_or_else(|| {
                let tick = auto_tick(rows, hi - lo, TARGET_EVENTS_PER_ROUND);
                if needs_counts {
                    // The popularity window is counted in ticks: keep sixteen per window.
                    tick.min((config.popularity_window_ms / 16).max(1))
                } else {
                    tick
                }
            });
            (lo, hi, tick)
        }
        _ => {
            // Without time statistics a derived tick could be a millisecond, and a round
            // per distinct millisecond is slow; an hour is a safe default.
            if config.tick_ms.is_none() {
                tracing::warn!(
                    source = %info.description,
                    "the source has no event-time statistics; using a 1 hour tick (set --tick to change)"
                );
            }
            (
                0,
                0,
                config.tick_ms.unwrap_or(DEFAULT_TICK_WITHOUT_STATS_MS),
            )
        }
    };
    let clock = Clock {
        origin_ms: min_ts,
        tick_ms,
    };
    let mut eval = config.eval.clone();
    if info.min_ts.is_none() || info.max_ts.is_none() {
        eval.window_ms = eval.window_ms.or(Some(DEFAULT_WINDOW_WITHOUT_STATS_MS));
    }
    let protocol = Protocol::new(&eval, rows, min_ts, max_ts);
    let window_ticks = (config.popularity_window_ms as u64)
        .div_ceil(tick_ms as u64)
        .max(1);
    Plan {
        clock,
        protocol,
        tick_ms,
        window_ticks,
        needs_counts,
        rows: info.rows,
    }
}

/// Stage 2 of [`run_dataflow`]: timely's configuration: threads in this process, or
/// this process's place in a cluster; differential's idle merging.
fn timely_config(cluster: Option<&Cluster>, workers: usize) -> timely::Config {
    let mut timely_config = match cluster {
        None => timely::Config::process(workers),
        Some(c) => timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: workers,
                process: c.process,
                addresses: c.addresses.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        },
    };
    differential_dataflow::configure(
        &mut timely_config.worker,
        &differential_dataflow::Config::default().idle_merge_effort(Some(IDLE_MERGE_EFFORT)),
    );
    timely_config
}

/// The prequential operator's state on one worker: rounds of events, popularity count
/// changes and GC cycle tickets waiting for their time, and other processes' row
/// changes; [`Prequential::advance`] runs whatever became complete, in time order.
struct Prequential {
    rounds: Stash<EventBatch>,
    /// A round's events, copied out of the shared batches to be put in replay order
    /// (kept: its capacity is reused).
    round_events: Vec<Event>,
    live_counts: Vec<Quality>,
    changes: Stash<CountChange>,
    cycles: Stash<CycleTicket>,
    remote: Vec<RowBatch>,
    /// The co-occurrence gauge walks every neighbour list: once a second is plenty for a
    /// gauge, and every round is not.
    bytes_shown: Option<Instant>,
    processed: Arc<AtomicU64>,
    live: Option<Arc<crate::live::LiveMetrics>>,
    gc: Arc<GcController>,
    /// Where the worker's time goes, logged at debug level when the operator drops:
    /// rounds learned and the time inside them, against the operator's lifetime (the
    /// rest is ingest, exchange, waiting and cycles). Two workers that learn for very
    /// different times, or learn for much more than half of what one worker does, show
    /// here without an instrumented build.
    worker: usize,
    rounds_learned: u64,
    learning: Duration,
    built: Instant,
}

impl Drop for Prequential {
    fn drop(&mut self) {
        tracing::debug!(
            worker = self.worker,
            rounds = self.rounds_learned,
            learn_s = self.learning.as_secs_f64(),
            lifetime_s = self.built.elapsed().as_secs_f64(),
            "learner time"
        );
    }
}

impl Prequential {
    fn new(
        worker: usize,
        processed: Arc<AtomicU64>,
        live: Option<Arc<crate::live::LiveMetrics>>,
        gc: Arc<GcController>,
    ) -> Self {
        Self {
            worker,
            rounds_learned: 0,
            learning: Duration::ZERO,
            built: Instant::now(),
            rounds: Stash::default(),
            round_events: Vec::new(),
            live_counts: Vec::new(),
            changes: Stash::default(),
            cycles: Stash::default(),
            remote: Vec::new(),
            bytes_shown: None,
            processed,
            live,
            gc,
        }
    }

    /// Sorts a batch of the side input into its stashes: count changes and cycle tickets
    /// wait for their time (`None`: the batch came without a capability and only rows
    /// are kept), other processes' rows for the next round.
    fn take_side(&mut self, time: Option<u64>, data: impl Iterator<Item = Side>) {
        let mut tickets = Vec::new();
        for item in data {
            match item {
                // A count change is kept by its own time: differential sends changes of
                // several times under the earliest one's capability (at the end, every
                // pending retraction at once), and a change must not reach a round
                // before its time.
                Side::Count(change) if time.is_some() => self.changes.push_at(change.1, change),
                Side::Count(_) => {}
                Side::Cycle(t) => tickets.push(t),
                Side::Rows(r) => self.remote.push(r),
            }
        }
        self.cycles.stash_at(time, &mut tickets);
    }

    /// Applies other processes' row changes, then runs every GC cycle whose time has
    /// come (`before_done`: everything before it is in) and every complete round
    /// (`done`), earliest first, each after the popularity changes before it. Row
    /// changes a round makes for other processes go to `emit` under its capability.
    fn advance(
        &mut self,
        learner: &mut Learner,
        mut trace: Option<&mut PopularityTrace>,
        done: &dyn Fn(&u64) -> bool,
        before_done: &dyn Fn(&u64) -> bool,
        emit: &mut dyn FnMut(&Capability<u64>, Vec<RowBatch>),
    ) {
        // Other processes' changes land as they come: additive, so their order does not
        // matter.
        for batch in self.remote.drain(..) {
            learner.apply_rows(&batch);
        }
        loop {
            let round = self.rounds.first_time().filter(|t| done(t));
            let cycle = self.cycles.first_time().filter(|t| before_done(t));
            match (round, cycle) {
                (_, Some(c)) if round.is_none_or(|r| c <= r) => {
                    let mut before = self.changes.take_before(c);
                    learner.apply_counts(&mut before);
                    for ticket in self.cycles.take_before(c + 1) {
                        run_cycle(learner, trace.as_deref_mut(), c, &self.gc, ticket);
                    }
                }
                (Some(time), _) => {
                    // Popularity as of the rounds before this one.
                    let mut before = self.changes.take_before(time);
                    learner.apply_counts(&mut before);
                    if let Some((cap, batches)) = self.rounds.take(time) {
                        self.round_events.clear();
                        for b in &batches {
                            b.extend_into(&mut self.round_events);
                        }
                        // The blocks go back to the pool now.
                        self.rounds.recycle(batches);
                        let started = Instant::now();
                        let owned = learner.process_round(time, &mut self.round_events);
                        self.learning += started.elapsed();
                        self.rounds_learned += 1;
                        self.processed.fetch_add(owned, Ordering::Relaxed);
                        self.publish_live(learner);
                        let changes = learner.take_row_changes();
                        if !changes.is_empty() {
                            emit(&cap, changes);
                        }
                    }
                }
                _ => break,
            }
        }
    }

    /// The live metrics after a round: counters, ensemble weights, and (once a second)
    /// the co-occurrence gauge.
    fn publish_live(&mut self, learner: &mut Learner) {
        let Some(live) = &self.live else {
            return;
        };
        learner.take_live(&mut self.live_counts);
        live.add(&self.live_counts);
        learner.each_weights(|v, w| live.set_weights(v, w));
        if self
            .bytes_shown
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.bytes_shown = Some(Instant::now());
            live.set_cooccurrence_bytes(learner.knn_bytes());
        }
    }
}

/// What watching the workers saw.
struct Watched {
    /// Every worker's outcome (in a cluster, the first local worker's holds the whole
    /// cluster's), or the first error.
    outcomes: Result<Vec<WorkerOutcome>>,
    allocs: Option<AllocWindow>,
    pool_steady: Option<(u64, u64)>,
}

/// Stage 4 of [`run_dataflow`]: reports progress ten times a second while the workers
/// run, meters allocator calls and pool gets over the steady state (from `warm_up`
/// events on), and joins the workers.
fn watch(
    guards: timely::communication::WorkerGuards<Result<Vec<WorkerOutcome>>>,
    processed: &AtomicU64,
    progress: &dyn Fn(u64),
    warm_up: u64,
    pool: Option<&BufferPool>,
) -> Watched {
    let mut meter = AllocMeter::new(warm_up);
    let mut pool_from = None;
    // The end is noticed within a few milliseconds, so that short runs' `seconds` (and
    // events/s) are not rounded up to 100 ms.
    let mut shown = Instant::now() - Duration::from_secs(1);
    while !guards.guards().iter().all(|g| g.is_finished()) {
        if shown.elapsed() >= Duration::from_millis(100) {
            shown = Instant::now();
            let n = processed.load(Ordering::Relaxed);
            meter.sample(n);
            if let (Some(p), None) = (pool, &pool_from) {
                if n >= warm_up {
                    pool_from = Some(p.stats());
                }
            }
            progress(n);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    progress(processed.load(Ordering::Relaxed));
    let mut outcomes = Vec::new();
    let mut first_error = None;
    for joined in guards.join() {
        match joined {
            Ok(Ok(mut outcome)) => outcomes.append(&mut outcome),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => {
                first_error.get_or_insert(Error::Internal(format!("a worker panicked: {panic}")));
            }
        }
    }
    Watched {
        outcomes: first_error.map_or(Ok(outcomes), Err),
        allocs: meter.window(),
        pool_steady: pool.zip(pool_from).map(|(p, from)| {
            let now = p.stats();
            (now.gets - from.gets, now.misses - from.misses)
        }),
    }
}

/// The dataflow behind every command: replays or follows `source`, scoring then
/// training, with GC cycles and (optionally) checkpoints. A source without a known size
/// (a live stream) gets no warm-up: every event after the first is scored per
/// `eval_every`.
///
/// Stages: `plan` (tick, protocol, popularity window), item tables (restored from a
/// checkpoint if any), `timely_config`, the workers (each builds the prequential
/// dataflow, then ingests its share of the source and drains, checkpointing on the
/// way), `watch` (progress, steady-state meters, join) and `assemble` (the report).
pub fn run_dataflow(
    source: Arc<dyn EventSource>,
    config: &BacktestConfig,
    dead: Arc<dyn DeadLetterSink>,
    options: RunOptions,
    progress: &dyn Fn(u64),
) -> Result<BacktestReport> {
    config.validate()?;
    let RunOptions {
        gc,
        checkpoints,
        restore,
        deltas,
        publish_every,
        cluster,
        live,
    } = options;
    let cluster = cluster.filter(|c| c.processes > 1);
    let info = source.info();
    let plan = plan(config, &info);
    let tables: Vec<_> = config
        .variants
        .iter()
        .map(|v| Model::table_for(&v.model, config.seed))
        .collect();
    if let (Some(loaded), Some(cp)) = (&restore, &checkpoints) {
        for (table, rows) in tables.iter().zip(&loaded.items) {
            if let (Some(table), Some(rows)) = (table, rows) {
                table.import(rows, loaded.shared.catalogue.alive());
            }
        }
        cp.restored(&loaded.manifest);
    }

    let processed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // The run's batches live in the pool the GC rotates; a caller without one gets a
    // default pool.
    let pool = gc
        .pool()
        .cloned()
        .unwrap_or_else(|| BufferPool::new(tidepool_pipeline::PoolConfig::default()));
    let connected = Arc::new(AtomicBool::new(false));
    if let Some(c) = &cluster {
        crate::cluster::connect_watchdog(c, Arc::clone(&connected));
        crate::cluster::exit_when_a_peer_is_lost(c.process);
    }
    let run = Run {
        source,
        config: config.clone(),
        plan,
        dead: Arc::clone(&dead),
        gc: Arc::clone(&gc),
        pool,
        checkpoints: checkpoints.clone(),
        restore,
        deltas,
        publish_every,
        live,
        tables: tables.clone(),
        replication: cluster.as_ref().map(|c| Replication {
            process: c.process,
            processes: c.processes,
            workers: config.workers,
        }),
        processed: Arc::clone(&processed),
        cancel: Arc::new(AtomicBool::new(false)),
        connected,
    };
    let guards = timely::execute(
        timely_config(cluster.as_ref(), config.workers),
        move |worker| run.worker(worker),
    )
    .map_err(|e| Error::Internal(format!("timely could not start its workers: {e}")))?;

    let processes = cluster.as_ref().map_or(1, |c| c.processes);
    let watched = watch(
        guards,
        &processed,
        progress,
        alloc_warm_up(info.rows, processes),
        gc.pool(),
    );
    let seconds = started.elapsed().as_secs_f64();
    let outcomes = watched.outcomes?;
    dead.flush()?;
    let mut report = assemble(config, plan.protocol, plan.tick_ms, seconds, outcomes);
    report.gc = gc.stats();
    report.allocs = watched.allocs;
    report.pool_steady = watched.pool_steady;
    report.processes = processes;
    if !plan.needs_counts {
        report.popularity_window_events = None;
    }
    for (v, table) in report.variants.iter_mut().zip(&tables) {
        v.item_table_norm = table.as_ref().map(|t| t.norm());
    }
    if let Some(cp) = &checkpoints {
        let carried = cp.carried();
        report.rows += carried.rows;
        report.dead_letters += carried.dead;
        report.reordered += carried.reordered;
        report.checkpoints = Some(cp.stats());
    }
    Ok(report)
}

/// Stage 3 of [`run_dataflow`]: what every worker of a run shares, moved into timely's
/// worker closure once. [`Run::worker`] is one worker's life: [`Run::learner`] (its
/// state, restored or replicated), [`Run::dataflow`] (the graph of the module header),
/// [`Run::ingest_and_drain`] (its share of the source, checkpoints on the way, the final
/// checkpoint) and the outcome, gathered across processes in a cluster.
struct Run {
    source: Arc<dyn EventSource>,
    config: BacktestConfig,
    plan: Plan,
    dead: Arc<dyn DeadLetterSink>,
    gc: Arc<GcController>,
    pool: BufferPool,
    checkpoints: Option<Arc<Checkpointer>>,
    restore: Option<Arc<Loaded>>,
    deltas: Option<Arc<dyn DeltaSink>>,
    publish_every: Option<Duration>,
    live: Option<Arc<LiveMetrics>>,
    tables: Vec<Option<Arc<ItemTable>>>,
    replication: Option<Replication>,
    /// Events trained, for progress.
    processed: Arc<AtomicU64>,
    /// Set by a failing worker: the others stop instead of waiting for it.
    cancel: Arc<AtomicBool>,
    /// Whether the first worker has announced that the cluster is connected.
    connected: Arc<AtomicBool>,
}

/// A worker's learner, shared by the prequential operator and the checkpoint code, and
/// taken out at the end.
type SharedLearner = Rc<RefCell<Option<Learner>>>;

/// Replayed popularity-window records: (item, tick, diff).
type ReplayInput =
    timely::dataflow::InputHandle<u64, CapacityContainerBuilder<Vec<(u64, u64, isize)>>>;

/// The inputs and probe of one worker's dataflow.
struct Graph {
    input: Inputs,
    /// Replayed popularity-window records (a restored checkpoint's window).
    replay: ReplayInput,
    probe: ProbeHandle<u64>,
}

impl Run {
    fn worker(&self, worker: &mut timely::worker::Worker) -> Result<Vec<WorkerOutcome>> {
        let index = worker.index();
        if !self.connected.swap(true, Ordering::AcqRel) {
            if let Some(r) = &self.replication {
                tracing::info!(
                    process = r.process,
                    "connected to every process of the cluster"
                );
            }
        }
        // Buffers built or dropped on this thread use its shard of the pool, and
        // batches from other processes are rebuilt in it.
        tidepool_pipeline::BufferPool::register_worker(index);
        self.pool.install_current();
        if let Some(r) = &self.replication {
            // One fingerprint per process: its workers share the configuration. This is
            // the first dataflow every process builds, whatever its job.
            let mine = index.is_multiple_of(r.workers).then(|| {
                (
                    r.process,
                    crate::cluster::job_fingerprint(&self.config, self.plan.tick_ms),
                )
            });
            crate::cluster::check_same_job(&gather(worker, mine))?;
        }
        let learner = Rc::new(RefCell::new(Some(self.learner(index, worker.peers()))));
        let Graph {
            input,
            mut replay,
            probe,
        } = self.dataflow(worker, &learner);
        // A restored popularity window re-enters the count before the first round.
        if let (0, Some(loaded)) = (index, &self.restore) {
            for record in Learner::window_replay(&loaded.shared, self.plan.clock) {
                replay.send(record);
            }
        }
        drop(replay);
        let (stats, done) = self.ingest_and_drain(worker, input, &probe, &learner);
        let outcome = learner
            .borrow_mut()
            .take()
            .ok_or_else(|| Error::Internal("learner taken twice".into()))
            .and_then(|learner| {
                done?;
                Ok(WorkerOutcome {
                    ingest: stats,
                    learner: learner.finish(),
                })
            });
        if self.replication.is_none() {
            return outcome.map(|o| vec![o]);
        }
        // Every process reports on the whole cluster; a worker that failed still
        // takes part, or the others would wait for it.
        let all = gather(worker, outcome.as_ref().ok().cloned());
        outcome.map(|_| {
            if index.is_multiple_of(self.config.workers) {
                all
            } else {
                Vec::new()
            }
        })
    }

    /// This worker's learner: fresh or restored, and told what the run publishes,
    /// replicates and checkpoints.
    fn learner(&self, index: usize, peers: usize) -> Learner {
        let config = &self.config;
        let mut l = Learner::new(
            index,
            peers,
            self.plan.protocol,
            config.seed,
            &config.variants,
            &self.tables,
            config.state.clone(),
        );
        if let Some(loaded) = &self.restore {
            l.restore(&loaded.shared, loaded.parts.clone(), config.seed);
        }
        // Removals become tombstones where rows are published: users by their owner,
        // items by worker 0, which publishes the item tables.
        if self.deltas.is_some() {
            l.track_removals(index == 0);
        }
        if let Some(replication) = self.replication {
            l.replicate(replication);
        }
        // Worker 0 writes the shared part of checkpoints, window log included.
        if self.plan.needs_counts && self.checkpoints.is_some() && index == 0 {
            l.keep_window(self.plan.window_ticks, self.plan.clock);
        }
        l
    }

    /// The graph of the module header on this worker: the events broadcast into the
    /// prequential operator, beside the popularity counts, cycle tickets and (in a
    /// cluster) other processes' item rows.
    fn dataflow(&self, worker: &mut timely::worker::Worker, learner: &SharedLearner) -> Graph {
        let index = worker.index();
        let mut replay = timely::dataflow::InputHandle::new();
        let mut input = Inputs::new();
        let probe = ProbeHandle::new();
        let Plan {
            window_ticks,
            needs_counts,
            ..
        } = self.plan;
        worker.dataflow::<u64, _, _>(|scope| {
            let events = scope.input_from(&mut input.events);
            let control = scope
                .input_from(&mut input.control)
                .broadcast()
                .map(Side::Cycle);
            let (counts, mut trace): (_, Option<PopularityTrace>) = if needs_counts {
                let replay = scope.input_from(&mut replay);
                let (counts, trace) = events
                    .clone()
                    .windowed_counts_replayed(replay, window_ticks);
                (counts.inner.broadcast().map(Side::Count), Some(trace))
            } else {
                (empty(scope), None)
            };
            let side = counts.concat(control);
            // In a cluster, item-row changes loop back one round later (see
            // crate::cluster); alone, the loop is not built and rounds pipeline.
            let (rows_loop, side) = if self.replication.is_some() {
                let (handle, rows) = scope.feedback::<Vec<RowBatch>>(1);
                (Some(handle), side.concat(rows.map(Side::Rows)))
            } else {
                (None, side)
            };
            let learner = Rc::clone(learner);
            let mut state = Prequential::new(
                index,
                Arc::clone(&self.processed),
                self.live.clone(),
                Arc::clone(&self.gc),
            );
            let changes_out = events
                .broadcast()
                .binary_frontier::<_, CapacityContainerBuilder<Vec<RowBatch>>, _, _, _, _>(
                    side,
                    Pipeline,
                    Pipeline,
                    "Prequential",
                    move |_, _| {
                        move |(events, events_frontier), (side, side_frontier), output| {
                            let out = output.output_index();
                            events.for_each(|cap, data| {
                                state.rounds.stash(cap.retain_least(out), data);
                            });
                            side.for_each(|cap, data| {
                                // Only the time is kept: holding a capability for changes
                                // would hold back the probe, and with it the sources,
                                // until the next round (a deadlock when the sources wait
                                // for the probe).
                                let time = cap.retain_least(out).map(|c| *c.time());
                                state.take_side(time, data.drain(..));
                            });
                            let done = |t: &u64| {
                                !events_frontier.less_equal(t) && !side_frontier.less_equal(t)
                            };
                            // Everything before `t` is in: a cycle stamped `t` may run.
                            let before_done = |t: &u64| {
                                !events_frontier.less_than(t) && !side_frontier.less_than(t)
                            };
                            let mut learner = learner.borrow_mut();
                            let Some(learner) = learner.as_mut() else {
                                return;
                            };
                            state.advance(
                                learner,
                                trace.as_mut(),
                                &done,
                                &before_done,
                                &mut |cap, changes| {
                                    output.session(cap).give_iterator(changes.into_iter());
                                },
                            );
                            // Changes with no round after them only matter at the end.
                            if events_frontier.is_empty() && side_frontier.is_empty() {
                                let mut rest = state.changes.take_before(u64::MAX);
                                learner.apply_counts(&mut rest);
                            }
                        }
                    },
                )
                .probe_with(&probe);
            if let Some(handle) = rows_loop {
                changes_out
                    .exchange(|batch: &RowBatch| batch.target)
                    .connect_loop(handle);
            }
        });
        Graph {
            input,
            replay,
            probe,
        }
    }

    /// Feeds this worker's share of the source into `input`, publishing deltas and
    /// joining checkpoints at batch boundaries; then closes the input, steps the dataflow
    /// until every round is trained, and takes the final checkpoint. Returns the ingest
    /// statistics and whether all of it succeeded; a failure tells the other workers.
    fn ingest_and_drain(
        &self,
        worker: &mut timely::worker::Worker,
        mut input: Inputs,
        probe: &ProbeHandle<u64>,
        learner: &SharedLearner,
    ) -> (IngestStats, Result<()>) {
        let (index, peers) = (worker.index(), worker.peers());
        let (config, checkpoints, cancel) = (&self.config, &self.checkpoints, &*self.cancel);
        let coord = RefCell::new(Coordinator::build(
            worker,
            Handlers {
                checkpoints: checkpoints.clone(),
                gc: Arc::clone(&self.gc),
                cancel: Arc::clone(&self.cancel),
            },
        ));
        // A failing worker tells the cluster, or the others would wait for it.
        let fail = || {
            cancel.store(true, Ordering::Relaxed);
            coord.borrow_mut().abort();
        };
        let mut stats = IngestStats::default();
        // The input time this worker's input had when it closed: the events it sent last
        // are at that time, so a checkpoint cut must lie beyond it even after the input
        // is gone (a worker that has read all its partitions can be far ahead in event
        // time of one still reading).
        let closed_at = std::cell::Cell::new(None::<u64>);
        let ctx = checkpoints.as_deref().map(|cp| CheckpointCtx {
            cp,
            coord: &coord,
            learner,
            probe,
            tables: &self.tables,
            cancel,
            deltas: self.deltas.as_deref(),
            dead: self.dead.as_ref(),
            replicated: self.replication.is_some(),
        });
        let mut last_publish = Instant::now();
        let mut hook = |worker: &mut timely::worker::Worker,
                        input: Option<&mut Inputs>,
                        stats: &IngestStats,
                        flushed: bool|
         -> Result<()> {
            // Between checkpoints: a user's rows change only on its owner, and item rows
            // are read as they are (Hogwild!), so no cut is needed; the checkpoint's own
            // publication is the consistent one.
            if let (Some(sink), Some(every), Some(ctx)) =
                (self.deltas.as_deref(), self.publish_every, &ctx)
            {
                if last_publish.elapsed() >= every {
                    last_publish = Instant::now();
                    let changed = learner
                        .borrow_mut()
                        .as_mut()
                        .map(|l| l.take_deltas(ctx.cp.next_id(), index == 0))
                        .unwrap_or_default();
                    sink.publish(&changed)?;
                }
            }
            let Some(ctx) = &ctx else {
                return Ok(());
            };
            // A worker still holding events back joins at its next batch.
            if !flushed || !ctx.cp.pending() {
                return Ok(());
            }
            take_checkpoint(worker, input, closed_at.get(), stats, ctx)
        };
        let local_first = index.is_multiple_of(config.workers);
        let must_flush = || {
            // Requests made to another process (signals, admin) go to worker 0.
            if local_first && index != 0 {
                forward_requests(&mut coord.borrow_mut(), checkpoints.as_deref(), &self.gc);
            }
            checkpoints.as_ref().is_some_and(|cp| {
                if index == 0 {
                    if let Some(id) = cp.poll() {
                        coord.borrow_mut().start(id);
                    }
                }
                cp.pending()
            })
        };
        let ingest = self.source.open(index, peers).and_then(|reader| {
            let feed = Feed {
                clock: self.plan.clock,
                rounds_in_flight: config.rounds_in_flight,
                dead: self.dead.as_ref(),
                cancel,
                gc: (index == 0).then_some(self.gc.as_ref()),
                late: config.late,
                allowed_lateness_ms: config.allowed_lateness_ms,
                max_skew_ms: config.max_skew_ms,
                must_flush: &must_flush,
                live: self.live.as_deref(),
                checkpoint_pending: &|| checkpoints.as_ref().is_some_and(|cp| cp.pending()),
                pool: &self.pool,
                // The whole source: one reader may get all of it (a file of one row
                // group).
                rows_hint: self.plan.rows,
            };
            drive(
                worker, &mut input, probe, reader, &feed, &mut stats, &mut hook,
            )
        });
        if ingest.is_err() {
            fail();
        }
        // Closing the input lets the frontier run out; the dataflow must still be stepped
        // to completion so that the other workers can finish too (and join a checkpoint
        // one of them started).
        closed_at.set(Some(*input.events.time()));
        drop(input);
        let mut drained = Ok(());
        while !probe.done() {
            worker.step_or_park(Some(Duration::from_millis(10)));
            // Joins a checkpoint worker 0 started before its input closed. No new one
            // starts now: every worker must see the same sequence of checkpoints, and the
            // last is the final one below.
            if drained.is_ok() {
                drained = hook(worker, None, &stats, true);
            }
        }
        // The final checkpoint: every worker is here, every event trained.
        if let (Some(ctx), true) = (&ctx, ingest.is_ok() && drained.is_ok()) {
            if !cancel.load(Ordering::Relaxed) {
                drained = take_checkpoint(worker, None, closed_at.get(), &stats, ctx);
            }
        }
        if drained.is_err() {
            fail();
        }
        coord.borrow_mut().close();
        (stats, ingest.and(drained))
    }
}

/// What a worker needs to take its part in a checkpoint besides its inputs.
struct CheckpointCtx<'a> {
    cp: &'a Checkpointer,
    coord: &'a RefCell<Coordinator>,
    learner: &'a RefCell<Option<Learner>>,
    probe: &'a ProbeHandle<u64>,
    tables: &'a [Option<Arc<ItemTable>>],
    cancel: &'a AtomicBool,
    deltas: Option<&'a dyn DeltaSink>,
    /// Flushed (file: fsync; Kafka: every letter acknowledged) before this worker's part
    /// is written, so a committed checkpoint never covers offsets whose dead letters
    /// could still be lost in a crash.
    dead: &'a dyn DeadLetterSink,
    /// In a cluster the cut lies one round further (see [`take_checkpoint`]).
    replicated: bool,
}

/// This worker's part of a checkpoint (see [`crate::checkpoint`]): join, advance to the
/// cut, wait until every round before it is trained, write, and wait for the commit.
///
/// In a cluster, a round's item-row changes reach the other processes one round later
/// (see [`crate::cluster`]). The cut is therefore one round past the newest input time:
/// that round carries no events, only the last rows, and once the probe has passed it
/// every replica holds every change of every trained round, so process 0's replica is
/// the whole model.
fn take_checkpoint(
    worker: &mut timely::worker::Worker,
    mut input: Option<&mut Inputs>,
    closed_at: Option<u64>,
    stats: &IngestStats,
    ctx: &CheckpointCtx<'_>,
) -> Result<()> {
    let cancelled = || Error::Internal("checkpoint abandoned: another worker failed".into());
    let (cp, cancel) = (ctx.cp, ctx.cancel);
    let index = worker.index();
    let mut idle = || {
        worker.step_or_park(Some(Duration::from_millis(1)));
        !cancel.load(Ordering::Relaxed)
    };
    let mut coord = ctx.coord.borrow_mut();
    cp.begin();
    // Every event this worker sent is at or before its input's time (or the time its
    // input had when it closed): the cut lies beyond all of them.
    let time = input.as_ref().map(|i| *i.events.time()).or(closed_at);
    let joined = coord
        .gather(
            Stage::Join {
                id: cp.next_id(),
                time,
            },
            &mut idle,
        )
        .ok_or_else(cancelled)?;
    let (mut id, mut newest) = (None, 0);
    for stage in &joined {
        if let Stage::Join { id: i, time } = stage {
            id.get_or_insert(*i);
            newest = newest.max(time.unwrap_or(0));
        }
    }
    let id = id.ok_or_else(|| Error::Internal("checkpoint join without worker 0".into()))?;
    let cut = newest + 1 + u64::from(ctx.replicated);
    if let Some(input) = input.as_mut() {
        input.advance_to(cut);
    }
    while ctx.probe.less_than(&cut) {
        if !idle() {
            return Err(cancelled());
        }
    }
    coord
        .gather(Stage::Quiesced, &mut idle)
        .ok_or_else(cancelled)?;
    let (part, shared, changed) = {
        let mut l = ctx.learner.borrow_mut();
        let l = l
            .as_mut()
            .ok_or_else(|| Error::Internal("learner gone before the checkpoint".into()))?;
        let changed = ctx.deltas.map(|_| l.take_deltas(id, index == 0));
        (l.part(), (index == 0).then(|| l.shared()), changed)
    };
    if let (Some(sink), Some(changed)) = (ctx.deltas, changed) {
        sink.publish(&changed)?;
    }
    ctx.dead.flush()?;
    let bytes = cp.write_part(id, index, &part)?;
    let deposit = Deposit {
        positions: stats.positions.clone(),
        events: part_events(&part),
        rows: stats.rows,
        dead: stats.dead,
        reordered: stats.reordered,
        skipped: stats.skipped,
        lost: stats.lost,
        bytes,
    };
    let written = coord
        .gather(Stage::Written(deposit), &mut idle)
        .ok_or_else(cancelled)?;
    if let Some(shared) = shared {
        let deposits: Vec<Deposit> = written
            .into_iter()
            .filter_map(|s| match s {
                Stage::Written(d) => Some(d),
                _ => None,
            })
            .collect();
        cp.commit(id, &shared, ctx.tables, &deposits)?;
    }
    // Nobody trains on until the shared state is on disk: process 0's item tables are
    // being read, and every process's changes would reach them.
    coord
        .gather(Stage::Committed, &mut idle)
        .ok_or_else(cancelled)?;
    cp.finished(id);
    Ok(())
}

/// What every worker of the cluster sends (`mine`, if any), on every worker, through a
/// dataflow of its own: built by all workers in the same order (the job fingerprints
/// before the main dataflow, the outcomes after it).
fn gather<D>(worker: &mut timely::worker::Worker, mine: Option<D>) -> Vec<D>
where
    D: timely::ExchangeData + Clone,
{
    let collected = Rc::new(RefCell::new(Vec::new()));
    let mut input = timely::dataflow::InputHandle::<u64, CapacityContainerBuilder<Vec<D>>>::new();
    let probe = worker.dataflow::<u64, _, _>(|scope| {
        let sink = Rc::clone(&collected);
        scope
            .input_from(&mut input)
            .broadcast()
            .inspect(move |d: &D| sink.borrow_mut().push(d.clone()))
            .probe()
            .0
    });
    if let Some(mine) = mine {
        input.send(mine);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(10)));
    }
    collected.take()
}

/// One worker's share of compaction cycle `ticket`, run between rounds `time - 1` and
/// `time`.
fn run_cycle(
    learner: &mut Learner,
    trace: Option<&mut PopularityTrace>,
    time: u64,
    gc: &GcController,
    ticket: CycleTicket,
) {
    let started = Instant::now();
    let mut freed: Freed = learner.compact();
    if let Some(trace) = trace {
        freed.traces += compact_trace(trace, time);
    }
    gc.report(ticket, freed, started.elapsed().as_secs_f64() * 1000.0);
}

fn assemble(
    config: &BacktestConfig,
    protocol: Protocol,
    tick_ms: i64,
    seconds: f64,
    outcomes: Vec<WorkerOutcome>,
) -> BacktestReport {
    let mut report = BacktestReport {
        processes: 1,
        popularity_window_events: None,
        config: config.clone(),
        protocol,
        tick_ms,
        events: 0,
        rows: 0,
        dead_letters: 0,
        reordered: 0,
        sampler_shortfalls: 0,
        users: 0,
        items: 0,
        users_evicted: 0,
        items_expired: 0,
        user_state_bytes: 0,
        cooccurrence_bytes: 0,
        gc: GcStats::default(),
        checkpoints: None,
        seconds,
        variants: Vec::new(),
        allocs: None,
        pool_steady: None,
    };
    let mut merged: Vec<(Quality, BTreeMap<i64, Quality>)> =
        vec![Default::default(); config.variants.len()];
    let mut mixing: Vec<crate::learner::MixingTrace> =
        vec![Default::default(); config.variants.len()];
    for outcome in outcomes {
        report.rows += outcome.ingest.rows;
        report.dead_letters += outcome.ingest.dead;
        report.reordered += outcome.ingest.reordered;
        report.sampler_shortfalls += outcome.learner.sampler_shortfalls;
        // Every worker holds the same replica of the window counts.
        let window = report.popularity_window_events.get_or_insert(0);
        *window = (*window).max(outcome.learner.window_events);
        report.users += outcome.learner.users;
        report.users_evicted += outcome.learner.users_evicted;
        report.user_state_bytes += outcome.learner.user_bytes;
        report.cooccurrence_bytes = report.cooccurrence_bytes.max(outcome.learner.knn_bytes);
        // Every worker expires the same items.
        report.items_expired = report.items_expired.max(outcome.learner.items_expired);
        // Every worker holds the full catalogue replica.
        report.items = report.items.max(outcome.learner.items);
        for (slot, trace) in mixing.iter_mut().zip(&outcome.learner.mixing) {
            crate::learner::merge_traces(slot, trace);
        }
        for (slot, (_, total, windows)) in merged.iter_mut().zip(outcome.learner.variants) {
            slot.0.merge(&total);
            for (w, q) in windows {
                slot.1.entry(w).or_default().merge(&q);
            }
        }
    }
    report.events = merged.first().map_or(0, |m| m.0.events);
    report.variants = config
        .variants
        .iter()
        .zip(merged)
        .zip(mixing)
        .map(|((v, (total, windows)), trace)| {
            let mean = |(steps, sums): &(u64, Vec<f64>)| -> Vec<f64> {
                sums.iter().map(|s| s / (*steps).max(1) as f64).collect()
            };
            VariantReport {
                name: v.name.clone(),
                model: v.model.clone(),
                total,
                windows: windows
                    .into_iter()
                    .map(|(w, quality)| WindowReport {
                        start_ms: protocol.window_start(w),
                        end_ms: protocol.window_start(w + 1),
                        quality,
                        weights: trace.get(&w).map(mean),
                    })
                    .collect(),
                item_table_norm: None,
                components: v.model.ensemble.components.clone(),
                weights: trace.values().next_back().map(mean),
            }
        })
        .collect();
    report
}
