"""Feast objects: entities and the feature views that serving reads.

The user timeline is one feature view so that serving needs a single online read per request; it holds
the material of all FIN sub-sequences (every event with its place and time keys), cut per request by
`features.fragments.fragment`. Item and shop views hold point-in-time click statistics.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Float32, Int64
from feast.value_type import ValueType

from features.sequences import TIMELINE_FIELDS

PROJECT = "fin_ads"
TIMESTAMP = "event_timestamp"
STAT_FIELDS = ("impressions_7d", "clicks_7d", "ctr_7d", "impressions_30d", "clicks_30d", "ctr_30d")

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="an app user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="an advertised item")
shop = Entity(name="shop", join_keys=["shop_id"], value_type=ValueType.INT64, description="a shop")


def _stats_schema() -> list[Field]:
    return [Field(name=f, dtype=Float32 if f.startswith("ctr") else Int64) for f in STAT_FIELDS]


def feature_views(sources: Path) -> list[FeatureView]:
    """Feature views over the parquet the features job writes under `sources` (a file, or a folder of parts)."""
    def source(name: str) -> FileSource:
        path = sources / name if (sources / name).is_dir() else sources / f"{name}.parquet"
        return FileSource(name=name, path=str(path), timestamp_field=TIMESTAMP)

    return [
        FeatureView(name="user_timeline", entities=[user], ttl=timedelta(0), source=source("user_timeline"),
                    schema=[Field(name=f, dtype=Array(Int64)) for f in TIMELINE_FIELDS],
                    description="the user's last events, oldest first, with place and time keys"),
        FeatureView(name="item_stats", entities=[item], ttl=timedelta(0), source=source("item_stats"),
                    schema=_stats_schema(), description="7/30-day impressions, clicks and CTR, as of the day"),
        FeatureView(name="shop_stats", entities=[shop], ttl=timedelta(0), source=source("shop_stats"),
                    schema=_stats_schema(), description="7/30-day impressions, clicks and CTR, as of the day"),
    ]


def objects(sources: Path) -> list:
    return [user, item, shop, *feature_views(sources)]


def store_yaml(online: str = "sqlite", redis_connection: str = "127.0.0.1:6379") -> str:
    """feature_store.yaml: file offline store; sqlite online store, or Redis for production."""
    online_store = ("  type: sqlite\n  path: online_store.db\n" if online == "sqlite"
                    else f"  type: redis\n  connection_string: \"{redis_connection}\"\n")
    return (f"project: {PROJECT}\nregistry: registry.db\nprovider: local\n"
            f"online_store:\n{online_store}offline_store:\n  type: file\n"
            "entity_key_serialization_version: 3\n")
