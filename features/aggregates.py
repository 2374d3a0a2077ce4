"""Point-in-time item and shop click statistics.

The row for (key, day d) summarises impressions of days d-w .. d-1 only (w = 7 and 30): a training
example on day d joins it with no look-ahead, and serving reads the newest row. The CTR is smoothed
towards a fixed prior so that it needs nothing computed from later data.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from features.dataset import EVENT_TIMESTAMP, STAT_COLUMNS, STAT_WINDOWS

DAY_MS = 86_400_000


@dataclass(frozen=True)
class StatsConfig:
    prior_ctr: float = 0.05
    prior_weight: float = 20.0  # pseudo-impressions of the prior


def local_day(ts: pl.Expr, utc_offset_hours: float) -> pl.Expr:
    """Days since 1970-01-01 of the local date of a UTC millisecond timestamp."""
    return ((ts + int(utc_offset_hours * 3_600_000)) // DAY_MS).cast(pl.Int32)


def local_day_start_ms(day: int, utc_offset_hours: float) -> int:
    """The UTC millisecond timestamp at which local day `day` (days since 1970-01-01) begins."""
    return day * DAY_MS - int(utc_offset_hours * 3_600_000)


def daily_counts(impressions: pl.LazyFrame, key: str) -> pl.LazyFrame:
    """(key, day) -> impressions, clicks. `impressions` must carry a `day` column."""
    return impressions.group_by(key, "day").agg(impressions=pl.len().cast(pl.Int64),
                                                 clicks=pl.col("label").cast(pl.Int64).sum())


def point_in_time_stats(counts: pl.DataFrame, key: str, first_day: int, last_day: int, utc_offset_hours: float,
                        config: StatsConfig = StatsConfig()) -> pl.DataFrame:
    """Dense (key, day) table for days first_day .. last_day + 1 of windowed stats over the days before.

    `counts` may hold several rows per (key, day) (one per data partition); they are summed.
    """
    counts = counts.group_by(key, "day").agg(pl.col("impressions").sum(), pl.col("clicks").sum())
    days = pl.DataFrame({"day": pl.int_range(first_day, last_day + 2, eager=True).cast(pl.Int32)})
    grid = (counts.select(key).unique().join(days, how="cross")
            .join(counts, on=[key, "day"], how="left")
            .with_columns(pl.col("impressions", "clicks").fill_null(0))
            .sort(key, "day"))
    before = {c: pl.col(c).cum_sum().over(key) - pl.col(c) for c in ("impressions", "clicks")}
    grid = grid.with_columns(**{f"{c}_before": e for c, e in before.items()})
    out = []
    for w in STAT_WINDOWS:
        for c in ("impressions", "clicks"):
            out.append((pl.col(f"{c}_before") - pl.col(f"{c}_before").shift(w).over(key).fill_null(0)).alias(f"{c}_{w}d"))
    grid = grid.with_columns(out)
    a, p = config.prior_weight, config.prior_ctr
    grid = grid.with_columns(
        [((pl.col(f"clicks_{w}d") + a * p) / (pl.col(f"impressions_{w}d") + a)).cast(pl.Float32).alias(f"ctr_{w}d")
         for w in STAT_WINDOWS])
    offset_ms = int(utc_offset_hours * 3_600_000)
    return grid.select(
        key, "day",
        (pl.col("day").cast(pl.Int64) * DAY_MS - offset_ms).cast(pl.Datetime("ms", "UTC")).alias(EVENT_TIMESTAMP),
        *STAT_COLUMNS,
    )
