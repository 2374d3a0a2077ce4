"""The features a request needs from the Feast online store, behind small bounded caches.

Per request: one read of the user's timeline (one feature view, `features.online.read_timelines`) and the
candidates' item and shop statistics, each served from a cache while younger than its staleness limit.
A failed or slow read never fails the request: the result says `degraded` and the model scores with an
empty history and zero statistics (what training saw for unknown ids). Reads are bounded by a timeout
(a store client may retry for seconds), and after a failure the store is left alone for a short backoff,
so an outage costs each request nothing; the first read after the backoff tries the store again.
Requests whose features are all cached do not touch the store, so they are scored as usual during an outage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Callable

import numpy as np

from features.dataset import STATS_VIEWS
from features.online import read_timelines
from features.realtime import merged
from fin.inputs import STAT_FEATURES, STAT_KEYS, STAT_VALUES
from serving.config import OnlineConfig


class TTLCache:
    """At most `size` entries, each valid for `ttl_s` seconds after it was stored; when full, the entry stored
    longest ago goes (what a staleness limit evicts anyway). Reads take no lock (a dict read is atomic)."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._entries: dict = {}  # in the order stored
        self._lock = threading.Lock()

    def get(self, key):
        """(stored at, value), or None when absent or stale."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry[0] >= self.clock() - self.ttl_s else None

    def put(self, key, value) -> None:
        with self._lock:
            self._entries.pop(key, None)  # stored again: now the newest
            self._entries[key] = (self.clock(), value)
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]


class RowCache:
    """Up to `size` float32 rows of `width` values by integer id, each valid for `ttl_s` seconds after it was
    stored; when full, the row stored longest ago is replaced (the slots are a ring). The rows live in one
    array: looking up a request's ids is one dict read per id and one gather, with no Python object per row
    (a request reads hundreds of item and shop ids)."""

    def __init__(self, size: int, width: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._slot_of: dict[int, int] = {}
        self._ids = np.zeros(size, np.int64)  # the id each slot holds
        self._rows = np.zeros((size, width), np.float32)
        self._stored = np.full(size, -np.inf)  # when each slot was written
        self._next = 0  # the slot the next row goes to
        self._lock = threading.Lock()  # a put reuses slots: a get must not read one half rewritten

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `ids` [B] ([B, width], zeros where not found) and whether each was found fresh [B]."""
        oldest = self.clock() - self.ttl_s
        with self._lock:
            slots = np.fromiter(map(self._slot_of.get, ids.tolist(), repeat(-1)), np.int64, len(ids))
            found = (slots >= 0) & (self._stored[slots] >= oldest)  # slot -1 reads the last slot, then is masked
            rows = np.where(found[:, None], self._rows[slots], np.float32(0))
        return rows, found

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Store `rows` [K, width] under distinct `ids` [K], replacing what those ids held."""
        ids, rows = ids[-self.size:], rows[-self.size:]
        slots = (self._next + np.arange(len(ids))) % self.size
        with self._lock:
            for slot, new in zip(slots.tolist(), ids.tolist()):
                old = int(self._ids[slot])
                if self._slot_of.get(old) == slot:
                    del self._slot_of[old]  # the row stored longest ago goes
                self._slot_of[new] = slot  # an id stored again leaves its old slot unreferenced
            self._ids[slots], self._rows[slots], self._stored[slots] = ids, rows, self.clock()
            self._next = int(slots[-1] + 1) % self.size if len(slots) else self._next


@dataclass
class UserFeatures:
    timeline: dict[str, np.ndarray] | None  # None: cold-start user (or degraded)
    stats: np.ndarray  # float32 [B, len(STAT_FEATURES)]
    degraded: bool = False
    timeline_cached: bool = False
    stats_hits: int = 0  # item and shop id lookups answered by the cache
    stats_misses: int = 0


@dataclass
class _Lookup:
    """One request's features as far as the caches hold them; `_complete` reads the rest from the store."""

    user_id: int
    timeline: tuple | None  # the cache entry (stored at, timeline or None for an unknown user); None: not cached
    stats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # STAT_KEYS -> (ids [B], rows, found [B])
    timeline_cached: bool = True

    @property
    def complete(self) -> bool:
        return self.timeline is not None and all(found.all() for _, _, found in self.stats.values())

    def features(self) -> UserFeatures:
        hits = sum(int(found.sum()) for _, _, found in self.stats.values())
        return UserFeatures(self.timeline[1], np.concatenate([rows for _, rows, _ in self.stats.values()], axis=1),
                            timeline_cached=self.timeline_cached, stats_hits=hits,
                            stats_misses=sum(len(ids) for ids, _, _ in self.stats.values()) - hits)


class OnlineFeatures:
    def __init__(self, store, config: OnlineConfig = OnlineConfig(), threads: int = 2, realtime=None):
        self.store, self.config = store, config
        self.realtime = realtime  # features.realtime store of ingested events (None: materialised timelines only)
        self.timelines = TTLCache(config.timeline_cache_size, config.timeline_staleness_s)
        self.stats = {key: RowCache(config.stats_cache_size, len(STAT_VALUES), config.stats_staleness_s)
                      for key in STAT_KEYS}
        self._reads = ThreadPoolExecutor(threads, thread_name_prefix="online-store")
        self._skip_until = 0.0  # monotonic time until which the store is considered down

    def warm_up(self) -> None:
        """One read without a timeout (of id 0, which no entity has): the store's first read also opens
        connections and loads its registry."""
        self._complete(self._lookup(0, {key: np.zeros(1, np.int64) for key in STAT_KEYS}))

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)

    async def read(self, user_id: int, candidates: dict[str, np.ndarray]) -> UserFeatures:
        """The user's features; the timeline with the user's ingested events after it (read every time,
        never cached: an event is seen by the next request). If they cannot be read in time, the request
        is scored with the materialised timeline."""
        features = await self._stored(user_id, candidates)
        if self.realtime is None or features.degraded:
            return features
        try:
            read = self._reads.submit(self.realtime.read, [user_id])
            recent = await asyncio.wait_for(asyncio.wrap_future(read), self.config.read_timeout_s)
        except Exception:  # noqa: BLE001 - the stored timeline still scores the request
            return features
        return dataclasses.replace(features, timeline=merged(features.timeline, recent[0],
                                                             self.config.realtime_max_events))

    async def _stored(self, user_id: int, candidates: dict[str, np.ndarray]) -> UserFeatures:
        """The materialised features: straight from the caches when all are there (on the event loop: a dict
        read per id costs less than a thread hop), else what they lack read on this reader's threads (the
        event loop only waits)."""
        lookup = self._lookup(user_id, candidates)
        if lookup.complete:
            return lookup.features()
        if time.monotonic() >= self._skip_until:
            try:
                read = self._reads.submit(self._complete, lookup)
                return await asyncio.wait_for(asyncio.wrap_future(read), self.config.read_timeout_s)
            except Exception:  # noqa: BLE001 - any store failure or timeout degrades the request instead of failing it
                self._skip_until = time.monotonic() + self.config.outage_backoff_s
        n = len(candidates["item_id"])
        return UserFeatures(None, np.zeros((n, len(STAT_FEATURES)), np.float32), degraded=True)

    def _lookup(self, user_id: int, candidates: dict[str, np.ndarray]) -> _Lookup:
        stats = {}
        for key in STAT_KEYS:
            ids = candidates[key]
            stats[key] = (ids, *self.stats[key].get(ids))
        return _Lookup(user_id, self.timelines.get(user_id), stats)

    def _complete(self, lookup: _Lookup) -> UserFeatures:
        """`lookup`'s features, reading what the caches lacked from the store (and caching it)."""
        if lookup.timeline is None:
            timeline = read_timelines(self.store, [lookup.user_id])[0]
            self.timelines.put(lookup.user_id, timeline)
            lookup.timeline, lookup.timeline_cached = (0.0, timeline), False
        for key, (ids, rows, found) in lookup.stats.items():
            if found.all():
                continue
            absent = ids[~found]
            missing = np.unique(absent)
            response = self.store.get_online_features(
                features=[f"{STATS_VIEWS[key]}:{v}" for v in STAT_VALUES],
                entity_rows=[{key: i} for i in missing.tolist()]).to_dict()
            # an id the store does not know reads None: zeros, as in training
            read = np.nan_to_num(np.array([response[v] for v in STAT_VALUES], np.float64).T).astype(np.float32)
            self.stats[key].put(missing, read)
            rows[~found] = read[np.searchsorted(missing, absent)]
        return lookup.features()
