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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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


class Fragment:
    """A sub-sequence of every request of a batch: `index`, flat int64 positions into the history values,
    grouped by request, oldest first; `lengths`, int64 per request; `tags` (integrated only), each position's
    set-membership tag; `first`, where each request's events are one run of positions (full and recent, cut
    from many windows), its first position. A fragment of runs may be given without `index`: it is spelled
    out when first read, so that a reader of runs (a model attending over the full fragment as windows of
    shared slices, `fin.models.layout.SliceWindows`) never builds a training batch's million positions."""

    def __init__(self, index: torch.Tensor | None, lengths: torch.Tensor, tags: torch.Tensor | None = None,
                 first: torch.Tensor | None = None):
        if index is None and first is None:
            raise ValueError("a fragment needs its index or, for runs, each request's first position")
        self.stored_index, self.lengths, self.tags, self.first = index, lengths, tags, first

    @property
    def index(self) -> torch.Tensor:
        if self.stored_index is None:
            self.stored_index = runs(self.first, self.lengths)
        return self.stored_index

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

    One request (a served one) is cut as a row by the rules' masks (`_keep`). Many are cut by `_Windows`,
    whose work follows the slices' events, not the windows': a training batch's ~1,200 windows of ~800
    events each lie in ~80,000 slice events, and a user's requests ask of them only a few places and meal
    slots."""
    missing = [f for f in HISTORY_FIELDS if f not in history] + [f"context.{f}" for f in CONTEXT_FIELDS if f not in context]
    if missing:
        raise ValueError(f"fragment() needs {', '.join(missing)}")
    if starts.numel() == 0:
        empty = starts.new_zeros(0)
        return {name: Fragment(empty, empty, empty if name == "integrated" else None) for name in FRAGMENTS}
    if starts.numel() > 1:
        return _Windows(starts, ends, history, context).cut(config)
    start, width = int(starts[0]), int(ends[0] - starts[0])
    pos = torch.arange(start, start + width, device=starts.device)[None]

    def field(name: str) -> torch.Tensor:
        return history[name][start:start + width][None]

    before = field("ts") < context["ts"][:, None]
    keep, tags = _keep(field, before, context, config)
    return {name: Fragment(index=pos.masked_select(keep[name]), lengths=keep[name].sum(1),
                           tags=tags.masked_select(keep[name]) if name == "integrated" else None)
            for name in FRAGMENTS}


def runs(first: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """first[i], first[i] + 1, ..., first[i] + lengths[i] - 1 for every i, one run after another (the flat
    positions of jagged rows that each hold a contiguous run)."""
    total = int(lengths.sum()) if lengths.numel() else 0
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(first - offsets, lengths, output_size=total) + \
        torch.arange(total, device=first.device)


class _Windows:
    """The rules over many windows, by ranges of events instead of masks over every window's events.

    Histories are oldest first, so a window's events before its request are a prefix (its length found by
    a binary search), and `full` and `recent` are the last events of that prefix. For `location` and `meal`,
    the windows that ask the same of the events (the same place, the same meal slot) and overlap are merged
    into ranges; each range's events are tested once, and a window keeps a contiguous run of its range's
    matching events: the last `cap` before its request. `integrated` merges the two kept lists."""

    def __init__(self, starts: torch.Tensor, ends: torch.Tensor, history: dict[str, torch.Tensor],
                 context: dict[str, torch.Tensor]):
        self.history, self.context, self.starts = history, context, starts
        self.key_width = history["ts"].numel() + 1  # (group, position) keys: group * key_width + position
        self.ends = starts + self._count_before(history["ts"], starts, ends, context["ts"])

    @staticmethod
    def _count_before(ts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, request_ts: torch.Tensor) -> torch.Tensor:
        """Per window values[lo:hi] (ascending), how many of its events are before `request_ts`: a binary
        search of all windows at once."""
        start = lo
        for _ in range(int((hi - lo).max()).bit_length()):  # halves every window: at most log2(widest) + 1 rounds
            mid = (lo + hi) // 2
            open_ = lo < hi
            earlier = ts.index_select(0, mid.clamp(max=ts.numel() - 1)) < request_ts
            lo = torch.where(open_ & earlier, mid + 1, lo)
            hi = torch.where(open_ & ~earlier, mid, hi)
        return lo - start

    def cut(self, config: FragmentConfig) -> dict[str, Fragment]:
        out = {name: self._last(config.cap(name)) for name in ("full", "recent")}
        place = [self.context["geohash6"], *([self.context["aoi_id"]] if config.match_aoi else [])]
        out["location"] = self._matching(torch.stack(place, 1), partial(self._at_place, config=config),
                                         config.location_len)
        out["meal"] = self._matching(self.context["time_type"][:, None], self._in_slot, config.meal_len)
        out["integrated"] = self._union(out["location"], out["meal"], config.integrated_len)
        return out

    def _last(self, cap: int) -> Fragment:
        lengths = (self.ends - self.starts).clamp(max=cap)
        first = self.ends - lengths
        return Fragment(index=None, lengths=lengths, first=first)

    def _matching(self, asks: torch.Tensor, matches: Callable[..., torch.Tensor], cap: int) -> Fragment:
        """The last `cap` events before each request that `matches`, where `asks` [R, k] is what each request
        asks of an event. `matches(pos, range_of, asks)`: events at positions `pos` [T] of ranges `range_of`
        [T] whose asks are `asks` [G, k] -> bool [T]."""
        n = self.key_width
        ask = torch.zeros_like(self.starts)  # a number per distinct row of `asks` (unique(dim=0) costs 20x)
        for column in asks.unbind(1):
            values, inverse = torch.unique(column, return_inverse=True)
            ask = ask * values.numel() + inverse
        order = torch.argsort(ask * n + self.starts)
        s, e, a = self.starts[order], self.ends[order], ask[order]
        # a range opens where the ask changes or a window starts after all before it of the same ask have ended
        base = a * n
        reach = torch.cummax(base + e, 0).values - base
        opens = torch.ones_like(s, dtype=torch.bool)
        opens[1:] = (a[1:] != a[:-1]) | (s[1:] > reach[:-1])
        closes = torch.ones_like(opens)
        closes[:-1] = opens[1:]
        group = torch.cumsum(opens, 0) - 1
        lo, hi = s[opens], reach[closes]
        pos = runs(lo, hi - lo)
        range_of = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), hi - lo, output_size=pos.numel())
        hit = matches(pos, range_of, asks[order][opens])
        seen = torch.cat([hit.new_zeros(1, dtype=torch.int64), torch.cumsum(hit, 0)])  # hits before each event
        at = torch.cumsum(hi - lo, 0) - (hi - lo) - lo  # a range's event at position x is its event x + at
        first, last = seen[s + at[group]], seen[e + at[group]]
        first = torch.maximum(first, last - cap)
        kept_first, kept = torch.empty_like(first), torch.empty_like(first)
        kept_first[order], kept[order] = first, last - first
        return Fragment(index=pos.masked_select(hit).index_select(0, runs(kept_first, kept)), lengths=kept)

    def _in_slot(self, pos: torch.Tensor, range_of: torch.Tensor, asks: torch.Tensor) -> torch.Tensor:
        """Events in the meal slot their range asks of (asks[:, 0])."""
        return self.history["time_type"].index_select(0, pos) == asks[:, 0].index_select(0, range_of)

    def _at_place(self, pos: torch.Tensor, range_of: torch.Tensor, asks: torch.Tensor,
                  config: FragmentConfig) -> torch.Tensor:
        """Events at the place their range asks of: asks[:, 0] its cell (or a neighbour), asks[:, 1] its AOI."""
        cell, wanted = self.history["place_geohash6"].index_select(0, pos), asks[:, 0]
        known = (wanted != MISSING).index_select(0, range_of)
        at = (cell == wanted.index_select(0, range_of)) & known
        if config.neighbour_cells:
            # one comparison per neighbour: a third of the time of searching each event's cell among sorted
            # (range, cell) keys, and half of comparing [events, 8] at once
            near = torch.zeros_like(at)
            for neighbour in _neighbour_codes(wanted.clamp(min=0)).unbind(1):
                near |= neighbour.index_select(0, range_of) == cell
            at |= near & known & (cell != MISSING)
        if config.match_aoi:
            aoi = self.history["aoi_id"].index_select(0, pos)
            at |= (aoi == asks[:, 1].index_select(0, range_of)) & (aoi != MISSING)
        return at

    def _union(self, location: Fragment, meal: Fragment, cap: int) -> Fragment:
        """The last `cap` events of each request's location and meal fragments together, in time order, each
        tagged by the fragments it is in. Only each one's last `cap` can be among them."""
        n = self.key_width
        requests = torch.arange(self.starts.numel(), device=self.starts.device)

        def keys(frag: Fragment) -> torch.Tensor:  # (request, position), ascending: requests in order, oldest first
            kept = frag.lengths.clamp(max=cap)
            rows = runs(frag.offsets[1:] - kept, kept)
            return torch.repeat_interleave(requests, kept, output_size=rows.numel()) * n + frag.index.index_select(0, rows)

        loc, meal = keys(location), keys(meal)
        # how many of the other list's keys are below each key (one search per list serves both the
        # membership test and the merge: keys are distinct within a list)
        meal_below, loc_below = torch.searchsorted(meal, loc), torch.searchsorted(loc, meal)
        loc_in_meal, meal_only = _found(meal, meal_below, loc), ~_found(loc, loc_below, meal)
        meal_only_below = torch.cat([meal_below.new_zeros(1), torch.cumsum(meal_only, 0)])  # at each meal rank
        # a key's place in the union: its rank in its own list plus the other list's keys below it (of the
        # meal keys, only those not in the location list)
        at_loc = torch.arange(loc.numel(), device=loc.device) + meal_only_below.index_select(0, meal_below)
        at_meal = (meal_only_below[:-1] + loc_below)[meal_only]
        both = torch.empty(at_loc.numel() + at_meal.numel(), dtype=loc.dtype, device=loc.device)
        tags = torch.empty_like(both)
        both[at_loc], both[at_meal] = loc, meal[meal_only]
        tags[at_loc] = torch.where(loc_in_meal, TAG_BOTH, TAG_LOCATION_ONLY)
        tags[at_meal] = TAG_MEAL_ONLY
        counts = torch.bincount(both // n, minlength=requests.numel())
        kept = counts.clamp(max=cap)
        rows = runs(torch.cumsum(counts, 0) - kept, kept)
        return Fragment(index=both.index_select(0, rows) % n, lengths=kept, tags=tags.index_select(0, rows))


def _found(sorted_: torch.Tensor, below: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Which of `values` are in the ascending `sorted_`, given how many of its entries are below each
    (`torch.searchsorted(sorted_, values)`)."""
    if not sorted_.numel():
        return torch.zeros_like(values, dtype=torch.bool)
    return sorted_.index_select(0, below.clamp(max=sorted_.numel() - 1)) == values


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
    keep, tag_grid = _keep(field, before, context, config)
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


def _keep(field, before: torch.Tensor, context: dict[str, torch.Tensor],
          config: FragmentConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The rules of the sub-sequences over one request's events as a row [1, W] (`field(name)` gives each
    field's row; `before`: its real events strictly before the request): which events each fragment keeps
    (masks [1, W]), and the integrated set tag of every event."""
    cell = field("place_geohash6")
    request_cell = context["geohash6"][:, None]
    at_place = (cell == request_cell) & (request_cell != MISSING)
    if config.neighbour_cells:
        ring = _neighbour_codes(context["geohash6"].clamp(min=0))  # [1, 8]
        ring = torch.where(request_cell == MISSING, torch.full_like(ring, MISSING), ring)
        at_place |= (cell[..., None] == ring[:, None, :]).any(-1) & (cell != MISSING)
    if config.match_aoi:
        aoi = field("aoi_id")
        at_place |= (aoi == context["aoi_id"][:, None]) & (aoi != MISSING)
    in_slot = field("time_type") == context["time_type"][:, None]

    keep = {
        "full": keep_last(before, config.full_len),
        "recent": keep_last(before, config.recent_len),
        "location": keep_last(before & at_place, config.location_len),
        "meal": keep_last(before & in_slot, config.meal_len),
    }
    keep["integrated"] = keep_last(keep["location"] | keep["meal"], config.integrated_len)
    tags = torch.where(keep["location"] & keep["meal"], TAG_BOTH,
                       torch.where(keep["location"], TAG_LOCATION_ONLY, TAG_MEAL_ONLY))
    return keep, tags
