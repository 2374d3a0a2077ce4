"""How many of the events a model reads have the candidate's shop and its category: the counts that follow
each interest vector to the tower (`ModelConfig.intensity`), compared row by row (`matched_counts`) or
counted by sorting (`sorted_counts` over `Entries`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from features.contract import MISSING
from features.fragments import Fragment, Slots
from fin.inputs import Batch
from fin.layers import gather

MATCHED = ("shop_id", "category_1_id")  # the candidate's ids counted in the events a model reads


def matched_counts(batch: Batch, index: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log1p of how many events each candidate reads (the batch's events at `index` [R, L] where `mask`, row
    `rows` [B] for each candidate) have its shop, its category: [B, len(MATCHED)] (0 for an unknown id). The
    simulated click rate grows with such counts (a habit is a count), which an attention's weighted average
    cannot give and its log-mass gives only softly. Each candidate's row compared whole: B x L, for the
    short sequences of the baselines; FIN's fragments are counted by sorting (`sorted_counts`)."""
    mask = mask.index_select(0, rows)
    counts = []
    for key in MATCHED:  # (index_select: gather's, several times faster than advanced indexing on a CPU)
        candidate = batch.ids[key]
        hits = (gather(batch.history[key], index).index_select(0, rows) == candidate[:, None]) & mask
        counts.append((hits & (candidate != MISSING)[:, None]).sum(1))
    return torch.log1p(torch.stack(counts, 1).to(torch.float32))


@dataclass
class Entries:
    """A fragment's events one by one, to be counted by sorting: each one's position among the batch's events
    [E], its row (a request, or a shared timeline slice) [E] and its place in that row [E]; only those where
    `real` [E] (None: all) count."""

    index: torch.Tensor
    row: torch.Tensor
    place: torch.Tensor
    real: torch.Tensor | None = None

    @classmethod
    def of(cls, frag: Fragment | Slots, tag: int | None = None) -> Entries:
        """The events of `frag` (with `tag`, only the integrated events of that set tag)."""
        if isinstance(frag, Slots):  # [R, K] slots, the masked ones not counted
            rows, width = frag.index.shape
            row = torch.arange(rows, device=frag.index.device)[:, None].expand(rows, width).flatten()
            place = torch.arange(width, device=frag.index.device)[None].expand(rows, width).flatten()
            real = frag.mask if tag is None else frag.mask & (frag.tags == tag)
            return cls(frag.index.flatten(), row, place, real.flatten())
        total = frag.index.numel()
        row = torch.repeat_interleave(torch.arange(frag.lengths.numel(), device=frag.index.device), frag.lengths,
                                      output_size=total)
        first = torch.cumsum(frag.lengths, 0) - frag.lengths
        place = torch.arange(total, device=frag.index.device) - first.index_select(0, row)
        return cls(frag.index, row, place, None if tag is None else frag.tags == tag)


def sorted_counts(batch: Batch, entries: Entries, rows: torch.Tensor, start: torch.Tensor | None = None,
                  length: torch.Tensor | None = None) -> torch.Tensor:
    """`matched_counts` of the events `entries` holds in each candidate's row (`rows` [B]), or, with `start` and
    `length` [B], in its window of that row (the places start .. start + length - 1), counted by sorting: each
    event keyed (row, id, place) in one sorted order, each candidate's count is the distance between where
    (its row, its id, its window's first place) and (.., its window's end) would go. E log E + B log E
    instead of B x L comparisons: far less for many candidates a row (a scored request's 200 over one
    timeline) and for the full fragment's shared slices, sorted once for all the requests that read
    windows of them; somewhat more for one or two a row (`fin.models.fin.fragment_counts` picks)."""
    if entries.index.numel() == 0:
        return rows.new_zeros(rows.numel(), len(MATCHED), dtype=torch.float32)
    places = entries.place.amax() + 1  # keys (row, id + 1, place) as one int64: ((row x ids) + id + 1) x places + place
    counts = []
    for key in MATCHED:
        values, candidate = gather(batch.history[key], entries.index), batch.ids[key]
        ids = torch.maximum(values.amax(), candidate.amax()) + 2
        keys = (entries.row * ids + values + 1) * places + entries.place
        if entries.real is not None:
            keys = keys.masked_fill(~entries.real, -1)  # before every candidate's range
        ordered = torch.sort(keys).values
        low = (rows * ids + candidate + 1) * places
        high = low + places if start is None else low + start + length
        low = low if start is None else low + start
        found = torch.searchsorted(ordered, high) - torch.searchsorted(ordered, low)
        counts.append(found.masked_fill(candidate == MISSING, 0))
    return torch.log1p(torch.stack(counts, 1).to(torch.float32))
