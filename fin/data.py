"""Training batches streamed from the features job's output, cut into FIN fragments by the shared `fragment()`.

Memory stays bounded by one user partition: the loader holds one partition's timelines (flat arrays)
and examples at a time, gathers each batch's histories by slicing the timelines at the examples'
`history_len` pointers (`history_batch`), and calls `features.fragments.fragment`,
the same function the server calls, so train and serve cut sub-sequences identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import polars as pl
import torch

from features import contract
from features.aggregates import WINDOWS
from features.fragments import MISSING, Fragment, FragmentConfig, fragment
from features.sequences import TIMELINE_FIELDS, geohash_code

# Per-example inputs a model may read: the candidate, the request context, point-in-time statistics.
TARGET_FEATURES = ("item_id", "shop_id", "category_1_id", "brand_id")
CONTEXT_FEATURES = ("geohash6", "aoi_id", "city_id", "time_type", "weekdays", "hours")
STAT_KEYS = ("item", "shop")
STAT_VALUES = tuple(f"{m}_{w}d" for w in WINDOWS for m in ("impressions", "ctr"))  # per key, as the stats views
STAT_FEATURES = tuple(f"{key}_{value}" for key in STAT_KEYS for value in STAT_VALUES)
FRAGMENT_CONTEXT = ("geohash6", "aoi_id", "time_type")  # what `fragment()` reads of the request besides its time


def history_batch(timelines: dict[str, np.ndarray], timeline_offsets: np.ndarray, rows: np.ndarray,
                  history_len: np.ndarray, max_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gather a jagged batch of histories: for example i, the `max_len` events before position
    `history_len[i]` of timeline `rows[i]`. `timelines` holds each field's flat values over all users,
    `timeline_offsets` where each user's timeline starts (length users + 1)."""
    end = timeline_offsets[rows] + history_len
    start = np.maximum(end - max_len, timeline_offsets[rows])
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    values = {f: torch.from_numpy(np.ascontiguousarray(v[flat])) for f, v in timelines.items()}
    return torch.from_numpy(offsets.astype(np.int64)), values


@dataclass(frozen=True)
class LoaderConfig:
    # Defaults tuned on the default simulator (2-core CPU budget); configs/lifelong.yaml reads 1000 events.
    batch_size: int = 512
    max_seq_len: int = 200
    fragments: FragmentConfig = field(default_factory=lambda: FragmentConfig(
        full_len=200, recent_len=50, location_len=50, meal_len=50, integrated_len=50))
    shuffle: bool = True
    seed: int = 0


@dataclass
class Batch:
    """B candidates of U requests. A request carries the user's history and its fragments once; each
    candidate points at its request (`request_of`). In training every example is its own request (U = B,
    `request_of` None); an evaluation batch of logged candidates has about 30 candidates per request, and the
    server scores many candidates of one request (U = 1)."""

    label: torch.Tensor  # float32 [B]
    ids: dict[str, torch.Tensor]  # TARGET_FEATURES and CONTEXT_FEATURES -> int64 [B] (MISSING when unknown)
    stats: torch.Tensor  # float32 [B, len(STAT_FEATURES)]
    ts: torch.Tensor  # int64 [U], request time (ms)
    history_offsets: torch.Tensor  # int64 [U+1]
    history: dict[str, torch.Tensor]  # TIMELINE_FIELDS -> int64 [N], oldest first per request
    fragments: dict[str, Fragment]  # U rows
    row_id: torch.Tensor  # int64 [B], to join predictions back: impression_id (candidate_id for candidates)
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
            history={k: move(v) for k, v in self.history.items()}, row_id=move(self.row_id),
            request_of=move(self.request_of),
            fragments={k: Fragment(move(f.index), move(f.lengths), move(f.tags)) for k, f in self.fragments.items()})


def _stats(data: Path, key: str) -> pl.DataFrame:
    prefix = key.split("_")[0]
    table = pl.read_parquet(data / "feast_sources" / f"{prefix}_stats.parquet")
    return table.select(key, "day", *[pl.col(v).cast(pl.Float32).alias(f"{prefix}_{v}") for v in STAT_VALUES])


def dataset_folder(path: str | Path) -> Path:
    """The folder holding examples/ and timelines/: `path` itself, or the `data/` inside the output folder of
    `fin features`, so either may be passed as --data."""
    path = Path(path)
    return path / "data" if not (path / "examples").is_dir() and (path / "data" / "examples").is_dir() else path


ROW_IDS = {"examples": "impression_id", "candidates": "candidate_id"}  # dataset -> the id of its rows


class ExampleStream:
    """Iterates batches of one split (train/validation/test), partition by partition: of the impressions
    (`dataset` "examples"), or of every logged ad candidate, shown or not (`dataset` "candidates", the
    validation and test splits; what revenue replay scores; unshown candidates have label 0).

    With `world` workers, every worker walks the same global batches of `config.batch_size` examples (same
    seed, same order) and builds only its own contiguous slice (`rank`), so N workers see exactly the data
    one worker would. A partition's last global batch is skipped when it has fewer examples than workers.
    """

    def __init__(self, data: str | Path, split: str, config: LoaderConfig = LoaderConfig(), rank: int = 0,
                 world: int = 1, dataset: str = "examples"):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        if dataset not in ROW_IDS:
            raise ValueError(f"dataset {dataset!r} is not one of {', '.join(ROW_IDS)}")
        self.data, self.split, self.config, self.rank, self.world = dataset_folder(data), split, config, rank, world
        self.dataset = dataset
        self.parts = sorted((self.data / dataset / split).glob("*.parquet"))
        if not self.parts:
            raise FileNotFoundError(f"no {split} {dataset} under {self.data}/{dataset} (run fin features first)")
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
        return _assembled(
            label=torch.from_numpy(ex["label"].to_numpy().astype(np.float32)),
            ids=ids,
            stats=torch.from_numpy(ex.select(STAT_FEATURES).to_numpy().astype(np.float32)),
            ts=torch.from_numpy(requests["ts"].to_numpy(writable=True)),
            request_context={c: torch.from_numpy(requests[c].to_numpy(writable=True)) for c in FRAGMENT_CONTEXT},
            history_offsets=offsets, history=history, config=self.config,
            row_id=torch.from_numpy(ex[ROW_IDS[self.dataset]].to_numpy(writable=True)),
            request_of=None if request_of is None else torch.from_numpy(request_of),
        )


@dataclass
class ScoringRequest:
    """One request to score, as the server has it after reading the user's features.

    timeline: TIMELINE_FIELDS -> one user's events, oldest first (events at or after the request time are
    ignored, as in training, which reads the events strictly before the impression).
    context: "ts" (ms) and CONTEXT_FEATURES -> int (geohash6 as a `geohash_code`, MISSING when unknown).
    candidates: TARGET_FEATURES -> int64 [B]; stats: float32 [B, len(STAT_FEATURES)] (zeros when None).
    """

    timeline: Mapping[str, np.ndarray]
    context: Mapping[str, int]
    candidates: Mapping[str, np.ndarray]
    stats: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.candidates[TARGET_FEATURES[0]])


def requests_batch(requests: Sequence[ScoringRequest], config: LoaderConfig = LoaderConfig()) -> Batch:
    """U scoring requests as one batch: each request's history and fragments once, its candidates pointing at
    it (`request_of`), in request order. Scores equal scoring each request alone (attention is masked per
    request), so a server may put the requests that wait together into one forward."""
    counts = np.array([len(r) for r in requests])
    sizes = np.array([len(r.timeline["ts"]) for r in requests])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    before = np.array([np.searchsorted(np.asarray(r.timeline["ts"]), r.context["ts"], side="left") for r in requests])
    flat = {f: np.concatenate([np.asarray(r.timeline[f], dtype=np.int64) for r in requests]) for f in TIMELINE_FIELDS}
    offsets, history = history_batch(flat, starts, np.arange(len(requests)), before, config.max_seq_len)
    request_of = torch.from_numpy(np.repeat(np.arange(len(requests)), counts))
    ids = {c: torch.from_numpy(np.concatenate([np.asarray(r.candidates[c], dtype=np.int64) for r in requests]))
           for c in TARGET_FEATURES}
    names = ("ts", *CONTEXT_FEATURES)
    by_request = np.array([[int(r.context[c]) for r in requests] for c in names], dtype=np.int64)  # [7, U]
    by_candidate = np.repeat(by_request, counts, axis=1)  # [7, B]: numpy, where tiny arrays cost least
    context = {c: torch.from_numpy(by_request[i]) for i, c in enumerate(names)}
    ids |= {c: torch.from_numpy(by_candidate[i]) for i, c in enumerate(names) if c != "ts"}
    stats = np.concatenate([np.zeros((len(r), len(STAT_FEATURES)), np.float32) if r.stats is None
                            else np.asarray(r.stats, np.float32) for r in requests])
    b = int(counts.sum())
    return _assembled(
        label=torch.zeros(b), ids=ids, stats=torch.from_numpy(stats), ts=context["ts"],
        request_context={c: context[c] for c in FRAGMENT_CONTEXT},
        history_offsets=offsets, history=history, config=config,
        row_id=torch.full((b,), -1, dtype=torch.int64), request_of=request_of)


def request_batch(timeline: Mapping[str, np.ndarray], context: Mapping[str, int],
                  candidates: Mapping[str, np.ndarray], stats: np.ndarray | None = None,
                  config: LoaderConfig = LoaderConfig()) -> Batch:
    """One scoring request as a batch (U = 1); see `ScoringRequest` for the arguments."""
    return requests_batch([ScoringRequest(timeline, context, candidates, stats)], config)


def _assembled(ts: torch.Tensor, request_context: dict[str, torch.Tensor], history_offsets: torch.Tensor,
               history: dict[str, torch.Tensor], config: LoaderConfig, **candidate_fields) -> Batch:
    """A Batch with its fragments cut by the shared `fragment()` (the one place either path calls it)."""
    fragments = fragment(history_offsets, history, {"ts": ts, **request_context}, config.fragments)
    return Batch(ts=ts, history_offsets=history_offsets, history=history, fragments=fragments, **candidate_fields)
