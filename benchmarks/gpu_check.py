"""Check and benchmark on a CUDA machine: FIN's fragments, TorchRec training and scoring on the GPU against
the same machine's CPU.

Everything here also runs where there is no GPU (it then compares the CPU with itself), so the script can be
tried anywhere before it is taken to a GPU machine. On the GPU machine it reports:
  fragments  `features.fragments.fragment` on the GPU gives exactly the CPU's sub-sequences: the batches of
             the validation split (the training path) and single requests cut from them (the server's path);
  training   `fin train` (configs/lifelong.yaml: 1,000-event histories, shared-timeline batches of
             `--batch-size` assembled by `--loader-workers` processes, fragments cut on the device) for a
             fixed number of steps, on the GPU (NCCL, TorchRec's fused table kernels) with each of
             `--shardings`, and once with the GPU hidden (gloo, all CPU cores): examples/s of each, the first
             GPU run's ratio to the CPU's, and the validation AUC each reached;
  scoring    the GPU-trained artifact scores the test split on the CPU and on the GPU (largest pCTR difference,
             AUC of each), then one served request (200 candidates, the longest history of the test split)
             end to end: batch and fragments on the CPU, forward on the device, scores back; CPU with one
             intra-op thread (as `fin serve`) against the GPU, p50/p99, and 8 requests in one GPU forward;
  resume     `fin train` killed after its first epoch's checkpoint resumes from it on the device and
             finishes (how far it ends from an uninterrupted run).
Usage: python benchmarks/gpu_check.py --data DIR (a `fin features` output) [--steps 100] [--cpu-steps 20]
       [--batch-size 8192] [--loader-workers 4] [--reps 200] [--sections fragments training resume]
       [--shardings table_wise row_wise auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import ROOT, report, run_sampled
from train_scale import LIFELONG, timed

sys.path.insert(0, str(ROOT))


SECTIONS = ("fragments", "training", "resume")


def devices():
    import torch

    return torch.device("cpu"), torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fragments_agree(data: Path, loader, batches: int, singles: int) -> dict:
    """fragment() on the device against the CPU, on real batches and on single requests cut from them."""
    import torch

    from features.fragments import FRAGMENTS, fragment_windows
    from fin.loader import ExampleStream

    cpu, device = devices()

    def cut(starts, ends, history, context, on):
        frags = fragment_windows(starts.to(on), ends.to(on), {k: v.to(on) for k, v in history.items()},
                                 {k: v.to(on) for k, v in context.items()}, loader.fragments)
        return {name: (f.index.cpu(), f.lengths.cpu(), None if f.tags is None else f.tags.cpu())
                for name, f in frags.items()}

    def same(a, b) -> bool:
        return all(all(x is y if x is None or y is None else torch.equal(x, y) for x, y in zip(a[n], b[n]))
                   for n in FRAGMENTS)

    # shuffled (as training batches are): examples of a user share its timeline slice, each reading its own
    # window; the first of a batch are also cut one by one below, as the server cuts them
    stream = ExampleStream(data, "validation", dataclasses.replace(loader, batch_size=256))
    checked = {"batches": 0, "single_requests": 0, "events": 0, "mismatches": 0}
    for _, batch in zip(range(batches), stream):
        context = {"ts": batch.ts, **batch.request_context}  # per request: a request's examples share it
        checked["batches"] += 1
        h = batch.histories
        checked["events"] += int(h.offsets[-1])
        checked["mismatches"] += not same(cut(h.start, h.end, batch.history, context, cpu),
                                          cut(h.start, h.end, batch.history, context, device))
        for i in range(min(singles, batch.ts.numel())):
            lo, hi = int(h.start[i]), int(h.end[i])
            starts, ends = torch.tensor([0]), torch.tensor([hi - lo])
            history = {k: v[lo:hi] for k, v in batch.history.items()}
            one = {k: v[i:i + 1] for k, v in context.items()}
            checked["single_requests"] += 1
            checked["mismatches"] += not same(cut(starts, ends, history, one, cpu),
                                              cut(starts, ends, history, one, device))
    return {**checked, "device": device.type, "identical": checked["mismatches"] == 0}


def train_run(data: Path, models: Path, name: str, steps: int, sharding: str, hide_gpu: bool, batch_size: int,
              loader_workers: int) -> dict:
    """`fin train` as its own process (configs/lifelong.yaml, in batches of `batch_size` read by `loader_workers`
    processes); with `hide_gpu` it cannot see the GPU and trains on the CPU (gloo)."""
    from features.configfile import read_config_file

    config = read_config_file(LIFELONG)
    config["loader"] = {**config.get("loader", {}), "workers": loader_workers}
    config_file = models / f"{name}.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if hide_gpu else None
    m = run_sampled([sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(models),
                     "--name", name, "--config", str(config_file), "--batch-size", str(batch_size), "--epochs", "1",
                     "--max-steps", str(steps), "--sharding", sharding], env=env)
    folder = next((models / name).glob("*/artifact.json")).parent
    meta = json.loads((folder / "artifact.json").read_text())
    training = meta["training"]
    return {"device": training["device"], "plan": sorted(set(training["plan"].values())), "steps": steps,
            "examples": training["examples"], "train_loop_s": training["seconds"],
            "examples_per_s": round(training["examples_per_s"], 1),
            "validation_auc": round(meta["metrics"]["validation_auc"], 4), "process_wall_s": m["wall_s"],
            "artifact": str(folder)}


def resume_after_kill(data: Path, models: Path, steps: int) -> dict:
    """`fin train` (FIN, 2 epochs) killed once its first epoch's checkpoint is on disk, then run again: it must
    resume there (torch.distributed.checkpoint on the device: sharded tables, fused and dense optimizer state)
    and finish. Reports how far its weights end from an uninterrupted run's (GPU kernels may sum in another
    order from run to run, so this is a figure, not a pass/fail)."""
    import signal
    import subprocess

    from safetensors.torch import load_file

    args = [sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--epochs", "2", "--patience", "2",
            "--max-steps", str(steps)]
    killed = subprocess.Popen([*args, "--out", str(models / "killed")], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = models / "killed" / "fin" / ".checkpoint" / "latest.json"
    deadline = time.monotonic() + 300
    try:
        while not (pointer.exists() and json.loads(pointer.read_text())["progress"]["epoch"] >= 1):
            if killed.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("training ended (or ran out of time) before its first checkpoint")
            time.sleep(0.05)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    resumed = run_sampled([*args, "--out", str(models / "killed")])["stderr"]
    run_sampled([*args, "--out", str(models / "straight")])
    a, b = (load_file(str(next((models / run / "fin").glob("*/model.safetensors")))) for run in ("killed", "straight"))
    return {"resumed_at_epoch_2": "resumed from" in resumed and "epoch 1/2" not in resumed,
            "max_abs_weight_difference_vs_uninterrupted": max(float((a[k] - b[k]).abs().max()) for k in a)}


def scoring(data: Path, artifact_folder: str, candidates: int, reps: int) -> dict:
    import torch

    from features.sequences import TIMELINE_FIELDS
    from fin.artifact import load_artifact
    from fin.inputs import CANDIDATE_NUMBERS, CONTEXT_FEATURES, TARGET_FEATURES, ScoringRequest, requests_batch
    from fin.loader import ExampleStream
    from fin.metrics import auc

    cpu, device = devices()
    torch.set_num_threads(1)  # as `fin serve --torch-threads 1`
    artifact = load_artifact(artifact_folder)
    on_cpu = artifact.model.eval()
    on_device = load_artifact(artifact_folder).model.to(device).eval()
    loader = artifact.loader

    # the test split on both
    stream = ExampleStream(data, "test", dataclasses.replace(loader, shuffle=False, batch_size=1024))
    labels, p_cpu, p_device, longest = [], [], [], None
    with torch.inference_mode():
        for batch in stream:
            labels.append(batch.label.numpy())
            p_cpu.append(torch.sigmoid(on_cpu(batch)).numpy())
            p_device.append(torch.sigmoid(on_device(batch.to(device))).cpu().numpy())
            lengths = batch.histories.end - batch.histories.start
            i = int(lengths.argmax())
            if longest is None or lengths[i] > longest[0]:
                longest = (int(lengths[i]), batch, i)
    labels, p_cpu, p_device = map(np.concatenate, (labels, p_cpu, p_device))
    test = {"examples": int(labels.size), "max_abs_pctr_difference": float(np.abs(p_cpu - p_device).max()),
            "auc_cpu": round(auc(labels, p_cpu), 6), "auc_device": round(auc(labels, p_device), 6)}

    # one served request: the longest history of the test split, `candidates` candidates drawn from the split
    events, batch, i = longest  # request i of the batch (its examples share its history)
    lo, hi = int(batch.histories.start[i]), int(batch.histories.end[i])
    timeline = {f: batch.history[f][lo:hi].numpy() for f in TIMELINE_FIELDS}
    example = int((batch.candidate_requests() == i).nonzero()[0, 0])
    context = {"ts": int(batch.ts[i]), **{c: int(batch.ids[c][example]) for c in CONTEXT_FEATURES}}
    rows = np.random.default_rng(0).integers(0, len(batch), candidates)
    candidate = {c: batch.ids[c].numpy()[rows] for c in TARGET_FEATURES}
    candidate |= {c: batch.numbers[:, k].numpy()[rows] for k, c in enumerate(CANDIDATE_NUMBERS)}
    request = ScoringRequest(timeline, context, candidate, batch.stats.numpy()[rows])

    def score(model, on, requests):
        with torch.inference_mode():
            return torch.sigmoid(model(requests_batch(requests, loader).to(on))).cpu().numpy()

    np.testing.assert_allclose(score(on_cpu, cpu, [request]), score(on_device, device, [request]), atol=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    on_device_batch = requests_batch([request], loader).to(device)

    def forward_only():
        with torch.inference_mode():
            on_device(on_device_batch)
        sync()

    runs = {"cpu_1_thread": timed(lambda: score(on_cpu, cpu, [request]), reps, 60),
            "device": timed(lambda: score(on_device, device, [request]), reps, 60),
            "device_forward_only": timed(forward_only, reps, 60),
            "device_8_requests_per_forward": timed(lambda: score(on_device, device, [request] * 8), reps, 60)}
    for name, run in runs.items():
        run["candidates_per_s"] = round(candidates * (8 if name.endswith("per_forward") else 1) / run["p50_ms"] * 1000)
    return {"test_split": test, "request": {"history_events": events, "candidates": candidates, **runs},
            "device_vs_cpu_p50": round(runs["cpu_1_thread"]["p50_ms"] / runs["device"]["p50_ms"], 2)}


def environment() -> dict:
    import torch
    import torchrec

    cpu, device = devices()
    return {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"), "device": device.type,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "cpu_cores": os.cpu_count()}


def main() -> None:
    from fin.sharding import SHARDINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `fin features` output (or its data/ folder)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run on the GPU")
    parser.add_argument("--cpu-steps", type=int, default=20, help="training steps of the CPU run")
    # a GPU step of FIN costs about the same for a batch of 512 as for thousands (it waits on kernel launches
    # and the host): 512, the CPU's default, measured the launches, not the GPU (5,910 examples/s on an H100)
    parser.add_argument("--batch-size", type=int, default=8192, help="examples per training step")
    parser.add_argument("--loader-workers", type=int, default=4,
                        help="processes reading and assembling training batches ahead of the step")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--reps", type=int, default=200, help="scoring repetitions (also bounded by 60 s)")
    parser.add_argument("--fragment-batches", type=int, default=20)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to run (default all; scoring needs training); a subset writes "
                             "results/gpu_check_<sections>.json")
    parser.add_argument("--resume-steps", type=int, default=30, help="steps per epoch of the resume check")
    parser.add_argument("--shardings", nargs="+", default=["table_wise", "row_wise"], choices=SHARDINGS,
                        help="table shardings to train with on the GPU (default table_wise and row_wise; the CPU run "
                             "uses the first)")
    args = parser.parse_args()
    from features.dataset import Dataset
    from fin.train import load_train_config

    data = Dataset.at(args.data).root
    doc: dict = {"environment": environment()}
    started = time.perf_counter()
    models = Path(tempfile.mkdtemp(prefix="fin-gpu-check-"))
    if "fragments" in args.sections:
        doc["fragments"] = attempt(fragments_agree, data, load_train_config(LIFELONG).loader,
                                   args.fragment_batches, 16)
    if "training" in args.sections:
        on_gpu = args.shardings if doc["environment"]["device"] == "cuda" else []
        batches = {"batch_size": args.batch_size, "loader_workers": args.loader_workers}
        runs = {f"device_{s}": attempt(train_run, data, models, f"fin-{s}", args.steps, s, hide_gpu=False, **batches)
                for s in on_gpu}
        runs["cpu"] = attempt(train_run, data, models, "fin-cpu", args.cpu_steps, args.shardings[0], hide_gpu=True,
                              **batches)
        trained = [r for r in runs.values() if "error" not in r]
        doc["training"] = {**runs, "device_vs_cpu_examples_per_s": round(
            trained[0]["examples_per_s"] / trained[-1]["examples_per_s"], 2) if len(trained) == len(runs) else None}
        if trained:  # the first trained: the GPU's where it trained
            doc["scoring"] = attempt(scoring, data, trained[0]["artifact"], args.candidates, args.reps)
    if "resume" in args.sections:
        doc["resume"] = attempt(resume_after_kill, data, models / "resume", args.resume_steps)
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    report("gpu_check" if set(args.sections) == set(SECTIONS) else "_".join(["gpu_check", *args.sections]), doc)
    failed = [name for name, part in doc.items() if isinstance(part, dict) and "error" in part]
    failed += [name for name, run in doc.get("training", {}).items() if isinstance(run, dict) and "error" in run]
    failed += [name for name, key in (("fragments", "identical"), ("resume", "resumed_at_epoch_2"))
               if doc.get(name, {}).get(key) is False]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def attempt(section, *args, **kwargs) -> dict:
    """A section's results, or its error: one part that fails still leaves the others' figures."""
    try:
        return section(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit status
        return {"error": f"{type(e).__name__}: {str(e)[-3000:]}"}


if __name__ == "__main__":
    main()
