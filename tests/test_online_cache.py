"""The server's feature caches: bounded, and never serving an entry older than its staleness limit."""

from serving.online import TTLCache


def test_entries_expire_and_the_oldest_stored_goes_first():
    now = [0.0]
    cache = TTLCache(size=2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 5
    cache.put("b", 2)
    assert cache.get_many(["a", "b", "c"]) == [(0.0, 1), (5, 2), None]
    cache.put("a", 3)  # stored again: now the newest, so "b" is the oldest
    cache.put("c", 4)
    assert cache.get("b") is None and cache.get("a") == (5, 3) and cache.get("c") == (5, 4)
    now[0] = 15.5
    assert cache.get("a") is None  # stored at 5, older than 10 s
