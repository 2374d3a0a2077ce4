"""Logged requests as ScoreRequests, and logged days replayed against a server in time order.

`logged_requests` turns a split of the features job's output (its impressions, or every logged ad
candidate of each request) into ScoreRequests. `replay_in_time_order` sends them to a server as the day
happened: before each request, the behaviours logged since the previous one are ingested (what the ad
server and the order service send), so each request is scored with the history it had when it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import polars as pl

from features.dataset import EXAMPLES, ROW_IDS, Dataset
from serving.ingest import behaviour_events
from serving.pb import ctr_scoring_pb2 as pb
from serving.scoring import CANDIDATE_IDS, CANDIDATE_NUMBERS


@dataclass
class LoggedRequest:
    request: pb.ScoreRequest
    row_ids: list[int]  # the logged row of each candidate, in order (impression_id or candidate_id)
    labels: list[int | None]  # clicks (None: a candidate that was not shown)
    day: int  # the local day of the request (the dataset's `day`)


def logged_requests(data: str | Path, split: str = "test", limit: int | None = None,
                    where: pl.Expr | None = None, rows: str = EXAMPLES) -> list[LoggedRequest]:
    """Requests of `split` (optionally filtered by `where` on its rows) in time order, at most `limit`; their
    candidates are the impressions (`rows` = examples) or every logged ad candidate (candidates)."""
    row_id = ROW_IDS[rows]
    frame = Dataset.at(data).scan(rows, split)
    if where is not None:
        frame = frame.filter(where)
    frame = frame.sort("ts", "request_id", "position", row_id, nulls_last=True)
    ids = frame.select("request_id").unique(maintain_order=True)
    if limit is not None:
        ids = ids.head(limit)
    frame = frame.join(ids, on="request_id", maintain_order="left").collect()
    out = []
    for _, group in frame.group_by("request_id", maintain_order=True):
        r = group.row(0, named=True)
        context = pb.Context(ts_ms=r["ts"], geohash=r["geohash_12"] or r["geohash_6"], city_id=r["city_id"] or 0)
        if r["aoi_id"] is not None:
            context.aoi_id = r["aoi_id"]
        candidates = [pb.Candidate(**{field: c[column] or 0 for column, field in CANDIDATE_IDS.items()},
                                   **{field: c[field] or 0 for field in CANDIDATE_NUMBERS})
                      for c in group.iter_rows(named=True)]
        out.append(LoggedRequest(pb.ScoreRequest(user_id=r["user_id"], context=context, candidates=candidates),
                                 group[row_id].to_list(), group["label"].to_list(), int(r["day"])))
    return out


@dataclass
class Replayed:
    scores: dict[str, pl.DataFrame]  # per model the served pCTR of each row: row_id, pctr
    ingested: int  # behaviours sent
    refused: int  # of them, those the server refused (as the features job quarantines them)


def replay_in_time_order(stub, requests: Sequence[LoggedRequest], behaviours: pl.DataFrame | None,
                         models: Sequence[str], new_day: Callable[[int], None] | None = None,
                         batch: int = 1000, timeout_s: float = 30.0) -> Replayed:
    """Score `requests` (in time order) through `stub` (a CtrScoringStub) with each of `models`. Before each
    request, the `behaviours` (rows of the contract's behaviours table) logged before it and since the
    previous request are ingested, in calls of at most `batch`; None: nothing is ingested (a store frozen
    between days). `new_day(day)` runs before the first request of each day (where a daily job would
    change the store)."""
    if behaviours is not None:
        behaviours = behaviours.sort("ts", "event_id")
        ends = np.searchsorted(behaviours["ts"].to_numpy(), [r.request.context.ts_ms for r in requests], side="left")
    served = {model: ([], []) for model in models}
    sent, refused, day = 0, 0, None
    for i, logged in enumerate(requests):
        if new_day is not None and logged.day != day:
            new_day(logged.day)
        day = logged.day
        while behaviours is not None and sent < ends[i]:
            chunk = behaviours.slice(sent, min(batch, int(ends[i]) - sent))
            try:
                refused += len(stub.Ingest(pb.IngestRequest(events=behaviour_events(chunk)), timeout=timeout_s).refused)
            except grpc.RpcError as e:  # a call whose every event failed the contract is refused whole
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                refused += chunk.height
            sent += chunk.height
        for model in models:
            logged.request.model_name = model
            response = stub.Score(logged.request, timeout=timeout_s)
            served[model][0].extend(logged.row_ids)
            served[model][1].extend(s.pctr for s in response.scores)
    scores = {model: pl.DataFrame({"row_id": ids, "pctr": pctrs}, schema={"row_id": pl.Int64, "pctr": pl.Float64})
              for model, (ids, pctrs) in served.items()}
    return Replayed(scores, sent, refused)
