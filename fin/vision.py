"""The creative encoder: a standard ResNet (MONAI's, randomly initialised) that reads an ad's creative image and
returns an embedding, trained here on the creatives of warm ads; and the writer of vision artifacts.

Objective (`train_encoder`): from the embedding, predict the item's category (cross-entropy) and its click
rate over the train split (the smoothed log-odds of its clicks per impression, a squared error weighted by
how many impressions stand behind it). Only train-split items teach it: a test-week ad's creative is never
seen in training, as a new ad's is not. The category is also a model input, so what the embedding adds for
a new ad is what its click rate owes to how the creative looks.

A vision artifact is `MODELS/<name>/<version>/` with `model.safetensors` and `artifact.json` (task "vision";
`serving.vision` loads and serves it through the Open Inference Protocol's ModelInfer).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from features.creatives import CREATIVE_SIZE, decode_pngs
from features.dataset import EXAMPLES, Dataset
from fin.versions import META, WEIGHTS, sha256, versions

TASK = "vision"
ENCODER = "creative_encoder"  # the architecture's name in artifacts, and the default model name
EMBEDDING = "embedding"  # the output every reader of creatives uses


@dataclass(frozen=True)
class CreativeEncoderConfig:
    size: int = CREATIVE_SIZE  # square RGB images, size x size
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the ResNet's four stages
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # basic blocks per stage: a ResNet-10 at a quarter of its width
    embedding_dim: int = 16
    categories: int = 32  # category ids below this have a class of their own (the rest share the last)


class CreativeEncoder(nn.Module):
    """FP32 images [N, 3, size, size] with values in [0, 1] -> {"embedding": [N, E], "category_probabilities":
    [N, categories], "ctr": [N]} (the click rate it predicts for the creative, before any context)."""

    outputs = (EMBEDDING, "category_probabilities", "ctr")

    def __init__(self, config: CreativeEncoderConfig = CreativeEncoderConfig()):
        super().__init__()
        from monai.networks.nets import ResNet  # imported here: a second to import, needed by vision users only

        self.config = config
        self.backbone = ResNet("basic", list(config.blocks), list(config.widths), spatial_dims=2,
                               n_input_channels=3, num_classes=config.embedding_dim)
        self.category = nn.Linear(config.embedding_dim, config.categories)
        self.ctr = nn.Linear(config.embedding_dim, 1)
        # the pixels' mean and spread over creatives (fixed: inputs arrive in [0, 1])
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def heads(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Category logits [N, categories] and CTR log-odds [N]."""
        return self.category(embedding), self.ctr(embedding).squeeze(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.embed(images)
        category, ctr = self.heads(embedding)
        return {EMBEDDING: embedding, "category_probabilities": torch.softmax(category, -1), "ctr": torch.sigmoid(ctr)}


def images_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> FP32 [N, 3, H, W] in [0, 1]: the encoder's input, as ModelInfer takes it."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class EncoderTrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    ctr_weight: float = 1.0  # of the click-rate loss against the category loss
    prior_impressions: float = 20.0  # the click-rate target shrinks towards the mean CTR by this many impressions
    holdout: float = 0.15  # items kept out of training to report how well it generalises
    seed: int = 0
    encoder: CreativeEncoderConfig = field(default_factory=CreativeEncoderConfig)


def training_items(data: Dataset, prior_impressions: float) -> pl.DataFrame:
    """The train split's items with a creative: item_id, category, impressions, the click-rate target
    (smoothed log-odds) and its weight, and the creative's PNG bytes (`image_png`)."""
    if not data.creatives.exists():
        raise FileNotFoundError(f"no creatives at {data.creatives}: the logs have no creatives table")
    shown = data.scan(EXAMPLES, "train").group_by("item_id").agg(
        pl.col("category_1_id").first(), pl.len().alias("impressions"), pl.col("label").sum().alias("clicks")).collect()
    mean_ctr = float(shown["clicks"].sum() / max(int(shown["impressions"].sum()), 1))
    prior = prior_impressions
    shown = shown.with_columns(
        ((pl.col("clicks") + prior * mean_ctr) / (pl.col("impressions") + prior)).alias("_rate"),
        (pl.col("impressions") / (pl.col("impressions") + prior)).alias("weight"))
    shown = shown.with_columns((pl.col("_rate") / (1 - pl.col("_rate"))).log().alias("target")).drop("_rate")
    creatives = pl.read_parquet(data.creatives, columns=["item_id", "image_png"])
    return shown.join(creatives, on="item_id", how="inner").sort("item_id")


def train_encoder(data: str | Path, models: str | Path, config: EncoderTrainConfig = EncoderTrainConfig(),
                  name: str = ENCODER, log: Callable[[str], None] = print,
                  progress: Callable[[int], object] = lambda n: None) -> Path:
    """Train the creative encoder on a features run's train split and write it as the next version of `name`."""
    torch.manual_seed(config.seed)
    items = training_items(Dataset.at(data), config.prior_impressions)
    if items.height < 8:
        raise ValueError(f"only {items.height} train-split items have a creative: too few to train on")
    enc = config.encoder
    pixels = images_tensor(decode_pngs(items["image_png"].to_list(), enc.size))
    category = torch.from_numpy(np.minimum(items["category_1_id"].to_numpy(), enc.categories - 1).astype(np.int64))
    target = torch.from_numpy(items["target"].to_numpy().astype(np.float32))
    target_mean, target_std = float(target.mean()), float(target.std().clamp(min=1e-3))
    target = (target - target_mean) / target_std
    weight = torch.from_numpy(items["weight"].to_numpy().astype(np.float32))
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(items.height)
    held = order[: int(round(items.height * config.holdout))]
    fit = order[held.size:]

    module = CreativeEncoder(enc)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * -(-fit.size // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=max(steps, 1))
    started = time.perf_counter()
    for epoch in range(config.epochs):
        module.train()
        total = 0.0
        shuffled = torch.from_numpy(fit[rng.permutation(fit.size)])
        for lo in range(0, fit.size, config.batch_size):
            rows = shuffled[lo:lo + config.batch_size]
            x = pixels[rows]
            flip = torch.rand(x.shape[0]) < 0.5  # creatives are laid out either way round
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits, ctr = module.heads(module.embed(x))
            loss = F.cross_entropy(logits, category[rows]) + config.ctr_weight * (
                weight[rows] * (ctr - target[rows]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * rows.numel()
        progress(1)
        log(f"creative encoder epoch {epoch + 1}/{config.epochs}: loss {total / max(fit.size, 1):.4f}")
    module.eval()
    with torch.inference_mode():
        logits, ctr = module.heads(module.embed(pixels[torch.from_numpy(held)]))
    held_t = torch.from_numpy(held)
    metrics = {
        "items": int(items.height), "held_out_items": int(held.size), "seconds": round(time.perf_counter() - started, 1),
        "held_out_category_accuracy": float((logits.argmax(1) == category[held_t]).float().mean()) if held.size else None,
        "held_out_ctr_correlation": _weighted_correlation(ctr, target[held_t], weight[held_t]) if held.size > 2 else None,
    }
    # the CTR head predicts standardised log-odds: fold the standardisation into it, so "ctr" is a rate
    with torch.no_grad():
        module.ctr.weight.mul_(target_std)
        module.ctr.bias.mul_(target_std).add_(target_mean)
    return write_vision_artifact(models, name, module, ENCODER, asdict(enc),
                                 inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 3, enc.size, enc.size]}],
                                 outputs=[{"name": EMBEDDING, "datatype": "FP32", "shape": [-1, enc.embedding_dim]},
                                          {"name": "category_probabilities", "datatype": "FP32",
                                           "shape": [-1, enc.categories]},
                                          {"name": "ctr", "datatype": "FP32", "shape": [-1]}],
                                 extra={"training": metrics | {"config": asdict(config) | {"data": str(data)}}})


def _weighted_correlation(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    return float(cov / ((w * (x - mx) ** 2).sum().sqrt() * (w * (y - my) ** 2).sum().sqrt()).clamp(min=1e-12))


# ---------------------------------------------------------------------------- artifacts
def write_vision_artifact(models: str | Path, name: str, module: nn.Module, kind: str, config: dict,
                          inputs: list[dict], outputs: list[dict], version: int | None = None,
                          extra: dict | None = None) -> Path:
    """Write `module` as version `version` (default: the next) of `name`: the folder appears by one rename once
    complete, so a server scanning the repository never loads half an artifact."""
    version = version if version is not None else (versions(models, name) or [0])[-1] + 1
    folder = Path(models) / name / str(version)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(staging / WEIGHTS))
    meta = {"name": name, "version": version, "task": TASK, "model": kind, "config": config,
            "inputs": inputs, "outputs": outputs, "sha256": sha256(staging / WEIGHTS), **(extra or {})}
    (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
    os.rename(staging, folder)
    return folder
