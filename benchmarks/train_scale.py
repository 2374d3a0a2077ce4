"""Benchmark: training throughput of FIN over 1000-long timelines vs DIN, 1 and 2 workers; inference for
one user x 200 candidates (the server's case) against per-example history copies and a per-candidate loop.

Data: a simulated city over a long period (configs/large.yaml with fewer users) so that most impressions
have 1,000 events of history. Training: each (model, workers) runs as its own `fin train` process for a
fixed number of steps; examples/s is the training loop's own figure (loading and fragmenting included,
validation excluded), peak RSS the largest sum over the process and its workers. FIN reads the last 1,000
events (configs/lifelong.yaml); DIN reads the last 50 (all it attends over). Inference: the 1-worker
artifacts score 200 candidates of one request of the user with the longest history: (a) one request batch
(U = 1: history, fragments and user-side work once), (b) one batch of 200 examples each with its own copy
of the history (how training batches look), (c) the model run once per candidate.
Usage: python benchmarks/train_scale.py [--data DIR] [--steps 40] [--reps 100]
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
RUNS = {"fin": ["--config", str(LIFELONG)], "din": ["--max-seq-len", "50"]}


def build_data(folder: Path, users: int, days: int) -> Path:
    if not (folder / "features" / "data" / "stats.json").exists():
        fin = [sys.executable, "-m", "jobs.cli"]
        run_sampled([*fin, "simulate", "--config", str(ROOT / "configs" / "large.yaml"), "--users", str(users),
                     "--days", str(days), "--out", str(folder / "logs"), "--overwrite"])
        run_sampled([*fin, "features", "--logs", str(folder / "logs"), "--out", str(folder / "features"),
                     "--validation-days", "2", "--test-days", "2", "--no-materialize"])
    return folder / "features" / "data"


def history_lengths(data: Path) -> dict:
    """Mean and p50 of the history events FIN's loader feeds per training example (first 20 batches)."""
    from fin.loader import ExampleStream
    from fin.train import load_train_config

    stream = ExampleStream(data, "train", load_train_config(LIFELONG).loader)
    lengths = []
    for _, batch in zip(range(20), stream):
        lengths.append((batch.histories.end - batch.histories.start).numpy())
    lengths = np.concatenate(lengths)
    return {"mean": round(float(lengths.mean()), 1), "p50": float(np.median(lengths)),
            "share_at_1000": round(float((lengths >= 1000).mean()), 3)}


def train_run(data: Path, models: Path, model: str, workers: int, steps: int) -> dict:
    name = f"{model}-w{workers}"
    m = run_sampled([sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(models),
                     "--model", model, "--name", name, "--workers", str(workers), "--epochs", "1",
                     "--max-steps", str(steps), *RUNS[model]])
    meta = json.loads(next((models / name).glob("*/artifact.json")).read_text())
    training = meta["training"]
    return {"model": model, "workers": workers, "steps": steps, "examples": training["examples"],
            "train_loop_s": training["seconds"], "examples_per_s": round(training["examples_per_s"], 1),
            "process_wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}


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
        return Batch(label=one.label, ids=one.ids, stats=one.stats, ts=ts,
                     request_context={c: one.ids[c] for c in FRAGMENT_CONTEXT}, histories=histories,
                     row_id=one.row_id).cut(loader.fragments)

    out = {"user_history_events": len(timeline["ts"]), "candidates": candidates, "threads": torch.get_num_threads()}
    for kind in ("fin", "din"):
        artifact = load_artifact(resolve(models / f"{kind}-w1"))
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
    parser.add_argument("--steps", type=int, default=40, help="training steps (of 512 examples) per run")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--reps", type=int, default=100, help="inference repetitions (also bounded by 30 s)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fin-train-bench-"))
    data = build_data(args.data or scratch / "data", args.users, args.days)
    runs = [train_run(data, scratch / "models", model, workers, args.steps)
            for model in ("fin", "din") for workers in (1, 2)]
    by = {(r["model"], r["workers"]): r for r in runs}
    report("train_scale", {
        "data": {"users": args.users, "days": args.days, "fin_history_per_example": history_lengths(data)},
        "training": runs,
        "fin_vs_din_examples_per_s": {w: round(by["fin", w]["examples_per_s"] / by["din", w]["examples_per_s"], 3)
                                      for w in (1, 2)},
        "two_vs_one_worker_examples_per_s": {m: round(by[m, 2]["examples_per_s"] / by[m, 1]["examples_per_s"], 3)
                                             for m in ("fin", "din")},
        "inference": inference(data, scratch / "models", args.candidates, args.reps),
    })


if __name__ == "__main__":
    main()
