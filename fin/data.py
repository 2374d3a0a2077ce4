"""Training batches streamed from the features job's output, cut into FIN fragments by the shared `fragment()`.

Memory stays bounded by one user partition: the loader holds one partition's timelines (flat arrays)
and examples at a time, gathers each batch's histories by slicing the timelines at the examples'
`history_len` pointers (`features.sequences.history_batch`), and calls `features.fragments.fragment`,
the same function the server calls, so train and serve cut sub-sequences identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from features import contract
from features.aggregates import WINDOWS
from features.fragments import MISSING, Fragment, FragmentConfig, fragment
from features.sequences import TIMELINE_FIELDS, geohash_code, history_batch

# Per-example inputs a model may read: the candidate, the request context, point-in-time statistics.
TARGET_FEATURES = ("item_id", "shop_id", "category_1_id", "brand_id")
CONTEXT_FEATURES = ("geohash6", "aoi_id", "city_id", "time_type", "weekdays", "hours")
STAT_FEATURES = tuple(f"{key}_{m}_{w}d" for key in ("item", "shop") for w in WINDOWS for m in ("impressions", "ctr"))


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 1024
    max_seq_len: int = 1000
    fragments: FragmentConfig = field(default_factory=FragmentConfig)
    shuffle: bool = True
    seed: int = 0


@dataclass
class Batch:
    """B candidates of U requests. A request carries the user's history and its fragments once; each
    candidate points at its request (`request_of`). In training every example is its own request (U = B,
    `request_of` None); the server scores many candidates of one request (U = 1)."""

    label: torch.Tensor  # float32 [B]
    ids: dict[str, torch.Tensor]  # TARGET_FEATURES and CONTEXT_FEATURES -> int64 [B] (MISSING when unknown)
    stats: torch.Tensor  # float32 [B, len(STAT_FEATURES)]
    ts: torch.Tensor  # int64 [U], request time (ms)
    history_offsets: torch.Tensor  # int64 [U+1]
    history: dict[str, torch.Tensor]  # TIMELINE_FIELDS -> int64 [N], oldest first per request
    fragments: dict[str, Fragment]  # U rows
    impression_id: torch.Tensor  # int64 [B], to join predictions back to examples
    request_of: torch.Tensor | None = None  # int64 [B]: candidate -> request; None: candidate b is request b
    global_size: int = 0  # examples in this step over all workers (this batch is one worker's slice)

    def candidate_requests(self) -> torch.Tensor:
        if self.request_of is not None:
            return self.request_of
        return torch.arange(len(self), device=self.label.device)

    def __len__(self) -> int:
        return int(self.label.numel())

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self, label=move(self.label), ids={k: move(v) for k, v in self.ids.items()}, stats=move(self.stats),
            ts=move(self.ts), history_offsets=move(self.history_offsets),
            history={k: move(v) for k, v in self.history.items()}, impression_id=move(self.impression_id),
            request_of=move(self.request_of),
            fragments={k: Fragment(move(f.index), move(f.lengths), move(f.tags)) for k, f in self.fragments.items()})


def _stats(data: Path, key: str) -> pl.DataFrame:
    prefix = key.split("_")[0]
    table = pl.read_parquet(data / "feast_sources" / f"{prefix}_stats.parquet")
    return table.select(key, "day", *[pl.col(f"{m}_{w}d").cast(pl.Float32).alias(f"{prefix}_{m}_{w}d")
                                      for w in WINDOWS for m in ("impressions", "ctr")])


class ExampleStream:
    """Iterates batches of one split (train/validation/test), partition by partition.

    With `world` workers, every worker walks the same global batches of `config.batch_size` examples (same
    seed, same order) and builds only its own contiguous slice (`rank`), so N workers see exactly the data
    one worker would. A partition's last global batch is skipped when it has fewer examples than workers.
    """

    def __init__(self, data: str | Path, split: str, config: LoaderConfig = LoaderConfig(), rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.data, self.split, self.config, self.rank, self.world = Path(data), split, config, rank, world
        self.parts = sorted((self.data / "examples" / split).glob("*.parquet"))
        if not self.parts:
            raise FileNotFoundError(f"no {split} examples under {self.data}/examples (run fin features first)")
        self.stats = {key: _stats(self.data, key) for key in ("item_id", "shop_id")}
        self.epoch = 0

    def __len__(self) -> int:
        return sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in self.parts)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.config.seed, self.epoch])
        self.epoch += 1
        parts = rng.permutation(len(self.parts)) if self.config.shuffle else range(len(self.parts))
        for i in parts:
            yield from self._partition(self.parts[i], rng)

    def _partition(self, part: Path, rng: np.random.Generator) -> Iterator[Batch]:
        timelines = pl.read_parquet(self.data / "timelines" / part.name)
        lengths = timelines["ts"].list.len().to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = {f: timelines[f].explode().to_numpy().astype(np.int64) for f in TIMELINE_FIELDS}
        users = timelines["user_id"].to_numpy()  # sorted: timelines are built in user order

        examples = pl.read_parquet(part).drop(contract.ORACLE_COLUMNS)  # no model input reads the oracle
        for key, stats in self.stats.items():
            examples = examples.join(stats, on=[key, "day"], how="left", maintain_order="left")
        examples = examples.with_columns(
            geohash_code(pl.col("geohash_6")).fill_null(MISSING).alias("geohash6"),
            *[pl.col(c).fill_null(MISSING).cast(pl.Int64) for c in (*TARGET_FEATURES, "aoi_id", "city_id",
                                                                    "time_type", "weekdays", "hours")],
            *[pl.col(c).fill_null(0.0) for c in STAT_FEATURES],
        )
        order = rng.permutation(examples.height) if self.config.shuffle else np.arange(examples.height)
        for lo in range(0, examples.height, self.config.batch_size):
            rows = order[lo:lo + self.config.batch_size]
            if rows.size < self.world:
                continue
            batch = self._batch(examples[np.array_split(rows, self.world)[self.rank]], flat, starts, users)
            batch.global_size = rows.size
            yield batch

    def _batch(self, ex: pl.DataFrame, flat: dict, starts: np.ndarray, users: np.ndarray) -> Batch:
        rows = np.searchsorted(users, ex["user_id"].to_numpy())
        offsets, history = history_batch(flat, starts, rows, ex["history_len"].to_numpy(), self.config.max_seq_len)
        ts = torch.from_numpy(ex["ts"].to_numpy(writable=True))
        ids = {c: torch.from_numpy(ex[c].to_numpy(writable=True)) for c in (*TARGET_FEATURES, *CONTEXT_FEATURES)}
        context = {"ts": ts, "geohash6": ids["geohash6"], "aoi_id": ids["aoi_id"], "time_type": ids["time_type"]}
        return Batch(
            label=torch.from_numpy(ex["label"].to_numpy().astype(np.float32)),
            ids=ids,
            stats=torch.from_numpy(ex.select(STAT_FEATURES).to_numpy().astype(np.float32)),
            ts=ts,
            history_offsets=offsets,
            history=history,
            fragments=fragment(offsets, history, context, self.config.fragments),
            impression_id=torch.from_numpy(ex["impression_id"].to_numpy(writable=True)),
        )
