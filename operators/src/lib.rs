//! tidepool's dataflow: timely operators and the online models they train.
//!
//! - [`run_backtest`]: replays an [`EventSource`](tidepool_pipeline::EventSource) through
//!   the prequential dataflow and reports quality and throughput.
//! - [`config`]: models, the evaluation protocol, replay settings.
//! - `ingest`: source → timely input, event-time ticks, flow control.
//! - `coord`: coordination between every worker of every process (checkpoint start,
//!   barriers with payloads, forwarded requests, aborts).
//! - `learner`: score-then-train per event, per worker.
//! - `model`: `mostpop` and `bpr` (matrix factorisation, BPR loss, SGD/Adagrad).
//! - `id_index`: raw id -> dense index, with slots that can be hinted ahead.
//! - `item_table`: item embeddings shared by a process's workers (Hogwild!), and each
//!   scoring worker's plain copy of them.
//! - `prefetch`: cache hints for the training loop (`unsafe`, like `item_table`'s row locks).
//! - `eval`: the rank of a held-out item under the protocol's tie rule.
//! - [`WindowedPopularity`]: item counts over a sliding window, in differential dataflow.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod backtest;
pub mod checkpoint;
pub mod cluster;
pub mod config;
mod coord;
mod eval;
mod history;
mod id_index;
mod ingest;
mod item_table;
mod learner;
pub mod live;
mod model;
mod popularity;
#[allow(unsafe_code)]
mod prefetch;
mod series;
pub mod serve;
mod state;

pub use backtest::{
    run_backtest, run_backtest_with, run_dataflow, BacktestReport, RunOptions, VariantReport,
    WindowReport,
};
pub use config::{
    BacktestConfig, EvalConfig, LatePolicy, ModelConfig, ModelKind, Optimizer, StateConfig,
    VariantConfig,
};
pub use ingest::{auto_tick, Clock, IngestStats};
pub use item_table::ItemTable;
pub use learner::{auto_window, Protocol};
pub use model::{
    reference_kernel, reference_kernel_parallel, reference_scoring_kernel, KernelRun, Norm,
    Objective, MAX_COMPONENTS, RANK_DEPTH, TOP_PAIRS,
};
pub use popularity::{
    compact_trace, trace_redundancy, CountChange, PopularityTrace, WindowedPopularity,
    TRACE_UPDATE_BYTES,
};
