"""Shared fixtures: the data directory, the tidepool binary, a sorted MovieLens frame."""

import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TIDEPOOL_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ratings_csv() -> pathlib.Path:
    path = data_dir() / "ml-latest-small" / "ratings.csv"
    if not path.exists():
        message = f"MovieLens not found at {path} (set TIDEPOOL_DATA_DIR)"
        if os.environ.get("TIDEPOOL_REQUIRE_DATA") == "1":
            pytest.fail(message)
        print(f"\nWARNING: {message}; skipping")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def movielens(ratings_csv):
    """ml-latest-small in event-time order (a stable sort, as `tidepool import` does)."""
    import pandas as pd

    return pd.read_csv(ratings_csv).sort_values("timestamp", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="session")
def tidepool_bin() -> str:
    """The CLI, to compare messages with: TIDEPOOL_BIN, or the build in the target dir."""
    candidates = [os.environ.get("TIDEPOOL_BIN")]
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    candidates += [os.path.join(target, p, "tidepool") for p in ("debug", "release")]
    candidates.append(shutil.which("tidepool"))
    for c in candidates:
        if c and os.path.exists(c):
            return c
    pytest.fail("no tidepool binary: build it (cargo build -p tidepool-jobs) or set TIDEPOOL_BIN")


MOVIELENS_COLUMNS = dict(user_col="userId", item_col="movieId", time_col="timestamp", time_unit="s")
