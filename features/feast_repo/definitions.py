"""Feast objects: entities and the feature views that serving reads.

The user timeline is one feature view so that serving needs a single online read per request; it holds
the material of all FIN sub-sequences (every event with its place and time keys), cut per request by
`features.fragments.fragment`. Item and shop views hold point-in-time click statistics; the item creative
view holds each item's creative embedding (`fin embed-creatives` writes and materialises it).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Float32, Int64
from feast.value_type import ValueType

from features.dataset import EVENT_TIMESTAMP, STAT_COLUMNS, STAT_FLOATS, STATS_VIEWS, TIMELINE_VIEW
from features.item_embeddings import CREATIVE_VIEW, EMBEDDING
from features.sequences import TIMELINE_FIELDS

PROJECT = "fin_ads"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="an app user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="an advertised item")
shop = Entity(name="shop", join_keys=["shop_id"], value_type=ValueType.INT64, description="a shop")


def _stats_schema() -> list[Field]:
    return [Field(name=f, dtype=Float32 if f in STAT_FLOATS else Int64) for f in STAT_COLUMNS]


def feature_views(sources: Path) -> list[FeatureView]:
    """Feature views over the parquet the features job writes under `sources` (a file, or a folder of parts)."""
    def source(name: str) -> FileSource:
        path = sources / name if (sources / name).is_dir() else sources / f"{name}.parquet"
        return FileSource(name=name, path=str(path), timestamp_field=EVENT_TIMESTAMP)

    timeline = FeatureView(name=TIMELINE_VIEW, entities=[user], ttl=timedelta(0), source=source(TIMELINE_VIEW),
                           schema=[Field(name=f, dtype=Array(Int64)) for f in TIMELINE_FIELDS],
                           description="the user's last events, oldest first, with place and time keys")
    entities = {"item_id": item, "shop_id": shop}
    stats = [FeatureView(name=view, entities=[entities[key]], ttl=timedelta(0), source=source(view),
                         schema=_stats_schema(), description="7/30-day impressions, clicks and CTR, as of the day")
             for key, view in STATS_VIEWS.items()]
    creative = FeatureView(name=CREATIVE_VIEW, entities=[item], ttl=timedelta(0), source=source(CREATIVE_VIEW),
                           schema=[Field(name=EMBEDDING, dtype=Array(Float32))],
                           description="the embedding of the item's creative by the creative encoder")
    return [timeline, *stats, creative]


def objects(sources: Path) -> list:
    return [user, item, shop, *feature_views(sources)]


def store_yaml(online: str = "sqlite", redis_connection: str = "127.0.0.1:6379") -> str:
    """feature_store.yaml: file offline store; sqlite online store, or Redis for production."""
    online_store = ("  type: sqlite\n  path: online_store.db\n" if online == "sqlite"
                    else f"  type: redis\n  connection_string: \"{redis_connection}\"\n")
    return (f"project: {PROJECT}\nregistry: registry.db\nprovider: local\n"
            f"online_store:\n{online_store}offline_store:\n  type: file\n"
            "entity_key_serialization_version: 3\n")
