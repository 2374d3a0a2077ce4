"""The production online store: the features job materialises into a real local redis-server."""


import polars as pl
from feast import FeatureStore

from features.online import read_timelines
from features.sequences import TIMELINE_FIELDS
from jobs.features_job import FeaturesConfig, run_features


def test_timelines_round_trip_through_redis(small_logs, tmp_path, redis_server):
    out = tmp_path / "out"
    config = FeaturesConfig(max_seq_len=20, partitions=2, validation_days=2, test_days=2, num_cpus=2,
                            online_store="redis", redis_connection=f"127.0.0.1:{redis_server.port}")
    run_features(small_logs, out, config)
    assert "type: redis" in (out / "feast" / "feature_store.yaml").read_text()
    store = FeatureStore(repo_path=str(out / "feast"))
    timelines = pl.read_parquet(out / "data" / "timelines" / "*.parquet").sort("user_id").head(5)
    online = read_timelines(store, timelines["user_id"].to_list() + [10**9])
    assert online[-1] is None
    for row, got in zip(timelines.iter_rows(named=True), online):
        assert {f: got[f].tolist() for f in TIMELINE_FIELDS} == {f: row[f][-20:] for f in TIMELINE_FIELDS}
