"""Benchmark: the project's numpy AUC and polars GAUC against torchmetrics, at evaluation sizes and larger.

`fin.metrics` computes AUC from average ranks in numpy and GAUC (per-user AUC, impression-weighted) with
one polars window rank over all users. torchmetrics has a binary AUROC but no grouped AUC: its GAUC here
is one AUROC per user, as one would write it with that library. Same random labels and scores for both;
the best of `--reps` runs. Usage: python benchmarks/metrics_speed.py [--out results/metrics_speed.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from fin.metrics import auc, gauc

ROOT = Path(__file__).resolve().parents[1]


def best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * min(times), 2)


def torchmetrics_gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    total = weight = 0.0
    for rows in np.split(order, bounds):
        y = labels[rows]
        if 0 < y.sum() < y.size:
            total += rows.size * float(binary_auroc(torch.from_numpy(scores[rows]), torch.from_numpy(y)))
            weight += rows.size
    return total / weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "metrics_speed.json")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    # 40k and 230k: the demo's test impressions and logged candidates; 2,000 users as in the demo
    for n, users in ((40_000, 2_000), (230_000, 2_000), (1_000_000, 2_000)):
        labels = (rng.random(n) < 0.12).astype(np.int64)
        scores = rng.random(n).astype(np.float32)
        groups = rng.integers(0, users, n)
        ours, theirs = auc(labels, scores), float(binary_auroc(torch.from_numpy(scores), torch.from_numpy(labels)))
        row = {"examples": n, "users": users,
               "auc_ms": {"numpy": best_ms(lambda: auc(labels, scores), args.reps),
                          "torchmetrics": best_ms(lambda: binary_auroc(torch.from_numpy(scores),
                                                                       torch.from_numpy(labels)), args.reps)},
               "gauc_ms": {"polars": best_ms(lambda: gauc(labels, scores, groups), args.reps),
                           "torchmetrics_per_user": best_ms(lambda: torchmetrics_gauc(labels, scores, groups), 1)},
               "auc_difference": abs(ours - theirs),
               "gauc_difference": abs(gauc(labels, scores, groups) - torchmetrics_gauc(labels, scores, groups))}
        row["auc_torchmetrics_over_numpy"] = round(row["auc_ms"]["torchmetrics"] / row["auc_ms"]["numpy"], 2)
        row["gauc_torchmetrics_over_polars"] = round(row["gauc_ms"]["torchmetrics_per_user"]
                                                     / row["gauc_ms"]["polars"], 1)
        rows.append(row)
    doc = {"benchmark": "metrics_speed", "threads": 1, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
