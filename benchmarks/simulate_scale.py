"""Benchmark: `fin simulate` wall time, events/s and peak RSS at ~1M and ~20M behaviour events.

Each size runs as its own `fin simulate` process; peak RSS is the largest sum of resident memory over
that process and its workers. Prints one JSON document and writes it under results/.
Usage: python benchmarks/simulate_scale.py [--sizes 1m 20m] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _measure import ROOT, report, run_sampled

# users x 365 days of configs/large.yaml; the default activity gives ~1,180 behaviours per user-year
SIZES = {"1m": 900, "20m": 17_000}


def simulate(users: int, workers: int, out: Path) -> dict:
    m = run_sampled([sys.executable, "-m", "jobs.cli", "simulate", "--config", str(ROOT / "configs" / "large.yaml"),
                     "--users", str(users), "--workers", str(workers), "--out", str(out), "--overwrite"])
    manifest = json.loads((out / "manifest.json").read_text())
    events = manifest["rows"]["behaviours"]
    return {"users": users, "days": manifest["config"]["days"], "workers": workers, "behaviours": events,
            "impressions": manifest["rows"]["impressions"], "wall_s": m["wall_s"],
            "events_per_s": round(events / m["wall_s"]), "peak_rss_mb": m["peak_rss_mb"],
            "output_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the generated log folders under this folder")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="fin-sim-bench-"))
    try:
        results = {size: simulate(SIZES[size], args.workers, scratch / size) for size in args.sizes}
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report("simulate_scale", {"results": results})


if __name__ == "__main__":
    main()
