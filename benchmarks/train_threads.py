"""Benchmark: `fin train` with all the CPUs as intra-op threads, with one thread, and two one-thread runs at once.

Each run is FIN with the defaults for `--steps` steps of 512 (the default batch size then; one epoch, no
compiled package) on the given features; the figure is the training rate its artifact records. The
side-by-side pair is what `make demo` does with its trainings: the question is whether two trainings with
one thread each do more work than one with all of them.
Usage: python benchmarks/train_threads.py --data FEATURES [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import ROOT, report


def _command(data: Path, out: Path, steps: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(out), "--model", "fin",
            "--epochs", "1", "--max-steps", str(steps), "--no-compile", "--threads", str(threads),
            "--batch-size", "512"]  # the default batch size when this was measured


def _rate(out: Path) -> int:
    return round(json.loads((out / "fin" / "1" / "artifact.json").read_text())["training"]["examples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the output folder of fin features")
    parser.add_argument("--steps", type=int, default=200, help="steps of 512 per run")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="train-threads-") as tmp:
        def alone(name: str, threads: int) -> int:
            subprocess.run(_command(args.data, Path(tmp) / name, args.steps, threads), cwd=ROOT, check=True,
                           capture_output=True)
            return _rate(Path(tmp) / name)

        all_cpus, one = alone("all", cpus), alone("one", 1)
        pair = [subprocess.Popen(_command(args.data, Path(tmp) / f"pair{i}", args.steps, 1), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        if any(p.wait() != 0 for p in pair):
            raise RuntimeError("a side-by-side run failed")
        side_by_side = [_rate(Path(tmp) / f"pair{i}") for i in range(2)]
    report("train_threads", {"data": str(args.data), "steps": args.steps,
                             "examples_per_s": {f"{cpus}_threads": all_cpus, "1_thread": one,
                                                "side_by_side_1_thread_each": side_by_side},
                             "one_over_all": round(one / all_cpus, 2),
                             "pair_total_over_all": round(sum(side_by_side) / all_cpus, 2)})


if __name__ == "__main__":
    main()
