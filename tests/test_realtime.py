"""Real-time timeline events in the online stores (`features.realtime`), against a real sqlite file and a real
redis-server: time order whatever the arrival order, one copy per event id, the newest `max_len` kept,
concurrent writers all kept, durable across a reopen or a server restart. And the behaviour log the
ingested events also go to (`features.behaviour_log`)."""

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import contract, logio
from features.behaviour_log import PENDING, BehaviourLog
from features.realtime import EVENT_ID, USER, RedisRealtime, SqliteRealtime
from features.sequences import TIMELINE_FIELDS
from features.validate import validate_table


def _events(ids, users, ts) -> pl.DataFrame:
    ids = np.asarray(ids)
    rng = np.random.default_rng(int(ids.sum()) if ids.size else 0)
    columns = {f: rng.integers(0, 1000, ids.size) for f in TIMELINE_FIELDS}
    return pl.DataFrame({EVENT_ID: ids, USER: np.broadcast_to(users, ids.shape), **columns, "ts": np.asarray(ts)})


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, tmp_path):
    """A function that opens a client of one store (every call a new client of the same data)."""
    opened = []
    if request.param == "sqlite":
        def open_(max_len=1000):
            opened.append(SqliteRealtime(tmp_path / "realtime.db", max_len))
            return opened[-1]
    else:
        server = request.getfixturevalue("redis_server")

        def open_(max_len=1000):
            opened.append(RedisRealtime.connect(f"127.0.0.1:{server.port}", max_len))
            return opened[-1]
    open_.kind = request.param
    yield open_
    for store in opened:
        store.close()


def test_events_end_in_time_order_whatever_order_they_arrive_in(open_store):
    store = open_store()
    events = _events(ids=[5, 3, 9, 1, 7], users=42, ts=[500, 300, 300, 100, 700])
    store.append(events[[2, 4]])
    store.append(events[[0, 1, 3]])
    (got,) = store.read([42])
    expected = events.sort("ts", EVENT_ID)  # equal times: by event id
    for field in TIMELINE_FIELDS:
        assert got[field].tolist() == expected[field].to_list(), field
    assert store.read([43])[0]["ts"].size == 0  # a user without events


def test_a_repeated_event_id_is_stored_once(open_store):
    store = open_store()
    first = store.append(_events(ids=[1, 2, 2], users=7, ts=[10, 20, 20]))  # a duplicate inside the batch
    retry = store.append(_events(ids=[2, 3], users=7, ts=[20, 30]))  # the ad server retries
    assert (first.stored, first.duplicates, retry.stored, retry.duplicates) == (2, 1, 1, 1)
    assert (first.duplicate_ids, retry.duplicate_ids) == ({2}, {2})
    assert store.read([7])[0]["ts"].tolist() == [10, 20, 30]


def test_each_user_keeps_the_newest_max_len_events(open_store):
    store = open_store(max_len=4)
    store.append(_events(ids=np.arange(1, 8), users=1, ts=[70, 10, 60, 20, 50, 30, 40]))
    store.append(_events(ids=[100], users=2, ts=[5]))
    store.append(_events(ids=[8], users=1, ts=[15]))  # late and old: older than all it keeps, so trimmed
    one, two = store.read([1, 2])
    assert one["ts"].tolist() == [40, 50, 60, 70] and two["ts"].tolist() == [5]


def test_one_append_far_over_max_len_keeps_the_newest(open_store):
    """An append that trims more events than one Redis command's arguments can hold (~8,000: the script's
    deletions go in parts; before, it failed midway and left the deleted ids' fields behind)."""
    store = open_store(max_len=10)
    ids = np.arange(1, 9_011)
    store.append(_events(ids=ids, users=1, ts=ids))
    assert store.read([1])[0]["ts"].tolist() == list(range(9_001, 9_011))
    if open_store.kind == "redis":
        assert store.client.hlen(f"{store.prefix}:1:events") == 10


def test_a_store_written_before_it_kept_counts_trims_as_one_that_did(tmp_path):
    SqliteRealtime(tmp_path / "realtime.db").append(_events(ids=np.arange(1, 6), users=1, ts=np.arange(1, 6)))
    with sqlite3.connect(tmp_path / "realtime.db") as db:
        db.execute("DROP TABLE realtime_counts")  # as a store of an earlier version holds it
    store = SqliteRealtime(tmp_path / "realtime.db", max_len=4)
    store.append(_events(ids=[6], users=1, ts=[6]))
    assert store.read([1])[0]["ts"].tolist() == [3, 4, 5, 6]


def test_concurrent_writers_of_one_user_are_all_kept(open_store):
    stores = [open_store(), open_store()]

    def write(k):
        for batch in range(20):
            ids = 1 + k * 1000 + batch * 10 + np.arange(10)
            stores[k].append(_events(ids=ids, users=3, ts=ids * 7 % 997))

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = open_store().read([3])[0]
    assert got["ts"].size == 400 and np.all(np.diff(got["ts"]) >= 0)


def test_stored_events_outlive_the_client_and_the_server(open_store, request):
    open_store().append(_events(ids=[1, 2], users=9, ts=[1, 2]))
    if open_store.kind == "redis":
        server = request.getfixturevalue("redis_server")
        server.stop()
        server.start()  # the append-only file brings the data back
    assert open_store().read([9])[0]["ts"].tolist() == [1, 2]


def test_events_without_the_needed_columns_are_refused(open_store):
    with pytest.raises(ValueError, match="hours"):
        open_store().append(_events(ids=[1], users=1, ts=[1]).drop("hours"))


def _log_rows(ids, ts) -> pl.DataFrame:
    n = len(ids)
    local = contract.local_time_fields(np.asarray(ts), 8.0)
    return pl.DataFrame({"event_id": ids, "user_id": [1] * n, "ts": ts, "action": [0] * n, "shop_id": [2] * n,
                         "item_id": [3] * n, "category_1_id": [4] * n, "brand_id": [None] * n,
                         "price": [9.5] * n, "shop_aoi_id": [None] * n, "shop_geohash_6": ["wtw3sj"] * n,
                         "geohash_6": [None] * n, "aoi_id": [None] * n, **local, "city_id": [1] * n},
                        schema_overrides={"brand_id": pl.Int64, "shop_aoi_id": pl.Int64, "aoi_id": pl.Int64,
                                          "geohash_6": pl.String})


DAY = 1_780_000_000_000


def test_the_behaviour_log_writes_contract_partitions(tmp_path):
    log = BehaviourLog(tmp_path, 8.0, flush_s=3600)
    log.append(_log_rows([1, 2], [DAY, DAY + 86_400_000]))  # two local dates
    assert logio.read_raw(tmp_path, "behaviours") is None  # pending: durable, not yet in the layout
    log.append(_log_rows([3], [DAY + 1]))
    assert log.flush() == 3
    log.append(_log_rows([4], [DAY + 2]))  # into a new segment
    log.close()
    stored = logio.read_raw(tmp_path, "behaviours")
    assert sorted(stored["event_id"].to_list()) == [1, 2, 3, 4]
    assert len({p.parent.name for p in logio.table_files(tmp_path, "behaviours")}) == 2
    assert not any((tmp_path / "behaviours" / PENDING).glob("*arrows*"))
    result = validate_table(stored, contract.BEHAVIOURS, window=(0, 2 * DAY), known_keys={})
    assert result.quarantine.height == 0  # what the features job will read is clean contract rows


_DIE_APPENDING = """
import os, sys
import polars as pl
from features.behaviour_log import BehaviourLog
BehaviourLog(sys.argv[1], 8.0, flush_s=3600).append(pl.read_ipc(sys.argv[2]))
os._exit(0)  # gone with its segment open: no close, no flush
"""


_DIE_FLUSHING = """
import os, pathlib, sys
import polars as pl
import pyarrow.parquet as pq
from features.behaviour_log import BehaviourLog
log = BehaviourLog(sys.argv[1], 8.0, flush_s=3600)
log.append(pl.read_ipc(sys.argv[2]))
unlink, write, written = pathlib.Path.unlink, pq.write_table, []
def unlinked(path, *args, **kwargs):
    if sys.argv[3] == "removing" and path.name.endswith(".arrows"):
        os._exit(0)  # killed in its flush: its part files written, its segments not yet removed
    return unlink(path, *args, **kwargs)
def wrote(*args, **kwargs):
    if sys.argv[3] == "between_dates" and written:
        os._exit(0)  # killed in its flush between the part files of its two dates
    written.append(1)
    return write(*args, **kwargs)
pathlib.Path.unlink, pq.write_table = unlinked, wrote
log.flush()
"""


@pytest.mark.parametrize("live", [True, False], ids=["beside_a_live_process", "at_the_next_start"])
@pytest.mark.parametrize("killed", ["appending", "removing", "between_dates"])
def test_what_a_killed_process_left_lands_once(tmp_path, killed, live):
    """A process sharing the folder is killed with rows of two dates in its open segment, or in its flush after
    writing its part files and before removing their segments, or between its two dates' part files; a process
    that stays up takes its rows over at its next flush (or the next one to start, at its start): each row once.
    (Before: beside a live process, the dead writer's rows waited for the next start and a flush killed after
    its part files was written again; a flush killed between its dates lost the second date's rows.)"""
    folder = tmp_path / "log"
    other = BehaviourLog(folder, 8.0, flush_s=3600) if live else None  # up before the process dies, and after
    _log_rows([7, 8], [DAY, DAY + 86_400_000]).write_ipc(tmp_path / "rows.arrow")
    script = _DIE_APPENDING if killed == "appending" else _DIE_FLUSHING
    died = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "rows.arrow"), killed],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert died.returncode == 0, died.stderr
    assert any((folder / "behaviours" / PENDING).glob("*.arrows*"))  # what the killed process left
    other = other or BehaviourLog(folder, 8.0, flush_s=3600)
    other.append(_log_rows([10], [DAY]))
    other.flush()
    assert sorted(logio.read_raw(folder, "behaviours")["event_id"].to_list()) == [7, 8, 10]
    other.close()
    assert not any((folder / "behaviours" / PENDING).glob("*arrows*"))
    assert not (folder / "behaviours" / PENDING / ".flushing").exists()


def test_a_segment_being_closed_is_not_taken_for_a_dead_ones(tmp_path, monkeypatch):
    """Another process's flush runs while this one closes its segment (between its last write and its rename):
    the segment is still locked, so it is left to its writer, whose flush and later appends go on. (Before, the
    file was released before its rename: the other flush took it over and this one's rename, flush and every
    later append failed.)"""
    folder = tmp_path / "log"
    other, log = BehaviourLog(folder, 8.0, flush_s=3600), BehaviourLog(folder, 8.0, flush_s=3600)
    log.append(_log_rows([1, 2], [DAY, DAY]))
    replace, raced = os.replace, []

    def closing(src, dst):
        if str(src).endswith(".arrows.open") and not raced:
            raced.append(other.flush())
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", closing)
    assert log.flush() == 2 and raced == [0]
    log.append(_log_rows([3], [DAY]))
    log.close()
    other.close()
    assert sorted(logio.read_raw(folder, "behaviours")["event_id"].to_list()) == [1, 2, 3]


def test_the_behaviour_log_recovers_what_a_crash_left(tmp_path):
    folder, pending = tmp_path / "log", tmp_path / "log" / "behaviours" / PENDING
    # a process killed with rows in its open segment, and a torn append after them (never acknowledged)
    _log_rows([9], [DAY]).write_ipc(tmp_path / "rows.arrow")
    died = subprocess.run([sys.executable, "-c", _DIE_APPENDING, str(folder), str(tmp_path / "rows.arrow")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert died.returncode == 0, died.stderr
    (orphan,) = pending.glob("*.arrows.open")
    with open(orphan, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x40\x01\x00")
    # a crash after the part files were written but before the segment was removed: nothing twice
    log = BehaviourLog(tmp_path / "other", 8.0, flush_s=3600)
    log.append(_log_rows([7, 8], [DAY, DAY]))
    (segment,) = (tmp_path / "other" / "behaviours" / PENDING).glob("*.arrows.open")
    kept = segment.read_bytes()
    log.close()
    (pending / segment.name).write_bytes(kept)
    for part in logio.table_files(tmp_path / "other", "behaviours"):
        target = folder / part.relative_to(tmp_path / "other")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(part.read_bytes())

    live = BehaviourLog(tmp_path / "log", 8.0, flush_s=3600)  # the next start recovers
    live.append(_log_rows([10], [DAY]))
    BehaviourLog(tmp_path / "log", 8.0, flush_s=3600).close()  # a second process leaves the live segment be
    assert sorted(logio.read_raw(folder, "behaviours")["event_id"].to_list()) == [7, 8, 9]
    live.close()
    assert sorted(logio.read_raw(folder, "behaviours")["event_id"].to_list()) == [7, 8, 9, 10]
    assert not any(pending.glob("*arrows*"))
