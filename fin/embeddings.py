"""The sparse side of every model: TorchRec tables shared by a target id and its history sequence.

One EmbeddingCollection holds the tables that a candidate (or request) id shares with the events of
the user's history: item, shop, category, brand, and the place keys geohash6 and AOI (the request's
place against each event's place). Each history event is embedded once; FIN's fragments are then
gathers from those rows by `Fragment.index`, so the sub-sequences cost no extra lookups. Single ids
with no sequence counterpart (city, meal slot, weekday, hour) go through an EmbeddingBagCollection.

Ids beyond a table's size are hashed into it: row 0 is kept for unknown ids (MISSING, negative), every
other id maps to 1 + id mod (rows - 1). Collisions are possible by design and shrink as tables grow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from fin.data import Batch

# table -> (the batch id used as the target or request side, the history field)
SHARED = {
    "item": ("item_id", "item_id"),
    "shop": ("shop_id", "shop_id"),
    "category": ("category_1_id", "category_1_id"),
    "brand": ("brand_id", "brand_id"),
    "geohash6": ("geohash6", "place_geohash6"),
    "aoi": ("aoi_id", "aoi_id"),
}
SINGLE = ("city_id", "time_type", "weekdays", "hours")


@dataclass(frozen=True)
class EmbeddingSizes:
    dim: int = 8
    rows: dict[str, int] = field(default_factory=lambda: {
        "item": 100_000, "shop": 50_000, "category": 1_000, "brand": 10_000, "geohash6": 50_000, "aoi": 10_000,
        "city_id": 1_000, "time_type": 8, "weekdays": 8, "hours": 32,
    })


def hash_ids(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Any int64 id -> a row of a table with `rows` rows (row 0: unknown)."""
    return torch.where(ids < 0, torch.zeros_like(ids), 1 + torch.remainder(ids, rows - 1))


@dataclass
class SparseOutput:
    target: dict[str, torch.Tensor]  # table -> [B, d], the candidate's (or request's) id
    history: dict[str, torch.Tensor]  # table -> [N, d], one row per history event
    single: torch.Tensor  # [B, len(SINGLE) * d]


class SparseArch(nn.Module):
    def __init__(self, sizes: EmbeddingSizes = EmbeddingSizes(), device: torch.device | None = None):
        super().__init__()
        self.sizes = sizes
        device = device or torch.device("cpu")
        self.sequence = EmbeddingCollection(device=device, tables=[
            EmbeddingConfig(name=t, embedding_dim=sizes.dim, num_embeddings=sizes.rows[t],
                            feature_names=[f"target_{t}", f"history_{t}"]) for t in SHARED])
        self.single = EmbeddingBagCollection(device=device, tables=[
            EmbeddingBagConfig(name=f, embedding_dim=sizes.dim, num_embeddings=sizes.rows[f], feature_names=[f],
                               pooling=PoolingType.SUM) for f in SINGLE])

    def inputs(self, batch: Batch) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """The batch as KeyedJaggedTensors (ids hashed into their tables)."""
        n = len(batch)
        ones = torch.ones(n, dtype=torch.int64)
        # every key of a KeyedJaggedTensor has B rows: requests' histories, then empty rows up to B
        history_lengths = torch.zeros(n, dtype=torch.int64)
        history_lengths[:batch.history_offsets.numel() - 1] = batch.history_offsets.diff()
        keys, values, lengths = [], [], []
        for table, (target_id, history_field) in SHARED.items():
            rows = self.sizes.rows[table]
            keys += [f"target_{table}", f"history_{table}"]
            values += [hash_ids(batch.ids[target_id], rows), hash_ids(batch.history[history_field], rows)]
            lengths += [ones, history_lengths]
        sequence = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        single = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SINGLE), values=torch.cat([hash_ids(batch.ids[f], self.sizes.rows[f]) for f in SINGLE]),
            lengths=torch.ones(n * len(SINGLE), dtype=torch.int64))
        return sequence, single

    def forward(self, batch: Batch) -> SparseOutput:
        sequence, single = self.inputs(batch)
        embedded = self.sequence(sequence)  # read by key: the order of outputs may change with sharding
        pooled = self.single(single).to_dict()
        return SparseOutput(
            target={t: embedded[f"target_{t}"].values() for t in SHARED},
            history={t: embedded[f"history_{t}"].values() for t in SHARED},
            single=torch.cat([pooled[f] for f in SINGLE], dim=1),
        )
