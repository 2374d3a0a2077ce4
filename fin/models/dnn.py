"""DNN baseline: the tower over the candidate, request context and statistics; no behaviour sequence."""

from __future__ import annotations

from features.fragments import FragmentConfig
from fin.models.base import CTRModel


class DNN(CTRModel):
    interests = 0

    @staticmethod
    def events_read(fragments: FragmentConfig) -> int:
        return 0
