"""The Python API against the same oracles as the CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.csv
import pytest

import tidepool
from conftest import MOVIELENS_COLUMNS

# The published most-popular reference on ml-latest-small (docs/protocol.md).
ORACLE = dict(recall=0.032724, ndcg=0.016644, scored=9076)


def assert_oracle(report):
    (v,) = report.variants
    assert v["model"] == "mostpop"
    assert v["events_scored"] == ORACLE["scored"]
    assert round(v["recall@10"], 6) == ORACLE["recall"]
    assert round(v["ndcg@10"], 6) == ORACLE["ndcg"]


def test_movielens_oracle_from_a_dataframe(movielens):
    report = tidepool.backtest(movielens, model="mostpop", progress=False, **MOVIELENS_COLUMNS)
    assert report.summary["events"] == len(movielens)
    assert_oracle(report)


def test_movielens_oracle_from_a_pyarrow_table_on_two_workers(ratings_csv):
    table = pyarrow.csv.read_csv(ratings_csv)
    order = pa.compute.sort_indices(table, sort_keys=[("timestamp", "ascending")])
    # sort_indices is stable: equal timestamps keep their file order.
    table = table.take(order)
    report = tidepool.backtest(table, model="mostpop", workers=2, progress=False, **MOVIELENS_COLUMNS)
    assert_oracle(report)


def test_a_record_batch_reader_and_paths_give_the_same_report(tmp_path, movielens):
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(movielens, preserve_index=False)
    path = tmp_path / "ratings.parquet"
    pq.write_table(table, path, row_group_size=30_000)
    from_file = tidepool.backtest(str(path), model="mostpop", progress=False, **MOVIELENS_COLUMNS)
    from_reader = tidepool.backtest(
        pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7_000)),
        model="mostpop",
        progress=False,
        **MOVIELENS_COLUMNS,
    )
    assert_oracle(from_file)
    assert from_reader.variants == from_file.variants


def test_variants_are_reported_side_by_side_with_windows():
    report = tidepool.backtest(
        None,
        events=30_000,
        variants={"pop": "uniform,model=mostpop", "mf": "uniform,model=bpr,dim=16"},
        progress=False,
    )
    names = [v["name"] for v in report.variants]
    assert names == ["pop", "mf"]
    assert report.variants[1]["model_config"]["dim"] == 16
    windows = report.windows
    assert set(windows.column("variant").to_pylist()) == {"pop", "mf"}
    assert {"window_start_ms", "window_end_ms", "recall", "ndcg", "loss"} <= set(windows.column_names)
    # The windows add up to the variant's totals.
    for v in report.variants:
        rows = windows.filter(pa.compute.equal(windows.column("variant"), v["name"]))
        assert sum(rows.column("events").to_pylist()) == v["events"]
        assert sum(rows.column("hits").to_pylist()) == v["hits"]
    variants, frame = report.to_pandas()
    assert list(variants["name"]) == ["pop", "mf"]
    assert len(frame) == windows.num_rows


def test_bad_options_raise_value_error_with_the_cli_message(tidepool_bin):
    for options, flags in [
        (dict(dim="x"), ["--dim", "x"]),
        (dict(frobnicate=1), ["--frobnicate", "1"]),
        (dict(model="nope"), ["--model", "nope"]),
    ]:
        with pytest.raises(ValueError) as raised:
            tidepool.backtest(None, progress=False, **options)
        cli = subprocess.run([tidepool_bin, "backtest", *flags], capture_output=True, text=True)
        assert cli.returncode != 0
        assert str(raised.value).strip() == cli.stderr.strip(), (str(raised.value), cli.stderr)


def test_switches_and_on_off_options_map_to_their_flags():
    flags = tidepool.options_to_flags(
        dict(pool=False, pool_poison=True, no_item_bias=False, dim=8, variants={"a": "uniform"})
    )
    assert flags == ["--pool", "off", "--pool-poison", "--dim", "8", "--variant", "a=uniform"]
    assert tidepool.options_to_flags(dict(pool=True)) == ["--pool", "on"]
    # Both spellings run: the pool off shows in the summary.
    report = tidepool.backtest(None, model="mostpop", events=5_000, pool=False, pool_poison=True, progress=False)
    assert report.summary["pool"]["enabled"] is False


def test_a_configuration_the_library_refuses_is_a_value_error():
    with pytest.raises(ValueError, match="dim"):
        tidepool.backtest(None, model="bpr", dim=0, progress=False)


def test_missing_columns_are_named(movielens):
    with pytest.raises(ValueError, match="column user_id"):
        tidepool.backtest(movielens, model="mostpop", progress=False)


def test_a_job_file_runs_and_its_errors_point_at_the_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(
            """
            [source]
            kind = "generator"
            events = 20000

            [model]
            kind = "mostpop"

            [output]
            summary_json = "summary.json"
            """
        )
    )
    report = tidepool.Job.from_toml(job).run(progress=False)
    assert report.summary["events"] == 20_000
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["variants"] == report.variants
    # Options override the file as flags do.
    smaller = tidepool.Job.from_toml(job, events=5_000).run(progress=False)
    assert smaller.summary["events"] == 5_000

    bad = tmp_path / "bad.toml"
    bad.write_text('[source]\nkind = "generator"\n\n[model]\nkind = "mostpop"\ndimension = 3\n')
    with pytest.raises(ValueError, match=r"bad\.toml:6:1"):
        tidepool.Job.from_toml(bad)


def test_a_kafka_job_runs_and_its_checkpoint_serves_recommendations(tmp_path):
    # The shipped no-setup example: an in-process cluster filled with a generated stream
    # (the Rust tests run the same retraining against a real broker).
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "kafka-embedded.toml")
    job = tmp_path / "kafka.toml"
    job.write_text(open(example).read())
    report = tidepool.Job.from_toml(job, events=20_000).run(progress=False)
    assert report.summary["events"] == 20_000
    assert report.summary["kafka"]["messages"] == 20_000
    assert report.summary["checkpoints"]["written"] >= 1
    assert not report.stopped_early
    assert [v["model"] for v in report.variants] == ["bpr"]
    assert report.windows.num_rows > 0
    written = json.loads((tmp_path / "kafka-summary.json").read_text())
    assert written["variants"] == report.variants
    items = tidepool.recommend(tmp_path / "kafka-checkpoints", user=1, k=5)
    assert len(items) == 5


def test_recommend_serves_a_saved_model(tmp_path):
    report = tidepool.backtest(None, model="bpr", events=20_000, save_model=str(tmp_path / "model"), progress=False)
    assert report.summary["events"] == 20_000
    top = tidepool.recommend(tmp_path / "model", user=5, k=7)
    assert len(top) == 7
    items = [item for item, _ in top]
    scores = [score for _, score in top]
    assert len(set(items)) == 7
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="not in checkpoint"):
        tidepool.recommend(tmp_path / "model", user=10**12, k=3)


def test_ctrl_c_stops_the_run_and_attaches_the_partial_report(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys, tidepool
        print("started", flush=True)
        try:
            tidepool.backtest(None, model="mostpop", events=200_000_000, progress=False)
        except KeyboardInterrupt as e:
            print(json.dumps({"events": e.report.summary["events"], "stopped": e.report.stopped_early}))
            sys.exit(0)
        print("finished without an interrupt")
        sys.exit(1)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    import time

    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] is True
    assert 0 < result["events"] < 200_000_000


def test_the_example_script_writes_its_chart(tmp_path):
    import matplotlib  # noqa: F401  (scripts/setup installs it; missing is a failure)

    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "backtest_variants.py")
    out = tmp_path / "recall.png"
    run = subprocess.run(
        [sys.executable, script, "--events", "30000", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "mostpop" in run.stdout and "bpr-dns" in run.stdout
    assert out.stat().st_size > 10_000
