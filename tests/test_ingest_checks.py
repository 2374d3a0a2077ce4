"""An Ingest call's events are checked and turned into timeline rows by numpy (`features.validate.check_arrays`,
`features.sequences.timeline_arrays`); the features job does the same to whole logs with polars
(`validate_table`, `timeline_events`). Two engines, one set of rules: on events with every kind of fault
they agree row by row, reason by reason and value by value."""

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import contract, logio, sequences
from features.behaviour_log import BehaviourLog
from features.realtime import SqliteRealtime
from features.validate import validate_table
from serving.ingest import _FUTURE_MS, _WINDOW_START_MS, behaviour_events, behaviour_rows, check_events, ingest_calls
from serving.pb import ctr_scoring_pb2 as pb

NOW = 1_780_000_000_000
FAULTS = {  # field -> values that break a rule (or sit on its edge)
    "event_id": [-1],  # unknown
    "user_id": [0], "shop_id": [0], "category_id": [0],  # required, unknown
    "item_id": [0], "brand_id": [0], "aoi_id": [0], "shop_aoi_id": [0], "city_id": [0],  # optional, unknown
    "ts_ms": [0, 5, NOW + _FUTURE_MS, NOW + _FUTURE_MS - 1, _WINDOW_START_MS - 1, _WINDOW_START_MS],
    "action": [-1, 4, 9, 127, 128, 300],
    "price": [-0.01, 0.0, float("nan"), float("inf"), -float("inf"), 1e30, 3.4e38, 1e39, 2**20 - 1, 7.0, 63.0],
    "geohash": ["", "wtw3s", "wtw3sa", "WTW3SJ", "wtw3sjq6", "wtw3s\n"],
    "shop_geohash": ["", "abcdef", "0123456789"],
}


def _messages(seed: int, n: int = 400) -> list:
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        event = pb.BehaviourEvent(
            event_id=int(rng.integers(0, 2**62)), user_id=int(rng.integers(1, 50)),
            ts_ms=int(NOW - rng.integers(0, 10**9)), action=int(rng.integers(0, len(contract.Action))), shop_id=int(rng.integers(1, 10**6)),
            item_id=int(rng.integers(1, 10**9)), category_id=int(rng.integers(1, 100)), brand_id=int(rng.integers(1, 500)),
            price=float(rng.choice([0.0, 1.0, 3.0, 15.0, 255.0, rng.uniform(0, 500)])),
            shop_aoi_id=int(rng.integers(1, 100)), aoi_id=int(rng.integers(1, 100)), city_id=1,
            shop_geohash="wtw3sj", geohash=str(rng.choice(["wtw3sjq6", "wtw3sm", ""])))
        for _ in range(rng.poisson(0.6)):  # a few faults on some events
            field = str(rng.choice(list(FAULTS)))
            setattr(event, field, FAULTS[field][int(rng.integers(len(FAULTS[field])))])
        events.append(event)
    return events


@pytest.mark.parametrize("seed", range(5))
def test_the_ingest_checks_agree_with_the_jobs_validator_and_timelines(seed):
    messages = _messages(seed)
    checked = check_events(messages, 8.0, now_ms=NOW)
    rows = behaviour_rows(messages, 8.0).with_row_index("call_index")
    job = validate_table(rows, contract.BEHAVIOURS, window=(_WINDOW_START_MS, NOW + _FUTURE_MS), known_keys={})
    expected = dict(job.quarantine.select("call_index", "reason").iter_rows())
    assert 40 < len(expected) < len(messages) - 40  # faults of many kinds, and many good events
    assert dict(checked.refused) == expected
    assert_frame_equal(pl.from_arrow(checked.behaviours), job.clean)
    assert_frame_equal(checked.events, sequences.timeline_events(job.clean, keep_event_id=True), check_dtypes=False)
    assert checked.repeats == 0


def test_a_repeated_event_id_in_one_call_is_one_event_and_unknown_ids_are_each_refused():
    first = pb.BehaviourEvent(event_id=7, user_id=1, ts_ms=NOW - 1000, action=1, shop_id=5, category_id=2,
                              price=3.0, shop_geohash="wtw3sj", geohash="wtw3sjq6")
    again, later = pb.BehaviourEvent(), pb.BehaviourEvent()
    again.CopyFrom(first)
    again.price = 9.0  # a retry carries the same event: the first copy is kept
    later.CopyFrom(first)
    later.event_id = -1
    checked = check_events([first, again, later, later], 8.0, now_ms=NOW)
    assert checked.repeats == 1 and checked.behaviours["price"].to_pylist() == [3.0]
    assert checked.refused == [(2, "null:event_id"), (3, "null:event_id")]


def test_a_log_row_without_an_event_id_or_action_is_sent_as_unknown_and_refused():
    """A log row's null event id or action goes on the wire as unknown (-1), so the server refuses it as the
    features job quarantines it (before, both were sent as 0: an id, and a click, and the event was accepted)."""
    row = dict(event_id=1, user_id=1, ts=NOW - 1000, action=1, shop_id=5, category_1_id=2, shop_geohash_6="wtw3sj")
    rows = pl.DataFrame([row, dict(row, event_id=2, action=None), dict(row, event_id=None)])
    rows = pl.from_arrow(contract.BEHAVIOURS.schema.empty_table()).drop(rows.columns).clear(rows.height).hstack(rows)
    checked = check_events(behaviour_events(rows), 8.0, now_ms=NOW)
    assert checked.refused == [(1, "null:action"), (2, "null:event_id")] and len(checked.checked) == 1


def test_a_refused_event_keeps_no_later_copy_of_its_id_from_being_stored(tmp_path):
    """A client's corrected retry of a refused event, in the same call or in another call of the same group, is
    stored and answered as it would be alone (before, the refused first copy was kept as the id's one event:
    the retry was answered accepted but never stored)."""
    good = pb.BehaviourEvent(event_id=7, user_id=1, ts_ms=NOW - 1000, action=1, shop_id=5, category_id=2,
                             price=3.0, shop_geohash="wtw3sj", geohash="wtw3sjq6")
    bad = pb.BehaviourEvent()
    bad.CopyFrom(good)
    bad.shop_id = 0  # unknown: refused
    checked = check_events([bad, good, good], 8.0, now_ms=NOW)
    assert checked.refused == [(0, "null:shop_id")] and checked.checked.tolist() == [1] and checked.repeats == 1
    log, store = BehaviourLog(tmp_path / "log", 8.0, flush_s=3600), SqliteRealtime(tmp_path / "realtime.db")
    results = ingest_calls([[bad], [good], [good]], 8.0, log, store, now_ms=NOW)
    assert [(r.accepted, r.duplicates, r.refused) for r in results] == [(0, 0, [(0, "null:shop_id")]), (1, 0, []),
                                                                        (1, 1, [])]
    log.close()
    assert logio.read_raw(tmp_path / "log", "behaviours")["event_id"].to_list() == [7]
    assert store.read([1])[0]["ts"].tolist() == [NOW - 1000]
    store.close()
