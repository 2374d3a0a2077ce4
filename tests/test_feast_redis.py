"""The production online store: the features job materialises into a real local redis-server."""

import shutil
import socket
import subprocess
import time

import polars as pl
import pytest
import redis
from feast import FeatureStore

from features.online import read_timelines
from features.sequences import TIMELINE_FIELDS
from jobs.features_job import FeaturesConfig, run_features


@pytest.fixture()
def redis_port(tmp_path):
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: `make test` installs it (Debian package redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_timelines_round_trip_through_redis(small_logs, tmp_path, redis_port):
    out = tmp_path / "out"
    config = FeaturesConfig(max_seq_len=20, partitions=2, validation_days=2, test_days=2, num_cpus=2,
                            online_store="redis", redis_connection=f"127.0.0.1:{redis_port}")
    run_features(small_logs, out, config)
    assert "type: redis" in (out / "feast" / "feature_store.yaml").read_text()
    store = FeatureStore(repo_path=str(out / "feast"))
    timelines = pl.read_parquet(out / "data" / "timelines" / "*.parquet").sort("user_id").head(5)
    online = read_timelines(store, timelines["user_id"].to_list() + [10**9])
    assert online[-1] is None
    for row, got in zip(timelines.iter_rows(named=True), online):
        assert {f: got[f].tolist() for f in TIMELINE_FIELDS} == {f: row[f][-20:] for f in TIMELINE_FIELDS}
