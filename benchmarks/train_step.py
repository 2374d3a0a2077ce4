"""Benchmark: FIN's training step as each change to its layout left it, in one process.

- `padded`: every request's fragment gathered and padded to the batch's longest, every history event
  looked up and encoded (the layout before commit af74059);
- `grouped`: requests in groups of similar length, the full fragment read from shared timeline slices
  (`fin.models.layout.attend_by_length`, `SliceWindows`), every event looked up and encoded;
- `distinct`: as `grouped`, each distinct history event looked up and encoded once
  (`fin.embeddings.DistinctEvents`), every attention through the fused kernel;
- `unfused_short`: as `distinct`, sequences of up to `fin.layers.UNFUSED_MAX_LEN` events attended with a
  plain product, softmax and product;
- `folded`: as `unfused_short`, the multi-head attentions (recent, integrated) with their key and value
  projections folded into the few queries of each user instead of applied to every event
  (`fin.layers.MultiHeadTargetAttention`);
- `written_backward`: as `folded`, the unfused attentions over events that are both keys and values by
  `fin.layers._EventAttention`, whose backward is written out (`fin.layers.WRITTEN_BACKWARD`): today's step;
- `without_intensity`: as `written_backward`, a FIN without its intensities (`ModelConfig.intensity`: the
  fragments' counts of the candidate's shop and category and the attentions' log-mass), what they cost.

The first six give the same scores and gradients (tests/test_models.py, tests/test_layers.py); what differs is
how much work the step does for them. Each data folder's first training batches (FIN's defaults: user
chunks of 2, 1,000 events, the creatives when the data has them, as `fin train` reads them) are loaded and
cut once; then the variants take turns, `--steps` timed steps each per round (after 5 of warm-up), on one
sharded FIN (TorchRec, gloo, one process), so that the machine's drift falls on all alike. The figure is
the median round.
Usage: python benchmarks/train_step.py --data FEATURES_DATA [FEATURES_DATA ...] [--steps 20] [--rounds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _measure import ROOT, report

sys.path.insert(0, str(ROOT))

from fin import layers  # noqa: E402
from fin.loader import ExampleStream  # noqa: E402
from fin.models import layout  # noqa: E402
from fin.sharding import shard  # noqa: E402
from fin.train import MODELS, TrainConfig, with_image_modality  # noqa: E402


def padded_rows(batch) -> dict:
    """Event rows the step's fragment attentions gather, padded and grouped (FIN: every fragment's padded rows)."""
    user_of = batch.candidate_requests()
    before = after = 0
    for name, frag in batch.fragments.items():
        before += int(frag.lengths.max()) * frag.lengths.numel()
        windows = layout.SliceWindows.of(frag, batch.histories, user_of) if name == "full" else None
        lengths = frag.lengths if windows is None else windows.rows.lengths
        after += sum(int(lengths[g].max()) * g.numel() for g in layout.length_groups(lengths, MODELS["fin"].length_groups))
    real = sum(int(f.lengths.sum()) for f in batch.fragments.values())
    return {"real": real, "padded": before, "grouped": after}


@contextlib.contextmanager
def lone_process_group():
    """A gloo group of this process alone on 127.0.0.1, as `fin train` makes for one worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_fin(data: Path, **model_config):
    """FIN with `fin train`'s defaults on `data` (the creatives when it has them; `model_config` fields
    replaced), sharded in this process's group, in training mode -> (the sharded model, its training step:
    batch -> None, its training batches: (batch size, count) -> list)."""
    config = with_image_modality(data, TrainConfig(), log=lambda message: None)
    config = dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, **model_config))
    torch.manual_seed(config.seed)
    model = shard(MODELS["fin"](config.model_config), torch.device("cpu"), config.sharding, config.sparse_lr, 1)
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=config.lr))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    loader = config.loader  # FIN reads the whole window (`FIN.events_read`)
    images = config.model_config.image_dim > 0
    model.train()

    def step(batch) -> None:
        logits, auxiliary = model(batch, auxiliary=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum")
        optimizer.zero_grad()
        (loss + auxiliary.sum()).backward()
        optimizer.step()

    def batches(size: int, count: int) -> list:
        stream = ExampleStream(data, "train", dataclasses.replace(loader, batch_size=size), images=images)
        return list(itertools.islice(iter(stream), count))
    return model, step, batches


def measure(data: Path, steps: int, rounds: int, batch_size: int) -> dict:
    model, step, load = sharded_fin(data)
    _, plain_step, _ = sharded_fin(data, intensity=False)
    batches = load(batch_size, steps + 5)
    images = model.module.config.image_dim > 0

    windows, fin, sparse, unfused = layout.SliceWindows.of, model.module, model.module.sparse, layers.UNFUSED_MAX_LEN
    folds, written = layers.MultiHeadTargetAttention.fold_queries, layers.WRITTEN_BACKWARD
    no_windows = classmethod(lambda cls, *args: None)
    # variant -> (length groups, SliceWindows.of, one lookup per distinct event, longest sequence attended
    # unfused, multi-head projections folded into the queries, the events' attention's backward written out)
    variants = {"padded": (1, no_windows, False, 0, False, False),
                "grouped": (fin.length_groups, windows, False, 0, False, False),
                "distinct": (fin.length_groups, windows, True, 0, False, False),
                "unfused_short": (fin.length_groups, windows, True, unfused, False, False),
                "folded": (fin.length_groups, windows, True, unfused, True, False),
                "written_backward": (fin.length_groups, windows, True, unfused, True, True),
                "without_intensity": (fin.length_groups, windows, True, unfused, True, True)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, (groups, slice_windows, distinct, unfused_max_len, fold, backward) in variants.items():
                fin.length_groups, layout.SliceWindows.of, sparse.lookup_distinct = groups, slice_windows, distinct
                layers.UNFUSED_MAX_LEN, layers.MultiHeadTargetAttention.fold_queries = unfused_max_len, fold
                layers.WRITTEN_BACKWARD = backward
                run = plain_step if name == "without_intensity" else step
                for batch in batches[:5]:
                    run(batch)
                started = time.perf_counter()
                for batch in batches[5:]:
                    run(batch)
                seconds[name].append((time.perf_counter() - started) / steps)
    finally:
        layout.SliceWindows.of, layers.UNFUSED_MAX_LEN, layers.MultiHeadTargetAttention.fold_queries = windows, unfused, folds
        layers.WRITTEN_BACKWARD = written
    examples = statistics.mean(len(b) for b in batches[5:])
    step_ms = {name: statistics.median(s) * 1000 for name, s in seconds.items()}
    distinct = sparse.history_ids(batches[5])[0].first.numel()
    return {"data": str(data), "images": images, "examples_per_step": examples,
            "padded_rows_per_step": padded_rows(batches[5]),
            "history_events_per_step": {"all": int(batches[5].histories.offsets[-1]), "distinct": distinct},
            **{f"{name}_step_ms": round(ms, 1) for name, ms in step_ms.items()},
            **{f"{name}_examples_per_s": round(examples / ms * 1000) for name, ms in step_ms.items()},
            "distinct_over_grouped": round(step_ms["grouped"] / step_ms["distinct"], 2),
            "unfused_short_over_distinct": round(step_ms["distinct"] / step_ms["unfused_short"], 2),
            "folded_over_unfused_short": round(step_ms["unfused_short"] / step_ms["folded"], 2),
            "written_backward_over_folded": round(step_ms["folded"] / step_ms["written_backward"], 2),
            "intensity_cost": round(step_ms["written_backward"] / step_ms["without_intensity"], 2),
            "distinct_over_padded": round(step_ms["padded"] / step_ms["distinct"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="features data folders (fin features --out DIR: DIR/data)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout and round")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="examples per step (default 512: the batch size when results/train_step.json was measured)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with lone_process_group():
        runs = [measure(folder, args.steps, args.rounds, args.batch_size) for folder in args.data]
    report("train_step", {"steps": args.steps, "rounds": args.rounds, "runs": runs,
                                "note": "batches pre-loaded and cut: the step alone, without the loader"})


if __name__ == "__main__":
    main()
