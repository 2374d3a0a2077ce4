"""How a model lays a batch's fragments out to attend over them: padded per request (`Padded`), in groups of
similar length each padded to its own longest (`attend_by_length`), or, for the full fragment, as windows
of the timeline slices that a user's requests share (`SliceWindows`); and the events' time gaps to their
request (`time_gaps`). Every layout gives each candidate the same events; they differ in how much padding
is gathered and attended over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from features.fragments import Fragment, Slots, runs
from fin.inputs import Histories
from fin.layers import gather


@dataclass
class Padded:
    """A fragment padded per request: rows of the batch's history events [U, L], which are real [U, L], and
    (integrated) the set tags [U, L]. Padding slots point at real rows: only masked readers may read them.
    `requests`: which of the batch's requests the U rows are (None: all of them, in order)."""

    index: torch.Tensor
    mask: torch.Tensor
    tags: torch.Tensor | None = None
    requests: torch.Tensor | None = None

    @classmethod
    def of(cls, frag: Fragment | Slots, requests: torch.Tensor | None = None) -> Padded:
        if isinstance(frag, Slots):  # one request's fragment at a fixed width: already padded
            return cls(frag.index, frag.mask, frag.tags)
        pos, mask = frag.padded(requests)
        return cls(gather(frag.index, pos), mask, None if frag.tags is None else gather(frag.tags, pos), requests)

    def request_times(self, ts: torch.Tensor) -> torch.Tensor:
        """The batch's request times [U] at this fragment's rows."""
        return ts if self.requests is None else ts[self.requests]


def length_groups(lengths: torch.Tensor, groups: int, cuts: int = 32) -> list[torch.Tensor]:
    """The rows (indices into `lengths` [U]) in at most `groups` groups of similar length, cut where the padded
    area (each group's rows times its longest, summed) is least: a shortest path over the sorted lengths
    whose cut points are searched among `cuts` quantiles, so the search costs the same for any U."""
    order = torch.argsort(lengths)
    count = order.numel()
    if groups < 2 or count < 2:
        return [order]
    ascending = lengths[order].cpu()
    at = torch.unique(torch.cat([torch.tensor([0, count]), torch.linspace(1, count - 1, min(cuts, count - 1)).round().long()]))
    # area[i, j]: one group of the sorted rows at[i] .. at[j] - 1, padded to the longest of them (i == j: none)
    area = ((at[None, :] - at[:, None]) * ascending[(at - 1).clamp(min=0)][None, :]).double()
    area = area.masked_fill(at[None, :] < at[:, None], float("inf"))
    best = torch.full((at.numel(),), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    came_from = []
    for _ in range(groups):  # best[j]: least area of the rows before at[j] in the groups so far
        best, previous = (best[:, None] + area).min(0)
        came_from.append(previous)
    bounds, j = [at.numel() - 1], at.numel() - 1
    for previous in reversed(came_from):
        j = int(previous[j])
        bounds.append(j)
    cuts_at = sorted({int(at[b]) for b in bounds} | {0, count})
    return [order[lo:hi] for lo, hi in zip(cuts_at[:-1], cuts_at[1:]) if hi > lo]


# attend(candidates, padded fragment, each of those candidates' row in it) -> [b, ...]; candidates: the
# indices of the candidates to attend for (None: all of them, in order)
Attend = Callable[[torch.Tensor | None, Padded, torch.Tensor], torch.Tensor]


def attend_by_length(frag: Fragment | Slots, user_of: torch.Tensor, attend: Attend, groups: int,
                     count_groups: int = 1) -> torch.Tensor:
    """`attend` for every candidate (`user_of` [B]: its row of `frag`) -> [B, ...], with the rows (requests,
    or shared timeline slices) in up to `groups` groups of similar length (`length_groups`), each padded to
    its own longest and attended over by its own candidates: a training batch's full fragments run from a
    few events to 1,000, and padding them all to the longest gathers, attends over and scatters back about
    2.6 times the real events (1.3 times in three groups). With `count_groups`, each group is split again
    into up to that many of similar candidate counts, each padded to its own most (rows of slice segments
    hold 1 to 76 candidates in a training batch of 2,048). Every candidate gets what one group would give
    it: attention is per row."""
    if isinstance(frag, Slots) or groups < 2 or frag.lengths.numel() < 2 * groups:
        return attend(None, Padded.of(frag), user_of)
    rows = length_groups(frag.lengths, groups)
    if count_groups > 1:
        per_row = torch.bincount(user_of, minlength=frag.lengths.numel())
        rows = [members[part] for members in rows for part in length_groups(per_row[members], count_groups)]
    if len(rows) == 1:
        return attend(None, Padded.of(frag), user_of)
    group_of, local = torch.empty_like(frag.lengths), torch.empty_like(frag.lengths)
    for g, members in enumerate(rows):
        group_of[members] = g
        local[members] = torch.arange(members.numel(), device=members.device)
    order = torch.argsort(group_of[user_of], stable=True)  # candidates, group by group
    counts = torch.bincount(group_of[user_of], minlength=len(rows)).tolist()
    out = [attend(cand, Padded.of(frag, members), local[user_of[cand]])
           for members, cand in zip(rows, torch.split(order, counts)) if cand.numel()]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(out).index_select(0, inverse)


def selected(values: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """`values` [B, ...] of the `candidates` an `Attend` is called for."""
    return values if candidates is None else values.index_select(0, candidates)


@dataclass
class SliceWindows:
    """A contiguous fragment (the full one: every event before the request, the most recent ones) as windows
    into the batch's timeline slices, where the requests of one user share a slice, so that each event is
    gathered and attended over for all of them at once. A slice of many requests can be long (a user's
    overlapping windows merge into one), so the rows are segments of the slices: 2W events from every W-th
    (W: the longest window), each window held whole by the segment it starts in. `rows`: the segments as rows
    of a fragment; per candidate its row [B] and its window's first event in it and length [B]."""

    rows: Fragment
    row_of: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    @classmethod
    def of(cls, frag: Fragment | Slots, histories: Histories, user_of: torch.Tensor) -> SliceWindows | None:
        """None where no slice is shared (one request, or one history copy per request: nothing to gain), where
        no request has an event, or where the fragment is not one run of events per request."""
        offsets = histories.offsets
        if isinstance(frag, Slots) or offsets.numel() - 1 >= histories.start.numel() or not frag.lengths.numel():
            return None
        width = int(frag.lengths.max())
        if not width:
            return None
        head = frag.first  # each request's first event, where the cut says its events are one run
        if head is None:
            first = torch.cumsum(frag.lengths, 0) - frag.lengths
            head = frag.index[first.clamp(max=frag.index.numel() - 1)]
            if not torch.equal(frag.index, runs(head, frag.lengths)):
                return None
        # (a request without events may sit at the end of the last slice: any row does for it)
        request_slice = (torch.searchsorted(offsets, histories.start, right=True) - 1).clamp(max=offsets.numel() - 2)
        local = torch.where(frag.lengths > 0, head - offsets[request_slice], 0)  # the window's start in its slice
        segment = local // width
        per_slice = int(segment.max()) + 1
        keys, request_row = torch.unique(request_slice * per_slice + segment, return_inverse=True)
        row_slice, row_segment = keys // per_slice, keys % per_slice
        row_first = offsets[row_slice] + row_segment * width
        row_length = torch.minimum(offsets[row_slice + 1] - row_first, row_first.new_tensor(2 * width))
        start = local - segment * width
        return cls(Fragment(runs(row_first, row_length), row_length), request_row[user_of], start[user_of], frag.lengths[user_of])


def time_gaps(request_ts: torch.Tensor, event_ts: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Request time [R] minus the time of each event at `index` [R, L] (ms, exact int64; 0 where masked)."""
    return (request_ts[:, None] - gather(event_ts, index)).masked_fill(~mask, 0)
