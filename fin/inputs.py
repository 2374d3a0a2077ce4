"""The model's inputs: what a model reads (`Batch`), and how a batch is assembled from histories.

Both paths build batches here: the training loader (`fin.loader`) from the offline dataset, and the server
from the requests it scores (`ScoringRequest`, `requests_batch`). Each gathers its histories with
`history_batch` and cuts them with the one `features.fragments.fragment` (in `assembled`), so training
and serving cut sub-sequences identically (docs/design.md, "Fragments"). No polars here: the server
depends on the model's inputs, not on the training loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from features.dataset import STAT_COLUMNS, STATS_VIEWS
from features.fragments import Fragment, FragmentConfig, fragment
from features.sequences import TIMELINE_FIELDS

# Per-example inputs a model may read: the candidate, the request context, point-in-time statistics.
TARGET_FEATURES = ("item_id", "shop_id", "category_1_id", "brand_id")
CONTEXT_FEATURES = ("geohash6", "aoi_id", "city_id", "time_type", "weekdays", "hours")
STAT_KEYS = tuple(STATS_VIEWS)  # the entities whose statistics a candidate carries: item_id, shop_id
STAT_VALUES = tuple(c for c in STAT_COLUMNS if not c.startswith("clicks"))  # read per key: impressions and CTR
STAT_FEATURES = tuple(f"{key.removesuffix('_id')}_{value}" for key in STAT_KEYS for value in STAT_VALUES)
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
    return assembled(
        label=torch.zeros(b), ids=ids, stats=torch.from_numpy(stats), ts=context["ts"],
        request_context={c: context[c] for c in FRAGMENT_CONTEXT},
        history_offsets=offsets, history=history, config=config,
        row_id=torch.full((b,), -1, dtype=torch.int64), request_of=request_of)


def request_batch(timeline: Mapping[str, np.ndarray], context: Mapping[str, int],
                  candidates: Mapping[str, np.ndarray], stats: np.ndarray | None = None,
                  config: LoaderConfig = LoaderConfig()) -> Batch:
    """One scoring request as a batch (U = 1); see `ScoringRequest` for the arguments."""
    return requests_batch([ScoringRequest(timeline, context, candidates, stats)], config)


def assembled(ts: torch.Tensor, request_context: dict[str, torch.Tensor], history_offsets: torch.Tensor,
               history: dict[str, torch.Tensor], config: LoaderConfig, **candidate_fields) -> Batch:
    """A Batch with its fragments cut by the shared `fragment()` (the one place either path calls it)."""
    fragments = fragment(history_offsets, history, {"ts": ts, **request_context}, config.fragments)
    return Batch(ts=ts, history_offsets=history_offsets, history=history, fragments=fragments, **candidate_fields)
