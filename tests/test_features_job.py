"""The features job end to end on a real local Ray and a real Feast (file offline, sqlite online) store."""

import dataclasses
import hashlib
import json
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import ray
from feast import FeatureStore

from features import contract, logio
from features.dataset import Dataset
from features.online import read_timelines
from features.sequences import TIMELINE_FIELDS
from jobs.features_job import FeaturesConfig, run_features
from tests.conftest import FEATURES_CONFIG as CONFIG
from tests.conftest import run_fin


@pytest.fixture()
def logs(features_logs) -> Path:
    return features_logs


@pytest.fixture()
def job(features_job):
    return features_job


def _read(root: Path, *parts: str) -> pl.DataFrame:
    return pl.read_parquet(root.joinpath(*parts) / "*.parquet")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.json"}


def test_timelines_hold_every_behaviour_in_time_order(job, logs):
    out, stats = job
    beh = pl.read_parquet(logs / "behaviours" / "**" / "*.parquet", hive_partitioning=False)
    tl = _read(out / "data", "timelines")
    assert tl["user_id"].n_unique() == tl.height == beh["user_id"].n_unique() == stats["users"]
    counts = beh.group_by("user_id").len().join(tl.select("user_id", n=pl.col("ts").list.len()), on="user_id")
    assert (counts["len"] == counts["n"]).all()
    assert tl.select(pl.col("ts").list.eval(pl.element().diff().fill_null(0) >= 0).list.all()).to_series().all()
    assert set(tl.columns) == {"user_id", *TIMELINE_FIELDS}


def test_examples_point_into_timelines_without_copies(job, logs):
    out, stats = job
    imp = pl.read_parquet(logs / "impressions" / "**" / "*.parquet", hive_partitioning=False)
    ex = pl.concat([_read(out / "data", "examples", s) for s in ("train", "validation", "test")])
    assert ex.height == imp.height and ex["impression_id"].n_unique() == ex.height
    assert not any(dt == pl.List for dt in ex.schema.dtypes())  # pointers only
    tl = _read(out / "data", "timelines").select("user_id", "ts")
    sample = ex.sample(300, seed=1).join(tl, on="user_id", suffix="_timeline")
    brute = [int(np.sum(np.asarray(t) < ts)) for t, ts in zip(sample["ts_timeline"], sample["ts"])]
    assert sample["history_len"].to_list() == brute


def test_candidates_carry_their_requests_context(job, logs):
    """Every logged ad candidate of the evaluation splits, shown or not, with its request's context and
    history pointer (what the models need to score it in revenue replay)."""
    out, stats = job
    raw = pl.read_parquet(logs / "ad_candidates" / "**" / "*.parquet", hive_partitioning=False)
    ex = pl.concat([_read(out / "data", "examples", s) for s in ("validation", "test")])
    for split in ("validation", "test"):
        cand = _read(out / "data", "candidates", split)
        assert stats["candidates"][split] == cand.height
        requests = _read(out / "data", "examples", split)["request_id"].unique()
        assert set(cand["request_id"].unique()) == set(requests)  # all of the split's requests, no other
        assert cand.height == raw.filter(pl.col("request_id").is_in(requests.implode())).height
    # only the candidate files of the evaluation days (local days, UTC+8 here) and the day before were read
    local_day = (pl.col("ts") + 8 * 3_600_000) // 86_400_000
    read = raw.filter(local_day >= ex["day"].min() - 1).height
    assert stats["validation"]["ad_candidates"]["rows"] == read < raw.height
    cand = pl.concat([_read(out / "data", "candidates", s) for s in ("validation", "test")])
    context = ["geohash_6", "aoi_id", "city_id", "hours", "time_type", "weekdays", "history_len", "day", "ts", "user_id"]
    joined = cand.join(ex.unique("request_id").select("request_id", *context), on="request_id", suffix="_request")
    for c in context:
        assert joined[c].equals(joined[f"{c}_request"], check_names=False), c
    shown = cand.filter(pl.col("position").is_not_null()).join(ex.select("impression_id", "item_id", "label"),
                                                               on="impression_id")
    assert shown.height == ex.height and (shown["item_id"] == shown["item_id_right"]).all()
    assert (shown["label"] == shown["label_right"]).all()


def test_files_from_skips_earlier_date_partitions(tmp_path):
    files = [tmp_path / "t" / f"date=2026-03-0{d}" / "part-00000.parquet" for d in (1, 2, 3)]
    others = [tmp_path / "t.parquet", tmp_path / "t" / "date=unknown" / "part.parquet"]
    assert logio.files_from([*files, *others], date(2026, 3, 2)) == [*files[1:], *others]


def test_split_is_by_day(job):
    out, stats = job
    days = {s: _read(out / "data", "examples", s)["day"] for s in ("train", "validation", "test")}
    assert days["train"].max() < days["validation"].min() <= days["validation"].max() < days["test"].min()
    assert days["test"].n_unique() == CONFIG.test_days and days["validation"].n_unique() == CONFIG.validation_days
    assert stats["examples"] == {s: len(d) for s, d in days.items()}


def test_item_stats_are_point_in_time(job, logs):
    out, _ = job
    stats = pl.read_parquet(out / "data" / "feast_sources" / "item_stats.parquet")
    ex = pl.concat([_read(out / "data", "examples", s) for s in ("train", "validation", "test")])
    row = stats.filter(pl.col("impressions_7d") > 0).sample(1, seed=3).row(0, named=True)
    window = ex.filter((pl.col("item_id") == row["item_id"]) & (pl.col("day") >= row["day"] - 7) & (pl.col("day") < row["day"]))
    assert row["impressions_7d"] == window.height and row["clicks_7d"] == window["label"].sum()
    # nothing from the day itself or later
    first_day = stats.filter(pl.col("item_id") == row["item_id"])["day"].min()
    assert stats.filter((pl.col("item_id") == row["item_id"]) & (pl.col("day") == first_day))["impressions_30d"].item() == 0


def test_online_store_holds_the_latest_timeline(job):
    out, _ = job
    store = FeatureStore(repo_path=str(out / "feast"))
    tl = _read(out / "data", "timelines").sort("user_id")
    users = tl["user_id"].to_list()[:10]
    online = read_timelines(store, users + [10**9])
    assert online[-1] is None  # an unknown user: nothing, not an error
    for user, got in zip(users, online[:-1]):
        row = tl.filter(pl.col("user_id") == user).row(0, named=True)
        for f in TIMELINE_FIELDS:
            assert got[f].tolist() == row[f][-CONFIG.max_seq_len:], (user, f)


def test_rerun_is_byte_identical(job, logs, tmp_path):
    out, stats = job
    again = tmp_path / "again"
    run_features(logs, again, CONFIG)
    assert _digest(again / "data") == _digest(out / "data")


def test_creatives_are_published_with_the_dataset(job, logs):
    out, stats = job
    creatives = pl.read_parquet(Dataset.at(out).creatives)
    assert creatives.equals(pl.read_parquet(logs / "creatives.parquet"))
    assert stats["validation"]["creatives"] == {"rows": creatives.height, "quarantined": 0, "reasons": {},
                                                "bad_fraction": 0.0}


def test_bad_rows_are_quarantined_and_counted(logs, tmp_path):
    bad_logs = tmp_path / "logs"
    shutil.copytree(logs, bad_logs)
    beh = pl.read_parquet(bad_logs / "behaviours" / "**" / "*.parquet", hive_partitioning=False).head(3)
    bad = beh.with_columns(event_id=pl.col("event_id") + 10**15, price=pl.lit(-1.0, pl.Float32))
    (bad_logs / "behaviours" / "date=2099-01-01").mkdir()
    bad.write_parquet(bad_logs / "behaviours" / "date=2099-01-01" / "bad.parquet")
    # a creative cut short: quarantined, the others published
    creatives = pl.read_parquet(bad_logs / "creatives.parquet")
    cut = creatives["item_id"][5]
    creatives.with_columns(image_png=pl.when(pl.col("item_id") == cut).then(pl.col("image_png").bin.slice(0, 200))
                           .otherwise(pl.col("image_png"))).write_parquet(bad_logs / "creatives.parquet")
    stats = run_features(bad_logs, tmp_path / "out", FeaturesConfig(**{**CONFIG.__dict__, "materialize": False}))
    assert stats["validation"]["behaviours"]["reasons"] == {"out_of_range:price": 3}
    assert stats["validation"]["behaviours"]["quarantined"] == 3
    q = _read(tmp_path / "out" / "data", "quarantine", "behaviours")
    assert q.height == 3 and q["event_id"].sort().to_list() == bad["event_id"].sort().to_list()
    assert stats["validation"]["creatives"]["reasons"] == {"bad_png:image_png": 1}
    assert _read(tmp_path / "out" / "data", "quarantine", "creatives")["item_id"].to_list() == [cut]
    published = pl.read_parquet(Dataset.at(tmp_path / "out").creatives)
    assert published.height == creatives.height - 1 and cut not in published["item_id"]


def test_a_failed_run_leaves_the_previous_dataset(logs, tmp_path):
    out = tmp_path / "out"
    cfg = FeaturesConfig(**{**CONFIG.__dict__, "materialize": False})
    run_features(logs, out, cfg)
    before = _digest(out / "data")
    broken = tmp_path / "broken"
    shutil.copytree(logs, broken)
    next(iter((broken / "impressions").rglob("*.parquet"))).write_bytes(b"not parquet")
    with pytest.raises(ray.exceptions.RayTaskError, match="parquet"):
        run_features(broken, out, cfg)
    assert _digest(out / "data") == before
    r = run_fin("features", "--logs", str(broken), "--out", str(out), "--no-materialize", "--partitions", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert _digest(out / "data") == before


def _first_days(logs: Path, out: Path, days: int) -> Path:
    """A copy of a log folder with only its first `days` local dates: what its producer had written then. (A
    shorter simulation is not that: which shops open on which day depends on the simulated span.)"""
    shutil.copytree(logs, out)
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    end_ms = manifest["window_start_ms"] + days * 86_400_000
    end = (datetime.fromtimestamp(end_ms / 1000, timezone.utc) + timedelta(hours=manifest["utc_offset_hours"])).date()
    for spec in contract.TABLES.values():
        for part in (out / spec.name).glob("date=*") if spec.partitioned else ():
            if date.fromisoformat(part.name.removeprefix("date=")) >= end:
                shutil.rmtree(part)
    (out / contract.MANIFEST_FILE).write_text(json.dumps({**manifest, "window_end_ms": end_ms}))
    return out


def test_materialisation_is_incremental(logs, tmp_path):
    """A later run over more days updates the online timelines of users with new events."""
    out = tmp_path / "out"
    short = _first_days(logs, tmp_path / "short", 10)  # the same city, 4 days fewer
    run_features(short, out, CONFIG)
    store = FeatureStore(repo_path=str(out / "feast"))
    before = read_timelines(store, list(range(1, 61)))
    run_features(logs, out, CONFIG)
    after = read_timelines(FeatureStore(repo_path=str(out / "feast")), list(range(1, 61)))
    tl = _read(out / "data", "timelines")
    changed = 0
    for user, (b, a) in enumerate(zip(before, after), start=1):
        row = tl.filter(pl.col("user_id") == user)
        if row.height == 0:
            continue
        assert a["ts"].tolist() == row["ts"].item().to_list()[-CONFIG.max_seq_len:]
        changed += b is None or b["ts"][-1] != a["ts"][-1]
    assert changed > 30
    assert json.loads((out / "data" / "run.json").read_text())["timings_s"]["feast_materialize_s"] >= 0


def _contract_rows(spec, rows: list[dict]) -> pl.DataFrame:
    """Rows of a contract table (the columns not given null)."""
    columns = {f.name: pl.Series(f.name, [r.get(f.name) for r in rows],
                                 dtype=None if any(f.name in r for r in rows) else pl.Null).to_arrow() for f in spec.schema}
    return pl.from_arrow(contract.to_table(spec, columns))


def _publish_online(out: Path, events: list[tuple[int, int]], impressions: int = 1, clicks: int = 0) -> pl.DataFrame:
    """One features run's online step (`apply_feast`, a real Feast sqlite store) over behaviours (user, ts): its
    timelines, each user's newest event its row's time, and a day of statistics (item and shop 10's impressions
    and clicks on the last day); returns the timelines and how many users' timelines it wrote online."""
    from features import aggregates
    from features.build import SplitDays
    from features.dataset import EVENT_TIMESTAMP, STATS_VIEWS
    from features.online import encode_timelines
    from features.pipeline import OnlineStoreConfig, Plan, apply_feast
    from features.sequences import build_timelines, tail_timelines, timeline_events

    local = contract.local_time_fields(np.array([ts for _, ts in events]), 8.0)
    behaviours = _contract_rows(contract.BEHAVIOURS, [
        {"event_id": i + 1, "user_id": user, "ts": ts, "action": 0, "shop_id": 10, "item_id": 100, "category_1_id": 1,
         "shop_geohash_6": "wx4g0b", **{k: int(v[i]) for k, v in local.items()}} for i, (user, ts) in enumerate(events)])
    timelines = build_timelines(timeline_events(behaviours))
    online = tail_timelines(timelines, 50).with_columns(
        pl.col("ts").list.last().cast(pl.Datetime("ms", "UTC")).alias(EVENT_TIMESTAMP))
    data = Dataset(out / "data")
    shutil.rmtree(data.root, ignore_errors=True)
    plan = Plan(Path("."), out, contract.LOG_TABLES, (events[0][1] - 40 * 86_400_000, events[-1][1] + 40 * 86_400_000),
                8.0, 0, SplitDays.last_days(0, 7, 7), date(2023, 1, 1))
    shutil.rmtree(plan.encoded, ignore_errors=True)
    data.online_timelines().mkdir(parents=True)
    plan.encoded.mkdir()
    online.write_parquet(data.online_timelines() / "part-00000.parquet")
    encode_timelines(online).write_parquet(plan.encoded / "part-00000.parquet")
    day = (events[-1][1] + 8 * 3_600_000) // 86_400_000
    newest = {"user_timeline": online[EVENT_TIMESTAMP].max()}
    for key, view in STATS_VIEWS.items():
        counts = pl.DataFrame({key: [10], "day": [day], "impressions": [impressions], "clicks": [clicks]},
                              schema={key: pl.Int64, "day": pl.Int32, "impressions": pl.Int64, "clicks": pl.Int64})
        stats = aggregates.point_in_time_stats(counts, key, day, day, 8.0)
        stats.write_parquet(data.stats_source(key))
        newest[view] = stats[EVENT_TIMESTAMP].max()
    pushed = apply_feast(dataclasses.replace(plan, last_day=day, split=SplitDays.last_days(day, 7, 7)), OnlineStoreConfig(),
                newest)
    return timelines, pushed["timelines_pushed"]


def test_an_id_repeated_under_another_user_is_kept_once(tmp_path):
    """Two rows of one impression id (and of one event id) with different users land in different partitions,
    each validated alone: the later one is quarantined as a duplicate, as `fin validate` does over the whole
    table (before, both were kept: two examples and two timeline events of one id)."""
    from features.build import SplitDays
    from features.dataset import EXAMPLES
    from features.pipeline import build_partition_files, ids_seen_elsewhere, partition_of, shard_logs

    partitions, t0 = 8, 1_700_000_000_000
    parts = partition_of(pl.Series(range(1, 50)), partitions)
    first, second = 1, next(u for u in range(2, 50) if parts[u - 1] != parts[0])
    local = {k: int(v[0]) for k, v in contract.local_time_fields(np.array([t0]), 8.0).items()}
    impression = dict(request_id=1, ts=t0, geohash_6="wx4g0b", geohash_12="wx4g0bm6c408", item_id=100, shop_id=10,
                      category_1_id=1, label=0, propensity=0.5, position=0, **local)
    behaviour = dict(ts=t0 - 5_000, action=0, shop_id=10, item_id=100, category_1_id=1, shop_geohash_6="wx4g0b",
                     **local)
    tables = {"impressions": _contract_rows(contract.IMPRESSIONS, [dict(impression, impression_id=7, user_id=first),
                                                                   dict(impression, impression_id=7, user_id=second)]),
              "behaviours": _contract_rows(contract.BEHAVIOURS, [dict(behaviour, event_id=5, user_id=first),
                                                                 dict(behaviour, event_id=5, user_id=second)])}
    work, staging = tmp_path / "work", tmp_path / "staging"
    for name, rows in tables.items():
        rows.write_parquet(tmp_path / f"{name}.parquet")
        shard_logs([str(tmp_path / f"{name}.parquet")], name, 0, str(work), partitions)
    elsewhere = {name: ids_seen_elsewhere(str(work), name) for name in tables}
    known = {"users": pl.Series("user_id", [first, second], pl.Int64), "shops": pl.Series("shop_id", [10], pl.Int64),
             "items": pl.Series("item_id", [100], pl.Int64)}
    built = [build_partition_files(p, str(work), str(staging), None, known, (t0 - 40 * 86_400_000, t0 + 86_400_000),
                                   SplitDays.last_days((t0 + 8 * 3_600_000) // 86_400_000, 7, 7), 50, 8.0, False,
                                   {name: rows[p] for name, rows in elsewhere.items() if p in rows})
             for p in range(partitions)]
    data = Dataset(staging)
    examples = pl.concat([pl.read_parquet(f) for f in data.root.glob(f"{EXAMPLES}/**/*.parquet")])
    assert examples["impression_id"].to_list() == [7] and examples["user_id"].to_list() == [first]
    assert sum(r["validation"]["behaviours"]["reasons"].get("duplicate_id:event_id", 0) for r in built) == 1
    assert sum(r["validation"]["impressions"]["reasons"].get("duplicate_id:impression_id", 0) for r in built) == 1


def test_a_user_whose_newest_event_is_at_the_watermark_is_pushed(tmp_path):
    """The online timelines' watermark sits 1 ms past a run's newest event; a user whose newest event in the next
    run is exactly there is pushed (before, only users strictly after it were: its online timeline stayed
    stale)."""
    t0 = 1_700_000_000_000
    _publish_online(tmp_path, [(1, t0 - 10_000), (1, t0)])
    timelines, _ = _publish_online(tmp_path, [(1, t0 - 10_000), (1, t0), (1, t0 + 1), (2, t0 + 5_000)])
    online = read_timelines(FeatureStore(repo_path=str(tmp_path / "feast")), [1, 2])
    for user, got in zip([1, 2], online):
        assert got["ts"].tolist() == timelines.filter(pl.col("user_id") == user)["ts"].item().to_list()


def test_a_late_event_and_a_day_s_late_impressions_reach_the_online_store(tmp_path):
    """The next run's logs hold an event older than its user's newest (delivered late) and more impressions of
    the last day: the user's online timeline gets the event and the day's statistics are written again (before,
    only users with events past the last run's newest were pushed, and statistics from the watermark on: both
    stayed as the first run left them). A user whose timeline is unchanged is not written again."""
    t0 = 1_700_000_000_000
    assert _publish_online(tmp_path, [(1, t0 - 10_000), (1, t0), (2, t0 + 5_000)])[1] == 2
    timelines, pushed = _publish_online(tmp_path, [(1, t0 - 10_000), (1, t0 - 5_000), (1, t0), (2, t0 + 5_000)], 40, 30)
    assert pushed == 1  # user 2's timeline is as it was
    store = FeatureStore(repo_path=str(tmp_path / "feast"))
    assert read_timelines(store, [1])[0]["ts"].tolist() == timelines.filter(pl.col("user_id") == 1)["ts"].item().to_list()
    stats = store.get_online_features(features=["item_stats:impressions_7d", "item_stats:clicks_7d"],
                                      entity_rows=[{"item_id": 10}]).to_dict()
    assert (stats["impressions_7d"][0], stats["clicks_7d"][0]) == (40, 30)


@pytest.mark.parametrize("message", ["Timed out waiting for file .../gcs_server_port_...",
                                     "The current node timed out during startup. This could happen because ..."])
def test_a_local_ray_that_does_not_come_up_is_started_once_more(tmp_path, monkeypatch, message):
    """The first local start times out as Ray's GCS or raylet start does on a loaded machine (the failure is
    injected, after starting a process as Ray's would, naming the temp dir; the second start is Ray's own):
    the leftover is stopped, the session starts again and runs tasks; any other error is raised."""
    import subprocess
    import sys

    from jobs.features_job import RaySession

    real_init, calls, leftovers = ray.init, [], []

    def init(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                               kwargs["_temp_dir"]]))
            raise Exception(message)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init)
    session = RaySession(None, 1, tmp_path)
    try:
        assert len(calls) == 2 and ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        assert leftovers[0].poll() is not None  # killed and reaped, not left running beside the new start
    finally:
        session.close()
        leftovers[0].kill()
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("bad address")))
    with pytest.raises(RuntimeError, match="bad address"):
        RaySession(None, 1, tmp_path)


def test_sharding_takes_what_validation_reports(tmp_path):
    """Sharding runs before validation, so it must not fail on rows validation quarantines: a user id of text
    (a CSV log) goes to the partition of the missing ids, and a file without its table's key column has no ids
    to compare across partitions (before, the first crashed `shard_logs` and the second `ids_seen_elsewhere`)."""
    from features.pipeline import ids_seen_elsewhere, shard_logs

    t0 = 1_700_000_000_000
    local = {k: int(v[0]) for k, v in contract.local_time_fields(np.array([t0]), 8.0).items()}
    text_users = pl.DataFrame([dict(event_id=i, user_id=u, ts=t0, action=0, shop_id=10, category_1_id=1, **local)
                               for i, u in enumerate(["1", "2", "n/a"])])
    text_users.write_parquet(tmp_path / "behaviours.parquet")
    assert shard_logs([str(tmp_path / "behaviours.parquet")], "behaviours", 0, str(tmp_path / "work"), 8) == 3
    assert ids_seen_elsewhere(str(tmp_path / "work"), "behaviours") == {}
    pl.DataFrame({"user_id": [1, 2], "ts": [t0, t0]}).write_parquet(tmp_path / "impressions.parquet")
    shard_logs([str(tmp_path / "impressions.parquet")], "impressions", 0, str(tmp_path / "work"), 8)
    assert ids_seen_elsewhere(str(tmp_path / "work"), "impressions") == {}
