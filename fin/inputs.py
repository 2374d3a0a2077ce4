"""The model's inputs: what a model reads (`Batch`), and how a batch is assembled from histories.

Both paths build batches here: the training loader (`fin.loader`) from the offline dataset, and the server
from the requests it scores (`ScoringRequest`, `requests_batch`). Each gathers its histories with
`history_batch` and cuts them with the one `features.fragments.fragment` (`Batch.cut`), so training
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
from features.fragments import Fragment, FragmentConfig, fragment_windows
from features.item_embeddings import ItemEmbeddings
from features.sequences import TIMELINE_FIELDS

# Per-example inputs a model may read: the candidate, the request context (its user among it), the candidate's
# numbers and point-in-time statistics; in training also the slot the example was shown in (`Batch.position`).
TARGET_FEATURES = ("item_id", "shop_id", "category_1_id", "brand_id")
CONTEXT_FEATURES = ("user_id", "geohash6", "aoi_id", "city_id", "time_type", "weekdays", "hours")
CANDIDATE_NUMBERS = ("price", "distance_m")  # the candidate's price, its shop's distance from the user (0: unknown)
POSITION = "position"  # the slot an impression was shown in: a training-only input (the ranker picks the slot)
STAT_KEYS = tuple(STATS_VIEWS)  # the entities whose statistics a candidate carries: item_id, shop_id
STAT_VALUES = tuple(c for c in STAT_COLUMNS if not c.startswith("clicks"))  # read per key: impressions and CTR
STAT_FEATURES = tuple(f"{key.removesuffix('_id')}_{value}" for key in STAT_KEYS for value in STAT_VALUES)
FRAGMENT_CONTEXT = ("geohash6", "aoi_id", "time_type")  # what `fragment()` reads of the request besides its time


def history_batch(timelines: dict[str, np.ndarray], timeline_offsets: np.ndarray, rows: np.ndarray,
                  history_len: np.ndarray, max_len: int, share: bool = True) -> Histories:
    """Gather the histories of a batch of requests: for request i, the `max_len` events before position
    `history_len[i]` of timeline `rows[i]`. `timelines` holds each field's flat values over all users,
    `timeline_offsets` where each user's timeline starts (length users + 1).

    With `share`, requests of one timeline whose windows overlap read one slice of it, holding once every
    event any of them reads, so a user's events are embedded once however many of its neighbouring requests
    the batch has (two far apart in time get a slice each: nothing between them is read); without, each
    request gets its own copy (the per-example path, kept to compare against)."""
    history_len = np.asarray(history_len, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    first = np.maximum(history_len - max_len, 0)  # each request's first event, within its timeline
    if share and rows.size:
        # merge overlapping windows per timeline: in (timeline, first event) order, a request opens a new slice
        # when its timeline changes or it starts after every window of the slice so far has ended
        order = np.lexsort((history_len, first, rows))
        r, f = rows[order], first[order]
        base = r * (int(history_len.max()) + 1)  # keeps the running maximum within one timeline
        reach = np.maximum.accumulate(base + history_len[order]) - base
        opens = np.concatenate([[True], (r[1:] != r[:-1]) | (f[1:] > reach[:-1])])
        slot = np.empty(rows.size, dtype=np.int64)
        slot[order] = np.cumsum(opens) - 1
        users = r[opens]
        lo = f[opens]  # the first request of a slice starts it
        hi = np.zeros(users.size, dtype=np.int64)
        np.maximum.at(hi, slot, history_len)
    else:
        users, slot, lo, hi = rows, np.arange(rows.size), first, history_len
    lengths = hi - lo
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.repeat(timeline_offsets[users] + lo - offsets[:-1], lengths) + np.arange(offsets[-1])
    start = offsets[slot] + first - lo[slot]
    return Histories(offsets=torch.from_numpy(offsets),
                     values={f: torch.from_numpy(np.ascontiguousarray(v[flat])) for f, v in timelines.items()},
                     start=torch.from_numpy(start), end=torch.from_numpy(start + history_len - first))


@dataclass
class Histories:
    """The history events of a batch: S timeline slices one after the other (the rows the sparse side
    embeds), and each request's window into them, oldest first: request u reads
    values[f][start[u]:end[u]]. Windows of one user's requests overlap in its slice."""

    offsets: torch.Tensor  # int64 [S+1]
    values: dict[str, torch.Tensor]  # TIMELINE_FIELDS -> int64 [N]
    start: torch.Tensor  # int64 [U]
    end: torch.Tensor  # int64 [U]


@dataclass
class ItemImages:
    """The image modality of a batch: creative embeddings of its items in one table, row 0 all zeros (an item
    without one), and the row of each candidate and of each history event (`Histories.values` order)."""

    table: torch.Tensor  # float32 [K, E]
    candidate: torch.Tensor  # int64 [B]
    history: torch.Tensor  # int64 [N]

    @classmethod
    def of(cls, embeddings: ItemEmbeddings, candidate_items: np.ndarray, history_items: np.ndarray) -> ItemImages:
        return cls(torch.from_numpy(embeddings.vectors), torch.from_numpy(embeddings.rows(candidate_items)),
                   torch.from_numpy(embeddings.rows(history_items)))


@dataclass(frozen=True)
class LoaderConfig:
    # Lifelong by default: the last 1,000 events before each request (the paper's setting);
    # configs/history200.yaml is the earlier 200-event setting
    # A step of FIN costs ~50 ms on a CPU whatever its size (thousands of small operations) besides ~60 ms per
    # 512 examples, so batches of 2,048 train 1.3-1.6x the examples/s; configs/batch2048.yaml: as good a model
    # where an epoch is hundreds of such steps (the demo's world), 0.013 AUC worse on a 35-day world (65
    # steps an epoch), so 512 stays the default (benchmarks/README.md, "Batch size")
    batch_size: int = 512
    max_seq_len: int = 1000
    fragments: FragmentConfig = field(default_factory=lambda: FragmentConfig(
        full_len=1000, recent_len=50, location_len=200, meal_len=200, integrated_len=100))
    shuffle: bool = True
    seed: int = 0
    # Shuffled batches are made of chunks of `examples_per_user` consecutive examples of one user (chunks
    # shuffled across users), whose histories share one slice of the user's timeline; False: the
    # per-example path (examples shuffled one by one, each with its own copy of its history). Chunks of 2:
    # over a whole epoch, chunks of 4 trained a worse model than examples shuffled one by one on the
    # default world (benchmarks/README.md, "Training and inference")
    shared_timelines: bool = True
    examples_per_user: int = 2
    workers: int = 0  # processes reading and assembling batches ahead of the step (0: in the training process)
    prefetch: int = 4  # batches each of them keeps ready
    # Training: an example whose ad was first shown under this many days before it is marked a new ad
    # (`Batch.new_ad`; 0: none), and the model reads it without its ids, as it will read an ad first shown
    # after training. Ads first shown in the split's first `new_ad_days` days are not marked: they may be
    # older than the log
    new_ad_days: int = 7

    def __post_init__(self):
        small = [f"{name} must be at least {least}" for name, least in
                 (("batch_size", 1), ("examples_per_user", 1), ("prefetch", 1), ("max_seq_len", 0), ("workers", 0),
                  ("new_ad_days", 0)) if getattr(self, name) < least]
        if small:
            raise ValueError("; ".join(small))


@dataclass
class Batch:
    """B candidates of U requests. A request has its time, place and history window (into the batch's shared
    history slices) and its fragments; each candidate points at its request (`request_of`). A training
    batch of user chunks holds about 1.7 examples per request (the impressions of one page are one request),
    the requests of one user sharing its timeline slice; shuffled one by one (the per-example path), every
    example is its own request (U = B, `request_of` None); an evaluation batch of logged candidates has about 30 candidates per request, and the
    server scores many candidates of one request (U = 1)."""

    label: torch.Tensor  # float32 [B]
    ids: dict[str, torch.Tensor]  # TARGET_FEATURES and CONTEXT_FEATURES -> int64 [B] (MISSING when unknown)
    stats: torch.Tensor  # float32 [B, len(STAT_FEATURES)]
    numbers: torch.Tensor  # float32 [B, len(CANDIDATE_NUMBERS)]
    ts: torch.Tensor  # int64 [U], request time (ms)
    request_context: dict[str, torch.Tensor]  # FRAGMENT_CONTEXT -> int64 [U]
    histories: Histories
    row_id: torch.Tensor  # int64 [B], to join predictions back: impression_id (candidate_id for candidates)
    request_of: torch.Tensor | None = None  # int64 [B]: candidate -> request; None: candidate b is request b
    fragments: dict[str, Fragment] | None = None  # U rows; None until cut (`cut`)
    global_size: int = 0  # examples in this step over all workers (this batch is one worker's slice)
    # int64 [B]: the slot each training example was shown in (None when scoring: the score must not depend
    # on a slot the ranking has yet to choose)
    position: torch.Tensor | None = None
    # bool [B]: training examples of an ad first shown under `LoaderConfig.new_ad_days` days before (None: none
    # marked, as when scoring)
    new_ad: torch.Tensor | None = None
    images: ItemImages | None = None  # the creative embeddings of its items (models with an image modality)

    @property
    def history(self) -> dict[str, torch.Tensor]:
        return self.histories.values

    def candidate_requests(self) -> torch.Tensor:
        if self.request_of is not None:
            return self.request_of
        return torch.arange(len(self), device=self.label.device)

    def __len__(self) -> int:
        return int(self.label.numel())

    def cut(self, config: FragmentConfig) -> Batch:
        """The batch with its fragments, cut by the one `fragment()` on the batch's device (no-op when cut)."""
        if self.fragments is not None:
            return self
        h = self.histories
        fragments = fragment_windows(h.start, h.end, h.values, {"ts": self.ts, **self.request_context}, config)
        return dataclasses.replace(self, fragments=fragments)

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (what a DataLoader does before batches go to a GPU)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, fn) -> Batch:
        move = lambda t: None if t is None else fn(t)  # noqa: E731
        h = self.histories
        return dataclasses.replace(
            self, label=move(self.label), ids={k: move(v) for k, v in self.ids.items()}, stats=move(self.stats),
            numbers=move(self.numbers), position=move(self.position), new_ad=move(self.new_ad), ts=move(self.ts),
            request_context={k: move(v) for k, v in self.request_context.items()},
            histories=Histories(move(h.offsets), {k: move(v) for k, v in h.values.items()}, move(h.start),
                                move(h.end)),
            row_id=move(self.row_id), request_of=move(self.request_of),
            images=None if self.images is None else ItemImages(*map(move, dataclasses.astuple(self.images))),
            fragments=None if self.fragments is None else
            {k: Fragment(move(f.stored_index), move(f.lengths), move(f.tags), move(f.first)) for k, f in self.fragments.items()})


@dataclass
class ScoringRequest:
    """One request to score, as the server has it after reading the user's features.

    timeline: TIMELINE_FIELDS -> one user's events, oldest first (events at or after the request time are
    ignored, as in training, which reads the events strictly before the impression).
    context: "ts" (ms) and CONTEXT_FEATURES -> int (geohash6 as a `geohash_code`, MISSING when unknown).
    candidates: TARGET_FEATURES -> int64 [B], and CANDIDATE_NUMBERS -> float [B] (each 0 when left out);
    stats: float32 [B, len(STAT_FEATURES)] (zeros when None);
    images: the creative embeddings of its items, candidates' and events' (None: none known).
    """

    timeline: Mapping[str, np.ndarray]
    context: Mapping[str, int]
    candidates: Mapping[str, np.ndarray]
    stats: np.ndarray | None = None
    images: ItemEmbeddings | None = None

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
    histories = history_batch(flat, starts, np.arange(len(requests)), before, config.max_seq_len, share=False)
    request_of = torch.from_numpy(np.repeat(np.arange(len(requests)), counts))
    ids = {c: torch.from_numpy(np.concatenate([np.asarray(r.candidates[c], dtype=np.int64) for r in requests]))
           for c in TARGET_FEATURES}
    names = ("ts", *CONTEXT_FEATURES)
    by_request = np.array([[int(r.context[c]) for r in requests] for c in names], dtype=np.int64)  # [names, U]
    by_candidate = np.repeat(by_request, counts, axis=1)  # [names, B]: numpy, where tiny arrays cost least
    context = {c: torch.from_numpy(by_request[i]) for i, c in enumerate(names)}
    ids |= {c: torch.from_numpy(by_candidate[i]) for i, c in enumerate(names) if c != "ts"}
    stats = np.concatenate([np.zeros((len(r), len(STAT_FEATURES)), np.float32) if r.stats is None
                            else np.asarray(r.stats, np.float32) for r in requests])
    numbers = np.concatenate([np.stack([np.asarray(r.candidates[c], np.float32) if c in r.candidates
                                        else np.zeros(len(r), np.float32) for c in CANDIDATE_NUMBERS], axis=1)
                              for r in requests])
    b = int(counts.sum())
    batch = Batch(label=torch.zeros(b), ids=ids, stats=torch.from_numpy(stats), numbers=torch.from_numpy(numbers),
                  ts=context["ts"], request_context={c: context[c] for c in FRAGMENT_CONTEXT}, histories=histories,
                  row_id=torch.full((b,), -1, dtype=torch.int64), request_of=request_of,
                  images=_request_images(requests, histories))
    return batch.cut(config.fragments)


def _request_images(requests: Sequence[ScoringRequest], histories: Histories) -> ItemImages | None:
    """The requests' embeddings in one table (row 0 shared: no embedding), each request's rows offset to its
    own (the histories of `requests_batch` are one slice per request, in request order)."""
    if all(r.images is None for r in requests):
        return None
    dim = next(r.images.dim for r in requests if r.images is not None)
    tables = [ItemEmbeddings.of(np.zeros(0, np.int64), np.zeros((0, dim), np.float32)) if r.images is None
              else r.images for r in requests]
    offsets = np.concatenate([[0], np.cumsum([len(t.ids) for t in tables])])
    history_items = histories.values["item_id"].numpy()
    bounds = histories.offsets.numpy()

    def rows(u: int, items: np.ndarray) -> np.ndarray:
        found = tables[u].rows(items)
        return np.where(found > 0, found + offsets[u], 0)

    candidate = np.concatenate([rows(u, np.asarray(r.candidates["item_id"])) for u, r in enumerate(requests)])
    history = np.concatenate([rows(u, history_items[bounds[u]:bounds[u + 1]]) for u in range(len(requests))])
    table = np.concatenate([tables[0].vectors[:1], *(t.vectors[1:] for t in tables)])
    return ItemImages(torch.from_numpy(table), torch.from_numpy(candidate), torch.from_numpy(history))


def request_batch(timeline: Mapping[str, np.ndarray], context: Mapping[str, int],
                  candidates: Mapping[str, np.ndarray], stats: np.ndarray | None = None,
                  config: LoaderConfig = LoaderConfig(), images: ItemEmbeddings | None = None) -> Batch:
    """One scoring request as a batch (U = 1); see `ScoringRequest` for the arguments."""
    return requests_batch([ScoringRequest(timeline, context, candidates, stats, images)], config)


def scoring_requests(batch: Batch, limit: int | None = None) -> list[ScoringRequest]:
    """The requests of a batch as a server receives them (the inverse of `requests_batch`): each request's
    history window as its user's timeline, its context, its candidates with their numbers and statistics.
    The first `limit` requests (all when None)."""
    request_of = batch.candidate_requests().numpy()
    h = batch.histories
    out = []
    for u in range(int(h.start.numel()) if limit is None else min(limit, int(h.start.numel()))):
        rows = np.flatnonzero(request_of == u)
        if rows.size == 0:
            continue
        start, end = int(h.start[u]), int(h.end[u])
        first = int(rows[0])
        context = {"ts": int(batch.ts[u]), **{c: int(batch.ids[c][first]) for c in CONTEXT_FEATURES}}
        candidates = ({c: batch.ids[c].numpy()[rows] for c in TARGET_FEATURES}
                      | {c: batch.numbers.numpy()[rows, i] for i, c in enumerate(CANDIDATE_NUMBERS)})
        images = None
        if batch.images is not None:  # the embeddings of the request's items, as the server reads them
            table = batch.images.table.numpy()
            cand, hist = batch.images.candidate.numpy()[rows], batch.images.history.numpy()[start:end]
            items = np.concatenate([candidates["item_id"], h.values["item_id"].numpy()[start:end]])
            index = np.concatenate([cand, hist])
            images = ItemEmbeddings.of(items[index > 0], table[index[index > 0]])
        out.append(ScoringRequest(timeline={f: v.numpy()[start:end] for f, v in h.values.items()}, context=context,
                                  candidates=candidates, stats=batch.stats.numpy()[rows], images=images))
    return out
