"""DIN baseline: multi-head target attention (with time gaps) over the user's most recent events.

It reads the `recent` fragment: set `FragmentConfig.recent_len` to 50 for the classic setting.
"""

from __future__ import annotations

from features.fragments import FragmentConfig
from fin.inputs import Batch
from fin.models.base import TargetAttentionModel
from fin.models.layout import Padded, time_gaps


class DIN(TargetAttentionModel):
    @staticmethod
    def events_read(fragments: FragmentConfig) -> int:
        return fragments.recent_len

    def attended(self, batch: Batch):
        frag = Padded.of(batch.fragments["recent"])
        gaps = time_gaps(batch.ts, batch.history["ts"], frag.index, frag.mask)
        return frag.index, gaps, frag.mask, batch.candidate_requests()
