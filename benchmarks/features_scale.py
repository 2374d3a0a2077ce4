"""Benchmark: `fin features` end to end at ~1M and ~20M behaviour events, against a pandas baseline.

For each size: the job's wall time as a user sees it (process start to exit: Ray start, sharding,
building, statistics, Feast apply and materialisation) and with Ray's start excluded, events per
second, the peak RSS summed over the job and its Ray workers; in the same run, a single-process pandas
implementation of the same timelines (benchmarks/pandas_timelines.py) and the floor of reading the
behaviour and impression logs once and writing them once (benchmarks/io_floor.py); and the latency of one
user's timeline read from the sqlite online store (p50/p99 over 1,000 reads of random users).
Usage: python benchmarks/features_scale.py [--sizes 1m 20m] [--logs 1m=DIR 20m=DIR] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import ROOT, report, run_sampled
from simulate_scale import SIZES

sys.path.insert(0, str(ROOT))


def online_latency(repo: Path, users: int, reads: int = 1000) -> dict:
    from feast import FeatureStore

    from features.online import read_timelines

    store = FeatureStore(repo_path=str(repo))
    rng = np.random.default_rng(0)
    read_timelines(store, [1])  # warm the connection
    times = []
    for user in rng.integers(1, users + 1, reads):
        t = time.perf_counter()
        read_timelines(store, [int(user)])
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return {"reads": reads, "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def measure(logs: Path, scratch: Path, baseline: bool) -> dict:
    out = scratch / "features"
    shutil.rmtree(out, ignore_errors=True)
    job = run_sampled([sys.executable, "-m", "jobs.cli", "features", "--logs", str(logs), "--out", str(out)])
    stats = json.loads((out / "data" / "stats.json").read_text())
    timings = json.loads((out / "data" / "run.json").read_text())["timings_s"]
    events = stats["validation"]["behaviours"]["rows"]
    wall = job["wall_s"]
    result = {
        "behaviours": events, "impressions": stats["validation"]["impressions"]["rows"], "users": stats["users"],
        "end_to_end_s": wall, "events_per_s_end_to_end": round(events / wall),
        "events_per_s_excluding_ray_start": round(events / (wall - timings["ray_start_s"])),
        "events_per_s_excluding_ray_start_and_feast": round(
            events / (wall - timings["ray_start_s"] - timings["feast_apply_s"] - timings["feast_materialize_s"])),
        "peak_rss_mb": job["peak_rss_mb"], "job_timings_s": timings,
        "online_read_one_user": online_latency(out / "feast", stats["users"]),
    }
    floor = run_sampled([sys.executable, str(ROOT / "benchmarks" / "io_floor.py"), str(logs), str(scratch / "floor")])
    floor = json.loads(floor["stdout"])
    result["io_floor"] = {**floor, "events_per_s": round(events / floor["total_s"]),
                          "job_over_floor": round(wall / floor["total_s"], 2)}
    if baseline:
        pandas = run_sampled([sys.executable, str(ROOT / "benchmarks" / "pandas_timelines.py"), str(logs),
                              str(scratch / "pandas_timelines.parquet")])
        result["pandas_baseline"] = {"wall_s": pandas["wall_s"], "peak_rss_mb": pandas["peak_rss_mb"],
                                     "events_per_s": round(events / pandas["wall_s"])}
        result["speedup_vs_pandas_end_to_end"] = round(pandas["wall_s"] / wall, 2)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--logs", nargs="*", default=[], help="reuse simulated logs: SIZE=DIR")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.logs)
    scratch = Path(tempfile.mkdtemp(prefix="fin-features-bench-"))
    results = {}
    try:
        for size in args.sizes:
            logs = Path(given[size]) if size in given else scratch / f"logs-{size}"
            if size not in given:
                run_sampled([sys.executable, "-m", "jobs.cli", "simulate", "--config", str(ROOT / "configs" / "large.yaml"),
                             "--users", str(SIZES[size]), "--out", str(logs)])
            results[size] = measure(logs, scratch, not args.no_baseline)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report("features_scale", {"results": results})


if __name__ == "__main__":
    main()
