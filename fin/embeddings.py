"""The sparse side of every model: TorchRec tables shared by a target id and its history sequence.

One EmbeddingCollection holds the tables that a candidate (or request) id shares with the events of
the user's history: item, shop, category, brand, and the place keys geohash6 and AOI (the request's
place against each event's place). Each history event is embedded once; FIN's fragments are then
gathers from those rows by `Fragment.index`, so the sub-sequences cost no extra lookups. Single ids
with no sequence counterpart (the user, city, meal slot, weekday, hour) go through an
EmbeddingBagCollection; the user id table is the large one, the kind a planner shards row-wise.

Unsharded and in eval mode (the evaluator, the server), the same rows are read straight from the
tables' weights: for one request, building KeyedJaggedTensors and splitting the collections' outputs
costs about ten times the lookups themselves (1.5 of a 200-candidate request's ~10 ms). Training and
sharded modules go through TorchRec; both paths give the same rows (tested).

Through TorchRec (training, sharded modules) a batch's history events are looked up once per *distinct*
event (`DistinctEvents`: the same row of every shared table and the same creative), and the model encodes
each distinct event once: a training batch of 512 examples holds ~48,000 history events but ~13,000
distinct ones (a user orders the same dishes from the same places), so the lookups, their backward and the
event encoder do a quarter of the work for the same rows and gradients.

Ids beyond a table's size are hashed into it: row 0 is kept for unknown ids (MISSING, negative), every
other id maps to 1 + id mod (rows - 1). Collisions are possible by design and shrink as tables grow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from fin.inputs import Batch

# table -> (the batch id used as the target or request side, the history field)
SHARED = {
    "item": ("item_id", "item_id"),
    "shop": ("shop_id", "shop_id"),
    "category": ("category_1_id", "category_1_id"),
    "brand": ("brand_id", "brand_id"),
    "geohash6": ("geohash6", "place_geohash6"),
    "aoi": ("aoi_id", "aoi_id"),
}
SINGLE = ("user_id", "city_id", "time_type", "weekdays", "hours")


@dataclass(frozen=True)
class EmbeddingSizes:
    dim: int = 8
    rows: dict[str, int] = field(default_factory=lambda: {
        "item": 100_000, "shop": 50_000, "category": 1_000, "brand": 10_000, "geohash6": 50_000, "aoi": 10_000,
        "user_id": 200_000, "city_id": 1_000, "time_type": 8, "weekdays": 8, "hours": 32,
    })


def hash_ids(ids: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
    """Any int64 id -> a row of a table with `rows` rows (row 0: unknown); `rows` may be a tensor of
    table sizes broadcast against `ids` (one column per table)."""
    return torch.remainder(ids, rows - 1).add_(1).masked_fill_(ids < 0, 0)  # in place: no temporaries


@dataclass
class DistinctEvents:
    """The distinct rows among a batch's N history events (M of them), where two events are one row when every
    key column holds the same value: `first` [M], one event of each row; `row_of` [N], each event's row."""

    first: torch.Tensor
    row_of: torch.Tensor

    @classmethod
    def of(cls, columns: list[tuple[torch.Tensor, int]]) -> DistinctEvents:
        """`columns`: (values [N], how many values it may take: 0 <= value < size). The columns are packed into
        one int64 key, which is renumbered densely (a sort) whenever the next column would overflow it."""
        key, bound = None, 1
        for values, size in columns:
            if key is not None and bound * size >= 2 ** 62:
                unique, key = torch.unique(key, return_inverse=True)
                bound = unique.numel()
            key = values if key is None else key * size + values
            bound *= size
        unique, row_of = torch.unique(key, return_inverse=True)
        # any event of a row will do: they share every key column
        first = torch.empty(unique.numel(), dtype=torch.int64, device=key.device)
        first.scatter_(0, row_of, torch.arange(row_of.numel(), device=key.device))
        return cls(first, row_of)


@dataclass
class SparseOutput:
    target: torch.Tensor  # [B, len(SHARED), d]: the candidate's (or request's) id in each shared table
    history: torch.Tensor  # [N or M, len(SHARED), d]: the same for each history event (or distinct event)
    single: torch.Tensor  # [B, len(SINGLE) * d]
    distinct: DistinctEvents | None = None  # history holds one row per distinct event (None: one per event)


class SparseArch(nn.Module):
    lookup_distinct = True  # through TorchRec: one lookup per distinct history event (False: per event)

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
        self._stacked_tables: dict[str, StackedTables] = {}  # eval-mode lookups (`_read_weights`)

    def history_ids(self, batch: Batch) -> tuple[DistinctEvents | None, dict[str, torch.Tensor]]:
        """Each shared table's row ids of the batch's history events to look up: of its distinct events (those
        with the same row in every table and, with creatives, the same creative), or with `lookup_distinct`
        off, of every event (distinct: None)."""
        hashed = {t: hash_ids(batch.history[field], self.sizes.rows[t]) for t, (_, field) in SHARED.items()}
        if not self.lookup_distinct:
            return None, hashed
        columns = [(hashed[t], self.sizes.rows[t]) for t in SHARED]
        if batch.images is not None:
            columns.append((batch.images.history, batch.images.table.shape[0]))
        distinct = DistinctEvents.of(columns)
        return distinct, {t: ids.index_select(0, distinct.first) for t, ids in hashed.items()}

    def inputs(self, batch: Batch,
               history: dict[str, torch.Tensor]) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """The batch as KeyedJaggedTensors (ids hashed into their tables), with `history` (table -> row ids)
        as each table's history feature."""
        n, device = len(batch), batch.label.device  # lengths beside the values: a KJT's tensors share a device
        ones = torch.ones(n, dtype=torch.int64, device=device)
        # every key of a KeyedJaggedTensor has B rows: the history ids in the first (a sequence feature is
        # not pooled: which row holds them does not matter), then empty rows up to B
        history_lengths = torch.zeros(n, dtype=torch.int64, device=device)
        history_lengths[0] = next(iter(history.values())).numel()
        keys, values, lengths = [], [], []
        for table, (target_id, _) in SHARED.items():
            keys += [f"target_{table}", f"history_{table}"]
            values += [hash_ids(batch.ids[target_id], self.sizes.rows[table]), history[table]]
            lengths += [ones, history_lengths]
        sequence = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        single = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SINGLE), values=torch.cat([hash_ids(batch.ids[f], self.sizes.rows[f]) for f in SINGLE]),
            lengths=torch.ones(n * len(SINGLE), dtype=torch.int64, device=device))
        return sequence, single

    def forward(self, batch: Batch) -> SparseOutput:
        unsharded = type(self.sequence) is EmbeddingCollection and type(self.single) is EmbeddingBagCollection
        if unsharded and not self.training:
            return self._read_weights(batch)
        distinct, history = self.history_ids(batch)
        sequence, single = self.inputs(batch, history)
        embedded = self.sequence(sequence)  # read by key: the order of outputs may change with sharding
        pooled = self.single(single).to_dict()
        return SparseOutput(
            target=torch.stack([embedded[f"target_{t}"].values() for t in SHARED], dim=1),
            history=torch.stack([embedded[f"history_{t}"].values() for t in SHARED], dim=1),
            single=torch.cat([pooled[f] for f in SINGLE], dim=1),
            distinct=distinct,
        )

    def _read_weights(self, batch: Batch) -> SparseOutput:
        """`forward` of the unsharded modules without KeyedJaggedTensors: each id's row of its table (a bag of
        one id pools to its row), read from the tables stacked into one (kept while the weights are unchanged)."""
        return read_rows(batch, *self.stacked())

    def stacked(self) -> tuple[StackedTables, StackedTables]:
        """The shared and the single tables, each stacked into one weight (unsharded modules)."""
        return (self._stacked("shared", [self.sequence.embeddings[t].weight for t in SHARED]),
                self._stacked("single", [self.single.embedding_bags[f].weight for f in SINGLE]))

    def _stacked(self, name: str, tables: list[torch.Tensor]) -> StackedTables:
        key = tuple((w.data_ptr(), w._version) for w in tables)  # an optimizer step or a load changes it
        stacked = self._stacked_tables.get(name)
        if stacked is None or stacked.key != key:
            stacked = self._stacked_tables[name] = StackedTables(key, tables)
        return stacked


def read_rows(batch: Batch, shared: StackedTables, single: StackedTables) -> SparseOutput:
    """The batch's embedding rows from stacked tables (`SparseArch.stacked`)."""
    return SparseOutput(
        target=shared.rows([batch.ids[target_id] for target_id, _ in SHARED.values()]),
        history=shared.rows([batch.history[field] for _, field in SHARED.values()]),
        single=single.rows([batch.ids[f] for f in SINGLE]).flatten(1),
    )


class StackedTables(nn.Module):
    """Tables one after the other in one weight, so that looking up one id per table is one gather (a module:
    an exported graph holds them as its buffers)."""

    def __init__(self, key: tuple, tables: list[torch.Tensor]):
        super().__init__()
        self.key = key
        self.register_buffer("weight", torch.cat([w.detach() for w in tables]))
        self.table_rows = [w.shape[0] for w in tables]
        sizes = torch.tensor(self.table_rows, device=self.weight.device)
        self.register_buffer("sizes", sizes)
        self.register_buffer("first", torch.cumsum(sizes, 0) - sizes)

    def rows(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """One id column per table -> [n, tables, d]."""
        if torch.compiler.is_compiling():
            # a compiled graph hashes each column by its table's size as a constant: the compiler turns the
            # 64-bit remainder by a known number into multiplications (a division by a size held in memory
            # was most of the graph's per-event work); eagerly one broadcast remainder costs fewer calls
            hashed = torch.stack([hash_ids(x, n) for x, n in zip(ids, self.table_rows, strict=True)], dim=1)
        else:
            hashed = hash_ids(torch.stack(ids, dim=1), self.sizes)
        return F.embedding(hashed + self.first, self.weight)
