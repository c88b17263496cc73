"""Backtest three variants in one pass and plot recall@10 over time.

    pip install ./python matplotlib
    python examples/backtest_variants.py [ratings.parquet ...] [--out recall.png]

Without inputs it replays the generated default stream; with MovieLens imported by
`tidepool import ../shared/data/ml-latest-small/ratings.csv -o ml.parquet --preset
movielens-csv --dedup` pass ml.parquet.
"""

import argparse

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt

import tidepool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="Parquet files (default: generated stream)")
    parser.add_argument("--events", type=int, default=200_000, help="generated events")
    parser.add_argument("--out", default="recall.png", help="the chart to write")
    args = parser.parse_args()

    report = tidepool.backtest(
        args.inputs or None,
        events=None if args.inputs else args.events,
        variants={
            "mostpop": "uniform,model=mostpop",
            "itemknn": "uniform,model=itemknn",
            "bpr-dns": "dns:32,model=bpr",
        },
    )
    for v in report.variants:
        print(f"{v['name']:>10}  recall@10 {v['recall@10']:.4f}  ndcg@10 {v['ndcg@10']:.4f}")

    _, windows = report.to_pandas()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, rows in windows.groupby("variant", sort=False):
        scored = rows[rows["scored"] > 0]
        start = scored["window_start_ms"].astype("datetime64[ms]")
        ax.plot(start, scored["recall"], marker=".", label=name)
    ax.set_xlabel("window start (event time)")
    ax.set_ylabel("recall@10")
    ax.set_title("Prequential recall@10 per window")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
