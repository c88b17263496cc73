"""tidepool from Python: prequential backtests of streaming recommenders.

    >>> import tidepool
    >>> report = tidepool.backtest("ratings.parquet", model="mostpop")
    >>> report.summary["variants"][0]["recall@10"]
    >>> report.windows            # pyarrow.Table of the per-window metrics

Options are the command line's (``tidepool backtest --help``) with underscores:
``dim=32`` is ``--dim 32``, ``no_item_bias=True`` is ``--no-item-bias``, a list repeats
the flag, and ``variants={"name": "spec"}`` is ``--variant name=spec`` per entry. Bad
options raise ``ValueError`` with the message the CLI gives.

Runs release the GIL, show a tqdm bar when tqdm is installed (``progress=False`` turns
it off), and stop on Ctrl-C after draining what was read: ``KeyboardInterrupt`` is then
raised with the partial report as its ``report`` attribute.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import pyarrow as pa

from . import _tidepool

__all__ = ["Report", "Job", "backtest", "recommend", "options_to_flags"]

Frames = namedtuple("Frames", ["variants", "windows"])


class Report:
    """What a backtest produced.

    ``summary``: a dict with the keys of ``--summary-json``; ``windows``: a
    ``pyarrow.Table`` of per-window metrics (variant, window_start_ms, window_end_ms,
    events, scored, hits, recall, ndcg, mrr, train_pairs, loss, weights);
    ``stopped_early``: whether the run ended before its input did.
    """

    def __init__(self, summary: Dict[str, Any], windows: pa.Table, stopped_early: bool):
        self.summary = summary
        self.windows = windows
        self.stopped_early = stopped_early

    @property
    def variants(self) -> List[Dict[str, Any]]:
        """One dict per variant: name, model, recall@K, ndcg@K, mrr, loss, ..."""
        return self.summary.get("variants", [])

    def to_pandas(self) -> Frames:
        """``(variants, windows)`` as pandas DataFrames."""
        import pandas as pd

        variants = pd.DataFrame(
            [{k: v for k, v in row.items() if not isinstance(v, (dict, list))} for row in self.variants]
        )
        return Frames(variants, self.windows.to_pandas())

    def __repr__(self) -> str:
        parts = ", ".join(
            "{}: recall {:.4f}".format(v.get("name"), _recall(v)) for v in self.variants
        )
        return "Report({} events; {})".format(self.summary.get("events"), parts)


def _recall(variant: Dict[str, Any]) -> float:
    for key, value in variant.items():
        if key.startswith("recall@"):
            return float(value)
    return float("nan")


Source = Union[str, "os.PathLike[str]", Iterable[Union[str, "os.PathLike[str]"]], pa.Table, pa.RecordBatchReader, Any]


def options_to_flags(options: Dict[str, Any]) -> List[str]:
    """The command-line flags for keyword options (see the module docs)."""
    flags: List[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if name == "variants":
            if not isinstance(value, dict):
                raise ValueError("variants: expected a dict of name -> spec")
            for variant, spec in value.items():
                flags += ["--variant", "{}={}".format(variant, spec)]
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) and name in _ON_OFF:
            # An option whose value is a word: --pool on|off.
            flags += [flag, "on" if value else "off"]
        elif value is True:
            flags.append(flag)
        elif value is False:
            pass  # a switch left off
        elif isinstance(value, (list, tuple)):
            for v in value:
                flags += [flag, str(v)]
        else:
            flags += [flag, str(value)]
    return flags


# Options that take on/off as their value rather than being switches.
_ON_OFF = {"pool"}


class _Progress:
    """A tqdm bar made on the first report of progress (none when tqdm is missing or
    progress is off), so a run refused before it starts draws nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:
                pass

    def update(self, done: int, total: Optional[int]) -> None:
        if self.tqdm is None:
            return
        if self.bar is None:
            self.bar = self.tqdm(total=total, unit=" events", unit_scale=True, dynamic_ncols=True)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(call, progress: bool) -> Report:
    bar = _Progress(progress)
    try:
        summary, windows, stopped, interrupted = call(bar.update if bar.tqdm else None)
    finally:
        bar.close()
    table = pa.Table.from_batches([windows])
    report = Report(json.loads(summary), table, stopped)
    if interrupted:
        error = KeyboardInterrupt("stopped by Ctrl-C; the partial report is attached as .report")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _as_arrow(source: Any) -> Optional[Tuple[Any, str]]:
    """A RecordBatchReader for in-memory sources, or None for paths."""
    if isinstance(source, pa.RecordBatchReader):
        return source, "record batch reader"
    if isinstance(source, pa.Table):
        return source.to_reader(), "pyarrow table ({} rows)".format(source.num_rows)
    if isinstance(source, pa.RecordBatch):
        return pa.Table.from_batches([source]).to_reader(), "record batch ({} rows)".format(source.num_rows)
    module = type(source).__module__ or ""
    if module.startswith("pandas") and type(source).__name__ == "DataFrame":
        table = pa.Table.from_pandas(source, preserve_index=False)
        return table.to_reader(), "DataFrame ({} rows)".format(table.num_rows)
    return None


def backtest(source: Source = None, progress: bool = True, **options: Any) -> Report:
    """Replays ``source`` prequentially (rank each event, then train on it) and reports.

    ``source``: a Parquet path, directory or glob, or a list of them; a ``pyarrow.Table``,
    ``RecordBatchReader`` or pandas ``DataFrame`` (in event-time order, columns named by
    ``user_col``, ``item_col``, ``time_col``; integer times in ``time_unit``); or None for
    the generated default stream.
    """
    flags = options_to_flags(options)
    arrow = None if source is None else _as_arrow(source)
    if source is not None and arrow is None:
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        flags += [os.fspath(p) for p in paths]
    if arrow is None:
        return _run(lambda update: _tidepool.backtest(flags, None, None, update), progress)
    reader, description = arrow
    return _run(lambda update: _tidepool.backtest(flags, reader, description, update), progress)


class Job:
    """A job file (``tidepool run``'s TOML), run from Python."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], overrides: Optional[List[str]] = None):
        self.path = os.fspath(path)
        self.overrides = list(overrides or [])
        _tidepool.validate_job(self.path, self.overrides)

    @classmethod
    def from_toml(cls, path: Union[str, "os.PathLike[str]"], **options: Any) -> "Job":
        """Loads and validates a job file; ``options`` override its keys as flags do."""
        return cls(path, options_to_flags(options))

    def run(self, progress: bool = True) -> Report:
        """Runs the job (a backtest, or Kafka retraining until its ``stop_at``) and
        returns its report."""
        return _run(lambda update: _tidepool.run_job(self.path, self.overrides, update), progress)


def recommend(checkpoint_dir: Union[str, "os.PathLike[str]"], user: int, k: int = 10, variant: Optional[str] = None) -> List[Tuple[int, float]]:
    """A user's top ``k`` items from a checkpoint: ``[(item, score), ...]``, best first."""
    return _tidepool.recommend(os.fspath(checkpoint_dir), user, k, variant)
