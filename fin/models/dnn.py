"""DNN baseline: the tower over the candidate, request context and statistics; no behaviour sequence."""

from fin.models.base import CTRModel


class DNN(CTRModel):
    interests = 0
