"""SIM-hard baseline: hard search of the lifelong sequence for events of the candidate's category (the
most recent `sim_len` of them), then multi-head target attention with time gaps over those."""

from __future__ import annotations

from features.fragments import keep_last
from fin.data import Batch
from fin.models.base import Encoded, TargetAttentionModel, gather, time_gaps


class SIM(TargetAttentionModel):
    def attended(self, batch: Batch, x: Encoded):
        frag = batch.fragments["full"]
        seq, mask = gather(x.events, frag)
        category, _ = gather(batch.history["category_1_id"], frag)
        matched = keep_last(mask & (category[..., 0] == batch.ids["category_1_id"][:, None]), self.config.sim_len)
        return seq, time_gaps(batch, frag, matched), matched
