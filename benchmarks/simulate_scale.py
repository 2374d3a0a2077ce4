"""Benchmark: `fin simulate` wall time, events/s and peak RSS at ~1M and ~20M behaviour events.

Each size runs as its own `fin simulate` process; peak RSS is the largest sum of resident memory over
that process and its workers, sampled every 100 ms. Prints one JSON document and writes it under
results/. Usage: python benchmarks/simulate_scale.py [--sizes 1m 20m] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
# users x 365 days; the default activity gives ~1,200 behaviours per user-year
SIZES = {"1m": 900, "20m": 17_000}


def run(users: int, workers: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "simulate", "--config", str(ROOT / "configs" / "large.yaml"),
           "--users", str(users), "--workers", str(workers), "--out", str(out), "--overwrite"]
    started = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - started
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed: {stderr.strip()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    events = manifest["rows"]["behaviours"]
    return {"users": users, "days": manifest["config"]["days"], "workers": workers, "behaviours": events,
            "impressions": manifest["rows"]["impressions"], "wall_s": round(wall, 2),
            "events_per_s": round(events / wall), "peak_rss_mb": round(peak / 2**20, 1),
            "output_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fin-sim-bench-"))
    results = {}
    try:
        for size in args.sizes:
            results[size] = run(SIZES[size], args.workers, scratch / size)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    doc = {"benchmark": "simulate_scale", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
           "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}, "results": results}
    text = json.dumps(doc, indent=2)
    print(text)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "simulate_scale.json").write_text(text)


if __name__ == "__main__":
    main()
