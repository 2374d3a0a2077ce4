"""The data contract: every log table's schema and rules, in one place.

Field names follow the public Ele.me CTR dataset so real data maps in with a thin converter
(`features.eleme`). Every other module refers to the names and rules here instead of repeating them;
the validator (`features.validate`) enforces exactly what `TableSpec` declares.

Conventions: ids are int64; timestamps are int64 milliseconds since the epoch, UTC; `hours`,
`weekdays` and `time_type` are in the city's local time; geohash columns hold lowercase base32 strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import pyarrow as pa

# 1.1: ad_candidates; 1.2: creatives (both additive and optional; a major change would break artifacts)
CONTRACT_VERSION = "1.2"
MISSING = -1  # an unknown id, AOI or geohash cell, in every integer-coded field derived from the logs


class MealSlot(IntEnum):
    """Meal slot of a request or event (`time_type`), by local hour."""

    BREAKFAST = 0  # 05:00-09:59
    LUNCH = 1  # 10:00-13:59
    AFTERNOON_TEA = 2  # 14:00-16:59
    DINNER = 3  # 17:00-20:59
    NIGHT = 4  # 21:00-04:59


MEAL_SLOT_HOURS: dict[MealSlot, tuple[int, ...]] = {
    MealSlot.BREAKFAST: (5, 6, 7, 8, 9),
    MealSlot.LUNCH: (10, 11, 12, 13),
    MealSlot.AFTERNOON_TEA: (14, 15, 16),
    MealSlot.DINNER: (17, 18, 19, 20),
    MealSlot.NIGHT: (21, 22, 23, 0, 1, 2, 3, 4),
}
_SLOT_OF_HOUR = np.zeros(24, dtype=np.int8)
for _slot, _hours in MEAL_SLOT_HOURS.items():
    _SLOT_OF_HOUR[list(_hours)] = int(_slot)


def meal_slot_of_hour(hours: np.ndarray | int) -> np.ndarray:
    """Vectorised local hour (0-23) -> MealSlot code."""
    return _SLOT_OF_HOUR[np.asarray(hours, dtype=np.int64)]


class Action(IntEnum):
    CLICK = 0
    ORDER = 1


class AoiType(IntEnum):
    RESIDENTIAL = 0
    OFFICE = 1
    CAMPUS = 2


def local_time_fields(ts_ms: np.ndarray, utc_offset_hours: float) -> dict[str, np.ndarray]:
    """hours, weekdays (Monday=0) and time_type of UTC millisecond timestamps in a city's local time."""
    local_s = np.asarray(ts_ms, dtype=np.int64) // 1000 + int(utc_offset_hours * 3600)
    hours = (local_s // 3600) % 24
    days = local_s // 86400
    return {
        "hours": hours.astype(np.int8),
        "time_type": meal_slot_of_hour(hours),
        "weekdays": ((days + 3) % 7).astype(np.int8),  # 1970-01-01 was a Thursday
    }


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is out of range


@dataclass(frozen=True)
class TableSpec:
    """Schema and rules of one table. The validator checks exactly these."""

    name: str
    schema: pa.Schema
    key: str | None = None  # unique row id
    required: tuple[str, ...] = ()  # may not be null
    ranges: dict[str, Range] = field(default_factory=dict)
    foreign_keys: dict[str, str] = field(default_factory=dict)  # column -> referenced table (same column name there)
    geohashes: dict[str, int] = field(default_factory=dict)  # column -> precision
    timestamp: str | None = None  # checked against the data window
    partitioned: bool = False  # written as date=YYYY-MM-DD partitions
    # PNG column -> its declared (width, height) columns: it must decode to an RGB image of that size
    images: dict[str, tuple[str, str]] = field(default_factory=dict)


_ID = pa.int64()
_TIME_RANGES = {
    "hours": Range(0, 23),
    "weekdays": Range(0, 6),
    "time_type": Range(0, len(MealSlot) - 1),
}

AOIS = TableSpec(
    name="aois",
    schema=pa.schema([
        ("aoi_id", _ID), ("aoi_type", pa.int8()), ("city_id", _ID), ("district_id", _ID),
        ("lat", pa.float64()), ("lon", pa.float64()), ("geohash_6", pa.string()), ("radius_m", pa.float32()),
    ]),
    key="aoi_id",
    required=("aoi_id", "aoi_type", "lat", "lon", "geohash_6"),
    ranges={"aoi_type": Range(0, len(AoiType) - 1), "lat": Range(-90, 90), "lon": Range(-180, 180),
            "radius_m": Range(0, None)},
    geohashes={"geohash_6": 6},
)

SHOPS = TableSpec(
    name="shops",
    schema=pa.schema([
        ("shop_id", _ID), ("brand_id", _ID), ("category_1_id", _ID), ("city_id", _ID), ("district_id", _ID),
        ("shop_aoi_id", _ID), ("shop_geohash_6", pa.string()), ("shop_geohash_12", pa.string()),
        ("lat", pa.float64()), ("lon", pa.float64()), ("avg_price", pa.float32()),
        ("open_slots", pa.int8()),  # bit s set: open in MealSlot s
    ]),
    key="shop_id",
    required=("shop_id", "category_1_id", "shop_geohash_6"),
    ranges={"lat": Range(-90, 90), "lon": Range(-180, 180), "avg_price": Range(0, None), "open_slots": Range(0, 31)},
    geohashes={"shop_geohash_6": 6, "shop_geohash_12": 12},
)

ITEMS = TableSpec(
    name="items",
    schema=pa.schema([
        ("item_id", _ID), ("shop_id", _ID), ("price", pa.float32()), ("bid", pa.float32()),
    ]),
    key="item_id",
    required=("item_id", "shop_id"),
    ranges={"price": Range(0, None), "bid": Range(0, None)},
    foreign_keys={"shop_id": "shops"},
)

USERS = TableSpec(
    name="users",
    schema=pa.schema([
        ("user_id", _ID), ("gender", pa.int8()), ("is_super_vip", pa.int8()), ("visit_city", _ID),
        ("avg_price", pa.float32()), ("home_aoi_id", _ID), ("work_aoi_id", _ID),
        ("home_geohash_6", pa.string()), ("work_geohash_6", pa.string()),
    ]),
    key="user_id",
    required=("user_id",),
    ranges={"gender": Range(0, 2), "is_super_vip": Range(0, 1), "avg_price": Range(0, None)},
    geohashes={"home_geohash_6": 6, "work_geohash_6": 6},
)

BEHAVIOURS = TableSpec(
    name="behaviours",
    schema=pa.schema([
        ("event_id", _ID), ("user_id", _ID), ("ts", pa.int64()), ("action", pa.int8()),
        ("shop_id", _ID), ("item_id", _ID), ("category_1_id", _ID), ("brand_id", _ID), ("price", pa.float32()),
        ("shop_aoi_id", _ID), ("shop_geohash_6", pa.string()),
        ("geohash_6", pa.string()),  # where the user was (null when the source does not know)
        ("aoi_id", _ID),  # the user's AOI at the time (nullable)
        ("hours", pa.int8()), ("time_type", pa.int8()), ("weekdays", pa.int8()), ("city_id", _ID),
    ]),
    key="event_id",
    required=("event_id", "user_id", "ts", "action", "shop_id", "category_1_id", "hours", "time_type", "weekdays"),
    ranges={"action": Range(0, len(Action) - 1), "price": Range(0, None), **_TIME_RANGES},
    foreign_keys={"user_id": "users", "shop_id": "shops", "item_id": "items"},
    geohashes={"shop_geohash_6": 6, "geohash_6": 6},
    timestamp="ts",
    partitioned=True,
)

IMPRESSIONS = TableSpec(
    name="impressions",
    schema=pa.schema([
        ("impression_id", _ID), ("request_id", _ID), ("user_id", _ID), ("ts", pa.int64()),
        # request context
        ("geohash_12", pa.string()), ("geohash_6", pa.string()), ("aoi_id", _ID), ("city_id", _ID),
        ("hours", pa.int8()), ("time_type", pa.int8()), ("weekdays", pa.int8()),
        # candidate
        ("item_id", _ID), ("shop_id", _ID), ("category_1_id", _ID), ("brand_id", _ID),
        ("price", pa.float32()), ("distance_m", pa.float32()), ("bid", pa.float32()),
        # logging policy and outcome
        ("position", pa.int16()), ("propensity", pa.float32()), ("label", pa.int8()),
        ("oracle_click_prob", pa.float32()),  # simulator only; see ORACLE_COLUMNS
    ]),
    key="impression_id",
    required=("impression_id", "request_id", "user_id", "ts", "geohash_6", "item_id", "shop_id",
              "category_1_id", "hours", "time_type", "weekdays", "label"),
    ranges={"price": Range(0, None), "bid": Range(0, None), "distance_m": Range(0, None),
            "position": Range(0, None), "propensity": Range(0, 1, lo_open=True), "label": Range(0, 1),
            "oracle_click_prob": Range(0, 1), **_TIME_RANGES},
    foreign_keys={"user_id": "users", "shop_id": "shops", "item_id": "items"},
    geohashes={"geohash_12": 12, "geohash_6": 6},
    timestamp="ts",
    partitioned=True,
)

# Every candidate of every ad request, shown or not, with what the logging policy would have done with it:
# what counterfactual evaluation needs (re-rank the whole candidate set, weight logged outcomes by the
# logging policy's probabilities). Optional: a source without it (Ele.me) only lacks revenue replay.
AD_CANDIDATES = TableSpec(
    name="ad_candidates",
    schema=pa.schema([
        ("candidate_id", _ID), ("request_id", _ID), ("user_id", _ID), ("ts", pa.int64()),
        ("item_id", _ID), ("shop_id", _ID), ("category_1_id", _ID), ("brand_id", _ID),
        ("price", pa.float32()), ("distance_m", pa.float32()), ("bid", pa.float32()),
        # the logging policy: its ranking score (bid x its quality factor; prices its own auction), whether
        # this request was ranked uniformly at random, and P(it shows this candidate at slot k) per slot
        ("logging_score", pa.float32()), ("explored", pa.int8()), ("slot_propensities", pa.list_(pa.float32())),
        # what happened: the slot it was shown in and its impression (null when not shown), the click
        ("position", pa.int16()), ("impression_id", _ID), ("label", pa.int8()),
        ("oracle_slot_click_probs", pa.list_(pa.float32())),  # simulator only: true P(click) if shown at slot k
    ]),
    key="candidate_id",
    required=("candidate_id", "request_id", "user_id", "ts", "item_id", "shop_id", "category_1_id", "bid",
              "logging_score", "explored", "slot_propensities"),
    ranges={"price": Range(0, None), "bid": Range(0, None), "distance_m": Range(0, None),
            "logging_score": Range(0, None, lo_open=True), "explored": Range(0, 1), "position": Range(0, None),
            "label": Range(0, 1), "slot_propensities": Range(0, 1, lo_open=True),
            "oracle_slot_click_probs": Range(0, 1)},
    foreign_keys={"user_id": "users", "shop_id": "shops", "item_id": "items"},
    timestamp="ts",
    partitioned=True,
)

# One ad creative (the image shown with the ad) per item, as PNG bytes (`features.creatives` encodes,
# checks and decodes them). Optional: a source without images (Ele.me) only lacks image features.
CREATIVES = TableSpec(
    name="creatives",
    schema=pa.schema([("item_id", _ID), ("image_png", pa.binary()), ("width", pa.int16()), ("height", pa.int16())]),
    key="item_id",
    required=("item_id", "image_png", "width", "height"),
    ranges={"width": Range(1, None), "height": Range(1, None)},
    foreign_keys={"item_id": "items"},
    images={"image_png": ("width", "height")},
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (AOIS, SHOPS, ITEMS, USERS, BEHAVIOURS, IMPRESSIONS,
                                                    AD_CANDIDATES, CREATIVES)}
WORLD_TABLES = ("aois", "shops", "items", "users")
OPTIONAL_WORLD_TABLES = ("creatives",)  # world tables a log folder may lack; validated after WORLD_TABLES
LOG_TABLES = ("behaviours", "impressions")
EVALUATION_TABLES = ("ad_candidates",)  # optional logs that only offline evaluation reads

def to_table(spec: TableSpec, columns: dict) -> pa.Table:
    """Build a table of `spec` from column arrays given in any order; raises on missing or extra columns."""
    names = spec.schema.names
    if set(columns) != set(names):
        raise ValueError(f"{spec.name}: columns differ from the contract: missing {sorted(set(names) - set(columns))}, "
                         f"extra {sorted(set(columns) - set(names))}")
    return pa.table([pa.array(columns[n]) if not isinstance(columns[n], (pa.Array, pa.ChunkedArray)) else columns[n]
                     for n in names], names=names).cast(spec.schema)


# Columns that exist for evaluation only. No model input may read them.
ORACLE_COLUMNS = ("oracle_click_prob",)  # of impressions (and the examples built from them)
CANDIDATE_ORACLE_COLUMNS = ("oracle_slot_click_probs",)  # of ad_candidates

# Written beside the tables by every producer of a log folder.
MANIFEST_FILE = "manifest.json"
