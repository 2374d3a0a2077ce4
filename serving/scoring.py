"""A CTR scoring request -> checked model inputs -> pCTR per candidate, through `fin.inputs.requests_batch`.

Everything here is plain data in, numbers out (no gRPC): the server validates a request, reads the
user's features and calls `score`; the offline evaluator and the consistency test can do the same.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from features import contract, geohash
from features.fragments import MISSING
from features.item_embeddings import ItemEmbeddings
from features.sequences import TIMELINE_FIELDS
from fin.artifact import Artifact
from fin.inputs import CANDIDATE_NUMBERS as MODEL_NUMBERS
from fin.inputs import ScoringRequest, requests_batch
from serving.config import ScoringConfig

GEOHASH6 = 6
EMPTY_TIMELINE = {f: np.zeros(0, np.int64) for f in TIMELINE_FIELDS}  # a cold-start user
# Candidate fields of the ScoreRequest message by the contract's column names (0 means unknown for all)
CANDIDATE_IDS = {"item_id": "item_id", "shop_id": "shop_id", "category_1_id": "category_id", "brand_id": "brand_id"}
CANDIDATE_NUMBERS = ("bid", "price", "distance_m")
_CANDIDATE_FIELDS = operator.attrgetter(*CANDIDATE_IDS.values(), *CANDIDATE_NUMBERS)


class BadRequest(ValueError):
    """A request the server refuses (INVALID_ARGUMENT), with a message that says which field and why."""


@dataclass
class RequestInputs:
    """One request's model inputs, before the user's features are read."""

    user_id: int
    context: dict[str, int]  # "ts" and fin.inputs.CONTEXT_FEATURES
    candidates: dict[str, np.ndarray]  # fin.inputs.TARGET_FEATURES -> int64 [B], CANDIDATE_NUMBERS -> float64 [B]
    bids: np.ndarray  # float64 [B]

    def with_features(self, timeline: dict[str, np.ndarray] | None, stats: np.ndarray | None,
                      images: ItemEmbeddings | None = None) -> ScoringRequest:
        """The request to score, once the user's timeline (None: cold start), statistics and (models that
        read creatives) the creative embeddings of its items are read."""
        return ScoringRequest(timeline or EMPTY_TIMELINE, self.context, self.candidates, stats, images)


def request_inputs(request, config: ScoringConfig) -> RequestInputs:
    """Validate a `ScoreRequest` message and turn it into model inputs; raises BadRequest."""
    if request.user_id <= 0:
        raise BadRequest("user_id is required and must be positive")
    if not request.HasField("context"):
        raise BadRequest("context is required")
    n = len(request.candidates)
    if n == 0:
        raise BadRequest("candidates is empty")
    if n > config.max_candidates:
        raise BadRequest(f"{n} candidates is more than this server's maximum of {config.max_candidates}")
    context = {"user_id": int(request.user_id), **_context(request.context, config)}
    # one pass over the candidate messages (reading their attributes is the cost), then one array per column
    columns = list(zip(*map(_CANDIDATE_FIELDS, request.candidates)))
    ids = {name: np.array(columns[i], np.int64) for i, name in enumerate(CANDIDATE_IDS)}  # int64: no rounding
    for name in ("item_id", "shop_id"):
        bad = np.flatnonzero(ids[name] <= 0)
        if bad.size:
            raise BadRequest(f"candidates[{bad[0]}].{name} is required and must be positive")
    for name in ("category_1_id", "brand_id"):
        ids[name] = np.where(ids[name] > 0, ids[name], MISSING)
    numbers = {name: np.array(columns[len(CANDIDATE_IDS) + i], np.float64) for i, name in enumerate(CANDIDATE_NUMBERS)}
    for field, values in numbers.items():
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            raise BadRequest(f"candidates[{bad[0]}].{field} must be a finite number >= 0, got {values[bad[0]]}")
    bad = np.flatnonzero(numbers["bid"] > MAX_BID)
    if bad.size:
        raise BadRequest(f"candidates[{bad[0]}].bid {numbers['bid'][bad[0]]:g} is more than {MAX_BID:g}: its eCPM "
                         f"would not fit the response's float")
    ids |= {name: numbers[name] for name in MODEL_NUMBERS}  # price and distance are model inputs, the bid is not
    return RequestInputs(user_id=int(request.user_id), context=context, candidates=ids, bids=numbers["bid"])


def _context(ctx, config: ScoringConfig) -> dict[str, int]:
    if ctx.ts_ms <= 0:
        raise BadRequest("context.ts_ms is required (UTC milliseconds since the epoch)")
    if ctx.geohash:
        if not GEOHASH6 <= len(ctx.geohash) <= 12:
            raise BadRequest(f"context.geohash {ctx.geohash[:16]!r} is not {GEOHASH6} to 12 characters")
        try:  # every character read, not only the cell's 6 ("wtw3sjq!@#" was read as wtw3sj); the cell's code
            code = geohash.code_of(ctx.geohash) >> 5 * (len(ctx.geohash) - GEOHASH6)  # is the first 6 digits'
        except ValueError:
            raise BadRequest(f"context.geohash {ctx.geohash!r} is not a geohash") from None
    elif ctx.HasField("lat") and ctx.HasField("lon"):
        if not (math.isfinite(ctx.lat) and math.isfinite(ctx.lon) and abs(ctx.lat) <= 90 and abs(ctx.lon) <= 180):
            raise BadRequest(f"context.lat/lon ({ctx.lat}, {ctx.lon}) is not a place on Earth")
        code = geohash.code_of(str(geohash.encode(ctx.lat, ctx.lon, GEOHASH6)[0]))
    else:
        raise BadRequest("context needs a geohash or lat and lon")
    local = contract.local_time_fields(np.array([ctx.ts_ms]), config.utc_offset_hours)
    return {"ts": int(ctx.ts_ms), "geohash6": code,
            "aoi_id": int(ctx.aoi_id) if ctx.HasField("aoi_id") and ctx.aoi_id > 0 else MISSING,
            "city_id": int(ctx.city_id) if ctx.city_id > 0 else MISSING,
            **{k: int(v[0]) for k, v in local.items()}}


@torch.inference_mode()
def score_requests(artifact: Artifact, requests: list[ScoringRequest]) -> list[np.ndarray]:
    """pCTR [B] of each request's candidates, calibrated as `fin evaluate` calibrates them (`Artifact.pctr`).
    With a compiled package, one call of it per request (no Python between its operations); eagerly, all
    requests in one forward (each user's history and fragments once), the same numbers as one by one."""
    if artifact.package is not None and all(map(artifact.package.takes, requests)):
        return [artifact.package.pctr(r) for r in requests]
    pctr = artifact.pctr(artifact.model(requests_batch(requests, artifact.loader))).numpy().astype(np.float64)
    return np.split(pctr, np.cumsum([len(r) for r in requests])[:-1])


def score(artifact: Artifact, inputs: RequestInputs, timeline: dict[str, np.ndarray] | None,
          stats: np.ndarray | None, images: ItemEmbeddings | None = None) -> np.ndarray:
    """pCTR [B] of one request's candidates."""
    return score_requests(artifact, [inputs.with_features(timeline, stats, images)])[0]


MAX_BID = float(np.finfo(np.float32).max) / 1000  # eCPM = 1000 pCTR bid must fit the response's float


def ecpm(pctr: np.ndarray, bids: np.ndarray) -> np.ndarray:
    """Expected revenue per 1,000 impressions of a cost-per-click ad."""
    return 1000.0 * pctr * bids


# One `ScoreResponse.scores` entry on the wire: field 1, length-delimited, 10 bytes: pctr (field 1, fixed32
# float) and ecpm (field 2, fixed32 float). Every entry has the same 12 bytes of layout.
_SCORE_ENTRY = np.dtype([("tag", "u1"), ("size", "u1"), ("pctr_tag", "u1"), ("pctr", "<f4"),
                         ("ecpm_tag", "u1"), ("ecpm", "<f4")])


def scores_wire(pctr: np.ndarray, ecpm_: np.ndarray) -> bytes:
    """The `scores` of a ScoreResponse in wire format, built with numpy: `response.MergeFromString` of it
    appends one Score per candidate, the same message as adding them one by one (~0.3 ms of Python calls
    for 200 candidates, on the event loop). Floats round to float32 as the message setter rounds them."""
    entries = np.empty(len(pctr), _SCORE_ENTRY)
    entries["tag"], entries["size"], entries["pctr_tag"], entries["ecpm_tag"] = 0x0A, 10, 0x0D, 0x15
    with np.errstate(over="ignore"):  # beyond float32: inf, as the setter stores it
        entries["pctr"], entries["ecpm"] = pctr, ecpm_
    return entries.tobytes()

