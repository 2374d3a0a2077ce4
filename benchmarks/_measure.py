"""Shared helpers of the benchmark scripts: run a command, sample its process tree's memory, describe the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_sampled(cmd: list[str], cwd: Path = ROOT, env: dict | None = None) -> dict:
    """Run `cmd` (with environment `env`, default this one's); wall seconds and the peak of the summed RSS of
    it and all its descendants (100 ms samples)."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {stderr.strip()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "stdout": stdout, "stderr": stderr}


def speed_reference() -> float:
    """Milliseconds (best of 5) of a fixed single-threaded workload: an interpreter loop and numpy
    exponentials. The machine's speed moves by tens of percent from one run to the next; this figure
    moves with it, so runs of a benchmark can be compared."""
    import numpy as np

    values = np.random.default_rng(0).random(1_000_000)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i
        np.exp(values)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def report(name: str, doc: dict) -> None:
    """Print the JSON document and write it to results/<name>.json."""
    text = json.dumps({"benchmark": name, "machine": machine(), **doc}, indent=2)
    print(text)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / f"{name}.json").write_text(text)
