//! The native half of the `tidepool` Python package (`tidepool._tidepool`): backtests,
//! job files and recommendations, over the Rust library API ([`tidepool_jobs::api`]).
//!
//! Runs release the GIL: the run goes on a thread of its own while the calling thread
//! waits in slices of 100 ms without the GIL, checking for signals (Ctrl-C sets the run's
//! stop flag; the run drains and reports what it read) and calling the progress callback.
//! The Python half (`python/tidepool/__init__.py`) turns options into flags, sources into
//! Arrow, and results into a `Report`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use arrow::ffi_stream::RecordBatchStreamReader;
use arrow::pyarrow::{FromPyArrow, ToPyArrow};
use arrow::record_batch::RecordBatch;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tidepool_jobs::api::{self, Control, Input, Outcome};
use tidepool_jobs::cli::{Command, RecommendArgs};

/// What a finished run hands to Python: the summary as JSON, the per-window metrics,
/// whether it stopped early, and whether Ctrl-C stopped it.
type Finished<'py> = (String, Bound<'py, PyAny>, bool, bool);

/// Errors of the options (a flag clap refuses, a configuration the library refuses)
/// are `ValueError`s with the CLI's message; anything else is a `RuntimeError`.
fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string().trim().to_string())
}

fn runtime_error(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// Runs `work` on its own thread; meanwhile waits without the GIL, forwards Ctrl-C to
/// `stop` and reports progress. Returns the result and whether Ctrl-C was seen.
fn drive<T: Send + 'static>(
    py: Python<'_>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> PyResult<(anyhow::Result<T>, bool)> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("tidepool-run".into())
        .spawn(move || {
            // The receiver outlives the run unless the caller died; nothing to tell then.
            let _ = tx.send(work());
        })
        .map_err(|e| PyRuntimeError::new_err(format!("starting the run thread: {e}")))?;
    let mut interrupted = false;
    let mut rx = Some(rx);
    let outcome = loop {
        // The receiver goes into the GIL-free closure and back (it is Send, not Sync).
        let Some(waiting) = rx.take() else {
            return Err(PyRuntimeError::new_err("the run's channel was lost"));
        };
        let (got, back) = py.detach(move || {
            let got = waiting.recv_timeout(Duration::from_millis(100));
            (got, waiting)
        });
        rx = Some(back);
        match got {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                return Err(PyRuntimeError::new_err(
                    "the run thread ended without a result",
                ));
            }
        }
        if py.check_signals().is_err() && !interrupted {
            // The run stops reading, drains and reports; KeyboardInterrupt follows.
            interrupted = true;
            stop.store(true, Ordering::Relaxed);
        }
        if let Some(cb) = &progress {
            let total = match total.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            };
            cb.call1(py, (done.load(Ordering::Relaxed), total))?;
        }
    };
    let _ = handle.join();
    if let Some(cb) = &progress {
        cb.call1(py, (done.load(Ordering::Relaxed), None::<u64>))?;
    }
    Ok((outcome, interrupted))
}

fn finish<'py>(py: Python<'py>, outcome: Outcome, interrupted: bool) -> PyResult<Finished<'py>> {
    let summary = serde_json::to_string(&outcome.summary)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let windows = outcome.windows.to_pyarrow(py)?;
    Ok((summary, windows, outcome.stopped, interrupted))
}

/// Runs a backtest. `flags`: the CLI's options (`--dim 32`, input paths, ...); `data`:
/// a `pyarrow.Table` or `RecordBatchReader` to replay instead of files (no copy, through
/// the Arrow C stream interface); `progress(done, total)` is called about ten times a
/// second.
#[pyfunction]
#[pyo3(signature = (flags, data=None, description=None, progress=None))]
fn backtest<'py>(
    py: Python<'py>,
    flags: Vec<String>,
    data: Option<Bound<'py, PyAny>>,
    description: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Finished<'py>> {
    let args = api::options(&flags).map_err(|e| value_error(e.render()))?;
    let config = args.config().map_err(value_error)?;
    config.validate().map_err(value_error)?;
    let input = match data {
        None => Input::FromArgs,
        Some(data) => {
            let reader = RecordBatchStreamReader::from_pyarrow_bound(&data)?;
            let batches = reader
                .collect::<Result<Vec<RecordBatch>, _>>()
                .map_err(value_error)?;
            Input::Batches {
                batches,
                description: description.unwrap_or_else(|| "in-memory table".into()),
            }
        }
    };
    run(py, args, input, progress)
}

/// A library `Control` whose progress lands in `done` and `total`, which [`drive`]
/// reports to Python, and whose stop flag [`drive`] sets on Ctrl-C.
fn control() -> (Control, Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let control = Control {
        stop: Arc::clone(&stop),
        progress: Some({
            let (done, total) = (Arc::clone(&done), Arc::clone(&total));
            Box::new(move |d, t| {
                done.store(d, Ordering::Relaxed);
                total.store(t.unwrap_or(0), Ordering::Relaxed);
            })
        }),
        ..Control::library()
    };
    (control, stop, done, total)
}

/// Runs a Kafka retraining job (a job file with `kind = "kafka"`) until its `stop_at`
/// or Ctrl-C, which ends the readers; the run drains and writes its final checkpoint.
fn train<'py>(
    py: Python<'py>,
    args: tidepool_jobs::cli::TrainArgs,
    progress: Option<Py<PyAny>>,
) -> PyResult<Finished<'py>> {
    let (control, stop, done, total) = control();
    let (outcome, interrupted) = drive(py, stop, done, total, progress, move || {
        tidepool_jobs::stream::train_with(&args, control)
    })?;
    finish(py, outcome.map_err(runtime_error)?, interrupted)
}

fn run<'py>(
    py: Python<'py>,
    args: tidepool_jobs::cli::BacktestArgs,
    input: Input,
    progress: Option<Py<PyAny>>,
) -> PyResult<Finished<'py>> {
    let (control, stop, done, total) = control();
    let (outcome, interrupted) = drive(py, stop, done, total, progress, move || {
        api::backtest(&args, input, control)
    })?;
    let outcome = outcome.map_err(|e| {
        // Input the library refuses before reading (columns, files) is the caller's.
        if e.downcast_ref::<tidepool_pipeline::Error>()
            .is_some_and(|p| matches!(p, tidepool_pipeline::Error::Config(_)))
        {
            value_error(format!("{e:#}"))
        } else {
            runtime_error(e)
        }
    })?;
    finish(py, outcome, interrupted)
}

/// Runs a job file (a backtest, or Kafka retraining), with flag overrides as `tidepool
/// run` takes them.
#[pyfunction]
#[pyo3(signature = (path, overrides=Vec::new(), progress=None))]
fn run_job<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
    overrides: Vec<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Finished<'py>> {
    match tidepool_jobs::job::load(&path, &overrides).map_err(|e| value_error(format!("{e:#}")))? {
        Command::Backtest(args) => run(py, *args, Input::FromArgs, progress),
        Command::Train(args) => train(py, *args, progress),
        _ => Err(PyValueError::new_err(format!(
            "{}: not a runnable job",
            path.display()
        ))),
    }
}

/// Checks a job file as `tidepool validate` does; raises `ValueError` with its message.
#[pyfunction]
#[pyo3(signature = (path, overrides=Vec::new()))]
fn validate_job(path: std::path::PathBuf, overrides: Vec<String>) -> PyResult<()> {
    tidepool_jobs::job::load(&path, &overrides)
        .map(drop)
        .map_err(|e| value_error(format!("{e:#}")))
}

/// A user's top `k` items from a checkpoint: `[(item, score), ...]`, best first.
#[pyfunction]
#[pyo3(signature = (checkpoint_dir, user, k=10, variant=None))]
fn recommend(
    checkpoint_dir: std::path::PathBuf,
    user: u64,
    k: usize,
    variant: Option<String>,
) -> PyResult<Vec<(u64, f32)>> {
    let args = RecommendArgs {
        checkpoint: checkpoint_dir,
        user,
        k,
        variant,
        json: false,
    };
    tidepool_jobs::stream::recommend_items(&args)
        .map(|items| items.into_iter().map(|r| (r.item, r.score)).collect())
        .map_err(|e| value_error(format!("{e:#}")))
}

#[pymodule]
fn _tidepool(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backtest, m)?)?;
    m.add_function(wrap_pyfunction!(run_job, m)?)?;
    m.add_function(wrap_pyfunction!(validate_job, m)?)?;
    m.add_function(wrap_pyfunction!(recommend, m)?)?;
    Ok(())
}
