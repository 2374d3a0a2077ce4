"""Timelines and history pointers: pure polars/numpy transforms shared by the features job, training and serving.

A **timeline** is one user's behaviours sorted by time, held as list columns (one row per user). A
training example never copies a sequence: it carries `history_len`, the number of the user's timeline
events strictly before the impression; its history is the last `max_seq_len` of those.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from features import geohash
from features.contract import MISSING

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
    b = ((expr.cast(pl.Float64) + 1.0).log(2) * 6).floor().cast(pl.Int16, strict=False) + 1  # log2 of a float64 < 1025
    return b.clip(1, PRICE_BUCKETS - 1).fill_null(0)


def timeline_events(behaviours: pl.DataFrame | pl.LazyFrame, keep_event_id: bool = False) -> pl.DataFrame:
    """Contract behaviours -> timeline events (user_id + TIMELINE_FIELDS, and event_id when asked), sorted by
    user, time, event id.

    The place of an event is where the user was (`geohash_6`); sources that do not know it (the Ele.me
    histories) fall back to the shop's cell. Unknown ids become MISSING. Every field is an integer
    before the sort, so the sort moves no strings; numpy's lexsort orders the three keys several times
    faster than a polars multi-column sort.
    """
    events = behaviours.lazy().select(
        "user_id", "ts", "action", "shop_id",
        pl.col("item_id").fill_null(MISSING),
        "category_1_id",
        pl.col("brand_id").fill_null(MISSING),
        price_bucket(pl.col("price")).alias("price_bucket"),
        pl.col("shop_aoi_id").fill_null(MISSING),
        _geohash_codes(pl.coalesce("geohash_6", "shop_geohash_6")).alias("place_geohash6"),
        pl.col("aoi_id").fill_null(MISSING),
        "time_type", "weekdays", "hours", "event_id",
    ).collect()
    order = np.lexsort([events[c].to_numpy() for c in ("event_id", "ts", "user_id")])  # last key first
    # the gather is the costly step (a random permutation): it moves the narrow types, widened after
    return (events if keep_event_id else events.drop("event_id"))[pl.Series(order)].with_columns(
        pl.col("action", "price_bucket", "time_type", "weekdays", "hours").cast(pl.Int64))


def timeline_arrays(behaviours: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`timeline_events(..., keep_event_id=True)` for a few checked behaviours held as numpy columns (numbers
    as masked arrays, masked: null; cells as object arrays, None: null), with numpy and plain Python where
    a polars query would cost milliseconds (tests/test_ingest_checks.py keeps the two equal)."""
    def filled(name: str) -> np.ndarray:
        return np.ma.filled(np.ma.asarray(behaviours[name]).astype(np.int64), MISSING)

    price = np.ma.asarray(behaviours["price"]).astype(np.float32).astype(np.float64)  # as stored (float32)
    with np.errstate(invalid="ignore", divide="ignore"):  # the log of polars' price_bucket: ln(x) / ln(2)
        bucket = np.floor(np.log(np.ma.getdata(price) + 1.0) / np.log(2.0) * 6) + 1
    bucket = np.where(np.ma.getmaskarray(price) | ~np.isfinite(bucket), 0, np.clip(bucket, 1, PRICE_BUCKETS - 1))
    place = [p if p is not None else s for p, s in zip(behaviours["geohash_6"], behaviours["shop_geohash_6"])]
    codes = {cell: geohash.code_of(cell) for cell in set(place) if cell is not None}
    events = {"user_id": filled("user_id"), "ts": filled("ts"), "action": filled("action"),
              "shop_id": filled("shop_id"), "item_id": filled("item_id"), "category_1_id": filled("category_1_id"),
              "brand_id": filled("brand_id"), "price_bucket": bucket.astype(np.int64),
              "shop_aoi_id": filled("shop_aoi_id"),
              "place_geohash6": np.array([codes.get(cell, MISSING) for cell in place], np.int64),
              "aoi_id": filled("aoi_id"), "time_type": filled("time_type"), "weekdays": filled("weekdays"),
              "hours": filled("hours"), "event_id": filled("event_id")}
    order = np.lexsort([events["event_id"], events["ts"], events["user_id"]])
    return {name: values[order] for name, values in events.items()}


def _geohash_codes(cells: pl.Expr) -> pl.Expr:
    """geohash_code for a column with few distinct cells: convert each distinct cell once, then look up."""
    return cells.map_batches(_codes_of_distinct, return_dtype=pl.Int64)


def _codes_of_distinct(cells: pl.Series) -> pl.Series:
    distinct = cells.drop_nulls().unique()
    codes = distinct.to_frame().select(geohash_code(pl.col(cells.name))).to_series()
    return cells.replace_strict(distinct, codes, default=MISSING, return_dtype=pl.Int64)


def build_timelines(events: pl.DataFrame) -> pl.DataFrame:
    """Timeline events (sorted by user, then time) -> one row per user with a list column per field.
    Each user's events are already contiguous: the lists are views of the columns, cut at user changes."""
    user = events["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if user.size else np.zeros(0, dtype=np.int64)
    offsets = pa.array(np.r_[starts, user.size].astype(np.int64))
    lists = {f: pa.LargeListArray.from_arrays(offsets, events[f].to_arrow()) for f in TIMELINE_FIELDS}
    return pl.DataFrame({"user_id": user[starts]}).with_columns(
        **{f: pl.Series(f, lists[f]) for f in TIMELINE_FIELDS})


def history_lengths(user_id: np.ndarray, ts: np.ndarray, events: pl.DataFrame) -> np.ndarray:
    """For each (user_id, ts): how many of the user's timeline events are strictly earlier.

    `events` must be sorted by user then time (as `timeline_events` returns them). One binary search
    per request over a combined (user rank, time) key, with the requests sorted first so that the
    searches walk the events in order; no joins, no copies of sequences.
    """
    ev_user = events["user_id"].to_numpy()
    ev_ts = events["ts"].to_numpy()
    if ev_user.size == 0 or user_id.size == 0:
        return np.zeros(user_id.size, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ev_user[1:] != ev_user[:-1]])
    users = ev_user[starts]
    if starts.size >= 1 << 21:
        raise ValueError("more than 2M users in one partition: use more partitions")
    t0 = min(int(ev_ts.min()), int(ts.min()))
    rank = np.repeat(np.arange(starts.size, dtype=np.int64), np.diff(np.r_[starts, ev_user.size]))
    event_key = (rank << 42) | (ev_ts - t0)  # sorted, because events are sorted by (user, ts)
    pos = np.minimum(np.searchsorted(users, user_id), users.size - 1)
    known = users[pos] == user_id
    request_key = (pos.astype(np.int64) << 42) | (ts - t0)
    order = np.argsort(request_key)
    first_not_earlier = np.empty_like(request_key)
    first_not_earlier[order] = np.searchsorted(event_key, request_key[order], side="left")
    return np.where(known, first_not_earlier - starts[pos], 0)


def tail_timelines(timelines: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Keep each user's last `max_len` events (what the online store holds)."""
    return timelines.with_columns(pl.col(f).list.tail(max_len) for f in TIMELINE_FIELDS)
