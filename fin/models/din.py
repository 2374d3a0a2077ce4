"""DIN baseline: multi-head target attention (with time gaps) over the user's most recent events.

It reads the `recent` fragment: set `FragmentConfig.recent_len` to 50 for the classic setting.
"""

from __future__ import annotations

from features.fragments import FragmentConfig
from fin.inputs import Batch
from fin.models.base import Encoded, TargetAttentionModel, gather, time_gaps


class DIN(TargetAttentionModel):
    @staticmethod
    def events_read(fragments: FragmentConfig) -> int:
        return fragments.recent_len

    def attended(self, batch: Batch, x: Encoded):
        frag = batch.fragments["recent"]
        seq, mask = gather(x.events, frag)
        return seq, time_gaps(batch, frag), mask, batch.candidate_requests()
