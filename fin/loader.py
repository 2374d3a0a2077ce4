"""The training loader: batches of one split of the offline dataset, streamed partition by partition.

Memory stays bounded by one user partition: the loader holds one partition's timelines (flat arrays)
and examples at a time, gathers each batch's histories by slicing the timelines at the examples'
`history_len` pointers (`fin.inputs.history_batch`), and cuts their fragments with the same `fragment()`
the server calls (`fin.inputs.assembled`). It reads the dataset through `features.dataset`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch

from features import contract
from features.dataset import EXAMPLES, ROW_IDS, Dataset
from features.fragments import MISSING
from features.sequences import TIMELINE_FIELDS, geohash_code
from fin.inputs import (
    CONTEXT_FEATURES,
    FRAGMENT_CONTEXT,
    STAT_FEATURES,
    STAT_KEYS,
    STAT_VALUES,
    TARGET_FEATURES,
    Batch,
    LoaderConfig,
    assembled,
    history_batch,
)


def _stats(data: Dataset, key: str) -> pl.DataFrame:
    """An entity's point-in-time statistics by (id, day), as the model reads them."""
    prefix = key.removesuffix("_id")
    table = pl.read_parquet(data.stats_source(key))
    return table.select(key, "day", *[pl.col(v).cast(pl.Float32).alias(f"{prefix}_{v}") for v in STAT_VALUES])


class ExampleStream:
    """Iterates batches of one split (train/validation/test), partition by partition: of the impressions
    (`dataset` "examples"), or of every logged ad candidate, shown or not (`dataset` "candidates", the
    validation and test splits; what revenue replay scores; unshown candidates have label 0).

    With `world` workers, every worker walks the same global batches of `config.batch_size` examples (same
    seed, same order) and builds only its own contiguous slice (`rank`), so N workers see exactly the data
    one worker would. A partition's last global batch is skipped when it has fewer examples than workers.
    """

    def __init__(self, data: str | Path, split: str, config: LoaderConfig = LoaderConfig(), rank: int = 0,
                 world: int = 1, dataset: str = EXAMPLES):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.data, self.split, self.config, self.rank, self.world = Dataset.at(data), split, config, rank, world
        self.dataset = dataset
        self.parts = self.data.parts(dataset, split)
        if not self.parts:
            raise FileNotFoundError(f"no {split} {dataset} under {self.data.root / dataset} (run fin features first)")
        self.stats = {key: _stats(self.data, key) for key in STAT_KEYS}
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
        timelines = pl.read_parquet(self.data.timeline_part(part))
        lengths = timelines["ts"].list.len().to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = {f: timelines[f].explode().to_numpy().astype(np.int64) for f in TIMELINE_FIELDS}
        users = timelines["user_id"].to_numpy()  # sorted: timelines are built in user order

        # no model input reads the oracle
        examples = pl.read_parquet(part).drop(*contract.ORACLE_COLUMNS, *contract.CANDIDATE_ORACLE_COLUMNS,
                                              strict=False).with_columns(pl.col("label").fill_null(0))
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
        # Examples with the same user, history pointer, time and place are one request (the candidates of one
        # logged request, the impressions of one page). Unshuffled (evaluation, validation), a request's
        # examples are neighbours in the file and share one history and one set of fragments, as the server's
        # candidates do (`requests_batch`), pointing at it with `request_of`: about 30 times less history work
        # for logged candidates. Shuffled training batches hold about one example per request, and grouping
        # their few repeats would pad every request's queries to the most repeated one's (`fin.layers.by_user`),
        # so there each example keeps its own history.
        request_of, requests = None, ex
        if not self.config.shuffle:
            keys = ex.select(pl.struct("user_id", "history_len", "ts", *FRAGMENT_CONTEXT).rank("dense")).to_series()
            request_of = keys.to_numpy().astype(np.int64) - 1
            _, first = np.unique(request_of, return_index=True)  # each request's first example
            request_of, requests = (None, ex) if first.size == ex.height else (request_of, ex[first])
        rows = np.searchsorted(users, requests["user_id"].to_numpy())
        offsets, history = history_batch(flat, starts, rows, requests["history_len"].to_numpy(),
                                         self.config.max_seq_len)
        ids = {c: torch.from_numpy(ex[c].to_numpy(writable=True)) for c in (*TARGET_FEATURES, *CONTEXT_FEATURES)}
        return assembled(
            label=torch.from_numpy(ex["label"].to_numpy().astype(np.float32)),
            ids=ids,
            stats=torch.from_numpy(ex.select(STAT_FEATURES).to_numpy().astype(np.float32)),
            ts=torch.from_numpy(requests["ts"].to_numpy(writable=True)),
            request_context={c: torch.from_numpy(requests[c].to_numpy(writable=True)) for c in FRAGMENT_CONTEXT},
            history_offsets=offsets, history=history, config=self.config,
            row_id=torch.from_numpy(ex[ROW_IDS[self.dataset]].to_numpy(writable=True)),
            request_of=None if request_of is None else torch.from_numpy(request_of),
        )


