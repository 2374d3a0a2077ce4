"""Property tests of fragment(): the FIN sub-sequences against a plain per-request reference."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features import geohash
from features.fragments import (
    MISSING,
    TAG_BOTH,
    TAG_LOCATION_ONLY,
    TAG_MEAL_ONLY,
    FragmentConfig,
    fragment,
    fragment_slots,
    fragment_windows,
    runs,
)
from fin.inputs import history_batch

CENTRE = int(geohash.to_codes(np.array(["wtw3sj"]))[0][0])
RING = geohash.neighbour_codes(np.array([CENTRE]), 6)[0].tolist()
FAR = int(geohash.to_codes(np.array(["wtw9zz"]))[0][0])
CELLS = [CENTRE, *RING[:3], FAR, MISSING]


@st.composite
def batches(draw):
    n = draw(st.integers(1, 6))
    histories, contexts = [], []
    for _ in range(n):
        length = draw(st.integers(0, 40))
        ts = sorted(draw(st.lists(st.integers(0, 1000), min_size=length, max_size=length)))
        events = [dict(ts=t, place_geohash6=draw(st.sampled_from(CELLS)), aoi_id=draw(st.sampled_from([MISSING, 1, 2])),
                       time_type=draw(st.integers(0, 4))) for t in ts]
        histories.append(events)
        contexts.append(dict(ts=draw(st.integers(0, 1100)), geohash6=draw(st.sampled_from([CENTRE, FAR, MISSING])),
                             aoi_id=draw(st.sampled_from([MISSING, 1, 2])), time_type=draw(st.integers(0, 4))))
    config = FragmentConfig(full_len=draw(st.integers(1, 30)), recent_len=draw(st.integers(1, 10)),
                            location_len=draw(st.integers(1, 10)), meal_len=draw(st.integers(1, 10)),
                            integrated_len=draw(st.integers(1, 12)), neighbour_cells=draw(st.booleans()),
                            match_aoi=draw(st.booleans()))
    return histories, contexts, config


def _tensors(histories, contexts):
    lengths = [len(h) for h in histories]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    fields = ("ts", "place_geohash6", "aoi_id", "time_type")
    history = {f: torch.tensor([e[f] for h in histories for e in h], dtype=torch.int64) for f in fields}
    context = {f: torch.tensor([c[f] for c in contexts], dtype=torch.int64) for f in ("ts", "geohash6", "aoi_id", "time_type")}
    return offsets, history, context


def _reference(events, ctx, config):
    """Plain per-request rules (positions within the request's history)."""
    before = [i for i, e in enumerate(events) if e["ts"] < ctx["ts"]]
    cells = {ctx["geohash6"]} | (set(geohash.neighbour_codes(np.array([ctx["geohash6"]]), 6)[0].tolist())
                                 if config.neighbour_cells and ctx["geohash6"] != MISSING else set())
    cells.discard(MISSING)

    def at_place(e):
        return e["place_geohash6"] in cells or (config.match_aoi and e["aoi_id"] != MISSING and e["aoi_id"] == ctx["aoi_id"])

    loc = [i for i in before if at_place(events[i])][-config.location_len:]
    meal = [i for i in before if events[i]["time_type"] == ctx["time_type"]][-config.meal_len:]
    union = sorted(set(loc) | set(meal))[-config.integrated_len:]
    tags = [TAG_BOTH if i in loc and i in meal else TAG_LOCATION_ONLY if i in loc else TAG_MEAL_ONLY for i in union]
    return {"full": before[-config.full_len:], "recent": before[-config.recent_len:], "location": loc, "meal": meal,
            "integrated": union}, tags


@settings(max_examples=300, deadline=None)
@given(batches())
def test_fragments_match_the_rules(batch):
    histories, contexts, config = batch
    offsets, history, context = _tensors(histories, contexts)
    out = fragment(offsets, history, context, config)
    for b, (events, ctx) in enumerate(zip(histories, contexts)):
        expected, tags = _reference(events, ctx, config)
        for name, frag in out.items():
            got = (frag.index[frag.offsets[b]:frag.offsets[b + 1]] - offsets[b]).tolist()
            assert got == expected[name], (name, b)
            assert len(got) <= config.cap(name)
            assert all(history["ts"][offsets[b] + i] < ctx["ts"] for i in got)  # strictly before the request
        integ = out["integrated"]
        assert integ.tags[integ.offsets[b]:integ.offsets[b + 1]].tolist() == tags


@st.composite
def shared_windows(draw):
    """A few users' timelines end to end and many requests, each reading a window of one of them (windows
    overlap, as a training batch's requests of one user do), from a few places and meal slots (so that
    requests ask the same of the events)."""
    timelines = []
    for _ in range(draw(st.integers(1, 3))):
        length = draw(st.integers(0, 60))
        ts = sorted(draw(st.lists(st.integers(0, 1000), min_size=length, max_size=length)))
        timelines.append([dict(ts=t, place_geohash6=draw(st.sampled_from(CELLS)), aoi_id=draw(st.sampled_from([MISSING, 1, 2])),
                               time_type=draw(st.integers(0, 2))) for t in ts])
    first = np.concatenate([[0], np.cumsum([len(t) for t in timelines])])
    windows, contexts = [], []
    for _ in range(draw(st.integers(2, 12))):
        user = draw(st.integers(0, len(timelines) - 1))
        lo = draw(st.integers(0, len(timelines[user])))
        hi = draw(st.integers(lo, len(timelines[user])))
        windows.append((user, lo, hi))
        contexts.append(dict(ts=draw(st.integers(0, 1100)), geohash6=draw(st.sampled_from([CENTRE, FAR, MISSING])),
                             aoi_id=draw(st.sampled_from([MISSING, 1])), time_type=draw(st.integers(0, 2))))
    config = FragmentConfig(full_len=draw(st.integers(1, 40)), recent_len=draw(st.integers(1, 10)),
                            location_len=draw(st.integers(1, 10)), meal_len=draw(st.integers(1, 10)),
                            integrated_len=draw(st.integers(1, 12)), neighbour_cells=draw(st.booleans()),
                            match_aoi=draw(st.booleans()))
    return timelines, first, windows, contexts, config


@settings(max_examples=300, deadline=None)
@given(shared_windows())
def test_overlapping_windows_of_shared_timelines_are_cut_by_the_rules(case):
    """A training batch's requests read windows of their users' timelines (`fragment_windows`): each
    request's fragments are the rules' over its own window, indices into the shared values."""
    timelines, first, windows, contexts, config = case
    _, history, context = _tensors(timelines, contexts)
    starts = torch.tensor([first[u] + lo for u, lo, _ in windows], dtype=torch.int64)
    ends = torch.tensor([first[u] + hi for u, _, hi in windows], dtype=torch.int64)
    out = fragment_windows(starts, ends, history, context, config)
    for b, ((user, lo, hi), ctx) in enumerate(zip(windows, contexts)):
        expected, tags = _reference(timelines[user][lo:hi], ctx, config)
        for name, frag in out.items():
            got = (frag.index[frag.offsets[b]:frag.offsets[b + 1]] - starts[b]).tolist()
            assert got == expected[name], (name, b)
        integ = out["integrated"]
        assert integ.tags[integ.offsets[b]:integ.offsets[b + 1]].tolist() == tags
    for name in ("full", "recent"):  # said to be one run per request: each its first position onwards
        frag = fragment_windows(starts, ends, history, context, config)[name]
        assert frag.stored_index is None, name  # left for a reader of positions to spell out
        assert torch.equal(out[name].index, runs(frag.first, frag.lengths)), name


@settings(max_examples=200, deadline=None)
@given(batches())
def test_a_batch_cuts_each_request_as_it_alone_cuts(batch):
    """Training cuts batches, the server one request at a time (through a shortcut for one request): the
    same fragments. Each request alone is given the whole batch's values and its own two offsets."""
    histories, contexts, config = batch
    offsets, history, context = _tensors(histories, contexts)
    together = fragment(offsets, history, context, config)
    for b in range(len(histories)):
        alone = fragment(offsets[b:b + 2], history, {f: v[b:b + 1] for f, v in context.items()}, config)
        for name, frag in together.items():
            rows = slice(frag.offsets[b], frag.offsets[b + 1])
            assert alone[name].index.tolist() == frag.index[rows].tolist(), (name, b)
            assert alone[name].lengths.tolist() == [frag.lengths[b]]
            if frag.tags is not None:
                assert alone[name].tags.tolist() == frag.tags[rows].tolist()


@settings(max_examples=200, deadline=None)
@given(batches())
def test_padded_rows_hold_each_request_s_fragment_in_order(batch):
    """What a model gathers (`Fragment.padded`): row b's unmasked slots are request b's fragment, oldest
    first; masked slots point at real events (a gather through them needs no bounds care)."""
    histories, contexts, config = batch
    offsets, history, context = _tensors(histories, contexts)
    for name, frag in fragment(offsets, history, context, config).items():
        pos, mask = frag.padded()
        assert pos.shape == mask.shape == (len(histories), int(frag.lengths.max()) if len(histories) > 1 else
                                            frag.index.numel())
        for b in range(len(histories)):
            assert frag.index[pos[b][mask[b]]].tolist() == frag.index[frag.offsets[b]:frag.offsets[b + 1]].tolist()
        assert mask.sum(1).tolist() == frag.lengths.tolist()
        assert pos.numel() == 0 or 0 <= int(pos.min()) <= int(pos.max()) < max(frag.index.numel(), 1)



@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(0, 8))
def test_fixed_width_slots_hold_what_fragment_keeps(batch, spare):
    """The compiled scoring graph's cut (`fragment_slots`: one request, widths fixed by the caps): the real
    slots hold the rules' fragment, oldest first, with its tags; padding slots point at event 0."""
    histories, contexts, config = batch
    for events, ctx in zip(histories, contexts):
        if not events:  # the graph is given at least one event (a placeholder at the request time)
            continue
        _, history, context = _tensors([events], [ctx])
        max_len = len(events) + spare
        expected, tags = _reference(events, ctx, config)
        for name, slots in fragment_slots(history, context, max_len, config).items():
            assert slots.index.shape == slots.mask.shape == (1, min(config.cap(name), max_len))
            assert slots.index[slots.mask].tolist() == expected[name], name
            assert not slots.index[~slots.mask].any()
            if name == "integrated":
                assert slots.tags[slots.mask].tolist() == tags

def test_empty_batch_and_empty_histories():
    offsets = torch.tensor([0, 0, 0])
    history = {f: torch.zeros(0, dtype=torch.int64) for f in ("ts", "place_geohash6", "aoi_id", "time_type")}
    context = {f: torch.zeros(2, dtype=torch.int64) for f in ("ts", "geohash6", "aoi_id", "time_type")}
    out = fragment(offsets, history, context)
    assert all(f.lengths.tolist() == [0, 0] and f.index.numel() == 0 for f in out.values())


def test_missing_fields_are_named():
    import pytest

    with pytest.raises(ValueError, match="place_geohash6"):
        fragment(torch.tensor([0]), {"ts": torch.zeros(0)}, {})


def test_history_batch_takes_the_last_events_before_the_pointer():
    # two users' timelines, flat: user 0 has events 10..14, user 1 has 20..22
    values = {"ts": np.array([10, 11, 12, 13, 14, 20, 21, 22])}
    starts = np.array([0, 5, 8])
    rows, history_len = np.array([0, 1, 0, 0]), np.array([4, 2, 0, 5])
    own = history_batch(values, starts, rows, history_len, max_len=3, share=False)
    assert own.offsets.tolist() == [0, 3, 5, 5, 8]
    assert own.values["ts"].tolist() == [11, 12, 13, 20, 21, 12, 13, 14]
    # shared: user 0's overlapping windows read one slice (events 11..14, once); its empty window reads nothing
    shared = history_batch(values, starts, rows, history_len, max_len=3)
    assert shared.offsets.tolist() == [0, 0, 4, 6]
    assert shared.values["ts"].tolist() == [11, 12, 13, 14, 20, 21]
    assert shared.start.tolist() == [0, 4, 0, 1]  # requests 0 and 3 start in user 0 slice, request 1 in user 1
    # windows far apart in one timeline get a slice each: nothing between them is read
    apart = history_batch({"ts": np.arange(100)}, np.array([0, 100]), np.zeros(3, np.int64),
                          np.array([10, 12, 90]), max_len=5)
    assert apart.offsets.tolist() == [0, 7, 12] and apart.values["ts"].tolist() == [5, 6, 7, 8, 9, 10, 11,
                                                                                    85, 86, 87, 88, 89]
    for h in (own, shared):
        windows = [h.values["ts"][s:e].tolist() for s, e in zip(h.start.tolist(), h.end.tolist())]
        assert windows == [[11, 12, 13], [20, 21], [], [12, 13, 14]]


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 50)), max_size=60),
       requests=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 55)), min_size=1, max_size=20))
def test_history_lengths_count_strictly_earlier_events(events, requests):
    import polars as pl

    from features.sequences import history_lengths

    ev = pl.DataFrame(sorted(events), schema=["user_id", "ts"], orient="row")
    users = np.array([u for u, _ in requests], dtype=np.int64)
    ts = np.array([t for _, t in requests], dtype=np.int64)
    got = history_lengths(users, ts, ev)
    assert got.tolist() == [sum(1 for eu, et in events if eu == u and et < t) for u, t in requests]
