"""`fin embed-creatives` as a Ray job: every creative of a features run -> its embedding, in Feast.

The creatives (the dataset's validated `creatives` table) are cut into chunks; one Ray task per chunk loads
the creative encoder's vision artifact (`serving.vision.load_vision`: the model the server runs for ModelInfer
and for creatives it meets without an embedding) and embeds its images. The driver writes the `item_creative`
view's source (`features.item_embeddings`), applies the Feast repository and materialises the view into the
online store, as the features job does for the statistics.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from features.dataset import FEAST, Dataset
from features.item_embeddings import CREATIVE_VIEW, embeddings_source, write_embeddings


@dataclass(frozen=True)
class EmbedConfig:
    chunk: int = 2048  # creatives per Ray task
    batch_size: int = 256  # images per forward inside a task
    ray_address: str | None = None  # None: start (and stop) a local Ray
    num_cpus: int | None = None  # local Ray only; default: all cores
    materialize: bool = True


def embed_chunk(encoder: str, pngs: list[bytes], batch_size: int) -> np.ndarray:
    """Embeddings [n, E] of PNG creatives by the vision artifact at `encoder` (a Ray task's body)."""
    import torch

    from features.creatives import decode_pngs
    from fin.vision import EMBEDDING, images_tensor
    from serving.vision import load_vision

    torch.set_num_threads(1)  # one task per CPU
    model = load_vision(encoder)
    size = model.inputs[0].shape[-1]
    out = [model.infer({model.inputs[0].name: images_tensor(decode_pngs(pngs[lo:lo + batch_size], size))})[EMBEDDING]
           for lo in range(0, len(pngs), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def embed_creatives(data: str | Path, encoder: str | Path, config: EmbedConfig = EmbedConfig(),
                    progress: Callable[[str], None] = lambda message: None) -> dict:
    """Embed every creative of the features run at `data` (its output folder, beside `feast/`) with the vision
    artifact `encoder`; returns counts and timings."""
    import ray

    from jobs.features_job import RaySession

    dataset = Dataset.at(data)
    if not dataset.creatives.exists():
        raise FileNotFoundError(f"no creatives at {dataset.creatives}: the logs of this features run have none")
    creatives = pl.read_parquet(dataset.creatives, columns=["item_id", "image_png"])
    started = time.perf_counter()
    session = RaySession(config.ray_address, config.num_cpus, dataset.root.parent)
    try:
        task = ray.remote(num_cpus=1)(embed_chunk)
        pending = [task.remote(str(encoder), creatives["image_png"][lo:lo + config.chunk].to_list(), config.batch_size)
                   for lo in range(0, creatives.height, config.chunk)]
        chunks = []
        for i, ref in enumerate(pending):  # in order: chunk k holds rows k * chunk ...
            chunks.append(ray.get(ref))
            progress(f"embedded chunk {i + 1}/{len(pending)}")
    finally:
        session.close()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    embedded = time.perf_counter()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    write_embeddings(embeddings_source(dataset), creatives["item_id"].to_numpy(), vectors,
                     int(now.timestamp() * 1000))
    feast = _materialize(dataset, now, config.materialize)
    return {"creatives": creatives.height, "dim": int(vectors.shape[1]) if vectors.size else 0,
            "source": str(embeddings_source(dataset)), "feast_repo": feast,
            "seconds": {"embed": round(embedded - started, 3), "feast": round(time.perf_counter() - embedded, 3)}}


def _materialize(dataset: Dataset, stamp: datetime, materialize: bool) -> str | None:
    """Apply the run's Feast repository (the view's definition) and load the view into the online store."""
    repo = dataset.root.parent / FEAST
    if not (repo / "feature_store.yaml").exists():
        return None  # a features run without a Feast repository: the source file alone serves training
    from feast import FeatureStore

    from features.feast_repo import definitions

    store = FeatureStore(repo_path=str(repo))
    store.apply(definitions.objects(dataset.feast_sources.resolve()))
    if materialize:
        with contextlib.redirect_stdout(io.StringIO()):  # Feast prints its progress
            store.materialize(start_date=stamp - timedelta(days=1), end_date=stamp + timedelta(seconds=1),
                              feature_views=[CREATIVE_VIEW])
    return str(repo)
