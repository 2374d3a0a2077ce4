"""`fragment()`: FIN's spatial-temporal sub-sequences of a user's timeline, for a batch of requests.

One pure, vectorised torch function used by both the training data loader and the server, so train and
serve cannot cut sub-sequences differently. It works on any device.

Input: a jagged batch of histories (the user's timeline events, oldest first, with flat `values` per
field and `offsets`), and one request context per history. Output: for each sub-sequence, flat indices
into the history's values plus a length per request (KeyedJaggedTensor-ready: gather any field with
`values[field][index]`).

Sub-sequences (docs/design.md, "Fragments"; the exact rules are our reconstruction, not the paper's text):
    full        every event before the request, the most recent `full_len`
    recent      the most recent `recent_len` events before the request
    location    events at the request's place: same geohash6 cell, or (optional) one of its 8
                neighbours, or (optional) the same AOI when both are known; the most recent `location_len`
    meal        events in the request's meal slot (time_type); the most recent `meal_len`
    integrated  the union of the location and meal sub-sequences, each event tagged with its set
                membership (TAG_BOTH, TAG_LOCATION_ONLY, TAG_MEAL_ONLY); the most recent `integrated_len`
Only events strictly before the request time are ever used. Every sub-sequence keeps time order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from features import geohash
from features.contract import MISSING

# Fields of a history that fragment() reads, and of a request context.
HISTORY_FIELDS = ("ts", "place_geohash6", "aoi_id", "time_type")
CONTEXT_FIELDS = ("ts", "geohash6", "aoi_id", "time_type")
GEOHASH_PRECISION = 6

TAG_BOTH, TAG_LOCATION_ONLY, TAG_MEAL_ONLY = 1, 2, 3  # 0 is left for padding
FRAGMENTS = ("full", "recent", "location", "meal", "integrated")


@dataclass(frozen=True)
class FragmentConfig:
    full_len: int = 1000
    recent_len: int = 50
    location_len: int = 200
    meal_len: int = 200
    integrated_len: int = 100
    neighbour_cells: bool = True
    match_aoi: bool = True

    def cap(self, name: str) -> int:
        return getattr(self, f"{name}_len")


@dataclass
class Fragment:
    index: torch.Tensor  # flat int64 indices into the history values, grouped by request, oldest first
    lengths: torch.Tensor  # int64 per request
    tags: torch.Tensor | None = None  # integrated only: set-membership tag per index

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def padded(self, requests: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fragment per request, oldest first and left-aligned: positions into `index` (and `tags`)
        [U, L] and which of them are real [U, L]. A padding slot repeats a real position, so a model gathers
        its rows in one pass with no bounds care and masks them (attention gives them zero weight and zero
        gradient): no second, zero-filled copy of the gathered rows. With `requests` (int64 [R]), only those
        requests' rows [R, L], padded to the longest of them."""
        lengths = self.lengths
        if lengths.numel() == 1 and requests is None:  # one request (a served one): nothing to pad
            n = self.index.numel()
            pos = torch.arange(n, device=lengths.device)[None]
            return pos, torch.ones(1, n, dtype=torch.bool, device=lengths.device)
        first = torch.cumsum(lengths, 0) - lengths
        if requests is not None:
            lengths, first = lengths[requests], first[requests]
        width = int(lengths.max()) if lengths.numel() else 0
        col = torch.arange(width, device=lengths.device)
        mask = col[None, :] < lengths[:, None]
        return (first[:, None] + col[None, :]).clamp(max=max(self.index.numel() - 1, 0)), mask


def keep_last(mask: torch.Tensor, cap: int) -> torch.Tensor:
    """Within each row, keep the last `cap` True entries of `mask`: those at which more than
    `total - cap` True entries have been seen (one forward count; no flipped copies)."""
    # no row can have more (the full fragment of a history no longer than its cap); an exported graph, whose
    # history length is symbolic, takes the general form, which gives the same mask
    if not torch.compiler.is_compiling() and cap >= mask.shape[1]:
        return mask
    seen = torch.cumsum(mask, 1)
    return mask & (seen > seen[:, -1:] - cap)


def _neighbour_codes(cells: torch.Tensor) -> torch.Tensor:
    """The 8 neighbour cells of each cell. On the CPU through numpy: a few dozen integer operations on a
    handful of values, which cost numpy a third of what they cost torch (0.14 against 0.41 ms a request);
    for one cell (a served request) in plain Python, a few microseconds."""
    if cells.device.type == "cpu" and not torch.compiler.is_compiling():  # a graph being exported: torch
        if cells.numel() == 1:
            return torch.tensor([geohash.neighbour_codes_of(int(cells), GEOHASH_PRECISION)])
        return torch.from_numpy(geohash.neighbour_codes(cells.numpy(), GEOHASH_PRECISION))
    return geohash.neighbour_codes(cells, GEOHASH_PRECISION)


def fragment(offsets: torch.Tensor, history: dict[str, torch.Tensor], context: dict[str, torch.Tensor],
             config: FragmentConfig = FragmentConfig()) -> dict[str, Fragment]:
    """Cut every FIN sub-sequence for a batch of requests whose histories lie one after the other.

    offsets: int64 [B+1], request b's history is values[offsets[b]:offsets[b+1]], oldest first.
    history: HISTORY_FIELDS -> int64 [offsets[-1]] (geohash as `geohash.to_codes` codes, MISSING if unknown).
    context: CONTEXT_FIELDS -> int64 [B].
    """
    return fragment_windows(offsets[:-1], offsets[1:], history, context, config)


def fragment_windows(starts: torch.Tensor, ends: torch.Tensor, history: dict[str, torch.Tensor],
                     context: dict[str, torch.Tensor], config: FragmentConfig = FragmentConfig()) -> dict[str, Fragment]:
    """`fragment()` for histories that are windows of shared timelines: request b's history is
    values[starts[b]:ends[b]], oldest first, and windows may overlap (the requests of one user read one
    slice of its timeline, each up to its own time). The indices point into the shared values.

    The rules run over the windows' events laid end to end (`_Flat`), not over a [B, longest] grid: a
    training batch's windows run from a few events to 1,000 (about 400 on average), and a grid would be
    mostly padding."""
    missing = [f for f in HISTORY_FIELDS if f not in history] + [f"context.{f}" for f in CONTEXT_FIELDS if f not in context]
    if missing:
        raise ValueError(f"fragment() needs {', '.join(missing)}")
    lengths = ends - starts
    if lengths.numel() == 1:  # one request (a served one): its events are one slice, nothing to lay out
        start, width = int(starts[0]), int(lengths[0])
        pos = torch.arange(start, start + width, device=starts.device)[None]
        layout: _Row | _Flat = _Row()

        def field(name: str) -> torch.Tensor:
            return history[name][start:start + width][None]
    else:
        layout = _Flat(lengths)
        pos = layout.events(starts)

        def field(name: str) -> torch.Tensor:  # index_select: about 3x faster than history[name][pos] on CPU
            return history[name].index_select(0, pos)

    before = field("ts") < layout.of_request(context["ts"])
    keep, tags = _keep(field, before, context, config, layout)
    out = {}
    for name in FRAGMENTS:
        k = keep[name]
        out[name] = Fragment(index=pos.masked_select(k), lengths=layout.counts(k),  # masked_select: ~2x pos[k]
                             tags=tags.masked_select(k) if name == "integrated" else None)
    return out


class _Row:
    """One request's events as a row [1, W]: what `_keep` needs of a layout of the events."""

    def of_request(self, values: torch.Tensor) -> torch.Tensor:
        """Per-request values [B] -> broadcast against the events."""
        return values[:, None]

    def row(self, like: torch.Tensor) -> torch.Tensor:
        """Each event's request (its index)."""
        return like.new_zeros(1, 1)

    def keep_last(self, mask: torch.Tensor, cap: int) -> torch.Tensor:
        return keep_last(mask, cap)

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Per request, how many events `mask` holds."""
        return mask.sum(1)


class _Flat:
    """Events of B requests laid end to end ([E], request b's `lengths[b]` events after request b - 1's)."""

    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths
        self.offsets = torch.cumsum(lengths, 0) - lengths
        self.total = int(lengths.sum())
        self.requests = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                                output_size=self.total)

    def events(self, starts: torch.Tensor) -> torch.Tensor:
        """The positions of the requests' events among values whose request b starts at `starts[b]`."""
        return torch.repeat_interleave(starts - self.offsets, self.lengths, output_size=self.total) + \
            torch.arange(self.total, device=starts.device)

    def of_request(self, values: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, self.requests)

    def row(self, like: torch.Tensor) -> torch.Tensor:
        return self.requests

    def keep_last(self, mask: torch.Tensor, cap: int) -> torch.Tensor:
        """`keep_last` per request: the events at which more than the request's total - `cap` kept events
        have been seen."""
        if not self.total or cap >= int(self.lengths.max()):
            return mask
        seen = torch.cumsum(mask, 0)
        before = torch.cat([seen.new_zeros(1), seen])  # before[i]: kept events before event i
        first = before.index_select(0, self.offsets)  # kept before each request's first event
        total = before.index_select(0, self.offsets + self.lengths) - first
        return mask & (seen > self.of_request(first + total - cap))

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        before = torch.cat([mask.new_zeros(1, dtype=torch.int64), torch.cumsum(mask, 0)])
        return before.index_select(0, self.offsets + self.lengths) - before.index_select(0, self.offsets)


@dataclass
class Slots:
    """A fragment of one request at a fixed width K (its cap): positions into the history [1, K], which
    slots are real [1, K] (the kept events, oldest first, right-aligned), and (integrated) the set tags
    [1, K]. A padding slot points at event 0, so a reader gathers without bounds care and masks it."""

    index: torch.Tensor
    mask: torch.Tensor
    tags: torch.Tensor | None = None


def fragment_slots(history: dict[str, torch.Tensor], context: dict[str, torch.Tensor], max_len: int,
                   config: FragmentConfig = FragmentConfig()) -> dict[str, Slots]:
    """`fragment()` of one request, in shapes that do not depend on the data: the form an exported graph
    (`torch.export`, whose history length is symbolic) can cut inside itself. The same rules (`_keep`); the
    kept events are placed by counting (a cumulative sum and one scatter) instead of compacted, so each
    fragment has a width fixed by its cap (at most `max_len`, the longest history given).

    history: HISTORY_FIELDS -> int64 [N] (N >= 1), oldest first; context: CONTEXT_FIELDS -> int64 [1]."""
    def field(name: str) -> torch.Tensor:
        return history[name][None]

    before = field("ts") < context["ts"][:, None]
    keep, tag_grid = _keep(field, before, context, config, _Row())
    events = torch.arange(before.shape[1], device=before.device)[None]
    out = {}
    for name in FRAGMENTS:
        width = min(config.cap(name), max_len)  # >= the kept events: `_keep` keeps at most the cap
        seen = torch.cumsum(keep[name], 1)  # [1, N]: kept events up to each one
        total = seen[:, -1:]
        # right-aligned: the newest kept event in the last slot; events not kept go to a spare slot, dropped
        slot = torch.where(keep[name], seen - total + width - 1, width)
        pos = events.new_zeros(1, width + 1).scatter_(1, slot, events)[:, :width]
        mask = torch.arange(width, device=before.device)[None] >= width - total
        out[name] = Slots(index=pos, mask=mask, tags=tag_grid.gather(1, pos) if name == "integrated" else None)
    return out


def _keep(field, before: torch.Tensor, context: dict[str, torch.Tensor], config: FragmentConfig,
          layout: _Row | _Flat) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The rules of the sub-sequences: which events of each request's history each fragment keeps (masks over
    the events of a `layout`, whose fields `field(name)` gives; `before`: its real events strictly before the
    request), and the integrated set tag of every event."""
    cell = field("place_geohash6")
    request_cell = context["geohash6"]
    at_place = (cell == layout.of_request(request_cell)) & (layout.of_request(request_cell) != MISSING)
    if config.neighbour_cells:
        ring = _neighbour_codes(request_cell.clamp(min=0))  # [B, 8]
        ring = torch.where(request_cell[:, None] == MISSING, torch.full_like(ring, MISSING), ring)
        # each event's cell searched among its request's ring: (request, cell) keys, the rings' sorted in one
        # array (codes are under 2^30, MISSING is -1): [events] work, not an [events, 8] comparison
        shift = 1 << 32
        rows = torch.arange(ring.shape[0], device=ring.device)[:, None]
        keys = torch.sort((rows * shift + ring).flatten()).values
        wanted = layout.row(cell) * shift + cell
        nearest = keys.gather(0, torch.searchsorted(keys, wanted.flatten()).clamp(max=keys.numel() - 1))
        at_place |= (nearest.view(wanted.shape) == wanted) & (cell != MISSING)
    if config.match_aoi:
        aoi = field("aoi_id")
        at_place |= (aoi == layout.of_request(context["aoi_id"])) & (aoi != MISSING)
    in_slot = field("time_type") == layout.of_request(context["time_type"])

    keep = {
        "full": layout.keep_last(before, config.full_len),
        "recent": layout.keep_last(before, config.recent_len),
        "location": layout.keep_last(before & at_place, config.location_len),
        "meal": layout.keep_last(before & in_slot, config.meal_len),
    }
    union = keep["location"] | keep["meal"]
    keep["integrated"] = layout.keep_last(union, config.integrated_len)
    tags = torch.where(keep["location"] & keep["meal"], TAG_BOTH,
                       torch.where(keep["location"], TAG_LOCATION_ONLY, TAG_MEAL_ONLY))
    return keep, tags
