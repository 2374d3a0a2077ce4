"""Reading user timelines from the Feast online store: one online read for a batch of users."""

from __future__ import annotations

import numpy as np

from features.sequences import TIMELINE_FIELDS

TIMELINE_VIEW = "user_timeline"
TIMELINE_FEATURES = [f"{TIMELINE_VIEW}:{f}" for f in TIMELINE_FIELDS]


def read_timelines(store, user_ids: list[int]) -> list[dict[str, np.ndarray] | None]:
    """Each user's stored timeline (TIMELINE_FIELDS -> int64 array, oldest first), or None if unknown."""
    response = store.get_online_features(features=TIMELINE_FEATURES,
                                         entity_rows=[{"user_id": int(u)} for u in user_ids]).to_dict()
    out: list[dict[str, np.ndarray] | None] = []
    for i in range(len(user_ids)):
        if response[TIMELINE_FIELDS[0]][i] is None:
            out.append(None)
        else:
            out.append({f: np.asarray(response[f][i], dtype=np.int64) for f in TIMELINE_FIELDS})
    return out
