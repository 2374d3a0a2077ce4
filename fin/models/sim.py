"""SIM-hard baseline: hard search of the lifelong sequence for events of the candidate's category (the
most recent `sim_len` of them), then multi-head target attention with time gaps over those."""

from __future__ import annotations

import torch

from features.fragments import keep_last
from fin.inputs import Batch
from fin.models.base import TargetAttentionModel
from fin.models.layout import Padded, time_gaps


class SIM(TargetAttentionModel):
    not_exportable = "its search keeps a number of events per candidate that depends on the data"

    def attended(self, batch: Batch):
        # the search runs on ids (one row per candidate: what it retrieves depends on the candidate's
        # category); only the retrieved events are gathered
        full, request = Padded.of(batch.fragments["full"]), batch.candidate_requests()
        events = full.index[request]  # [B, L]
        category = batch.history["category_1_id"][events]
        matched = keep_last(full.mask[request] & (category == batch.ids["category_1_id"][:, None]),
                            self.config.sim_len)
        index, mask = left_aligned(events, matched)
        gaps = time_gaps(batch.ts[request], batch.history["ts"], index, mask)
        return index, gaps, mask, torch.arange(len(batch), device=index.device)


def left_aligned(index: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries of each row of `index` [R, L], in order, moved to the row's start: [R, K] and its mask
    (K: the most kept in a row; padding slots hold 0, a real row while there is any)."""
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's kept columns in order
    counts = keep.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(rows.numel(), device=index.device) - (torch.cumsum(counts, 0) - counts)[rows]
    out = index.new_zeros(index.shape[0], width)
    out[rows, slot] = index[rows, cols]
    return out, torch.arange(width, device=index.device)[None, :] < counts[:, None]
