"""Floor: what reading the behaviour and impression logs once and writing them once costs on this machine.

`fin features` must at least read both logs and write their rows back (timelines, examples), with the
job's own codec. This times exactly that in one polars process using every core, with no validation,
sorting, joins, Ray or Feast, so no implementation of the job on this machine can be faster. Prints JSON.
Usage: python benchmarks/io_floor.py LOGS SCRATCH_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

TABLES = ("behaviours", "impressions")


def main(logs: str, scratch: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.features_job import _OUTPUT_PARQUET

    out, seconds, rows = Path(scratch), {}, {}
    out.mkdir(parents=True, exist_ok=True)
    frames = {}
    for table in TABLES:
        started = time.perf_counter()
        frames[table] = pl.read_parquet(f"{logs}/{table}/**/*.parquet", hive_partitioning=False)
        seconds[f"read_{table}_s"], rows[table] = time.perf_counter() - started, frames[table].height
    for table in TABLES:
        started = time.perf_counter()
        frames[table].write_parquet(out / f"{table}.parquet", **_OUTPUT_PARQUET)
        seconds[f"write_{table}_s"] = time.perf_counter() - started
        (out / f"{table}.parquet").unlink()
    print(json.dumps({"rows": rows, "seconds": {k: round(v, 2) for k, v in seconds.items()},
                      "total_s": round(sum(seconds.values()), 2)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", help="a log folder (fin simulate's output)")
    parser.add_argument("scratch", help="a folder to write the rows to")
    args = parser.parse_args()
    main(args.logs, args.scratch)
