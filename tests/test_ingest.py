"""Ingest: behaviour events into the real-time timelines through a real `fin serve` process (real Feast sqlite
store, real gRPC client), read by the next Score of the user."""

import json
import os
import shutil
import signal
import time

import grpc
import numpy as np
import psutil
import pytest

from features import logio
from features.behaviour_log import BehaviourLog
from serving.pb import ctr_scoring_pb2 as pb
from serving.pb import ctr_scoring_pb2_grpc
from tests.conftest import Running, run_fin
from tests.test_serving import _request

TS = 1_780_000_000_000  # the request time of `_request`


def _private_copy(trained_models, features_job, root, feast: bool = True):
    """The trained FIN artifact in a model repository `root/models` and, with `feast`, a copy of the features
    job's Feast repository at `root/feast`: what a test ingests stays its own."""
    fin = trained_models[1]["fin"]
    shutil.copytree(fin, root / "models" / "fin" / fin.name)
    if feast:
        shutil.copytree(features_job[0] / "feast", root / "feast")
    return fin


@pytest.fixture(scope="module")
def server(trained_models, features_job, tmp_path_factory):
    """A server over a private copy of the Feast repository: the events ingested here stay here."""
    root = tmp_path_factory.mktemp("ingest")
    _private_copy(trained_models, features_job, root)
    running = Running(root / "models", root / "feast", "--behaviour-log", str(root / "logs"))
    running.root = root
    yield running
    code, err = running.stop()
    assert code == 0, err


def _event(event_id: int, user_id: int, ts: int, **changes) -> pb.BehaviourEvent:
    event = pb.BehaviourEvent(event_id=event_id, user_id=user_id, ts_ms=ts, action=1, shop_id=5, item_id=10,
                              category_id=2, brand_id=1, price=20, shop_geohash="wtw3sj", geohash="wtw3sjq6")
    for key, value in changes.items():
        setattr(event, key, value)
    return event


def _pctr(server, user_id: int) -> np.ndarray:
    return np.array([s.pctr for s in server.stub.Score(_request(user_id, candidates=4), timeout=10).scores])


def test_an_ingested_event_reaches_the_next_score_and_a_retry_changes_nothing(server):
    before = _pctr(server, 1)
    events = [_event(10_000 + i, 1, TS - 60_000 * (i + 1), shop_id=5 + i % 4, item_id=10 + i % 4) for i in range(12)]
    events.append(_event(20_000, 1, TS + 60_000))  # after the request: not part of its history
    response = server.stub.Ingest(pb.IngestRequest(events=events), timeout=10)
    assert (response.accepted, response.duplicates, len(response.refused)) == (13, 0, 0)
    after = _pctr(server, 1)
    assert np.abs(after - before).max() > 1e-6  # the user's new orders move its scores
    retry = server.stub.Ingest(pb.IngestRequest(events=events[::-1]), timeout=10)  # the ad server retries
    assert (retry.accepted, retry.duplicates) == (13, 13)
    np.testing.assert_array_equal(_pctr(server, 1), after)
    assert np.array_equal(_pctr(server, 2), _pctr(server, 2))  # another user: untouched, deterministic


def test_a_cold_start_user_has_a_history_once_it_has_events(server):
    user = 987_654_321
    assert server.stub.Score(_request(user), timeout=10).cold_start_user
    server.stub.Ingest(pb.IngestRequest(events=[_event(30_000, user, TS - 1000)]), timeout=10)
    assert not server.stub.Score(_request(user), timeout=10).cold_start_user


def test_bad_events_are_refused_one_by_one_and_the_good_ones_kept(server):
    events = [_event(40_000, 3, TS - 5000), _event(40_001, 3, TS - 4000, price=-1.0),
              _event(40_002, 3, TS - 3000, shop_id=0), _event(40_000, 3, TS - 5000)]  # the last: a repeat
    response = server.stub.Ingest(pb.IngestRequest(events=events), timeout=10)
    assert [(r.index, r.reason) for r in response.refused] == [(1, "out_of_range:price"), (2, "null:shop_id")]
    assert (response.accepted, response.duplicates) == (2, 1)


def test_concurrent_calls_are_written_as_groups_and_each_answered_as_if_alone(server):
    """Sixteen clients at once, their calls overlapping in event ids (retries of each other's events) and
    one bad event each: the calls are written in groups (one check, one log append, one store transaction),
    yet each answer counts its own refusals, and every event id ends up stored once."""
    import threading

    from features.realtime import SqliteRealtime

    user, answers = 5, {}

    def client(k: int) -> None:
        events = [_event(60_000 + i, user, TS - 900_000 + 1000 * i) for i in range(k, k + 20)]
        events.append(_event(70_000 + k, user, TS, price=float("nan")))
        answers[k] = server.stub.Ingest(pb.IngestRequest(events=events), timeout=30)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all([(r.index, r.reason) for r in a.refused] == [(20, "out_of_range:price")] for a in answers.values())
    assert all(a.accepted == 20 for a in answers.values())
    distinct = 16 + 20 - 1  # ids 60,000 .. 60,034
    assert sum(a.accepted - a.duplicates for a in answers.values()) == distinct  # each id new to one call
    stored = SqliteRealtime(server.root / "feast" / "realtime.db").read([user])[0]
    assert stored["ts"].size == distinct and np.all(np.diff(stored["ts"]) > 0)


@pytest.mark.parametrize("events, message", [
    ([], "1 to 1000 events"),
    ([_event(i, 4, TS) for i in range(1001)], "this one has 1001"),
    ([_event(50_000, 4, TS, geohash="?"), _event(50_001, 0, TS)], "every event was refused: events[0]: bad_geohash"),
])
def test_calls_without_a_good_event_are_invalid_argument(server, events, message):
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Ingest(pb.IngestRequest(events=events), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> None:
    """Until every process has exited with all its threads. A killed process's main thread can be a zombie
    while another of its threads is still finishing a disk write: until that one is gone too, the process's
    files stay open and its locks held (so the next start would take its log segment for a live one's)."""
    deadline = time.monotonic() + timeout_s

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE and os.listdir(f"/proc/{pid}/task") == [str(pid)]
        except (psutil.NoSuchProcess, FileNotFoundError):
            return True

    for pid in pids:
        while not gone(pid):
            assert time.monotonic() < deadline, f"process {pid} still running {timeout_s:.0f} s after SIGKILL"
            time.sleep(0.01)


def test_an_acknowledged_event_survives_a_crash_right_after_the_answer(trained_models, features_job, tmp_path):
    _private_copy(trained_models, features_job, tmp_path)
    logs = tmp_path / "logs"
    running = Running(tmp_path / "models", tmp_path / "feast", "--behaviour-log", str(logs))
    events = [_event(60_000 + i, 5, TS - 1000 * i) for i in range(3)]
    assert running.stub.Ingest(pb.IngestRequest(events=events), timeout=10).accepted == 3
    crashed = [running.proc.pid, *(p.pid for p in psutil.Process(running.proc.pid).children(recursive=True))]
    for pid in crashed:  # the server and its ingest worker, SIGKILL: no shutdown, no flush
        os.kill(pid, signal.SIGKILL)
    running.proc.wait(timeout=30)
    _wait_gone(crashed)
    running.channel.close()
    BehaviourLog(logs, 8.0).close()  # what the next server start does
    stored = logio.read_raw(logs, "behaviours")
    assert sorted(stored["event_id"].to_list()) == [60_000, 60_001, 60_002]


def test_a_dead_ingest_worker_makes_ingest_unavailable_and_scoring_goes_on(trained_models, features_job, tmp_path):
    _private_copy(trained_models, features_job, tmp_path)
    running = Running(tmp_path / "models", tmp_path / "feast", "--behaviour-log", str(tmp_path / "logs"))
    try:
        (worker,) = [p for p in psutil.Process(running.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        worker.kill()
        _wait_gone([worker.pid])
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Ingest(pb.IngestRequest(events=[_event(80_000, 5, TS)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "ingest worker exited" in e.value.details()
        assert running.stub.Score(_request(5), timeout=10).scores
    finally:
        running.stop()


def test_a_server_without_a_behaviour_log_refuses_ingest(trained_models, features_job, tmp_path):
    _private_copy(trained_models, features_job, tmp_path, feast=False)
    running = Running(tmp_path / "models", features_job[0] / "feast")
    try:
        with pytest.raises(grpc.RpcError) as e:
            running.stub.Ingest(pb.IngestRequest(events=[_event(1, 1, TS)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--behaviour-log" in e.value.details()
    finally:
        code, err = running.stop()
    assert code == 0, err


def test_fin_ingest_replays_a_log_folder(server, tmp_path):
    from serving.ingest import behaviour_rows

    events = [_event(70_000 + i, 6, TS - 10_000 * (i + 1), shop_id=6 + i % 3) for i in range(25)]
    log = BehaviourLog(tmp_path / "logs", 8.0)
    log.append(behaviour_rows(events, 8.0))
    log.close()
    before = _pctr(server, 6)
    first = run_fin("ingest", "--addr", server.addr, "--logs", str(tmp_path / "logs"), "--batch", "10", "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert (result["events"], result["accepted"], result["duplicates"], result["refused"]) == (25, 25, 0, 0)
    assert np.abs(_pctr(server, 6) - before).max() > 1e-6
    again = json.loads(run_fin("ingest", "--addr", server.addr, "--logs", str(tmp_path / "logs"), "--json").stdout)
    assert (again["accepted"], again["duplicates"]) == (25, 25)
    missing = run_fin("ingest", "--addr", server.addr, "--logs", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "no behaviours under" in missing.stderr
    from google.protobuf import json_format

    request = pb.IngestRequest(events=[_event(80_000, 6, TS - 500), _event(80_001, 6, TS - 400, price=-2.0)])
    (tmp_path / "events.json").write_text(json_format.MessageToJson(request))
    sent = json.loads(run_fin("ingest", "--addr", server.addr, "--events", str(tmp_path / "events.json"),
                              "--json").stdout)
    assert (sent["events"], sent["accepted"], sent["refused"]) == (2, 1, 1)


def test_after_the_next_features_run_the_online_timeline_is_what_was_served(trained_models, features_logs,
                                                                           features_job, tmp_path):
    """Ingested events go to the log the features job reads: the timeline its next run stores for the user
    equals the one Score read before that run (the stored timeline followed by the real-time events)."""
    import polars as pl
    from feast import FeatureStore

    from features.online import read_timelines
    from features.realtime import SqliteRealtime, merged
    from jobs.features_job import run_features
    from serving.ingest import behaviour_events
    from tests.conftest import FEATURES_CONFIG

    logs = tmp_path / "logs"
    shutil.copytree(features_logs, logs)
    _private_copy(trained_models, features_job, tmp_path)
    end = json.loads((logs / "manifest.json").read_text())["window_end_ms"]
    behaviours = logio.read_raw(logs, "behaviours")
    last = behaviours.group_by("user_id").agg(pl.col("ts").max()).filter(pl.col("ts") < end - 3_600_000)
    user = int(last.sort("user_id")["user_id"][0])
    rows = behaviours.filter(pl.col("user_id") == user).sort("ts").tail(4).with_columns(
        event_id=pl.int_range(pl.len()) + int(behaviours["event_id"].max()) + 1,
        ts=pl.int_range(pl.len()) * 60_000 + int(last.filter(pl.col("user_id") == user)["ts"][0]) + 60_000)

    running = Running(tmp_path / "models", tmp_path / "feast", "--behaviour-log", str(logs))
    try:
        response = running.stub.Ingest(pb.IngestRequest(events=behaviour_events(rows)), timeout=10)
        assert (response.accepted, len(response.refused)) == (4, 0)
        stored = read_timelines(FeatureStore(repo_path=str(tmp_path / "feast")), [user])[0]
        recent = SqliteRealtime(tmp_path / "feast" / "realtime.db").read([user])[0]
        served = merged(stored, recent, FEATURES_CONFIG.max_seq_len)
        assert served["ts"].size > stored["ts"].size or stored["ts"].size == FEATURES_CONFIG.max_seq_len
    finally:
        code, err = running.stop()  # the log flushes what is pending into its date partitions
    assert code == 0, err

    run_features(logs, tmp_path / "out2", FEATURES_CONFIG)
    rebuilt = read_timelines(FeatureStore(repo_path=str(tmp_path / "out2" / "feast")), [user])[0]
    for field, values in served.items():
        assert rebuilt[field].tolist() == values.tolist(), field


def test_replayed_days_are_served_as_the_evaluator_scores_them(trained_models, features_logs, features_job, tmp_path):
    """The test days through a real server in time order, the store as a features run the day before left it
    (each user's timeline and the first day's statistics; each later day's statistics written as its daily
    run would): with every logged behaviour ingested before the requests that came after it, each served
    pCTR equals `fin evaluate`'s for that impression (which cuts the history at the request); with nothing
    ingested, the requests of users who acted earlier in the days score otherwise."""
    import polars as pl
    from feast import FeatureStore

    from features.aggregates import local_day_start_ms
    from features.online import write_as_of
    from fin.artifact import load_artifact
    from fin.evaluate import predict
    from serving.replay import logged_requests, replay_in_time_order
    from tests.conftest import FEATURES_CONFIG

    data = features_job[0] / "data"
    fin = _private_copy(trained_models, features_job, tmp_path)
    offset = json.loads((features_logs / "manifest.json").read_text())["utc_offset_hours"]
    store = FeatureStore(repo_path=str(tmp_path / "feast"))
    requests = logged_requests(data, "test")
    start = local_day_start_ms(requests[0].day, offset)
    write_as_of(store, data, start, FEATURES_CONFIG.max_seq_len)
    behaviours = logio.read_raw(features_logs, "behaviours").filter(pl.col("ts") >= start)
    behaviours = behaviours.filter(pl.col("ts") < requests[-1].request.context.ts_ms)  # what the requests follow
    acted_before = {r.request.user_id for r in requests} & set(behaviours["user_id"].to_list())
    assert len(requests) >= 10 and acted_before  # requests after behaviours of the same users

    def new_day(day: int) -> None:  # the statistics of the day, as its daily run writes them
        write_as_of(store, data, local_day_start_ms(day, offset), FEATURES_CONFIG.max_seq_len, timelines=False)

    running = Running(tmp_path / "models", tmp_path / "feast", "--behaviour-log", str(tmp_path / "logs"),
                      "--stats-staleness-s", "0")
    try:
        frozen = replay_in_time_order(running.stub, requests, None, ["fin"], new_day).scores["fin"]
        replayed = replay_in_time_order(running.stub, requests, behaviours, ["fin"], new_day)
    finally:
        code, err = running.stop()
    assert code == 0, err
    assert replayed.ingested == behaviours.height and replayed.refused == 0
    served = replayed.scores["fin"]
    offline = served.join(predict(load_artifact(fin), data, "test"), left_on="row_id", right_on="impression_id",
                          how="left", maintain_order="left")
    np.testing.assert_allclose(served["pctr"].to_numpy(), offline["pctr_right"].to_numpy(), rtol=1e-4, atol=1e-6)
    moved = np.abs(frozen["pctr"].to_numpy() - served["pctr"].to_numpy()) > 1e-6
    assert moved.any() and not moved.all()


def test_replicas_sharing_redis_read_each_others_events(trained_models, features_job, redis_server, tmp_path):
    """Two servers (one of two processes) over one Redis online store, filled by `write_as_of`: an event
    ingested through one is in the next Score of every process of both, and events of one user sent at
    once to both by two clients are all kept, in time order."""
    import threading

    import yaml
    from feast import FeatureStore

    from features.online import write_as_of
    from features.realtime import RedisRealtime
    from tests.conftest import FEATURES_CONFIG

    out, run = features_job
    repo = tmp_path / "feast"
    shutil.copytree(out / "feast", repo, ignore=shutil.ignore_patterns("realtime.db*", "online_store.db"))
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis", "connection_string": f"127.0.0.1:{redis_server.port}"}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    write_as_of(FeatureStore(repo_path=str(repo)), out / "data", run["window_end_ms"], FEATURES_CONFIG.max_seq_len)
    _private_copy(trained_models, features_job, tmp_path, feast=False)
    logs = str(tmp_path / "logs")  # one log folder for all: its writers take turns
    first = Running(tmp_path / "models", repo, "--behaviour-log", logs, "--processes", "2")
    second = Running(tmp_path / "models", repo, "--behaviour-log", logs)
    channels = [grpc.insecure_channel(first.addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(16)]  # a connection each: both processes serve some
    try:
        before = _pctr(second, 3)
        assert _pctr(first, 3).tolist() == before.tolist()  # one store, one timeline
        ingested = first.stub.Ingest(pb.IngestRequest(events=[_event(30_000, 3, TS - 120_000)]), timeout=10)
        assert ingested.accepted == 1
        after = _pctr(second, 3)
        assert np.abs(after - before).max() > 1e-6
        for channel in channels:
            stub = ctr_scoring_pb2_grpc.CtrScoringStub(channel)
            served = [s.pctr for s in stub.Score(_request(3, candidates=4), timeout=10).scores]
            assert served == after.tolist()
        assert all(first.metric("fin_requests_total", process=p, method="Score", code="OK") > 0 for p in (0, 1))

        calls = {server: [_event(31_000 + 2 * i + k, 3, TS - 100_000 + 2_000 * i + k) for i in range(20)]
                 for k, server in enumerate((first, second))}
        threads = [threading.Thread(target=server.stub.Ingest, args=(pb.IngestRequest(events=events),),
                                    kwargs={"timeout": 10}) for server, events in calls.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = RedisRealtime.connect(f"127.0.0.1:{redis_server.port}").read([3])[0]
        assert stored["ts"].size == 41 and np.all(np.diff(stored["ts"]) > 0)
        assert _pctr(first, 3).tolist() == _pctr(second, 3).tolist()
    finally:
        for channel in channels:
            channel.close()
        for server in (first, second):
            code, err = server.stop()
            assert code == 0, err
