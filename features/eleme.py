"""Converter from the public Ele.me CTR dataset's CSV layout into contract log tables.

In that dataset a row is one shown candidate (`label`), with the request's context and the user's
history as of the request in `*_list` columns (';'-separated, oldest first, aligned by position;
`timediff_list` is how long before the request each event happened). The mapping:
    row            -> one impression (no position, propensity or bid: the dataset does not log them)
    history lists  -> behaviours (action = click), de-duplicated across the rows of a user on
                      (user_id, ts, shop_id, item_id): the same event appears in many requests' lists
    shops/items/users -> derived from what the rows mention (first mention wins)
`times` is the request time: epoch seconds (or milliseconds), or 'YYYY-MM-DD HH:MM:SS' local time.
`time_type` may be a code 0-4 or a meal name. Where the user stood when a history event happened is
not in the dataset, so behaviours carry `geohash_6 = null` and fragments fall back to the shop's cell.
A malformed row (bad number, unparseable time, list lengths that disagree, bad geohash) goes to
quarantine with a reason; none is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features import contract, geohash, logio
from features.contract import Action, MealSlot
from features.validate import reason_counts

SCALAR_INT = ("label", "user_id", "gender", "visit_city", "is_super_vip", "shop_id", "item_id", "city_id",
              "district_id", "shop_aoi_id", "brand_id", "category_1_id", "hours", "weekdays")
SCALAR_FLOAT = ("avg_price",)
LIST_INT = ("shop_id_list", "item_id_list", "category_1_id_list", "brand_id_list", "shop_aoi_id_list",
            "hours_list", "weekdays_list")
LIST_FLOAT = ("price_list", "timediff_list")
LIST_TEXT = ("shop_geohash_6_list", "time_type_list")
COLUMNS = (
    "label", "user_id", "gender", "visit_city", "avg_price", "is_super_vip", "ctr_30", "ord_30", "total_amt_30",
    "shop_id", "item_id", "city_id", "district_id", "shop_aoi_id", "shop_geohash_6", "shop_geohash_12", "brand_id",
    "category_1_id", "merge_standard_food_id", "rank_7", "rank_30", "rank_90", "shop_id_list", "item_id_list",
    "category_1_id_list", "merge_standard_food_id_list", "brand_id_list", "price_list", "shop_aoi_id_list",
    "shop_geohash_6_list", "timediff_list", "hours_list", "time_type_list", "weekdays_list", "times", "hours",
    "time_type", "weekdays", "geohash12",
)
MEAL_NAMES = {"breakfast": MealSlot.BREAKFAST, "lunch": MealSlot.LUNCH, "afternoon_tea": MealSlot.AFTERNOON_TEA,
              "afternoon tea": MealSlot.AFTERNOON_TEA, "tea": MealSlot.AFTERNOON_TEA, "dinner": MealSlot.DINNER,
              "night": MealSlot.NIGHT, "supper": MealSlot.NIGHT}
TIMEDIFF_MS = {"s": 1000, "min": 60_000, "ms": 1}


@dataclass(frozen=True)
class ElemeConfig:
    timediff_unit: str = "s"
    utc_offset_hours: float = 8.0


def _meal_slot(expr: pl.Expr) -> pl.Expr:
    """time_type given as a code 0-4 or a meal name -> code, null when neither."""
    text = expr.str.strip_chars().str.to_lowercase()
    code = text.cast(pl.Int64, strict=False)
    named = text.replace_strict(list(MEAL_NAMES), [int(v) for v in MEAL_NAMES.values()], default=None,
                                return_dtype=pl.Int64)
    return pl.when(code.is_between(0, len(MealSlot) - 1)).then(code).otherwise(named)


def _split(col: str) -> pl.Expr:
    c = pl.col(col).str.strip_chars()
    return pl.when(c.is_null() | (c == "")).then(pl.lit([], dtype=pl.List(pl.String))).otherwise(c.str.split(";"))


def _request_ts(offset_hours: float) -> pl.Expr:
    text = pl.col("times").str.strip_chars()
    number = text.cast(pl.Float64, strict=False)
    epoch_ms = pl.when(number > 1e11).then(number).otherwise(number * 1000).cast(pl.Int64)
    local = text.str.to_datetime(format="%Y-%m-%d %H:%M:%S", strict=False, time_unit="ms")
    local_ms = local.dt.epoch("ms") - int(offset_hours * 3_600_000)
    return pl.when(number.is_not_null()).then(epoch_ms).otherwise(local_ms)


def parse_rows(raw: pl.DataFrame, config: ElemeConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Typed rows (history lists as typed lists) and the malformed rows with a `reason`."""
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"not the Ele.me CTR layout: missing column(s) {', '.join(missing)}")
    if config.timediff_unit not in TIMEDIFF_MS:
        raise ValueError(f"timediff unit must be one of {', '.join(TIMEDIFF_MS)}")
    typed = {c: pl.col(c).str.strip_chars().cast(pl.Int64, strict=False) for c in SCALAR_INT}
    typed |= {c: pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in SCALAR_FLOAT}
    typed |= {c: _split(c).list.eval(pl.element().str.strip_chars().cast(pl.Int64, strict=False)) for c in LIST_INT}
    typed |= {c: _split(c).list.eval(pl.element().str.strip_chars().cast(pl.Float64, strict=False)) for c in LIST_FLOAT}
    typed |= {"shop_geohash_6_list": _split("shop_geohash_6_list").list.eval(pl.element().str.strip_chars().str.to_lowercase()),
              "time_type_list": _split("time_type_list").list.eval(_meal_slot(pl.element())),
              "time_type": _meal_slot(pl.col("time_type")), "ts": _request_ts(config.utc_offset_hours),
              "geohash12": pl.col("geohash12").str.strip_chars().str.to_lowercase(),
              "shop_geohash_12": pl.col("shop_geohash_12").str.strip_chars().str.to_lowercase(),
              "shop_geohash_6": pl.col("shop_geohash_6").str.strip_chars().str.to_lowercase()}
    # the numbers no check below reads as a whole (the label, ids and time fields have their own)
    scalars = [c for c in (*SCALAR_INT, *SCALAR_FLOAT)
               if c not in ("label", "user_id", "shop_id", "item_id", "category_1_id", "hours", "weekdays")]
    given = {f"_given_{c}": pl.col(c).str.strip_chars().str.len_chars() > 0 for c in scalars}
    df = raw.with_row_index("row", offset=1).with_columns(**given).with_columns(**typed)

    checks: list[tuple[str, pl.Expr]] = [
        ("bad_label", ~pl.col("label").is_in([0, 1]).fill_null(False)),
        ("bad_times", pl.col("ts").is_null()),
        ("bad_time_fields", ~(pl.col("hours").is_between(0, 23) & pl.col("weekdays").is_between(0, 6)
                              & pl.col("time_type").is_not_null()).fill_null(False)),
        ("bad_geohash12", ~pl.col("geohash12").str.contains(geohash.pattern(12)).fill_null(False)),
        ("bad_shop_geohash", ~pl.col("shop_geohash_6").str.contains(geohash.pattern(6)).fill_null(False)),
    ]
    checks += [(f"bad_id:{c}", pl.col(c).is_null()) for c in ("user_id", "shop_id", "item_id", "category_1_id")]
    # a number given that does not read as one (an empty field is a missing value, allowed where optional)
    checks += [(f"bad_number:{c}", pl.col(f"_given_{c}").fill_null(False) & pl.col(c).is_null()) for c in scalars]
    # values the contract's columns do not allow (their small integer types could not even hold some: the
    # conversion of every row failed)
    checks += [(f"out_of_range:{c}", _outside(pl.col(c), contract.USERS.ranges[c]).fill_null(False))
               for c in ("gender", "is_super_vip")]
    checks += [(f"bad_list_value:{c}_list", pl.col(f"{c}_list").list.eval(
        _outside(pl.element(), contract.BEHAVIOURS.ranges[c])).list.any().fill_null(False)) for c in ("hours", "weekdays")]
    lists = (*LIST_INT, *LIST_FLOAT, *LIST_TEXT)
    first = pl.col(lists[0]).list.len()
    checks.append(("list_length_mismatch", pl.any_horizontal([pl.col(c).list.len() != first for c in lists[1:]])))
    # a missing value, or in a list of numbers one that is not finite (NaN or inf would fail the casts)
    value = pl.element()
    checks += [(f"bad_list_value:{c}", pl.col(c).list.eval(
        value.is_null() | ~value.is_finite() if c in LIST_FLOAT else value.is_null()).list.any()) for c in lists]
    checks.append(("bad_list_value:shop_geohash_6_list",
                   pl.col("shop_geohash_6_list").list.eval(~pl.element().str.contains(geohash.pattern(6))).list.any()))
    checks.append(("bad_list_value:timediff_list", pl.col("timediff_list").list.eval(pl.element() <= 0).list.any()))
    reason = pl.concat_str([pl.when(bad.fill_null(True)).then(pl.lit(n)) for n, bad in checks], separator=";",
                           ignore_nulls=True)
    df = df.with_columns(reason=reason).drop(*given)
    bad = df["reason"] != ""
    quarantine = raw.with_row_index("row", offset=1).filter(bad).with_columns(reason=df.filter(bad)["reason"])
    return df.filter(~bad).drop("reason"), quarantine


def _outside(x: pl.Expr, allowed: contract.Range) -> pl.Expr:
    return (x < allowed.lo) | (x > allowed.hi)


def to_tables(rows: pl.DataFrame, config: ElemeConfig) -> dict[str, pl.DataFrame]:
    """Contract tables from parsed rows."""
    impressions = rows.select(
        impression_id=pl.col("row").cast(pl.Int64),
        request_id=pl.struct("user_id", "ts", "geohash12").rank("dense").cast(pl.Int64),
        user_id="user_id", ts="ts", geohash_12="geohash12", geohash_6=pl.col("geohash12").str.slice(0, 6),
        aoi_id=pl.lit(None, pl.Int64), city_id="visit_city", hours="hours", time_type="time_type",
        weekdays="weekdays", item_id="item_id", shop_id="shop_id", category_1_id="category_1_id",
        brand_id="brand_id", price=pl.lit(None, pl.Float64), distance_m=pl.lit(None, pl.Float64),
        bid=pl.lit(None, pl.Float64), position=pl.lit(None, pl.Int64), propensity=pl.lit(None, pl.Float64),
        label="label", oracle_click_prob=pl.lit(None, pl.Float64),
    )
    # request-to-shop distance from the two geohash-12 cells (centimetre cells: exact enough)
    req_lat, req_lon = _cell_centres(rows["geohash12"])
    shop_lat, shop_lon = _cell_centres(rows["shop_geohash_12"])
    distance = pl.Series(geohash.haversine_m(req_lat, req_lon, shop_lat, shop_lon)).fill_nan(None)
    impressions = impressions.with_columns(distance_m=distance)

    unit_ms = TIMEDIFF_MS[config.timediff_unit]
    lists = (*LIST_INT, *LIST_FLOAT, *LIST_TEXT)
    history = (rows.select("user_id", "ts", "visit_city", *lists).explode(list(lists))
               .filter(pl.col("shop_id_list").is_not_null())
               .with_columns(event_ts=pl.col("ts") - (pl.col("timediff_list") * unit_ms).round().cast(pl.Int64))
               .unique(["user_id", "event_ts", "shop_id_list", "item_id_list"], keep="first", maintain_order=True)
               .sort("event_ts", "user_id", "shop_id_list", "item_id_list"))
    behaviours = history.select(
        event_id=pl.int_range(1, pl.len() + 1, dtype=pl.Int64), user_id="user_id", ts="event_ts",
        action=pl.lit(int(Action.CLICK), pl.Int64), shop_id="shop_id_list", item_id="item_id_list",
        category_1_id="category_1_id_list", brand_id="brand_id_list", price="price_list",
        shop_aoi_id="shop_aoi_id_list", shop_geohash_6="shop_geohash_6_list", geohash_6=pl.lit(None, pl.String),
        aoi_id=pl.lit(None, pl.Int64), hours="hours_list", time_type="time_type_list", weekdays="weekdays_list",
        city_id="visit_city",
    )

    target_shops = rows.select("shop_id", "brand_id", "category_1_id", "city_id", "district_id", "shop_aoi_id",
                               "shop_geohash_6", "shop_geohash_12")
    history_shops = history.select(shop_id="shop_id_list", brand_id="brand_id_list", category_1_id="category_1_id_list",
                                   city_id=pl.lit(None, pl.Int64), district_id=pl.lit(None, pl.Int64),
                                   shop_aoi_id="shop_aoi_id_list", shop_geohash_6="shop_geohash_6_list",
                                   shop_geohash_12=pl.lit(None, pl.String))
    shops = pl.concat([target_shops, history_shops]).unique("shop_id", keep="first", maintain_order=True)
    lat12, lon12 = _cell_centres(shops["shop_geohash_12"])
    lat6, lon6 = _cell_centres(shops["shop_geohash_6"])
    lat, lon = np.where(np.isnan(lat12), lat6, lat12), np.where(np.isnan(lon12), lon6, lon12)
    shops = shops.with_columns(lat=pl.Series(lat, dtype=pl.Float64), lon=pl.Series(lon, dtype=pl.Float64),
                               avg_price=pl.lit(None, pl.Float64), open_slots=pl.lit(None, pl.Int64))
    items = pl.concat([
        rows.select("item_id", "shop_id", price=pl.lit(None, pl.Float64)),
        history.select(item_id="item_id_list", shop_id="shop_id_list", price="price_list"),
    ]).unique("item_id", keep="first", maintain_order=True).with_columns(bid=pl.lit(None, pl.Float64))
    users = rows.select("user_id", "gender", "is_super_vip", "visit_city", "avg_price",
                        home_aoi_id=pl.lit(None, pl.Int64), work_aoi_id=pl.lit(None, pl.Int64),
                        home_geohash_6=pl.lit(None, pl.String), work_geohash_6=pl.lit(None, pl.String),
                        ).unique("user_id", keep="first", maintain_order=True)
    return {"shops": shops, "items": items, "users": users, "behaviours": behaviours, "impressions": impressions}


def _cell_centres(cells: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Centres of geohash cells of one precision (the longest present); NaN where a cell is missing or invalid."""
    lat, lon = np.full(cells.len(), np.nan), np.full(cells.len(), np.nan)
    precision = int(cells.str.len_chars().max() or 0)
    if precision == 0:
        return lat, lon
    valid = cells.str.contains(geohash.pattern(min(precision, 12))).fill_null(False).to_numpy()
    if valid.any():
        lat[valid], lon[valid] = geohash.decode(cells.to_numpy()[valid].astype(str))
    return lat, lon


def convert_eleme(csv: str | Path, out: str | Path, config: ElemeConfig = ElemeConfig(), *,
                  overwrite: bool = False) -> dict:
    """Convert one dataset CSV into a contract log folder; returns the manifest."""
    csv, out = Path(csv), Path(out)
    if not csv.is_file():
        raise FileNotFoundError(f"{csv} does not exist")
    raw = pl.read_csv(csv, infer_schema=False)
    rows, quarantine = parse_rows(raw, config)
    tables = to_tables(rows, config)
    tmp = logio.staging_folder(out, overwrite)
    (tmp / "quarantine").mkdir()
    for name, df in tables.items():
        table = contract.to_table(contract.TABLES[name], {c: df[c].to_arrow() for c in df.columns})
        path = tmp / name / "part-00000.parquet" if contract.TABLES[name].partitioned else tmp / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.from_arrow(table).write_parquet(path)
    quarantine.write_parquet(tmp / "quarantine" / "eleme_rows.parquet")
    ts = pl.concat([tables["impressions"]["ts"], tables["behaviours"]["ts"]])
    manifest = {
        "contract_version": contract.CONTRACT_VERSION,
        "producer": "fin convert-eleme",
        "source": str(csv),
        "window_start_ms": int(ts.min()) if ts.len() else 0,
        "window_end_ms": int(ts.max()) + 1 if ts.len() else 1,
        "utc_offset_hours": config.utc_offset_hours,
        "rows": {name: df.height for name, df in tables.items()},
        "source_rows": raw.height,
        "quarantined_rows": quarantine.height,
        "quarantine_reasons": reason_counts(quarantine),
    }
    (tmp / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    logio.publish(tmp, out)
    return manifest
