"""The training loader over the features job's output."""

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.dataset import ROW_IDS
from features.fragments import FragmentConfig, fragment_windows
from fin.inputs import STAT_FEATURES, LoaderConfig
from fin.loader import ExampleStream, user_chunk_order


def _examples(out, split):
    return pl.read_parquet(out / "data" / "examples" / split / "*.parquet")


def test_an_epoch_yields_every_example_once(features_job):
    out, stats = features_job
    stream = ExampleStream(out / "data", "train", LoaderConfig(batch_size=256, max_seq_len=50))
    seen = torch.cat([b.row_id for b in stream])
    assert len(stream) == stats["examples"]["train"] == seen.numel() == seen.unique().numel()
    again = torch.cat([b.row_id for b in stream])
    assert not torch.equal(seen, again)  # reshuffled each epoch
    assert torch.equal(seen.sort().values, again.sort().values)


@pytest.mark.parametrize("dataset", ["examples", "candidates"])
def test_histories_are_the_timeline_before_the_request(features_job, dataset):
    out, _ = features_job
    max_len = 20
    cfg = LoaderConfig(batch_size=64, max_seq_len=max_len, shuffle=False)
    batch = next(iter(ExampleStream(out / "data", "test", cfg, dataset=dataset)))
    timelines = pl.read_parquet(out / "data" / "timelines" / "*.parquet")
    rows = pl.read_parquet(out / "data" / dataset / "test" / "*.parquet")
    request = batch.candidate_requests()  # examples of one request share its history
    for i in range(len(batch)):
        ex = rows.filter(pl.col(ROW_IDS[dataset]) == int(batch.row_id[i])).row(0, named=True)
        full = timelines.filter(pl.col("user_id") == ex["user_id"])["ts"]
        full = full.item().to_list() if len(full) else []
        expected = [t for t in full if t < ex["ts"]][-max_len:]
        r = int(request[i])
        assert int(batch.ts[r]) == ex["ts"]
        assert batch.history["ts"][batch.histories.start[r]:batch.histories.end[r]].tolist() == expected
        assert batch.label[i].item() == (ex["label"] or 0)


def test_examples_of_one_request_share_its_history_when_unshuffled(features_job):
    """Unshuffled logged candidates (about 30 a request) and training batches of user chunks hold each
    request's history once; the per-example path keeps one history per example."""
    out, _ = features_job
    grouped = next(iter(ExampleStream(out / "data", "test", LoaderConfig(batch_size=256, shuffle=False),
                                      dataset="candidates")))
    assert grouped.request_of is not None and 2 * grouped.ts.numel() <= len(grouped)
    assert grouped.histories.start.numel() == grouped.ts.numel()
    assert torch.equal(grouped.request_of.unique(), torch.arange(grouped.ts.numel()))
    chunks = next(iter(ExampleStream(out / "data", "train", LoaderConfig(batch_size=256))))
    assert chunks.request_of is not None and chunks.ts.numel() < len(chunks)  # a user's impressions of a page
    shuffled = next(iter(ExampleStream(out / "data", "train", LoaderConfig(batch_size=256, shared_timelines=False))))
    assert shuffled.request_of is None and shuffled.ts.numel() == len(shuffled)


def test_fragments_come_from_the_shared_function(features_job):
    out, _ = features_job
    cfg = LoaderConfig(batch_size=128, max_seq_len=50, fragments=FragmentConfig(location_len=7, meal_len=5))
    batch = next(iter(ExampleStream(out / "data", "validation", cfg)))
    first = torch.zeros(batch.ts.numel(), dtype=torch.int64).index_reduce_(
        0, batch.candidate_requests(), torch.arange(len(batch)), "amin", include_self=False)  # a request's example
    context = {"ts": batch.ts, **{c: batch.ids[c][first] for c in ("geohash6", "aoi_id", "time_type")}}
    direct = fragment_windows(batch.histories.start, batch.histories.end, batch.history, context, cfg.fragments)
    for name, frag in batch.fragments.items():
        assert torch.equal(frag.index, direct[name].index) and torch.equal(frag.lengths, direct[name].lengths)
    assert int(batch.fragments["location"].lengths.max()) <= 7 and int(batch.fragments["meal"].lengths.max()) <= 5
    assert (batch.ids["geohash6"] > 0).all()


def test_statistics_are_joined_point_in_time(features_job):
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "test", LoaderConfig(batch_size=64, shuffle=False))))
    item_stats = pl.read_parquet(out / "data" / "feast_sources" / "item_stats.parquet")
    ex = _examples(out, "test").filter(pl.col("impression_id") == int(batch.row_id[0])).row(0, named=True)
    row = item_stats.filter((pl.col("item_id") == ex["item_id"]) & (pl.col("day") == ex["day"])).row(0, named=True)
    col = STAT_FEATURES.index("item_impressions_7d")
    assert batch.stats[0, col].item() == row["impressions_7d"]
    assert np.isfinite(batch.stats.numpy()).all()


def test_training_examples_of_ads_first_shown_days_before_are_marked_new(features_job):
    out, _ = features_job
    cfg = LoaderConfig(batch_size=256, max_seq_len=50, new_ad_days=2)
    batches = list(ExampleStream(out / "data", "train", cfg))
    marked = dict(zip(torch.cat([b.row_id for b in batches]).tolist(), torch.cat([b.new_ad for b in batches]).tolist()))
    train = _examples(out, "train")
    first = train.group_by("item_id").agg(pl.col("day").min().alias("first"))
    new = (pl.col("first") >= train["day"].min() + 2) & (pl.col("day") - pl.col("first") < 2)
    expected = train.join(first, on="item_id").select("impression_id", new.alias("new"))
    assert marked == dict(zip(expected["impression_id"].to_list(), expected["new"].to_list()))
    assert 0 < sum(marked.values()) < len(marked)
    assert next(iter(ExampleStream(out / "data", "validation", cfg))).new_ad is None  # scored as served
    assert next(iter(ExampleStream(out / "data", "train", LoaderConfig(batch_size=256, new_ad_days=0)))).new_ad is None


def test_shared_timeline_batches_give_each_example_its_own_history_and_fragments(features_job):
    """A training batch of users' chunks holds each user's events once, and every example reads exactly the
    history and fragments the per-example path gives it."""
    out, _ = features_job
    cfg = LoaderConfig(batch_size=128, max_seq_len=30, examples_per_user=8,
                       fragments=FragmentConfig(full_len=30, recent_len=10, location_len=12, meal_len=9,
                                                integrated_len=15))
    shared = next(iter(ExampleStream(out / "data", "train", cfg)))
    users = _examples(out, "train").select("impression_id", "user_id")
    of_batch = pl.DataFrame({"impression_id": shared.row_id.numpy()}).join(users, on="impression_id",
                                                                          maintain_order="left")["user_id"]
    # a slice per user, or per run of its chunks whose windows overlap (two far apart in time get one each)
    assert of_batch.n_unique() <= shared.histories.offsets.numel() - 1 < len(shared) // 4
    assert shared.histories.offsets[-1] < (shared.histories.end - shared.histories.start).sum()  # events once
    # the same examples, each with its own copy: rebuild them through the per-example path
    stream = ExampleStream(out / "data", "train", LoaderConfig(**{**cfg.__dict__, "shared_timelines": False}))
    own = {int(i): (b, k) for b in stream for k, i in enumerate(b.row_id.tolist()) if i in set(shared.row_id.tolist())}
    assert len(own) == len(shared)
    request = shared.candidate_requests()
    for k, row in enumerate(shared.row_id.tolist()):
        b, j = own[row]  # example k is request r of the shared batch, request j of its per-example batch
        r = int(request[k])
        s, e = int(shared.histories.start[r]), int(shared.histories.end[r])
        s2, e2 = int(b.histories.start[j]), int(b.histories.end[j])
        assert torch.equal(shared.history["ts"][s:e], b.history["ts"][s2:e2])
        for name, frag in shared.fragments.items():
            theirs = b.fragments[name]
            assert torch.equal(shared.history["ts"][frag.index[frag.offsets[r]:frag.offsets[r + 1]]],
                               b.history["ts"][theirs.index[theirs.offsets[j]:theirs.offsets[j + 1]]]), name
            if frag.tags is not None:
                assert torch.equal(frag.tags[frag.offsets[r]:frag.offsets[r + 1]],
                                   theirs.tags[theirs.offsets[j]:theirs.offsets[j + 1]])


@settings(max_examples=60, deadline=None)
@given(users=st.lists(st.integers(0, 6), min_size=0, max_size=80), k=st.integers(1, 9), seed=st.integers(0, 99))
def test_user_chunks_are_contiguous_in_time_order_and_cover_every_example_once(users, k, seed):
    user = np.array(users, dtype=np.int64)
    ts = np.random.default_rng(seed).integers(0, 20, user.size)  # with ties
    order = user_chunk_order(user, ts, k, np.random.default_rng(seed))
    assert sorted(order.tolist()) == list(range(user.size))
    where = np.empty(user.size, dtype=np.int64)
    where[order] = np.arange(user.size)
    for u in np.unique(user):
        mine = np.flatnonzero(user == u)
        mine = mine[np.lexsort((mine, ts[mine]))]  # the user's examples in time order
        for chunk in np.array_split(mine, range(k, mine.size, k)):
            assert np.array_equal(where[chunk], where[chunk[0]] + np.arange(chunk.size))


def test_an_epoch_of_user_chunks_yields_every_example_once(features_job):
    out, stats = features_job
    seen = torch.cat([b.row_id for b in ExampleStream(out / "data", "train", LoaderConfig(batch_size=64,
                                                                                          examples_per_user=4))])
    assert seen.numel() == seen.unique().numel() == stats["examples"]["train"]


def test_fragments_cut_where_the_model_runs_equal_the_loaders(features_job):
    out, _ = features_job
    cfg = LoaderConfig(batch_size=64, max_seq_len=40)
    cut_here = next(iter(ExampleStream(out / "data", "train", cfg)))
    uncut = next(iter(ExampleStream(out / "data", "train", cfg, cut=False)))
    assert uncut.fragments is None
    later = uncut.cut(cfg.fragments)
    for name, frag in cut_here.fragments.items():
        assert torch.equal(frag.index, later.fragments[name].index)
        assert torch.equal(frag.lengths, later.fragments[name].lengths)


def test_loader_workers_yield_the_same_batches_as_the_training_process(features_job):
    """Worker processes read whole partitions ahead of the step: the same batches, in turns."""
    out, _ = features_job
    cfg = LoaderConfig(batch_size=64, max_seq_len=20)
    alone = [tuple(b.row_id.tolist()) for b in ExampleStream(out / "data", "train", cfg)]
    two = ExampleStream(out / "data", "train", LoaderConfig(**{**cfg.__dict__, "workers": 2}))
    together = list(two)
    assert sorted(tuple(b.row_id.tolist()) for b in together) == sorted(alone)
    assert [tuple(b.row_id.tolist()) for b in two] != [tuple(b.row_id.tolist()) for b in together]  # next epoch
    first = together[0]
    assert first.fragments is not None and first.global_size == len(first)
