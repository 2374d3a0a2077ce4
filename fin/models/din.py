"""DIN baseline: multi-head target attention (with time gaps) over the user's most recent events.

It reads the `recent` fragment: set `FragmentConfig.recent_len` to 50 for the classic setting.
"""

from __future__ import annotations

import torch

from fin.data import Batch
from fin.layers import MultiHeadTargetAttention
from fin.models.base import CTRModel, Encoded, ModelConfig, each_own_user, gather, time_gaps


class DIN(CTRModel):
    interests = 1

    def __init__(self, config: ModelConfig = ModelConfig(), device: torch.device | None = None):
        super().__init__(config, device)
        self.attention = MultiHeadTargetAttention(config.dim, config.heads)

    def interest_vectors(self, batch: Batch, x: Encoded) -> list[torch.Tensor]:
        frag = batch.fragments["recent"]
        seq, mask = gather(x.events, frag)
        return [self.attention(x.target, seq, time_gaps(batch, frag, mask), mask, each_own_user(batch))]
