"""Real-time timeline events: each user's newest behaviours since the last features run, kept beside the
Feast-materialised timeline in the online store's own primitives.

An event is stored once (its `event_id`, the contract's key: a retried event is a duplicate, not a second
event), every user's events are read in time order (then event id) however they arrived, and a user keeps
at most `max_len` of them (the newest: the same bound as the materialised timeline). Appends from several
clients or server processes interleave safely: each store applies a user's append atomically.

- `SqliteRealtime` (one machine, the default beside Feast's sqlite online store): one table keyed by event
  id in a database file in WAL mode; an append is one transaction (insert-or-ignore, then the trim of the
  users it touched), durable when it commits.
- `RedisRealtime` (beside Feast's Redis online store): per user a sorted set of event ids scored by time
  and a hash of their packed fields, changed by one server-side script per user (dedupe, add, trim), so
  an append is atomic per user and a read of many users is one pipelined round trip. Durability is the
  Redis server's (append-only file).

Events are timeline rows as the features job derives them (`features.sequences.timeline_events`, or its
numpy twin `timeline_arrays` on the Ingest path) with their `event_id`: `EVENT_ID`, `USER` and
`TIMELINE_FIELDS`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.sequences import TIMELINE_FIELDS

EVENT_ID, USER = "event_id", "user_id"
_COLUMNS = (EVENT_ID, USER, *TIMELINE_FIELDS)


@dataclass(frozen=True)
class Appended:
    stored: int  # events new to the store
    duplicates: int  # events whose id it already held (retries), or held by an earlier event of the append
    duplicate_ids: frozenset[int]  # their ids


def _columns(events: pl.DataFrame) -> dict[str, np.ndarray]:
    missing = [c for c in _COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"real-time events need the columns {', '.join(missing)}")
    cols = {c: events[c].cast(pl.Int64).to_numpy() for c in _COLUMNS}
    if cols[EVENT_ID].size and int(cols[EVENT_ID].min()) < 0:
        raise ValueError("real-time events need non-negative event ids")
    return cols


def _empty() -> dict[str, np.ndarray]:
    return {f: np.zeros(0, np.int64) for f in TIMELINE_FIELDS}


class SqliteRealtime:
    """Real-time events in a sqlite file (created when missing)."""

    def __init__(self, path: str | Path, max_len: int = 1000, timeout_s: float = 10.0):
        self.path, self.max_len = Path(path), max_len
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed append survives a crash of the machine
        fields = ", ".join(f"{f} INTEGER NOT NULL" for f in TIMELINE_FIELDS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS realtime_events (event_id INTEGER PRIMARY KEY, "
                         f"user_id INTEGER NOT NULL, {fields})")
        self._db.execute("CREATE INDEX IF NOT EXISTS realtime_by_user ON realtime_events (user_id, ts, event_id)")
        self._lock = threading.Lock()  # one connection, used by one thread at a time

    def append(self, events: pl.DataFrame) -> Appended:
        cols = _columns(events)
        rows = list(zip(*(cols[c].tolist() for c in _COLUMNS)))
        insert = f"INSERT OR IGNORE INTO realtime_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        trim = ("DELETE FROM realtime_events WHERE user_id = ?1 AND event_id IN (SELECT event_id FROM "
                "realtime_events WHERE user_id = ?1 ORDER BY ts DESC, event_id DESC LIMIT -1 OFFSET ?2)")
        ids = cols[EVENT_ID].tolist()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes; readers go on
            try:
                held = {held for lo in range(0, len(ids), 500) for (held,) in db.execute(
                    f"SELECT event_id FROM realtime_events WHERE event_id IN ({', '.join('?' * len(ids[lo:lo + 500]))})",
                    ids[lo:lo + 500])}
                before = db.total_changes
                db.executemany(insert, rows)
                stored = db.total_changes - before
                db.executemany(trim, [(int(u), self.max_len) for u in np.unique(cols[USER])])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        unique, counts = np.unique(cols[EVENT_ID], return_counts=True)
        held |= set(unique[counts > 1].tolist())  # repeated inside this append
        return Appended(stored=stored, duplicates=len(rows) - stored, duplicate_ids=frozenset(held))

    def read(self, user_ids: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Each user's events (TIMELINE_FIELDS -> int64 array, oldest first; empty when none)."""
        with self._lock:
            return [self._read(int(user)) for user in user_ids]

    def _read(self, user: int) -> dict[str, np.ndarray]:
        rows = self._db.execute(f"SELECT {', '.join(TIMELINE_FIELDS)} FROM realtime_events WHERE user_id = ? "
                                "ORDER BY ts, event_id", (user,)).fetchall()
        values = np.array(rows, dtype=np.int64).reshape(len(rows), len(TIMELINE_FIELDS))
        return {f: values[:, i].copy() for i, f in enumerate(TIMELINE_FIELDS)} if rows else _empty()

    def close(self) -> None:
        self._db.close()


# Per user: KEYS[1] the sorted set of event ids (scored by time), KEYS[2] the hash event id -> packed fields.
# ARGV: max_len, then (event id, time, fields) per event. Adds the events whose id the set lacks, trims the
# oldest beyond max_len from both keys, returns the ids it already held. One script: atomic per user.
_APPEND_SCRIPT = """
local held = {}
for i = 2, #ARGV, 3 do
  if redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  else
    held[#held + 1] = ARGV[i]
  end
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  redis.call('HDEL', KEYS[2], unpack(old))
end
return held
"""
_ID_WIDTH = 20  # event ids as zero-padded decimals: equal times order by id, as in sqlite


class RedisRealtime:
    """Real-time events in Redis, under keys `<prefix>:<user>:ids` and `<prefix>:<user>:events`."""

    def __init__(self, client, max_len: int = 1000, prefix: str = "fin:realtime"):
        self.client, self.max_len, self.prefix = client, max_len, prefix
        self._append = client.register_script(_APPEND_SCRIPT)

    @classmethod
    def connect(cls, address: str, max_len: int = 1000, **kwargs) -> RedisRealtime:
        import redis

        host, _, port = address.rpartition(":")
        return cls(redis.Redis(host=host or "127.0.0.1", port=int(port)), max_len, **kwargs)

    def _keys(self, user: int) -> list[str]:
        return [f"{self.prefix}:{user}:ids", f"{self.prefix}:{user}:events"]

    def append(self, events: pl.DataFrame) -> Appended:
        cols = _columns(events)
        packed = np.stack([cols[f] for f in TIMELINE_FIELDS], axis=1).astype("<i8")
        order = np.argsort(cols[USER], kind="stable")
        users, starts = np.unique(cols[USER][order], return_index=True)
        pipe = self.client.pipeline(transaction=False)
        for user, rows in zip(users.tolist(), np.split(order, starts[1:])):
            args = [self.max_len]
            for r in rows.tolist():
                args += [f"{int(cols[EVENT_ID][r]):0{_ID_WIDTH}d}", int(cols["ts"][r]), packed[r].tobytes()]
            self._append(keys=self._keys(user), args=args, client=pipe)
        held = [int(i) for ids in pipe.execute() for i in ids]
        return Appended(stored=len(packed) - len(held), duplicates=len(held), duplicate_ids=frozenset(held))

    def read(self, user_ids: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Each user's events (TIMELINE_FIELDS -> int64 array, oldest first; empty when none), all users in
        one round trip (MULTI/EXEC: no append lands between a user's two reads)."""
        pipe = self.client.pipeline(transaction=True)
        for user in user_ids:
            ids_key, events_key = self._keys(int(user))
            pipe.zrange(ids_key, 0, -1)
            pipe.hgetall(events_key)
        replies = pipe.execute()
        out = []
        for ids, fields in zip(replies[0::2], replies[1::2]):
            packed = [fields[i] for i in ids]
            if not packed:
                out.append(_empty())
                continue
            values = np.frombuffer(b"".join(packed), dtype="<i8").reshape(len(packed), len(TIMELINE_FIELDS))
            out.append({f: values[:, i].astype(np.int64) for i, f in enumerate(TIMELINE_FIELDS)})
        return out

    def close(self) -> None:
        self.client.close()


def merged(stored: Mapping[str, np.ndarray] | None, recent: Mapping[str, np.ndarray],
           max_len: int) -> Mapping[str, np.ndarray] | None:
    """The timeline a request reads: the materialised one (None: none) followed by the real-time events after
    its newest event, the newest `max_len` of them. Real-time events at or before that event are in it, or
    arrived too late for the features run that built it: that run's successor places them (they are in
    the behaviour log)."""
    if recent["ts"].size == 0:
        return stored
    if stored is not None and stored["ts"].size:
        recent = {f: v[recent["ts"] > stored["ts"][-1]] for f, v in recent.items()}
        if recent["ts"].size == 0:
            return stored
        both = {f: np.concatenate([stored[f], recent[f]]) for f in TIMELINE_FIELDS}
    else:
        both = dict(recent)
    return {f: v[-max_len:] for f, v in both.items()}


def open_realtime(store, repo: str | Path, max_len: int = 1000) -> SqliteRealtime | RedisRealtime:
    """The real-time events beside a Feast repository's online store: `realtime.db` in the repository for
    sqlite, the same Redis server for Redis."""
    online = store.config.online_store
    if online.type == "redis":
        return RedisRealtime.connect(online.connection_string.split(",")[0], max_len)
    return SqliteRealtime(Path(repo) / "realtime.db", max_len)
