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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from features.online import read_timelines
from fin.data import STAT_FEATURES, STAT_KEYS, STAT_VALUES
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
        return self.get_many([key])[0]

    def get_many(self, keys: list) -> list:
        """`get` of each key."""
        oldest = self.clock() - self.ttl_s
        found = map(self._entries.get, keys)
        return [e if e is not None and e[0] >= oldest else None for e in found]

    def put(self, key, value) -> None:
        with self._lock:
            self._entries.pop(key, None)  # stored again: now the newest
            self._entries[key] = (self.clock(), value)
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]


@dataclass
class UserFeatures:
    timeline: dict[str, np.ndarray] | None  # None: cold-start user (or degraded)
    stats: np.ndarray  # float32 [B, len(STAT_FEATURES)]
    degraded: bool = False
    timeline_cached: bool = False
    stats_hits: int = 0  # item and shop ids found in the cache
    stats_misses: int = 0


class OnlineFeatures:
    def __init__(self, store, config: OnlineConfig = OnlineConfig(), threads: int = 2):
        self.store, self.config = store, config
        self.timelines = TTLCache(config.timeline_cache_size, config.timeline_staleness_s)
        self.stats = TTLCache(config.stats_cache_size, config.stats_staleness_s)
        self._reads = ThreadPoolExecutor(threads, thread_name_prefix="online-store")
        self._skip_until = 0.0  # monotonic time until which the store is considered down

    def warm_up(self) -> None:
        """One read without a timeout (of id 0, which no entity has): the store's first read also opens
        connections and loads its registry."""
        self._read(0, {"item_id": np.zeros(1, np.int64), "shop_id": np.zeros(1, np.int64)})

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)

    async def read(self, user_id: int, candidates: dict[str, np.ndarray]) -> UserFeatures:
        """The user's features: straight from the caches when all are there (on the event loop: a dict read
        per id costs less than a thread hop), else read on this reader's threads (the event loop only waits)."""
        cached = self._read(user_id, candidates, store=False)  # all in the caches: no thread hop, no store
        if cached is not None:
            return cached
        if time.monotonic() >= self._skip_until:
            try:
                read = self._reads.submit(self._read, user_id, candidates)
                return await asyncio.wait_for(asyncio.wrap_future(read), self.config.read_timeout_s)
            except Exception:  # noqa: BLE001 - any store failure or timeout degrades the request instead of failing it
                self._skip_until = time.monotonic() + self.config.outage_backoff_s
        n = len(candidates["item_id"])
        return UserFeatures(None, np.zeros((n, len(STAT_FEATURES)), np.float32), degraded=True)

    def _read(self, user_id: int, candidates: dict[str, np.ndarray], store: bool = True) -> UserFeatures | None:
        """The features from the caches, and what they lack from the store; with `store` False, None when
        anything is not cached."""
        cached = self.timelines.get(user_id)
        if cached is not None:
            timeline = cached[1]
        elif not store:
            return None
        else:
            timeline = read_timelines(self.store, [user_id])[0]
            self.timelines.put(user_id, timeline)
        parts, hits, misses = [], 0, 0
        for key in STAT_KEYS:
            found = self._stats(key, candidates[f"{key}_id"], store)
            if found is None:
                return None
            parts.append(found[0])
            hits, misses = hits + found[1], misses + found[2]
        return UserFeatures(timeline, np.concatenate(parts, axis=1), timeline_cached=cached is not None,
                            stats_hits=hits, stats_misses=misses)

    def _stats(self, key: str, ids: np.ndarray, store: bool = True) -> tuple[np.ndarray, int, int] | None:
        """[B, len(STAT_VALUES)] statistics of `ids` (zeros when unknown), reading only uncached ids (none:
        None when `store` is False and some are not cached); and the numbers of cache hits and misses."""
        unique, inverse = np.unique(ids, return_inverse=True)
        keys = [(key, entity) for entity in unique.tolist()]
        entries = self.stats.get_many(keys)
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing and not store:
            return None
        if missing:
            response = self.store.get_online_features(
                features=[f"{key}_stats:{v}" for v in STAT_VALUES],
                entity_rows=[{f"{key}_id": keys[i][1]} for i in missing]).to_dict()
            for j, i in enumerate(missing):
                row = np.array([response[v][j] or 0.0 for v in STAT_VALUES], np.float32)
                self.stats.put(keys[i], row)
                entries[i] = (0.0, row)
        rows = np.concatenate([entry[1] for entry in entries]).reshape(len(entries), len(STAT_VALUES))
        return rows[inverse], unique.size - len(missing), len(missing)
