import datetime as dt

import numpy as np
import pytest

from features import contract
from features.contract import MealSlot


def test_every_hour_has_exactly_one_meal_slot():
    hours = [h for hs in contract.MEAL_SLOT_HOURS.values() for h in hs]
    assert sorted(hours) == list(range(24))
    assert contract.meal_slot_of_hour(np.array([7, 12, 15, 19, 23, 2])).tolist() == [
        MealSlot.BREAKFAST, MealSlot.LUNCH, MealSlot.AFTERNOON_TEA, MealSlot.DINNER, MealSlot.NIGHT, MealSlot.NIGHT]


def test_local_time_fields():
    # 2026-03-02 (a Monday) 12:30 in UTC+8
    t = dt.datetime(2026, 3, 2, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    f = contract.local_time_fields(np.array([int(t.timestamp() * 1000)]), 8)
    assert (f["hours"][0], f["weekdays"][0], f["time_type"][0]) == (12, 0, MealSlot.LUNCH)


def test_field_names_follow_the_eleme_dataset():
    for name in ("shop_id", "item_id", "category_1_id", "brand_id", "shop_aoi_id", "shop_geohash_6", "hours",
                 "time_type", "weekdays", "city_id"):
        assert name in contract.BEHAVIOURS.schema.names
    assert {"request_id", "propensity", "label", "bid", "distance_m", "position"} <= set(contract.IMPRESSIONS.schema.names)
    for spec in contract.TABLES.values():
        assert set(spec.required) <= set(spec.schema.names)
        assert set(spec.ranges) <= set(spec.schema.names)
        assert all(ref in contract.TABLES for ref in spec.foreign_keys.values())
        assert all({image, *size} <= set(spec.schema.names) for image, size in spec.images.items())
    every = (*contract.WORLD_TABLES, *contract.OPTIONAL_WORLD_TABLES, *contract.LOG_TABLES, *contract.EVALUATION_TABLES)
    assert sorted(every) == sorted(contract.TABLES)


def test_to_table_orders_columns_and_refuses_missing_ones():
    cols = {f.name: [] for f in contract.ITEMS.schema}
    assert contract.to_table(contract.ITEMS, dict(reversed(list(cols.items())))).schema == contract.ITEMS.schema
    del cols["bid"]
    with pytest.raises(ValueError, match="missing \\['bid'\\]"):
        contract.to_table(contract.ITEMS, cols)
