"""Baseline: the user timelines of `fin features`, built the plain way, in one pandas process.

Reads the behaviours, derives the same per-event fields, sorts by user and time, and groups each
field into a per-user list (`groupby(...).agg(list)`), then writes parquet.
Usage: python benchmarks/pandas_timelines.py LOGS OUT_FILE
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.dataset as ds

GEOHASH = "0123456789bcdefghjkmnpqrstuvwxyz"
TO_BASE32 = str.maketrans(GEOHASH, "0123456789abcdefghijklmnopqrstuv")
FIELDS = ["ts", "action", "shop_id", "item_id", "category_1_id", "brand_id", "price_bucket", "shop_aoi_id",
          "place_geohash6", "aoi_id", "time_type", "weekdays", "hours"]


def main(logs: str, out: str) -> None:
    df = ds.dataset(f"{logs}/behaviours", format="parquet", partitioning=None).to_table().to_pandas()
    df["price_bucket"] = (np.floor(np.log2(df["price"].astype(float) + 1) * 6) + 1).clip(1, 63).fillna(0).astype("int64")
    place = df["geohash_6"].fillna(df["shop_geohash_6"])
    df["place_geohash6"] = place.map(lambda g: int(g.translate(TO_BASE32), 32) if isinstance(g, str) else -1)
    for c in ("item_id", "brand_id", "shop_aoi_id", "aoi_id"):
        df[c] = df[c].fillna(-1).astype("int64")
    df = df.sort_values(["user_id", "ts", "event_id"], kind="stable")
    timelines = df.groupby("user_id", sort=True)[FIELDS].agg(list).reset_index()
    timelines.to_parquet(out, index=False)
    print(len(timelines), len(df))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", help="a log folder (fin simulate's output)")
    parser.add_argument("out", help="the parquet file to write the timelines to")
    args = parser.parse_args()
    main(args.logs, args.out)
