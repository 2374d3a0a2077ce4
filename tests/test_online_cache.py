"""The server's feature caches: bounded, and never serving an entry older than its staleness limit."""

import numpy as np

from serving.online import RowCache, TTLCache


def test_entries_expire_and_the_oldest_stored_goes_first():
    now = [0.0]
    cache = TTLCache(size=2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 5
    cache.put("b", 2)
    assert [cache.get(k) for k in ("a", "b", "c")] == [(0.0, 1), (5, 2), None]
    cache.put("a", 3)  # stored again: now the newest, so "b" is the oldest
    cache.put("c", 4)
    assert cache.get("b") is None and cache.get("a") == (5, 3) and cache.get("c") == (5, 4)
    now[0] = 15.5
    assert cache.get("a") is None  # stored at 5, older than 10 s


def test_row_cache_finds_fresh_rows_and_replaces_the_oldest_when_full():
    now = [0.0]
    cache = RowCache(size=3, width=2, ttl_s=10, clock=lambda: now[0])
    cache.put(np.array([7, 8]), np.array([[1, 1], [2, 2]], np.float32))
    now[0] = 5
    cache.put(np.array([9]), np.array([[3, 3]], np.float32))
    rows, found = cache.get(np.array([9, 7, 5, 7]))  # repeats and an unknown id
    assert found.tolist() == [True, True, False, True]
    assert rows.tolist() == [[3, 3], [1, 1], [0, 0], [1, 1]]
    cache.put(np.array([10]), np.array([[4, 4]], np.float32))  # full: 7, stored longest ago, goes
    assert cache.get(np.array([7, 8, 9, 10]))[1].tolist() == [False, True, True, True]
    cache.put(np.array([9]), np.array([[5, 5]], np.float32))  # stored again (8 goes), then 11 takes 9's old slot
    cache.put(np.array([11]), np.array([[6, 6]], np.float32))
    rows, found = cache.get(np.array([8, 9, 10, 11]))
    assert found.tolist() == [False, True, True, True] and rows[1:].tolist() == [[5, 5], [4, 4], [6, 6]]
    now[0] = 15.5  # all were stored at 5: older than 10 s
    assert not cache.get(np.array([9, 10, 11]))[1].any()
    cache.put(np.arange(100, 105), np.ones((5, 2), np.float32))  # more than fit: the last 3 stay
    assert cache.get(np.arange(100, 105))[1].tolist() == [False, False, True, True, True]
