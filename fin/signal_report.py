"""The signal a log folder holds: the properties the simulator claims, measured on its output.

These work on any contract log folder (simulated or converted), are vectorised with polars, and are
used by the tests and printed by `fin simulate --report`. They live beside the models, not the
simulator, because they score features with the evaluation's own metrics (`fin.metrics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from features import logio
from fin.metrics import auc


def scan(logs: str | Path, table: str) -> pl.LazyFrame:
    """A table of a parquet log folder, lazily (the files `logio.table_files` finds)."""
    return pl.scan_parquet(logio.table_files(logs, table), hive_partitioning=False)


def behaviours_per_user(logs: str | Path) -> np.ndarray:
    counts = scan(logs, "behaviours").group_by("user_id").len().collect()
    return counts["len"].to_numpy()


def ctr_by_distance(logs: str | Path, edges_m: tuple[float, ...] = (0, 500, 1000, 1500, 2000, 3000, 1e9)) -> pl.DataFrame:
    """Click rate of impressions per distance bin (bin = index of the left edge)."""
    edges = np.asarray(edges_m, dtype=np.float64)
    imp = scan(logs, "impressions").select("distance_m", "label").collect()
    bins = np.searchsorted(edges, imp["distance_m"].to_numpy(), side="right") - 1
    return (imp.with_columns(bin=pl.Series(bins)).group_by("bin").agg(ctr=pl.col("label").mean(), n=pl.len())
            .sort("bin").with_columns(lo_m=pl.col("bin").map_elements(lambda b: edges[b], return_dtype=pl.Float64)))


def category_share_by_slot(logs: str | Path) -> pl.DataFrame:
    """(time_type x category_1_id) share of orders within each meal slot."""
    return (scan(logs, "behaviours").filter(pl.col("action") == 1).group_by("time_type", "category_1_id").len()
            .with_columns(share=pl.col("len") / pl.col("len").sum().over("time_type")).collect())


def slot_category_divergence(logs: str | Path) -> float:
    """Largest total-variation distance between the category mixes of two meal slots (0 = identical)."""
    wide = category_share_by_slot(logs).pivot(on="category_1_id", index="time_type", values="share").fill_null(0.0)
    mix = wide.drop("time_type").to_numpy()
    return float(max(0.5 * np.abs(mix[i] - mix[j]).sum() for i in range(len(mix)) for j in range(i + 1, len(mix))))


def history_count_features(logs: str | Path, recent: int = 50) -> pl.DataFrame:
    """Per impression, two counts of the user's earlier behaviours with the candidate shop:
    `same_place_slot`: over their whole history, only where they were in the same geohash6 cell and meal slot;
    `last_n`: within their last `recent` behaviours, anywhere and any time.
    Behaviours at the impression's own timestamp or later never count."""
    beh = scan(logs, "behaviours").select("user_id", "ts", "shop_id", "geohash_6", "time_type").with_columns(is_beh=pl.lit(1, pl.Int32))
    imp = scan(logs, "impressions").select("impression_id", "user_id", "ts", "shop_id", "geohash_6", "time_type", "label",
                                            "oracle_click_prob")
    both = pl.concat([imp.with_columns(is_beh=pl.lit(0, pl.Int32)), beh], how="diagonal").sort("ts", "is_beh")
    both = both.with_columns(
        user_index=pl.col("is_beh").cum_sum().over("user_id") - pl.col("is_beh"),
        shop_count=pl.col("is_beh").cum_sum().over("user_id", "shop_id"),
        same_place_slot=pl.col("is_beh").cum_sum().over("user_id", "shop_id", "geohash_6", "time_type"),
    )
    behaviours = (both.filter(pl.col("is_beh") == 1).select("user_id", "shop_id", "user_index", "shop_count")
                  .sort("user_index"))
    impressions = (both.filter(pl.col("is_beh") == 0)
                   .with_columns(window_start=pl.col("user_index") - recent - 1).sort("window_start"))
    # behaviours of (user, shop) that fell out of the recent window: the count at index < user_index - recent
    joined = impressions.join_asof(behaviours, left_on="window_start", right_on="user_index", by=["user_id", "shop_id"],
                                   strategy="backward", suffix="_old", check_sortedness=False)
    return joined.select(
        "impression_id", "label", "oracle_click_prob", "same_place_slot", "user_index",
        last_n=pl.col("shop_count") - pl.col("shop_count_old").fill_null(0),
    ).collect()


def history_feature_auc(logs: str | Path, recent: int = 50) -> dict[str, float]:
    """AUC on the logged labels of the two count features of `history_count_features`."""
    f = history_count_features(logs, recent)
    labels = f["label"].to_numpy()
    return {
        "same_place_slot_auc": auc(labels, f["same_place_slot"].to_numpy()),
        f"last_{recent}_auc": auc(labels, f["last_n"].to_numpy()),
        "impressions": float(f.height),
    }


def signal_report(logs: str | Path) -> dict:
    """The simulator's claims, measured: heavy-tailed lifelong activity, distance decay, meal-slot tastes,
    and the lifelong same-place-and-slot history beating the recent history."""
    per_user = behaviours_per_user(logs)
    ctr = ctr_by_distance(logs)
    return {
        "behaviours_per_user_p50_p90_p99": np.percentile(per_user, [50, 90, 99]).round(1).tolist(),
        "share_of_users_over_1000_behaviours": round(float((per_user > 1000).mean()), 4),
        "ctr_by_distance": {f">={lo:.0f}m": round(c, 4) for lo, c in zip(ctr["lo_m"], ctr["ctr"])},
        "meal_slot_category_divergence": round(slot_category_divergence(logs), 4),
        **{k: round(v, 4) for k, v in history_feature_auc(logs).items()},
    }
