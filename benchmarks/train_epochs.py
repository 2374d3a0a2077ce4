"""Benchmark: each epoch's training rate in a short multi-epoch `fin train`, this tree against a baseline commit.

The same `fin train` (FIN with the defaults, `--epochs` epochs of `--steps` steps, patience equal to the
epochs so that every epoch runs, no compiled package) runs from a git worktree of `--baseline` and from this
tree, in turn for `--rounds` rounds; each run's per-epoch examples/s come from its artifact's training
history. Written for commit 01fbdc2: before it, a lone worker's epoch boundary (validation scores gathered,
tables gathered, checkpoint) left an OpenMP team on gloo's thread, and every epoch after the first ran at
half speed.
Usage: python benchmarks/train_epochs.py --data FEATURES [--baseline COMMIT] [--epochs 3] [--steps 250] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import ROOT, report, run_sampled


def epoch_rates(tree: Path, data: Path, epochs: int, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(out), "--model", "fin",
           "--epochs", str(epochs), "--patience", str(epochs), "--max-steps", str(steps), "--no-compile",
           "--batch-size", "512"]  # the batch size of both trees when this was measured
    run = run_sampled(cmd, cwd=tree)  # `-m` from the tree's root: its packages, not the installed ones
    training = json.loads((out / "fin" / "1" / "artifact.json").read_text())["training"]
    rates = [round(epoch["examples_per_s"]) for epoch in training["history"]]
    return {"wall_s": run["wall_s"], "examples_per_s": rates,
            "later_over_first": round(statistics.mean(rates[1:]) / rates[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the output folder of fin features")
    parser.add_argument("--baseline", default="4ead3f9", help="commit to compare with (default: the one before the fix)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250, help="steps of 512 per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the later epochs are compared with the first")
    with tempfile.TemporaryDirectory(prefix="train-epochs-") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "this": []}
            for round_ in range(args.rounds):
                for name, tree in (("baseline", baseline), ("this", ROOT)):
                    out = Path(tmp) / f"models-{name}-{round_}"
                    runs[name].append(epoch_rates(tree, args.data.resolve(), args.epochs, args.steps, out))
                    print(name, runs[name][-1], file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    median = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
    report("train_epochs", {"data": str(args.data), "baseline": args.baseline, "this": commit.strip(),
                            "epochs": args.epochs, "steps_per_epoch": args.steps, "runs": runs,
                            "median_wall_s": median,
                            "baseline_wall_over_this": round(median["baseline"] / median["this"], 2)})


if __name__ == "__main__":
    main()
