"""`fin serve`: a real server process on 127.0.0.1, real Feast (sqlite), real artifacts, a real gRPC client."""

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fin.artifact import load_artifact
from fin.evaluate import predict
from fin.versions import promote
from serving.pb import ctr_scoring_pb2 as pb
from serving.replay import logged_requests
from tests.conftest import FEATURES_CONFIG, Running, run_fin, wait_for


@pytest.fixture(scope="module")
def repo(trained_models, tmp_path_factory) -> Path:
    """A private copy of the trained artifacts: the tests add versions to it."""
    root = tmp_path_factory.mktemp("serving") / "models"
    for name, path in trained_models[1].items():
        shutil.copytree(path, root / name / path.name)
    return root


@pytest.fixture(scope="module")
def server(repo, features_job):
    out, _ = features_job
    running = Running(repo, out / "feast")
    yield running
    code, err = running.stop()
    assert code == 0, err


def _request(user_id: int, candidates: int = 3, **changes) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        user_id=user_id, model_name="fin",
        context=pb.Context(ts_ms=1_780_000_000_000, geohash="wtw3sjq6", city_id=1),
        candidates=[pb.Candidate(item_id=10 + i, shop_id=5 + i, category_id=2, brand_id=1, price=20, distance_m=300,
                                 bid=0.5 + i) for i in range(candidates)])
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def test_scores_come_in_request_order_with_ecpm(server):
    assert server.status() == health_pb2.HealthCheckResponse.SERVING
    response = server.stub.Score(_request(1, candidates=5), timeout=10)
    assert (response.model_name, response.model_version) == ("fin", 1) and len(response.scores) == 5
    for i, s in enumerate(response.scores):
        assert 0 < s.pctr < 1 and math.isclose(s.ecpm, 1000 * s.pctr * (0.5 + i), rel_tol=1e-5)
    assert response.timing.total_ms > 0
    reversed_ = _request(1, candidates=5)
    reversed_.candidates.reverse()
    again = server.stub.Score(reversed_, timeout=10)
    np.testing.assert_allclose([s.pctr for s in again.scores], [s.pctr for s in reversed(response.scores)],
                               rtol=1e-5)
    dnn = server.stub.Score(_request(1, model_name="dnn"), timeout=10)
    assert dnn.model_name == "dnn"


def _bad(**change):
    request = _request(1)
    for path, value in change.items():
        target, field = request, path
        if "." in path:
            parent, field = path.split(".")
            target = request.context if parent == "context" else request.candidates[0]
        if value is None:
            target.ClearField(field)
        else:
            setattr(target, field, value)
    return request


def test_concurrent_calls_score_as_sequential_ones(server):
    """Calls in flight together may share forwards; each still gets its own scores, in its own order."""
    requests = [_request(user, candidates=2 + user % 4) for user in range(1, 13)]
    alone = [server.stub.Score(r, timeout=10) for r in requests]
    futures = [server.stub.Score.future(r, timeout=20) for r in requests for _ in range(2)]
    for i, future in enumerate(futures):
        together = future.result()
        assert [s.pctr for s in together.scores] == pytest.approx([s.pctr for s in alone[i // 2].scores], rel=1e-5)


@pytest.mark.parametrize("request_, message", [
    (_bad(user_id=0), "user_id"),
    (_bad(context=None), "context is required"),
    (_bad(**{"context.ts_ms": 0}), "ts_ms"),
    (_bad(**{"context.geohash": "wtw"}), "is not 6 to 12 characters"),
    (_bad(**{"context.geohash": "wtw3!!"}), "not a geohash"),
    (_bad(**{"context.geohash": "wtw3sjq!@#"}), "not a geohash"),  # junk after the cell (it was read as wtw3sj)
    (_bad(**{"candidate.bid": 3.4e38}), "its eCPM would not fit"),  # (its eCPM was infinite)
    (_bad(**{"context.geohash": "", "context.lat": 91.0, "context.lon": 10.0}), "not a place"),
    (_bad(**{"context.geohash": ""}), "geohash or lat and lon"),
    (_bad(candidates=None), "empty"),
    (_bad(**{"candidate.bid": float("nan")}), "bid"),
    (_bad(**{"candidate.price": -1.0}), "price"),
    (_bad(**{"candidate.item_id": 0}), "item_id"),
])
def test_bad_requests_are_invalid_argument(server, request_, message):
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Score(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_limits_unknown_models_and_deadlines(server):
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Score(_request(1, candidates=1001), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum of 1000" in e.value.details()
    for changes in ({"model_name": "nope"}, {"model_version": 99}):
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Score(_request(1, **changes), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # gRPC keeps deadlines in whole milliseconds, so a tiny timeout can still outlast a cached three-candidate
    # score; a full request's forward cannot finish within one
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Score(_request(1, candidates=1000), timeout=1e-3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.stub.Score(_request(1), timeout=10).scores  # still serving


def test_unknown_user_is_a_flagged_cold_start(server):
    before = server.metric("fin_cold_start_requests_total")
    response = server.stub.Score(_request(10**9), timeout=10)
    assert response.cold_start_user and not response.degraded_features and len(response.scores) == 3
    assert not server.stub.Score(_request(1), timeout=10).cold_start_user
    assert server.metric("fin_cold_start_requests_total") == before + 1


def test_metrics_count_calls_by_code(server):
    ok, bad = (server.metric("fin_requests_total", method="Score", code=c) for c in ("OK", "INVALID_ARGUMENT"))
    hits = {c: server.metric("fin_feature_cache_total", cache=c, result="hit") for c in ("timeline", "stats")}
    server.stub.Score(_request(1), timeout=10)
    server.stub.Score(_request(1), timeout=10)  # the second read of user 1 and its candidates is cached
    with pytest.raises(grpc.RpcError):
        server.stub.Score(_request(0), timeout=10)
    assert server.metric("fin_requests_total", method="Score", code="OK") == ok + 2
    assert server.metric("fin_requests_total", method="Score", code="INVALID_ARGUMENT") == bad + 1
    assert server.metric("fin_feature_cache_total", cache="timeline", result="hit") >= hits["timeline"] + 1
    assert server.metric("fin_feature_cache_total", cache="stats", result="hit") >= hits["stats"] + 2  # item, shop
    assert server.metric("fin_forward_requests_count") >= 2
    assert server.metric("fin_request_seconds_count", method="Score") >= 3
    assert server.metric("fin_candidates_per_request_bucket", le="5.0") >= 2


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_served_pctr_equals_the_offline_evaluator(trained_models, features_logs, features_job, tmp_path, path):
    """Logged test requests replayed through gRPC score as the evaluator scores them: one code path, the
    artifact's calibration included (`fin train` fitted one; it moves these pCTRs beyond the tolerance);
    through the artifact's compiled package and through the eager model (`fin serve --eager`).

    The online store holds the latest state: each user's last `max_seq_len` events and the statistics as of
    the day after the data. So the replayed requests are from the last day, of users whose whole timeline is
    stored (events after a request are cut off by `fragment()`), and a copy of the store first gets that
    day's item and shop statistics through Feast's materialisation, as a store materialised that day had."""
    from feast import FeatureStore

    from features.aggregates import local_day_start_ms
    from features.online import write_as_of

    out, _ = features_job
    examples = pl.read_parquet(out / "data" / "examples" / "test" / "*.parquet")
    day = examples["day"].max()
    whole = pl.read_parquet(out / "data" / "timelines" / "*.parquet").filter(
        pl.col("ts").list.len() <= FEATURES_CONFIG.max_seq_len)["user_id"]
    replayed = logged_requests(out, "test", limit=8,
                               where=(pl.col("day") == day) & pl.col("user_id").is_in(whole.implode()))
    assert len(replayed) >= 2

    shutil.copytree(out / "feast", tmp_path / "feast")
    offset = json.loads((features_logs / "manifest.json").read_text())["utc_offset_hours"]
    write_as_of(FeatureStore(repo_path=str(tmp_path / "feast")), out / "data", local_day_start_ms(day, offset),
                FEATURES_CONFIG.max_seq_len, timelines=False)

    running = Running(trained_models[0], tmp_path / "feast", *(["--eager"] if path == "eager" else []))
    try:
        assert running.metric("fin_model_compiled", model="fin", version="1") == (path == "compiled")
        artifact = load_artifact(trained_models[1]["fin"])
        assert artifact.calibration is not None
        offline = predict(artifact, out / "data", "test")
        for logged in replayed:
            logged.request.model_name = "fin"
            served = np.array([s.pctr for s in running.stub.Score(logged.request, timeout=10).scores])
            expected = pl.DataFrame({"impression_id": logged.row_ids}).join(
                offline, on="impression_id", maintain_order="left")
            np.testing.assert_allclose(served, expected["pctr"].to_numpy(), rtol=1e-4, atol=1e-6)
            assert not np.allclose(served, expected["pctr_uncalibrated"].to_numpy(), rtol=1e-4, atol=1e-6)
    finally:
        running.stop()


def _copy_version(repo: Path, name: str, source: int, target: int) -> Path:
    folder = repo / name / str(target)
    staging = repo / name / f".staging-{target}"
    shutil.copytree(repo / name / str(source), staging)
    meta = json.loads((staging / "artifact.json").read_text())
    (staging / "artifact.json").write_text(json.dumps({**meta, "version": target}))
    return staging, folder


def test_new_versions_hot_load_and_broken_ones_are_refused(server, repo):
    staging, folder = _copy_version(repo, "fin", 1, 2)
    staging.rename(folder)  # appears at once, like fin train's artifacts
    wait_for(lambda: server.stub.Score(_request(1), timeout=10).model_version == 2)
    assert server.stub.Score(_request(1, model_version=1), timeout=10).model_version == 1  # pinned

    staging, folder = _copy_version(repo, "fin", 1, 3)
    with open(staging / "model.safetensors", "r+b") as f:  # corrupt the weights
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    staging.rename(folder)
    wait_for(lambda: server.metric("fin_model_reload_failures_total", model="fin") == 1)
    time.sleep(1)  # more scans: a refused version is not retried while its files are unchanged
    assert server.metric("fin_model_reload_failures_total", model="fin") == 1
    assert server.stub.Score(_request(1), timeout=10).model_version == 2
    assert server.metric("fin_model_version", model="fin") == 2
    assert server.status() == health_pb2.HealthCheckResponse.SERVING

    # promotion: the promoted version becomes the default without a restart, even when it is older
    r = run_fin("promote", "--models", str(repo), "--name", "fin", "--version", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: server.stub.Score(_request(1), timeout=10).model_version == 1)
    assert server.metric("fin_model_version", model="fin") == 1
    promote(repo, "fin", 3)  # the broken version: the default stays as it was
    time.sleep(1)
    assert server.stub.Score(_request(1), timeout=10).model_version == 1
    assert run_fin("promote", "--models", str(repo), "--name", "fin", "--version", "9").returncode == 1
    promote(repo, "fin", 2)
    wait_for(lambda: server.stub.Score(_request(1), timeout=10).model_version == 2)


def test_a_version_with_a_broken_package_is_served_eagerly(server, repo):
    """A package that fails its checksum never refuses its version: the version loads, scores eagerly (the
    same pCTRs as the compiled version of the same weights) and says so in the metrics."""
    folder = repo / "finb" / "1"
    shutil.copytree(repo / "fin" / "1", folder.parent / ".staging")
    with open(folder.parent / ".staging" / "model.pt2", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    (folder.parent / ".staging").rename(folder)
    wait_for(lambda: server.metric("fin_model_version", model="finb") == 1)
    assert server.metric("fin_model_compiled", model="finb", version="1") == 0
    assert server.metric("fin_model_compiled", model="fin", version="1") == 1
    assert server.metric("fin_model_reload_failures_total", model="finb") == 0
    eager = [s.pctr for s in server.stub.Score(_request(3, candidates=20, model_name="finb"), timeout=10).scores]
    compiled = [s.pctr for s in server.stub.Score(_request(3, candidates=20, model_version=1), timeout=10).scores]
    np.testing.assert_allclose(eager, compiled, rtol=0, atol=1e-6)


def test_empty_repository_is_not_serving_until_a_model_arrives(trained_models, features_job, tmp_path, monkeypatch):
    """... and a stopped server leaves no unpacked package behind in its temporary folder."""
    out, _ = features_job
    (tmp_path / "models").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the server's temporary folder: torch unpacks there
    running = Running(tmp_path / "models", out / "feast")
    try:
        assert running.status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Score(_request(1), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        shutil.copytree(trained_models[1]["dnn"], tmp_path / "models" / "dnn" / "1")
        wait_for(lambda: running.status() == health_pb2.HealthCheckResponse.SERVING)
        assert running.stub.Score(_request(1, model_name=""), timeout=10).model_name == "dnn"
        assert running.metric("fin_model_compiled", model="dnn", version="1") == 1
        assert list((tmp_path / "tmp").glob("aotinductor_*"))  # the package, unpacked while it serves
    finally:
        code, err = running.stop()
    assert code == 0, err
    assert not list((tmp_path / "tmp").glob("aotinductor_*"))


def test_fin_score_client(server, tmp_path):
    from google.protobuf import json_format

    path = tmp_path / "request.json"
    path.write_text(json_format.MessageToJson(_request(1)))
    r = run_fin("score", "--addr", server.addr, "--request", str(path))
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["scores"]) == 3
    path.write_text(json_format.MessageToJson(_request(0)))
    r = run_fin("score", "--addr", server.addr, "--request", str(path))
    assert r.returncode == 1 and r.stderr.startswith("fin score: error: INVALID_ARGUMENT: user_id")


def test_tls_and_bearer_token(trained_models, features_job, tmp_path):
    """With --tls-cert/--tls-key the server speaks TLS only; with --auth-token-file every call but health
    checks needs the bearer token (UNAUTHENTICATED otherwise)."""
    out, _ = features_job
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    (tmp_path / "token").write_text("s3cret\n")
    models = tmp_path / "models"
    shutil.copytree(trained_models[1]["dnn"], models / "dnn" / "1")
    running = Running(models, out / "feast", "--tls-cert", str(cert), "--tls-key", str(key),
                      "--auth-token-file", str(tmp_path / "token"),
                      credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    try:
        assert running.status() == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Score(_request(1, model_name="dnn"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Score(_request(1, model_name="dnn"), timeout=10, metadata=(("authorization", "Bearer no"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = running.stub.Score(_request(1, model_name="dnn"), timeout=10,
                                  metadata=(("authorization", "Bearer s3cret"),))
        assert len(good.scores) == 3
        with grpc.insecure_channel(running.addr) as plain:  # no plaintext beside TLS
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
        request = tmp_path / "request.json"
        from google.protobuf import json_format

        request.write_text(json_format.MessageToJson(_request(1, model_name="dnn")))
        r = run_fin("score", "--addr", f"localhost:{running.addr.rsplit(':', 1)[1]}", "--request", str(request),
                    "--tls-ca", str(cert), "--auth-token-file", str(tmp_path / "token"))
        assert r.returncode == 0, r.stderr
    finally:
        code, err = running.stop()
    assert code == 0, err


def test_online_store_outage_degrades_and_recovers(small_logs, trained_models, tmp_path, redis_server):
    """Scoring goes on while the (Redis) online store is down: empty history and statistics, flagged and
    counted; once the store is back, requests read it again."""
    from jobs.features_job import FeaturesConfig, run_features

    out = tmp_path / "features"
    run_features(small_logs, out, FeaturesConfig(max_seq_len=20, partitions=2, validation_days=2, test_days=2,
                                                 num_cpus=2, online_store="redis",
                                                 redis_connection=f"127.0.0.1:{redis_server.port}"))
    users = pl.read_parquet(out / "data" / "timelines" / "*.parquet")["user_id"].sort().to_list()
    models = tmp_path / "models"
    shutil.copytree(trained_models[1]["dnn"], models / "dnn" / "1")
    running = Running(models, out / "feast")
    try:
        def score(user):  # a user not scored before: no cache in the way
            return running.stub.Score(_request(user, model_name="dnn"), timeout=10)

        normal = score(users[0])
        assert not normal.degraded_features and not normal.cold_start_user
        redis_server.stop()
        down = score(users[1])
        assert down.degraded_features and len(down.scores) == 3
        assert running.metric("fin_degraded_requests_total") == 1
        redis_server.start()
        fresh = iter(users[2:])

        def recovered():
            response = score(next(fresh))
            return None if response.degraded_features else response

        assert not wait_for(recovered).cold_start_user
    finally:
        code, err = running.stop()
    assert code == 0, err


def test_reload_under_load_loses_no_request_and_shutdown_drains(trained_models, features_job, tmp_path):
    """Two client threads score without pause while a new version is hot-loaded: every call succeeds and
    the answers move to the new version. Then calls in flight when SIGTERM arrives are all answered."""
    import threading

    out, _ = features_job
    models = tmp_path / "models"
    shutil.copytree(trained_models[1]["fin"], models / "fin" / "1")
    running = Running(models, out / "feast")
    seen_by, failures, stop = ([], []), [], threading.Event()  # the versions each client thread saw, in order

    def load(seen: list):
        while not stop.is_set() and len(seen) < 1000:  # bounded in count and in time (below)
            try:
                seen.append(running.stub.Score(_request(1 + len(seen) % 50), timeout=10).model_version)
            except grpc.RpcError as e:
                failures.append(e.code())

    threads = [threading.Thread(target=load, args=(seen,)) for seen in seen_by]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        staging, folder = _copy_version(models, "fin", 1, 2)
        staging.rename(folder)
        wait_for(lambda: all(seen and seen[-1] == 2 for seen in seen_by), timeout=30)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures
    # calls of two threads may finish out of order across the swap, but no client goes back to the old version
    assert all(seen[0] == 1 and seen[-1] == 2 and sorted(seen) == seen for seen in seen_by)
    assert running.metric("fin_model_compiled", model="fin", version="2") == 1  # the new version's package scores

    in_flight = [running.stub.Score.future(_request(7, candidates=1000), timeout=30) for _ in range(24)]
    answered = []
    for f in in_flight:
        f.add_done_callback(lambda _: answered.append(time.monotonic()))
    time.sleep(0.15)  # the calls have reached the server; most wait for one of its two workers
    terminated = time.monotonic()
    code, err = running.stop(close_channel=False)
    assert code == 0, err
    assert all(len(f.result().scores) == 1000 for f in in_flight)
    assert max(answered) > terminated  # answered after SIGTERM: drained, not cut off


def test_processes_share_the_port(trained_models, features_job):
    """`--processes 2`: a second server process listens on the same port; connections are spread over
    both (16 connections all land on one process with probability 2^-15), and SIGTERM stops both."""
    from serving.pb import ctr_scoring_pb2_grpc

    out, _ = features_job
    running = Running(trained_models[0], out / "feast", "--processes", "2")
    channels = [grpc.insecure_channel(running.addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(16)]
    try:
        for channel in channels:
            assert len(ctr_scoring_pb2_grpc.CtrScoringStub(channel).Score(_request(1), timeout=20).scores) == 3
        served = [running.metric("fin_requests_total", process=i, method="Score", code="OK") for i in (0, 1)]
        assert sum(served) == len(channels) and min(served) > 0
    finally:
        for channel in channels:
            channel.close()
        code, err = running.stop()
    assert code == 0, err
    assert err.count("shutting down") == 2  # both processes drained


def test_a_version_whose_folder_is_removed_is_unloaded_and_a_copy_is_named_by_its_folder(tmp_path):
    """Rolling back by removing the newest version's folder: the repository unloads it and keeps the two newest
    left (before, each scan loaded the older version, evicted it by age in the same scan and failed on it; the
    removed version kept serving)."""
    from serving.repository import ModelRepository
    from serving.vision import write_example

    for version in (1, 2, 3):
        write_example(tmp_path, "small_cnn", version=version, seed=version)
    repository = ModelRepository(tmp_path)
    try:
        assert [c.action for c in repository.refresh()] == ["loaded", "loaded"]  # the two newest
        shutil.rmtree(tmp_path / "small_cnn" / "3")
        changes = [(c.action, c.version) for c in repository.refresh()]
        assert changes == [("loaded", 1), ("unloaded", 3)] and repository.versions("small_cnn") == [1, 2]
        assert repository.refresh() == [] and repository.get("small_cnn").version == 2  # settled
        # a version copied under another name is served by that name (before, by its artifact.json's)
        shutil.copytree(tmp_path / "small_cnn" / "2", tmp_path / "other_cnn" / "1")
        repository.refresh()
        assert repository.get("other_cnn").name == "other_cnn" and repository.get("small_cnn").name == "small_cnn"
    finally:
        repository.close()
