"""FIN: Fragment Network + Integrate Network over a user's lifelong spatial-temporal timeline.

Follows DESIGN.md section 2; choices that are our reconstruction rather than the paper's text:
- an event is the projection of its item, shop, category, brand, place cell and AOI embeddings (the
  tables it shares with the candidate and the request);
- Fragment Network: simplified (one-head, dot-product, no MLP) target attention over the location, meal
  and full fragments; multi-head target attention with time-gap embeddings over the recent fragment;
- Integrate Network: the integrated sequence (location and meal fragments' union, each event tagged
  both / location-only / meal-only by an added embedding) through multi-head target attention;
- tower: MLP over [candidate, request context, point-in-time statistics, the five interest vectors,
  candidate x interest products] -> one logit, trained with binary cross-entropy.
Histories are embedded once per event and fragments gathered from them (`fin.embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from features.fragments import Fragment
from fin.data import STAT_FEATURES, Batch
from fin.embeddings import SHARED, SINGLE, EmbeddingSizes, SparseArch
from fin.layers import MLP, MultiHeadTargetAttention, SimplifiedTargetAttention, to_padded

SIMPLIFIED = ("location", "meal", "full")
MULTI_HEAD = ("recent", "integrated")


@dataclass(frozen=True)
class FINConfig:
    dim: int = 32
    heads: int = 2
    tower: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    embeddings: EmbeddingSizes = field(default_factory=EmbeddingSizes)


class FIN(nn.Module):
    def __init__(self, config: FINConfig = FINConfig(), device: torch.device | None = None):
        super().__init__()
        self.config = config
        d, e = config.dim, config.embeddings.dim
        self.sparse = SparseArch(config.embeddings, device)
        self.event = nn.Linear(len(SHARED) * e, d)  # history events and the candidate live in one space
        self.target = nn.Linear(len(SHARED) * e, d)
        self.simplified = nn.ModuleDict({f: SimplifiedTargetAttention(d) for f in SIMPLIFIED})
        self.multi_head = nn.ModuleDict({f: MultiHeadTargetAttention(d, config.heads) for f in MULTI_HEAD})
        self.set_tag = nn.Embedding(4, d)  # 0 padding, then TAG_BOTH / TAG_LOCATION_ONLY / TAG_MEAL_ONLY
        interests = len(SIMPLIFIED) + len(MULTI_HEAD)
        tower_in = d + len(SINGLE) * e + len(STAT_FEATURES) + 2 * interests * d
        self.tower = MLP(tower_in, config.tower, out_dim=1, dropout=config.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B]. Each example's history is its own 'user' here; the server passes one per user."""
        sparse = self.sparse(batch)
        events = self.event(torch.cat([sparse.history[t] for t in SHARED], dim=1))  # [N, d]
        target = self.target(torch.cat([sparse.target[t] for t in SHARED], dim=1))  # [B, d]
        user_of = torch.arange(len(batch), device=target.device)
        history_ts = batch.history["ts"]
        interests = []
        for name in SIMPLIFIED:
            seq, mask = self._gather(events, batch.fragments[name])
            interests.append(self.simplified[name](target, seq, mask, user_of))
        for name in MULTI_HEAD:
            frag = batch.fragments[name]
            seq, mask = self._gather(events, frag)
            if frag.tags is not None:
                tags, _ = to_padded(self.set_tag(frag.tags), frag.lengths)
                seq = seq + tags
            event_ts, _ = to_padded(history_ts[frag.index][:, None], frag.lengths)  # int64: exact ms
            gap_ms = (batch.ts[:, None] - event_ts[..., 0]).masked_fill(~mask, 0)
            interests.append(self.multi_head[name](target, seq, gap_ms, mask, user_of))
        stats = torch.log1p(batch.stats.clamp(min=0))
        features = [target, sparse.single, stats, *interests, *(target * i for i in interests)]
        return self.tower(torch.cat(features, dim=1)).squeeze(1)

    @staticmethod
    def _gather(events: torch.Tensor, frag: Fragment) -> tuple[torch.Tensor, torch.Tensor]:
        return to_padded(events[frag.index], frag.lengths)
