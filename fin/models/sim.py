"""SIM-hard baseline: hard search of the lifelong sequence for events of the candidate's category (the
most recent `sim_len` of them), then multi-head target attention with time gaps over those."""

from __future__ import annotations

import torch

from features.fragments import keep_last
from fin.inputs import Batch
from fin.models.base import Encoded, TargetAttentionModel, gather, time_gaps


class SIM(TargetAttentionModel):
    def attended(self, batch: Batch, x: Encoded):
        # the retrieved events depend on the candidate's category: one row per candidate
        frag, request = batch.fragments["full"], batch.candidate_requests()
        seq, mask = gather(x.events, frag)
        category, _ = gather(batch.history["category_1_id"], frag)
        matched = keep_last(mask[request] & (category[request, :, 0] == batch.ids["category_1_id"][:, None]),
                            self.config.sim_len)
        gaps = time_gaps(batch, frag)[request].masked_fill(~matched, 0)
        return seq[request], gaps, matched, torch.arange(len(batch), device=seq.device)
