"""Logged requests as ScoreRequests: replay a split of the features job's output against a server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.dataset import EXAMPLES, Dataset
from serving.pb import ctr_scoring_pb2 as pb
from serving.scoring import CANDIDATE_IDS, CANDIDATE_NUMBERS


@dataclass
class LoggedRequest:
    request: pb.ScoreRequest
    impression_ids: list[int]  # one per candidate, in order
    labels: list[int]


def logged_requests(data: str | Path, split: str = "test", limit: int | None = None,
                    where: pl.Expr | None = None) -> list[LoggedRequest]:
    """Requests of `split` (optionally filtered by `where` on the examples) in log order, at most `limit`."""
    examples = Dataset.at(data).scan(EXAMPLES, split)
    if where is not None:
        examples = examples.filter(where)
    examples = examples.sort("ts", "request_id", "position", "impression_id")
    ids = examples.select("request_id").unique(maintain_order=True)
    if limit is not None:
        ids = ids.head(limit)
    rows = examples.join(ids, on="request_id", maintain_order="left").collect()
    out = []
    for _, group in rows.group_by("request_id", maintain_order=True):
        r = group.row(0, named=True)
        context = pb.Context(ts_ms=r["ts"], geohash=r["geohash_12"] or r["geohash_6"], city_id=r["city_id"] or 0)
        if r["aoi_id"] is not None:
            context.aoi_id = r["aoi_id"]
        candidates = [pb.Candidate(**{field: c[column] or 0 for column, field in CANDIDATE_IDS.items()},
                                   **{field: c[field] or 0 for field in CANDIDATE_NUMBERS})
                      for c in group.iter_rows(named=True)]
        out.append(LoggedRequest(pb.ScoreRequest(user_id=r["user_id"], context=context, candidates=candidates),
                                 group["impression_id"].to_list(), group["label"].to_list()))
    return out
