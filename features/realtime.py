"""Real-time timeline events: each user's newest behaviours since the last features run, kept beside the
Feast-materialised timeline in the online store's own primitives.

An event is stored once (its `event_id`, the contract's key: a retried event is a duplicate, not a second
event; in Redis, once per user: one id sent with two users is stored under each), every user's events are
read in time order (then event id) however they arrived, and a user keeps at most `max_len` of them (the
newest: the same bound as the materialised timeline). Appends from several clients or server processes
interleave safely: each store applies a user's append atomically.

- `SqliteRealtime` (one machine, the default beside Feast's sqlite online store): one table keyed by event
  id in a database file in WAL mode; an append is one transaction (insert-or-ignore, then the trim of the
  users it touched beyond `max_len`, by a per-user count kept beside), which survives a crash of the
  process once it commits (a power loss may take the appends since the last checkpoint: the behaviour log
  the server writes first holds every acknowledged event, and the next features run places it).
- `RedisRealtime` (beside Feast's Redis online store): per user a sorted set of event ids scored by time
  and a hash of their packed fields, changed by one server-side script call per append (dedupe, add, trim
  each user it touches), so an append is one atomic round trip and a read of many users is one pipelined
  round trip. (The keys of one append must live on one Redis server: a Redis Cluster is not supported.) Durability is the
  Redis server's (append-only file).

Events are timeline rows as the features job derives them (`features.sequences.timeline_events`, or its
numpy twin `timeline_arrays` on the Ingest path) with their `event_id`: `EVENT_ID`, `USER` and
`TIMELINE_FIELDS`.
"""

from __future__ import annotations

import contextlib
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


def _select_in(db: sqlite3.Connection, query: str, values: list, *after) -> list[tuple]:
    """The rows of `query`, whose `IN ({})` takes `values`, then the parameters `after`; in chunks of 500
    values (sqlite bounds the parameters of one statement)."""
    return [row for lo in range(0, len(values), 500)
            for row in db.execute(query.format(", ".join("?" * len(values[lo:lo + 500]))),
                                  [*values[lo:lo + 500], *after])]


class SqliteRealtime:
    """Real-time events in a sqlite file (created when missing)."""

    def __init__(self, path: str | Path, max_len: int = 1000, timeout_s: float = 10.0,
                 checkpoint_appends: int = 500, checkpoint_s: float = 60.0):
        self.path, self.max_len = Path(path), max_len
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._db.execute("PRAGMA journal_mode=WAL")
        # a committed append survives a crash of the process, not every one of the machine: the behaviour log
        # is the durable record (fdatasynced before the store is written), so one disk flush per append
        self._db.execute("PRAGMA synchronous=NORMAL")
        fields = ", ".join(f"{f} INTEGER NOT NULL" for f in TIMELINE_FIELDS)
        with self._transaction() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS realtime_events (event_id INTEGER PRIMARY KEY, "
                       f"user_id INTEGER NOT NULL, {fields})")
            db.execute("CREATE INDEX IF NOT EXISTS realtime_by_user ON realtime_events (user_id, ts, event_id)")
            # each user's event count, kept by every append: the trim needs no count over the user's events
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'realtime_counts'").fetchone():
                db.execute("CREATE TABLE realtime_counts (user_id INTEGER PRIMARY KEY, events INTEGER NOT NULL)")
                db.execute("INSERT INTO realtime_counts SELECT user_id, COUNT(*) FROM realtime_events GROUP BY user_id")
        # The write-ahead log is copied into the database (a checkpoint) by a thread of its own after every
        # `checkpoint_appends` appends and every `checkpoint_s` seconds: not by the append that happens
        # to cross sqlite's threshold (which would wait for the copy and its fsync), and seldom, because
        # appends in flight while the checkpoint's writes reach the disk stall behind them (measured on
        # 2 cores: tens of ms each; once a second that was the ingest call p99, once per 500 appends not).
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self.checkpoint_appends, self._appends = checkpoint_appends, 0
        self._checkpoint_due = threading.Event()
        self._closed = threading.Event()
        # started by the first append: a client that only reads leaves the checkpoints to the writers
        self._checkpointer = threading.Thread(target=self._checkpoint_every, args=(checkpoint_s, timeout_s),
                                              name="realtime-checkpoint", daemon=True)

    def _checkpoint_every(self, seconds: float, timeout_s: float) -> None:
        db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._checkpoint_due.wait(seconds)
                self._checkpoint_due.clear()
                if self._closed.is_set():
                    return
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # alongside appends and reads, never blocking them
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self):
        """The connection inside one write transaction (one writer at a time across processes; readers go on)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def append(self, events: pl.DataFrame) -> Appended:
        cols = _columns(events)
        rows = list(zip(*(cols[c].tolist() for c in _COLUMNS)))
        insert = f"INSERT OR IGNORE INTO realtime_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        ids = cols[EVENT_ID]
        first = np.zeros(ids.size, bool)
        first[np.unique(ids, return_index=True)[1]] = True  # a repeat inside this append is not stored
        with self._lock:  # one thread starts it, once (two starting it at once: every later append failed)
            if self._checkpointer.ident is None and not self._closed.is_set():
                self._checkpointer.start()
        with self._transaction() as db:
            held = {held for (held,) in _select_in(db, "SELECT event_id FROM realtime_events WHERE event_id IN ({})",
                                                   ids.tolist())}
            before = db.total_changes
            db.executemany(insert, rows)
            stored = db.total_changes - before
            users, added = np.unique(cols[USER][first & ~np.isin(ids, list(held))], return_counts=True)
            db.executemany("INSERT INTO realtime_counts (user_id, events) VALUES (?, ?) ON CONFLICT (user_id) "
                           "DO UPDATE SET events = events + excluded.events", zip(users.tolist(), added.tolist()))
            over = _select_in(db, "SELECT user_id, events FROM realtime_counts WHERE user_id IN ({}) AND events > ?",
                              users.tolist(), self.max_len)
            db.executemany("DELETE FROM realtime_events WHERE event_id IN (SELECT event_id FROM realtime_events "
                           "WHERE user_id = ? ORDER BY ts, event_id LIMIT ?)",
                           [(user, events - self.max_len) for user, events in over])
            db.executemany("UPDATE realtime_counts SET events = ? WHERE user_id = ?",
                           [(self.max_len, user) for user, _ in over])
        self._appends += 1
        if self._appends >= self.checkpoint_appends:
            self._appends = 0
            self._checkpoint_due.set()
        held |= set(ids[~first].tolist())  # repeated inside this append
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
        self._closed.set()
        self._checkpoint_due.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()
        self._db.close()


# KEYS: per user, the sorted set of event ids (scored by time) and the hash event id -> packed fields. ARGV:
# max_len, then per user the number of its events and (event id, time, fields) per event. Adds the events
# whose id a user's set lacks, trims the oldest beyond max_len from both keys, returns the ids already held.
# One script call per append (a round trip and one atomic step, however many users the append touches).
_APPEND_SCRIPT = """
local max_len = tonumber(ARGV[1])
local held = {}
local a = 2
for k = 1, #KEYS, 2 do
  local ids, events = KEYS[k], KEYS[k + 1]
  local last = a + 3 * tonumber(ARGV[a])
  for i = a + 1, last, 3 do
    if redis.call('ZADD', ids, 'NX', ARGV[i + 1], ARGV[i]) == 1 then
      redis.call('HSET', events, ARGV[i], ARGV[i + 2])
    else
      held[#held + 1] = ARGV[i]
    end
  end
  a = last + 1
  local excess = redis.call('ZCARD', ids) - max_len
  if excess > 0 then
    local old = redis.call('ZRANGE', ids, 0, excess - 1)
    redis.call('ZREMRANGEBYRANK', ids, 0, excess - 1)
    for i = 1, #old, 1000 do  -- unpack takes at most ~8,000 values: an append that trims more failed midway
      redis.call('HDEL', events, unpack(old, i, math.min(i + 999, #old)))
    end
  end
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
        keys, args = [], [self.max_len]
        for user, rows in zip(users.tolist(), np.split(order, starts[1:])):
            keys += self._keys(user)
            args.append(len(rows))
            for r in rows.tolist():
                args += [f"{int(cols[EVENT_ID][r]):0{_ID_WIDTH}d}", int(cols["ts"][r]), packed[r].tobytes()]
        held = [int(i) for i in self._append(keys=keys, args=args)] if keys else []
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


def realtime_location(store, repo: str | Path) -> str:
    """Where the real-time events beside a Feast repository's online store live: `redis:HOST:PORT` (the same
    Redis server) or `sqlite:PATH` (`realtime.db` in the repository)."""
    online = store.config.online_store
    if online.type == "redis":
        return f"redis:{online.connection_string.split(',')[0]}"
    return f"sqlite:{Path(repo) / 'realtime.db'}"


def open_realtime_at(location: str, max_len: int = 1000) -> SqliteRealtime | RedisRealtime:
    """A client of the real-time events at a `realtime_location`."""
    kind, _, where = location.partition(":")
    if kind == "redis":
        return RedisRealtime.connect(where, max_len)
    if kind == "sqlite":
        return SqliteRealtime(where, max_len)
    raise ValueError(f"unknown real-time store {location!r}: redis:HOST:PORT or sqlite:PATH")


def open_realtime(store, repo: str | Path, max_len: int = 1000) -> SqliteRealtime | RedisRealtime:
    """A client of the real-time events beside a Feast repository's online store."""
    return open_realtime_at(realtime_location(store, repo), max_len)
