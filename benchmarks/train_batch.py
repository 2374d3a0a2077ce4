"""Benchmark: FIN's training step at several batch sizes, in one process: what a step costs whatever its size.

Each batch size's first training batches (FIN's defaults otherwise: user chunks of 2, 1,000 events, the
creatives when the data has them) are loaded and cut once; then the sizes take turns, `--steps` timed steps
each per round (after 2 of warm-up), on one sharded FIN (TorchRec, gloo, one process, one intra-op thread as
`make demo` trains), so that the machine's drift falls on all alike. The figure is the median round; the
fixed cost is the intercept of a least-squares line of step time against examples per step.
Usage: python benchmarks/train_batch.py --data FEATURES_DATA [--sizes 512 1024 2048 4096] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _measure import report
from train_step import lone_process_group, sharded_fin


def measure(data: Path, sizes: list[int], steps: int, rounds: int) -> dict:
    _, step, load = sharded_fin(data)
    batches = {size: load(size, steps + 2) for size in sizes}
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            for batch in batches[size][:2]:
                step(batch)
            started = time.perf_counter()
            for batch in batches[size][2:]:
                step(batch)
            seconds[size].append((time.perf_counter() - started) / steps)
    examples = {size: statistics.mean(len(b) for b in batches[size][2:]) for size in sizes}
    step_ms = {size: statistics.median(s) * 1000 for size, s in seconds.items()}
    slope, fixed = np.polyfit([examples[s] for s in sizes], [step_ms[s] for s in sizes], 1)
    first = sizes[0]
    return {"data": str(data),
            "runs": [{"batch_size": size, "step_ms": round(step_ms[size], 1),
                      "examples_per_s": round(examples[size] / step_ms[size] * 1000),
                      f"examples_per_s_over_{first}": round(examples[size] / step_ms[size]
                                                            / (examples[first] / step_ms[first]), 2)}
                     for size in sizes],
            "fixed_ms_per_step": round(float(fixed), 1), "ms_per_512_examples": round(float(slope) * 512, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a features data folder (fin features --out DIR: DIR/data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with lone_process_group():
        result = measure(args.data, args.sizes, args.steps, args.rounds)
    report("train_batch", {"steps": args.steps, "rounds": args.rounds, **result,
                           "note": "batches pre-loaded and cut: the step alone, without the loader"})


if __name__ == "__main__":
    main()
