"""SIM-hard baseline: hard search of the lifelong sequence for events of the candidate's category (the
most recent `sim_len` of them), then multi-head target attention with time gaps over those."""

from __future__ import annotations

import torch

from features.fragments import keep_last
from fin.data import Batch
from fin.layers import MultiHeadTargetAttention
from fin.models.base import CTRModel, Encoded, ModelConfig, each_own_user, gather, time_gaps


class SIM(CTRModel):
    interests = 1

    def __init__(self, config: ModelConfig = ModelConfig(), device: torch.device | None = None):
        super().__init__(config, device)
        self.attention = MultiHeadTargetAttention(config.dim, config.heads)

    def interest_vectors(self, batch: Batch, x: Encoded) -> list[torch.Tensor]:
        frag = batch.fragments["full"]
        seq, mask = gather(x.events, frag)
        category, _ = gather(batch.history["category_1_id"], frag)
        matched = keep_last(mask & (category[..., 0] == batch.ids["category_1_id"][:, None]), self.config.sim_len)
        return [self.attention(x.target, seq, time_gaps(batch, frag, matched), matched, each_own_user(batch))]
