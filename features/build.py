"""The per-partition work of the features job, as pure functions over polars frames.

A partition holds every log row of a set of users (rows are partitioned by user). For it we validate
rows against the contract, build timelines, point training examples into them, split examples by day,
and count impressions and clicks per item and shop for the point-in-time statistics. Nothing here
knows about files or Ray: `features.pipeline` reads and writes a partition around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from features import aggregates, contract, sequences
from features.dataset import EVALUATION_SPLITS, EVENT_TIMESTAMP, SPLITS
from features.validate import TableResult, validate_table

# what a candidate row takes from its request's impressions
REQUEST_COLUMNS = ("geohash_12", "geohash_6", "aoi_id", "city_id", "hours", "time_type", "weekdays", "history_len",
                   "day", "split")


@dataclass(frozen=True)
class SplitDays:
    """Local days (since 1970-01-01): validation from `validation_start`, test from `test_start`."""

    validation_start: int
    test_start: int

    @classmethod
    def last_days(cls, last_day: int, validation_days: int, test_days: int) -> "SplitDays":
        test_start = last_day - test_days + 1
        return cls(validation_start=test_start - validation_days, test_start=test_start)

    def split_of(self, day: pl.Expr) -> pl.Expr:
        return (pl.when(day >= self.test_start).then(pl.lit("test"))
                .when(day >= self.validation_start).then(pl.lit("validation")).otherwise(pl.lit("train")))


@dataclass
class PartitionOutput:
    timelines: pl.DataFrame  # one row per user, full timelines as lists
    online_timelines: pl.DataFrame  # the last max_seq_len events + event_timestamp, for the online store
    examples: dict[str, pl.DataFrame]  # split -> examples
    candidates: dict[str, pl.DataFrame]  # evaluation split -> every logged ad candidate, with its request's context
    item_counts: pl.DataFrame
    shop_counts: pl.DataFrame
    validation: dict[str, TableResult]


def build_partition(behaviours: pl.DataFrame, impressions: pl.DataFrame, *, known_keys: dict[str, pl.Series | None],
                    window: tuple[int, int], split: SplitDays, max_seq_len: int,
                    utc_offset_hours: float, candidates: pl.DataFrame | None = None,
                    seen_elsewhere: dict[str, pl.Series] | None = None) -> PartitionOutput:
    # Rows arrive in input-file order (shards are read in a fixed order), so "the first duplicate wins"
    # means the same here as in `fin validate`, and reruns are identical.
    # `seen_elsewhere`: per table, the rows whose id an earlier row of another partition holds
    elsewhere = seen_elsewhere or {}
    beh = validate_table(behaviours, contract.BEHAVIOURS, window=window, known_keys=known_keys,
                         seen_elsewhere=elsewhere.get(contract.BEHAVIOURS.name))
    imp = validate_table(impressions, contract.IMPRESSIONS, window=window, known_keys=known_keys,
                         seen_elsewhere=elsewhere.get(contract.IMPRESSIONS.name))
    events = sequences.timeline_events(beh.clean)
    timelines = sequences.build_timelines(events)
    online = sequences.tail_timelines(timelines, max_seq_len).with_columns(
        pl.col("ts").list.last().cast(pl.Datetime("ms", "UTC")).alias(EVENT_TIMESTAMP))

    clean_imp = imp.clean  # input order; examples need no sort (history_len is a binary search)
    examples = clean_imp.with_columns(
        history_len=pl.Series(sequences.history_lengths(clean_imp["user_id"].to_numpy(), clean_imp["ts"].to_numpy(),
                                                        events), dtype=pl.Int64),
        day=aggregates.local_day(pl.col("ts"), utc_offset_hours),
    ).with_columns(split=split.split_of(pl.col("day")))
    by_split = {s: examples.filter(pl.col("split") == s).drop("split") for s in SPLITS}
    validation = {"behaviours": beh, "impressions": imp}
    by_split_candidates = {}
    if candidates is not None:
        # a candidate takes its request's context and history pointer from the request's impressions (a
        # request without a clean impression has no context: its candidates are left out)
        cand = validate_table(candidates, contract.AD_CANDIDATES, window=window, known_keys=known_keys,
                              seen_elsewhere=elsewhere.get(contract.AD_CANDIDATES.name))
        validation["ad_candidates"] = cand
        requests = examples.select("request_id", *REQUEST_COLUMNS).unique("request_id", keep="first",
                                                                          maintain_order=True)
        joined = cand.clean.join(requests, on="request_id", how="inner", maintain_order="left")
        by_split_candidates = {s: joined.filter(pl.col("split") == s).drop("split") for s in EVALUATION_SPLITS}
    return PartitionOutput(
        timelines=timelines, online_timelines=online, examples=by_split, candidates=by_split_candidates,
        item_counts=aggregates.daily_counts(examples.lazy(), "item_id").collect(),
        shop_counts=aggregates.daily_counts(examples.lazy(), "shop_id").collect(),
        validation=validation,
    )
