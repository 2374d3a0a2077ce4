"""Benchmark: training throughput of FIN over 1,000-event histories with shared-timeline batches, against the
per-example path it replaces and against DIN over 50 events as it trained before; the loader alone; inference
for one user x 200 candidates (the server's case) against per-example history copies and a per-candidate loop.

Data: a simulated city over a long period (configs/large.yaml with fewer users) so that most impressions
have 1,000 events of history. Training: each run is its own `fin train` process over the same number of
examples (`--examples`, in whole steps of the run's batch size), one worker unless said; examples/s is the
training loop's own figure (loading, fragments and the sharded update; validation excluded), peak RSS the
largest sum over the process and its workers. Runs:
  fin_shared           FIN, the defaults: the last 1,000 events, batches of 512 in user chunks sharing timelines
  fin_shared_2048      FIN, the same in batches of 2,048 (configs/batch2048.yaml, as `make demo` trains)
  fin_shared_chunks_4  FIN, the same with user chunks of 4 (the default before chunks of 2)
  fin_per_example      FIN, the last 1,000 events, each example with its own history copy (the previous path)
  din_50_per_example   DIN over the last 50 events, per example (how DIN trained before)
  din_shared           DIN, the defaults (shared timelines; the loader ships the 50 events DIN reads)
  fin_shared_2         FIN, the defaults, 2 workers (gloo) training one model sharded over them
  fin_replicas_2       FIN, 2 workers each training a whole replica on batches of 512 (global 1,024), merged
                       every AVERAGE_EVERY steps (local SGD, `fin.local_sgd`)
  fin_replicas_2_2048  the same on batches of 2,048 each (configs/batch2048.yaml, global 4,096)
and, from a git worktree of the commit the training goals were set against (`--baseline-commit`, the last
one before shared-timeline batches), on the same data in the same run:
  fin_per_example_before   that commit's FIN over 1,000 events (configs/lifelong.yaml there), per example
  din_50_before            that commit's DIN over the last 50 events
The loader alone iterates the same batches as fin_shared without a model, in the training process and with
one reader process. Inference: the 1-worker FIN and DIN artifacts score 200 candidates of one request of the
user with the longest history: (a) one request batch, (b) one batch of 200 examples each with its own copy
of the history, (c) the model run once per candidate.
Usage: python benchmarks/train_scale.py [--data DIR] [--examples 76800] [--reps 100]
       [--baseline-commit REV | --no-baseline]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import ROOT, report, run_sampled

sys.path.insert(0, str(ROOT))

LIFELONG = ROOT / "configs" / "lifelong.yaml"
PER_EXAMPLE = ["--config", str(ROOT / "benchmarks" / "per_example.yaml")]
BASELINE_COMMIT = "9647a4a"  # the goals' "today": training before shared-timeline batches
BASELINE_BATCH = 512  # that commit's default batch size
BASELINE_RUNS = {  # name: (model, options of that commit's fin train)
    "fin_per_example_before": ("fin", ["--config", "configs/lifelong.yaml"]),
    "din_50_before": ("din", ["--max-seq-len", "50"]),
}
AVERAGE_EVERY = 8  # steps between the replicas' merges (benchmarks/README.md, "Local SGD")
RUNS = {  # name: (model, workers, extra options)
    "fin_shared": ("fin", 1, []),
    "fin_shared_2048": ("fin", 1, ["--config", str(ROOT / "configs" / "batch2048.yaml")]),
    "fin_shared_chunks_4": ("fin", 1, ["--config", str(ROOT / "benchmarks" / "user_chunks_4.yaml")]),
    "fin_per_example": ("fin", 1, PER_EXAMPLE),
    "din_50_per_example": ("din", 1, [*PER_EXAMPLE, "--max-seq-len", "50"]),
    "din_shared": ("din", 1, []),
    "fin_shared_2": ("fin", 2, []),
    "fin_replicas_2": ("fin", 2, ["--average-every", str(AVERAGE_EVERY), "--batch-size", "1024"]),
    "fin_replicas_2_2048": ("fin", 2, ["--config", str(ROOT / "configs" / "batch2048.yaml"),
                                       "--average-every", str(AVERAGE_EVERY), "--batch-size", "4096"]),
}


def build_data(folder: Path, users: int, days: int) -> Path:
    if not (folder / "features" / "data" / "stats.json").exists():
        fin = [sys.executable, "-m", "jobs.cli"]
        run_sampled([*fin, "simulate", "--config", str(ROOT / "configs" / "large.yaml"), "--users", str(users),
                     "--days", str(days), "--out", str(folder / "logs"), "--overwrite"])
        run_sampled([*fin, "features", "--logs", str(folder / "logs"), "--out", str(folder / "features"),
                     "--validation-days", "2", "--test-days", "2", "--no-materialize"])
    return folder / "features" / "data"


def history_lengths(data: Path) -> dict:
    """Per training example of the first 20 batches of FIN's defaults: the history events it reads, and the
    events a batch embeds per example (its timeline slices, shared by the examples of a user chunk)."""
    from fin.loader import ExampleStream
    from fin.train import TrainConfig

    reads, embedded, examples = [], 0, 0
    for _, batch in zip(range(20), ExampleStream(data, "train", TrainConfig().loader, cut=False)):
        h = batch.histories
        reads.append((h.end - h.start)[batch.candidate_requests()].numpy())
        embedded, examples = embedded + int(h.offsets[-1]), examples + len(batch)
    reads = np.concatenate(reads)
    return {"mean": round(float(reads.mean()), 1), "p50": float(np.median(reads)),
            "share_at_1000": round(float((reads >= 1000).mean()), 3),
            "embedded_per_example": round(embedded / examples, 1)}


def loader_alone(data: Path, batches: int) -> dict:
    """Examples/s of the loader alone (FIN's default batches, fragments cut), in this process and with one
    reader process (its start included)."""
    import dataclasses

    from fin.loader import ExampleStream
    from fin.train import TrainConfig

    out = {}
    for readers in (0, 1):
        stream = ExampleStream(data, "train", dataclasses.replace(TrainConfig().loader, workers=readers))
        started, examples = time.perf_counter(), 0
        for _, batch in zip(range(batches), stream):
            examples += len(batch)
        out[f"readers_{readers}"] = {"batches": batches, "examples_per_s": round(examples / (time.perf_counter()
                                                                                             - started), 1)}
    return out


def train_run(data: Path, models: Path, name: str, examples: int, tree: Path = ROOT) -> dict:
    """One `fin train` run of `RUNS` (of `BASELINE_RUNS` from the worktree `tree`) over about `examples`
    examples, and its figures."""
    from fin.train import load_train_config

    if tree == ROOT:
        model, workers, options = RUNS[name]
        batch = (int(options[options.index("--batch-size") + 1]) if "--batch-size" in options else
                 load_train_config(options[options.index("--config") + 1] if "--config" in options else None
                                   ).loader.batch_size)
    else:
        (model, options), workers, batch = BASELINE_RUNS[name], 1, BASELINE_BATCH
    steps = max(1, examples // batch)
    m = run_sampled([sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(models),
                     "--model", model, "--name", name, "--workers", str(workers), "--epochs", "1",
                     "--max-steps", str(steps), *options], cwd=tree)
    meta = json.loads(next((models / name).glob("*/artifact.json")).read_text())
    training = meta["training"]
    return {"run": name, "model": model, "workers": workers, "batch_size": batch, "steps": steps,
            "examples": training["examples"],
            "train_loop_s": training["seconds"], "examples_per_s": round(training["examples_per_s"], 1),
            "validation_auc": round(meta["metrics"]["validation_auc"], 4),
            "process_wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}


def baseline_runs(data: Path, models: Path, examples: int, commit: str) -> list[dict]:
    """`BASELINE_RUNS` from a git worktree of `commit` (its code, this run's data and machine)."""
    import subprocess

    tree = Path(tempfile.mkdtemp(prefix="fin-train-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    try:
        return [{**train_run(data, models, name, examples, tree), "commit": commit} for name in BASELINE_RUNS]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def timed(fn, reps: int, budget_s: float) -> dict:
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < reps and time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    return {"reps": len(times), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def inference(data: Path, models: Path, candidates: int, reps: int) -> dict:
    import polars as pl
    import torch

    from features.fragments import MISSING
    from features.sequences import TIMELINE_FIELDS, geohash_code
    from fin.artifact import load_artifact
    from fin.inputs import CONTEXT_FEATURES, FRAGMENT_CONTEXT, TARGET_FEATURES, Batch, history_batch, request_batch
    from fin.versions import resolve

    timelines = pl.read_parquet(data / "timelines" / "*.parquet")
    user = timelines.sort(pl.col("ts").list.len(), descending=True).row(0, named=True)
    timeline = {f: np.asarray(user[f], np.int64) for f in TIMELINE_FIELDS}
    examples = pl.read_parquet(data / "examples" / "test" / "*.parquet").with_columns(
        geohash_code(pl.col("geohash_6")).fill_null(MISSING).alias("geohash6"), pl.col("aoi_id").fill_null(MISSING))
    request = examples.row(0, named=True)
    context = {c: int(request[c]) for c in ("ts", *CONTEXT_FEATURES)}
    context["ts"] = int(timeline["ts"][-1]) + 1  # after the whole timeline: the longest history
    pool = examples.select(*TARGET_FEATURES).sample(candidates, with_replacement=True, seed=0)
    cands = {c: pool[c].fill_null(MISSING).to_numpy() for c in TARGET_FEATURES}

    def copies_batch(loader) -> Batch:
        """The training layout: every candidate carries its own copy of the user's history."""
        n = len(timeline["ts"])
        histories = history_batch(timeline, np.array([0, n]), np.zeros(candidates, np.int64),
                                  np.full(candidates, n), loader.max_seq_len, share=False)
        one = request_batch(timeline, context, cands, config=loader)
        ts = one.ts.expand(candidates)
        return Batch(label=one.label, ids=one.ids, stats=one.stats, numbers=one.numbers, ts=ts,
                     request_context={c: one.ids[c] for c in FRAGMENT_CONTEXT}, histories=histories,
                     row_id=one.row_id).cut(loader.fragments)

    out = {"user_history_events": len(timeline["ts"]), "candidates": candidates, "threads": torch.get_num_threads()}
    for kind in ("fin", "din"):
        artifact = load_artifact(resolve(models / f"{kind}_shared"))
        out[kind] = scoring_runs(artifact.model, artifact.loader, timeline, context, cands, copies_batch, reps)
    return out


def scoring_runs(model, loader, timeline, context, cands, copies_batch, reps: int) -> dict:
    import torch

    from fin.inputs import request_batch

    candidates = len(cands["item_id"])

    def one_request():
        return model(request_batch(timeline, context, cands, config=loader))

    def per_example_copies():
        return model(copies_batch(loader))

    def per_candidate():
        return torch.cat([model(request_batch(timeline, context, {c: v[i:i + 1] for c, v in cands.items()},
                                              config=loader)) for i in range(candidates)])

    with torch.inference_mode():
        torch.testing.assert_close(one_request(), per_example_copies(), rtol=1e-4, atol=1e-4)
        runs = {"one_request_batch": timed(one_request, reps, 30),
                "per_example_copies": timed(per_example_copies, max(reps // 5, 5), 30),
                "per_candidate_loop": timed(per_candidate, 5, 60)}
    base = runs["one_request_batch"]["p50_ms"]
    for r in runs.values():
        r["candidates_per_s"] = round(candidates / r["p50_ms"] * 1000)
    return {"history_events_read": min(len(timeline["ts"]), loader.max_seq_len), **runs,
            "speedup_vs_copies": round(runs["per_example_copies"]["p50_ms"] / base, 2),
            "speedup_vs_per_candidate": round(runs["per_candidate_loop"]["p50_ms"] / base, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder to keep (or reuse) the simulated logs and features in")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--examples", type=int, default=76_800,
                        help="training examples per run (in whole steps of the run's batch size)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--reps", type=int, default=100, help="inference repetitions (also bounded by 30 s)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT,
                        help=f"commit whose per-example FIN and DIN-50 also run (default {BASELINE_COMMIT})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs of --baseline-commit")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fin-train-bench-"))
    data = build_data(args.data or scratch / "data", args.users, args.days)
    runs = [train_run(data, scratch / "models", name, args.examples) for name in args.runs]
    if not args.no_baseline:
        runs += baseline_runs(data, scratch / "models", args.examples, args.baseline_commit)
    by = {r["run"]: r["examples_per_s"] for r in runs}
    loader = loader_alone(data, 60)

    def ratio(a: str, b: str) -> float | None:
        return round(by[a] / by[b], 2) if a in by and b in by else None

    report("train_scale", {
        "data": {"users": args.users, "days": args.days, "fin_history_per_example": history_lengths(data)},
        "training": runs,
        "fin_shared_vs_per_example": ratio("fin_shared", "fin_per_example"),
        "fin_shared_vs_din_50_per_example": ratio("fin_shared", "din_50_per_example"),
        "fin_shared_vs_per_example_before": ratio("fin_shared", "fin_per_example_before"),
        "fin_shared_vs_din_50_before": ratio("fin_shared", "din_50_before"),
        "fin_two_vs_one_worker": ratio("fin_shared_2", "fin_shared"),
        "fin_replicas_2_vs_one_worker": ratio("fin_replicas_2", "fin_shared"),
        "fin_replicas_2_vs_per_example_before": ratio("fin_replicas_2", "fin_per_example_before"),
        "fin_replicas_2_2048_vs_one_worker_2048": ratio("fin_replicas_2_2048", "fin_shared_2048"),
        "fin_replicas_2_2048_vs_per_example_before": ratio("fin_replicas_2_2048", "fin_per_example_before"),
        "fin_replicas_2_2048_vs_din_50_before": ratio("fin_replicas_2_2048", "din_50_before"),
        "fin_chunks_2_vs_4": ratio("fin_shared", "fin_shared_chunks_4"),
        "fin_batch_2048_vs_512": ratio("fin_shared_2048", "fin_shared"),
        "loader": loader,
        "loader_vs_fin_step": (round(max(v["examples_per_s"] for v in loader.values()) / by["fin_shared"], 2)
                               if "fin_shared" in by else None),
        "inference": inference(data, scratch / "models", args.candidates, args.reps)
        if {"fin_shared", "din_shared"} <= set(by) else None,
    })


if __name__ == "__main__":
    main()
