"""Timelines and history pointers: pure polars/torch transforms shared by the features job, training and serving.

A **timeline** is one user's behaviours sorted by time, held as list columns (one row per user). A
training example never copies a sequence: it carries `history_len`, the number of the user's timeline
events strictly before the impression; its history is the last `max_seq_len` of those.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from features import geohash
from features.fragments import MISSING

# Per-event fields of a timeline (besides user_id), in storage order.
TIMELINE_FIELDS = ("ts", "action", "shop_id", "item_id", "category_1_id", "brand_id", "price_bucket",
                   "shop_aoi_id", "place_geohash6", "aoi_id", "time_type", "weekdays", "hours")
PRICE_BUCKETS = 64
_GEOHASH_TO_BASE32 = dict(zip(geohash.BASE32, "0123456789abcdefghijklmnopqrstuv"))


def geohash_code(expr: pl.Expr) -> pl.Expr:
    """Geohash string -> the integer code of `geohash.to_codes` (null stays null), vectorised in polars."""
    digits = expr.str.to_lowercase().str.replace_many(list(_GEOHASH_TO_BASE32), list(_GEOHASH_TO_BASE32.values()))
    return digits.str.to_integer(base=32, strict=False)


def price_bucket(expr: pl.Expr) -> pl.Expr:
    """Log-scale price bucket in [1, PRICE_BUCKETS); 0 when the price is unknown."""
    b = ((expr.cast(pl.Float64) + 1.0).log(2) * 6).floor().cast(pl.Int64, strict=False) + 1
    return b.clip(1, PRICE_BUCKETS - 1).fill_null(0)


def timeline_events(behaviours: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Contract behaviours -> timeline events (user_id + TIMELINE_FIELDS), sorted by user then time.

    The place of an event is where the user was (`geohash_6`); sources that do not know it (the Ele.me
    histories) fall back to the shop's cell. Unknown ids become MISSING.
    """
    return behaviours.lazy().select(
        "user_id", "ts",
        pl.col("action").cast(pl.Int64),
        "shop_id",
        pl.col("item_id").fill_null(MISSING),
        "category_1_id",
        pl.col("brand_id").fill_null(MISSING),
        price_bucket(pl.col("price")).alias("price_bucket"),
        pl.col("shop_aoi_id").fill_null(MISSING),
        geohash_code(pl.coalesce("geohash_6", "shop_geohash_6")).fill_null(MISSING).alias("place_geohash6"),
        pl.col("aoi_id").fill_null(MISSING),
        *(pl.col(c).cast(pl.Int64) for c in ("time_type", "weekdays", "hours")),
        pl.col("event_id"),
    ).sort("user_id", "ts", "event_id").drop("event_id")


def build_timelines(events: pl.LazyFrame) -> pl.DataFrame:
    """Timeline events -> one row per user with a list column per field (time order kept)."""
    return events.group_by("user_id", maintain_order=True).agg(*TIMELINE_FIELDS).sort("user_id").collect()


def history_lengths(impressions: pl.LazyFrame, events: pl.LazyFrame) -> pl.LazyFrame:
    """Adds `history_len` to impressions: how many of the user's timeline events are strictly earlier."""
    indexed = events.select("user_id", "ts").with_columns(
        history_len=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user_id")).sort("ts")
    return (impressions.sort("ts")
            .join_asof(indexed, on="ts", by="user_id", strategy="backward", allow_exact_matches=False,
                       check_sortedness=False)
            .with_columns(pl.col("history_len").fill_null(0)))


def tail_timelines(timelines: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Keep each user's last `max_len` events (what the online store holds)."""
    return timelines.with_columns(pl.col(f).list.tail(max_len) for f in TIMELINE_FIELDS)


def history_batch(timelines: dict[str, np.ndarray], timeline_offsets: np.ndarray, rows: np.ndarray,
                  history_len: np.ndarray, max_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gather a jagged batch of histories: for example i, the `max_len` events before position
    `history_len[i]` of timeline `rows[i]`. `timelines` holds each field's flat values over all users,
    `timeline_offsets` where each user's timeline starts (length users + 1)."""
    end = timeline_offsets[rows] + history_len
    start = np.maximum(end - max_len, timeline_offsets[rows])
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    values = {f: torch.from_numpy(np.ascontiguousarray(v[flat])) for f, v in timelines.items()}
    return torch.from_numpy(offsets.astype(np.int64)), values
