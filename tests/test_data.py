"""The training loader over the features job's output."""

import numpy as np
import polars as pl
import pytest
import torch

from features.dataset import ROW_IDS
from features.fragments import FragmentConfig, fragment
from fin.inputs import STAT_FEATURES, LoaderConfig
from fin.loader import ExampleStream


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
        assert batch.history["ts"][batch.history_offsets[r]:batch.history_offsets[r + 1]].tolist() == expected
        assert batch.label[i].item() == (ex["label"] or 0)


def test_examples_of_one_request_share_its_history_when_unshuffled(features_job):
    """Unshuffled logged candidates (about 30 a request) hold each request's history once; shuffled training
    batches keep one history per example."""
    out, _ = features_job
    grouped = next(iter(ExampleStream(out / "data", "test", LoaderConfig(batch_size=256, shuffle=False),
                                      dataset="candidates")))
    assert grouped.request_of is not None and 2 * grouped.ts.numel() <= len(grouped)
    assert grouped.history_offsets.numel() == grouped.ts.numel() + 1
    assert torch.equal(grouped.request_of.unique(), torch.arange(grouped.ts.numel()))
    shuffled = next(iter(ExampleStream(out / "data", "train", LoaderConfig(batch_size=256))))
    assert shuffled.request_of is None and shuffled.ts.numel() == len(shuffled)


def test_fragments_come_from_the_shared_function(features_job):
    out, _ = features_job
    cfg = LoaderConfig(batch_size=128, max_seq_len=50, fragments=FragmentConfig(location_len=7, meal_len=5))
    batch = next(iter(ExampleStream(out / "data", "validation", cfg)))
    context = {"ts": batch.ts, "geohash6": batch.ids["geohash6"], "aoi_id": batch.ids["aoi_id"],
               "time_type": batch.ids["time_type"]}
    direct = fragment(batch.history_offsets, batch.history, context, cfg.fragments)
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
