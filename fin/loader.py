"""The training loader: batches of one split of the offline dataset, streamed partition by partition.

Memory stays bounded by one user partition: the loader holds one partition's timelines (flat arrays)
and examples at a time, gathers each batch's histories by slicing the timelines at the examples'
`history_len` pointers (`fin.inputs.history_batch`: the examples of one user share one slice of its
timeline), and cuts their fragments with the same `fragment()` the server calls (`Batch.cut`), here or,
with `cut=False`, where the model runs. It reads the dataset through `features.dataset`.
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
from features.item_embeddings import ItemEmbeddings, embeddings_source
from features.sequences import TIMELINE_FIELDS, geohash_code
from fin.inputs import (
    CANDIDATE_NUMBERS,
    CONTEXT_FEATURES,
    FRAGMENT_CONTEXT,
    POSITION,
    STAT_FEATURES,
    STAT_KEYS,
    STAT_VALUES,
    TARGET_FEATURES,
    Batch,
    ItemImages,
    LoaderConfig,
    history_batch,
)

_IMAGE_ROW = "image_row"  # the loader's own timeline column beside TIMELINE_FIELDS: each event's creative row
_FIRST_SHOWN, _NEW_AD = "first_shown_day", "new_ad"  # the loader's own example columns (`LoaderConfig.new_ad_days`)


def _stats(data: Dataset, key: str) -> pl.DataFrame:
    """An entity's point-in-time statistics by (id, day), as the model reads them."""
    prefix = key.removesuffix("_id")
    table = pl.read_parquet(data.stats_source(key))
    return table.select(key, "day", *[pl.col(v).cast(pl.Float32).alias(f"{prefix}_{v}") for v in STAT_VALUES])


def _first_shown(parts: list[Path], new_ad_days: int) -> pl.DataFrame:
    """item_id -> the day its ad was first shown among the split's examples, for the ads first shown at least
    `new_ad_days` days into the split (the earlier ones may have been shown before the log began). Known on
    any later day: an example on day d reads nothing of days after d."""
    shown = pl.concat([pl.scan_parquet(p).select("item_id", "day") for p in parts]).collect()
    first = shown.group_by("item_id").agg(pl.col("day").min().alias(_FIRST_SHOWN))
    return first.filter(pl.col(_FIRST_SHOWN) >= shown["day"].min() + new_ad_days)


def user_chunk_order(user_id: np.ndarray, ts: np.ndarray, examples_per_user: int,
                     rng: np.random.Generator) -> np.ndarray:
    """A permutation of examples: each user's examples in time order, cut into chunks of `examples_per_user`,
    the chunks in random order across users. A batch of B examples then holds about B / examples_per_user
    users, each with a few neighbouring examples whose histories overlap in one slice of its timeline, which
    is embedded once (`fin.inputs.history_batch`)."""
    n = user_id.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    by_user = np.lexsort((np.arange(n), ts, user_id))
    user = user_id[by_user]
    new_user = np.concatenate([[True], user[1:] != user[:-1]])
    position = np.arange(n) - np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    chunk = np.cumsum(new_user | (position % examples_per_user == 0)) - 1
    rank = np.empty(int(chunk[-1]) + 1, dtype=np.int64)
    rank[rng.permutation(rank.size)] = np.arange(rank.size)
    return by_user[np.argsort(rank[chunk], kind="stable")]


class ExampleStream:
    """Iterates batches of one split (train/validation/test), partition by partition: of the impressions
    (`dataset` "examples"), or of every logged ad candidate, shown or not (`dataset` "candidates", the
    validation and test splits; what revenue replay scores; unshown candidates have label 0).

    With `world` workers, every worker walks the same global batches of `config.batch_size` examples (same
    seed, same order) and builds only its own contiguous slice (`rank`), so N workers see exactly the data
    one worker would. A partition's last global batch is skipped when it has fewer examples than workers.

    With `images`, batches carry the creative embeddings of their items (`ItemImages`), read from the
    dataset's `item_creative` source (what the embedding job wrote and the online store serves).

    `training` (default: for the train split): batches carry the training-only inputs, each example's slot
    (`Batch.position`) and whether its ad was new (`Batch.new_ad`); scoring a split, the train one too, they
    carry neither, as the server scores.
    """

    def __init__(self, data: str | Path, split: str, config: LoaderConfig = LoaderConfig(), rank: int = 0,
                 world: int = 1, dataset: str = EXAMPLES, cut: bool = True, images: bool = False,
                 training: bool | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.data, self.split, self.config, self.rank, self.world = Dataset.at(data), split, config, rank, world
        self.dataset, self.cut = dataset, cut  # cut: fragments cut here; else where the model runs (`Batch.cut`)
        self.training = split == "train" if training is None else training
        self.parts = self.data.parts(dataset, split)
        if not self.parts:
            raise FileNotFoundError(f"no {split} {dataset} under {self.data.root / dataset} (run fin features first)")
        self.stats = {key: _stats(self.data, key) for key in STAT_KEYS}
        self.first_shown = _first_shown(self.parts, config.new_ad_days) \
            if self.training and dataset == EXAMPLES and config.new_ad_days > 0 else None
        self.images = None
        if images:
            source = embeddings_source(self.data)
            if not source.exists():
                raise FileNotFoundError(f"no creative embeddings at {source} (run fin embed-creatives first)")
            self.images = ItemEmbeddings.read(source)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in self.parts)

    def __iter__(self) -> Iterator[Batch]:
        """The next epoch's batches: read and assembled here, or with `config.workers` processes ahead of the
        consumer (each reads whole partitions; their batches arrive in turn, a fixed order for a given seed,
        epoch and number of workers)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.config.workers == 0:
            return self.batches(epoch)
        return iter(torch.utils.data.DataLoader(
            _Partitions(self, epoch), batch_size=None, num_workers=self.config.workers,
            prefetch_factor=self.config.prefetch, pin_memory=self.pin_memory,
            # spawned, not forked: polars' thread pool does not survive a fork (a forked reader deadlocks)
            multiprocessing_context="spawn"))

    pin_memory = False  # set when batches go to a GPU: page-locked, so the copies can be non-blocking

    def batches(self, epoch: int, reader: int = 0, readers: int = 1) -> Iterator[Batch]:
        """An epoch's batches of the partitions this `reader` of `readers` reads (every `readers`-th of the
        epoch's partition order). Each partition's order depends on (seed, epoch, partition) alone."""
        order = (np.random.default_rng([self.config.seed, epoch]).permutation(len(self.parts))
                 if self.config.shuffle else np.arange(len(self.parts)))
        for i in order[reader::readers]:
            yield from self._partition(self.parts[i], np.random.default_rng([self.config.seed, epoch, int(i)]))

    def _partition(self, part: Path, rng: np.random.Generator) -> Iterator[Batch]:
        timelines = pl.read_parquet(self.data.timeline_part(part))
        lengths = timelines["ts"].list.len().to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = {f: timelines[f].explode().to_numpy().astype(np.int64) for f in TIMELINE_FIELDS}
        if self.images is not None:  # each event's creative row, looked up once per partition, not per batch
            flat[_IMAGE_ROW] = self.images.rows(flat["item_id"])
        users = timelines["user_id"].to_numpy()  # sorted: timelines are built in user order

        # no model input reads the oracle
        examples = pl.read_parquet(part).drop(*contract.ORACLE_COLUMNS, *contract.CANDIDATE_ORACLE_COLUMNS,
                                              strict=False)
        order = self._order(examples, rng)
        batches = [rows for rows in np.split(order, np.arange(self.config.batch_size, order.size, self.config.batch_size))
                   if rows.size >= self.world]
        # this worker's slice of every batch, in batch order: only its own rows are joined and converted
        own = [np.array_split(rows, self.world)[self.rank] for rows in batches]
        examples = self._model_columns(examples[np.concatenate(own)] if own else examples.clear())
        lo = 0
        for rows, mine in zip(batches, own):
            batch = self._batch(examples.slice(lo, mine.size), flat, starts, users)
            batch.global_size = rows.size
            lo += mine.size
            yield batch

    def _model_columns(self, examples: pl.DataFrame) -> pl.DataFrame:
        """Examples as the model reads them: point-in-time statistics joined, ids and numbers filled, and (in
        training) new ads marked."""
        examples = examples.with_columns(pl.col("label").fill_null(0))
        for key, stats in self.stats.items():
            examples = examples.join(stats, on=[key, "day"], how="left", maintain_order="left")
        examples = examples.with_columns(
            geohash_code(pl.col("geohash_6")).fill_null(MISSING).alias("geohash6"),
            *[pl.col(c).fill_null(MISSING).cast(pl.Int64) for c in (*TARGET_FEATURES, "user_id", "aoi_id", "city_id",
                                                                    "time_type", "weekdays", "hours", POSITION)],
            *[pl.col(c).fill_null(0.0) for c in STAT_FEATURES],
            *[pl.col(c).fill_null(0.0).cast(pl.Float32) for c in CANDIDATE_NUMBERS],
        )
        if self.first_shown is not None:
            age = pl.col("day") - pl.col(_FIRST_SHOWN)
            examples = examples.join(self.first_shown, on="item_id", how="left", maintain_order="left") \
                .with_columns((age < self.config.new_ad_days).fill_null(False).alias(_NEW_AD))
        return examples

    def _order(self, examples: pl.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """The order in which a partition's examples are batched: file order unshuffled, else shuffled one by
        one (per-example path) or by user chunks (`user_chunk_order`)."""
        if not self.config.shuffle:
            return np.arange(examples.height)
        if not self.config.shared_timelines:
            return rng.permutation(examples.height)
        users = examples["user_id"].fill_null(MISSING).cast(pl.Int64).to_numpy()
        return user_chunk_order(users, examples["ts"].to_numpy(),
                                self.config.examples_per_user, rng)

    def _batch(self, ex: pl.DataFrame, flat: dict, starts: np.ndarray, users: np.ndarray) -> Batch:
        # Examples with the same user, history pointer, time and place are one request (the candidates of one
        # logged request, the impressions of one page). Unshuffled (evaluation, validation) and in batches of
        # user chunks, a request's examples are neighbours and share one history window, one set of fragments
        # and the request's side of the attention, as the server's candidates do (`requests_batch`), pointing
        # at it with `request_of`: about 30 times less of that work for logged candidates, about 5 times for
        # a user's impressions. The requests of one user share one slice of its timeline (`history_batch`).
        # Shuffled one by one (the per-example path), each example keeps its own request and history copy.
        request_of, requests = None, ex
        if not self.config.shuffle or self.config.shared_timelines:
            keys = ex.select(pl.struct("user_id", "history_len", "ts", *FRAGMENT_CONTEXT).rank("dense")).to_series()
            request_of = keys.to_numpy().astype(np.int64) - 1
            _, first = np.unique(request_of, return_index=True)  # each request's first example
            request_of, requests = (None, ex) if first.size == ex.height else (request_of, ex[first])
        rows = np.searchsorted(users, requests["user_id"].to_numpy())
        share = self.config.shared_timelines or not self.config.shuffle
        histories = history_batch(flat, starts, rows, requests["history_len"].to_numpy(), self.config.max_seq_len,
                                  share=share)
        event_images = histories.values.pop(_IMAGE_ROW, None)
        ids = {c: torch.from_numpy(ex[c].to_numpy(writable=True)) for c in (*TARGET_FEATURES, *CONTEXT_FEATURES)}
        batch = Batch(
            label=torch.from_numpy(ex["label"].to_numpy().astype(np.float32)),
            ids=ids,
            stats=torch.from_numpy(ex.select(STAT_FEATURES).to_numpy().astype(np.float32)),
            numbers=torch.from_numpy(ex.select(CANDIDATE_NUMBERS).to_numpy().astype(np.float32)),
            # the slot is a training input only: a split is scored as the server scores
            position=torch.from_numpy(ex[POSITION].to_numpy(writable=True)) if self.training else None,
            new_ad=torch.from_numpy(ex[_NEW_AD].to_numpy(writable=True)) if _NEW_AD in ex.columns else None,
            ts=torch.from_numpy(requests["ts"].to_numpy(writable=True)),
            request_context={c: torch.from_numpy(requests[c].to_numpy(writable=True)) for c in FRAGMENT_CONTEXT},
            histories=histories,
            row_id=torch.from_numpy(ex[ROW_IDS[self.dataset]].to_numpy(writable=True)),
            request_of=None if request_of is None else torch.from_numpy(request_of),
            images=None if self.images is None else ItemImages(
                torch.from_numpy(self.images.vectors), torch.from_numpy(self.images.rows(ex["item_id"].to_numpy())),
                event_images),
        )
        return batch.cut(self.config.fragments) if self.cut else batch


class _Partitions(torch.utils.data.IterableDataset):
    """An epoch of a stream for DataLoader worker processes: worker k of n reads every n-th partition."""

    def __init__(self, stream: ExampleStream, epoch: int):
        self.stream, self.epoch = stream, epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        return self.stream.batches(self.epoch, info.id if info else 0, info.num_workers if info else 1)
