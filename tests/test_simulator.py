"""The simulator's claims, measured on its output."""

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.simulator import load_sim_config, simulate
from features.validate import validate_logs
from fin import signal_report
from tests.conftest import ROOT


def _digest(root: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    cfg = dict(days=5, **{"users.users": 30})
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simulate(load_sim_config(**cfg), a)
    simulate(load_sim_config(**cfg), b)
    simulate(load_sim_config(seed=8, **cfg), c)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_parallel_workers_write_the_same_logs(tmp_path):
    cfg = dict(days=4, chunk_users=15, **{"users.users": 30})
    simulate(load_sim_config(**cfg), tmp_path / "one")
    simulate(load_sim_config(workers=2, **cfg), tmp_path / "two")
    # the data is identical; only the manifest's record of `workers` differs
    assert _digest(tmp_path / "one", "*.parquet") == _digest(tmp_path / "two", "*.parquet")
    assert len(list((tmp_path / "one" / "behaviours").rglob("part-00001.parquet"))) > 0  # chunked


def test_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        simulate(load_sim_config(days=1, **{"users.users": 5}), out)
    assert (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*partial"))


def test_unknown_config_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("users:\n  userz: 5\n")
    with pytest.raises(ValueError, match="users.userz"):
        load_sim_config(bad)


def test_default_logs_follow_the_contract(default_logs):
    report = validate_logs(default_logs)
    assert report.passed and all(t.quarantine.height == 0 for t in report.tables.values())


def test_labels_are_drawn_from_the_oracle_probability(default_logs):
    imp = signal_report.scan(default_logs, "impressions").select("label", "oracle_click_prob").collect()
    ctr, oracle = imp["label"].mean(), imp["oracle_click_prob"].mean()
    assert 0.02 < ctr < 0.2
    assert abs(ctr - oracle) < 4 * np.sqrt(oracle * (1 - oracle) / imp.height) + 1e-3
    # calibrated by decile of the oracle probability as well
    deciles = (imp.with_columns(q=(pl.col("oracle_click_prob").rank("ordinal") - 1) * 10 // imp.height)
               .group_by("q").agg(pl.col("label").mean(), pl.col("oracle_click_prob").mean(), pl.len()))
    for label, prob, n in deciles.select("label", "oracle_click_prob", "len").iter_rows():
        assert abs(label - prob) < 5 * np.sqrt(prob * (1 - prob) / n) + 2e-3


def test_logging_policy_propensities(default_logs):
    imp = signal_report.scan(default_logs, "impressions").collect()
    cfg = load_sim_config().ads
    assert imp["propensity"].min() >= cfg.logging_epsilon / cfg.candidates - 1e-6
    assert imp["propensity"].max() <= 1.0
    per_request = imp.group_by("request_id").agg(pl.len(), pl.col("position").n_unique().alias("positions"))
    assert (per_request["len"] == per_request["positions"]).all() and per_request["len"].max() <= cfg.slots


def test_click_rate_falls_with_distance(default_logs):
    ctr = signal_report.ctr_by_distance(default_logs)["ctr"].to_numpy()
    assert np.all(np.diff(ctr) < 0), ctr
    assert ctr[0] > 3 * ctr[-1]


def test_category_choice_differs_by_meal_slot(default_logs):
    shares = signal_report.category_share_by_slot(default_logs)
    top = shares.sort("share", descending=True).group_by("time_type", maintain_order=True).first()
    assert top["category_1_id"].n_unique() >= 4  # most slots have a different favourite category
    assert signal_report.slot_category_divergence(default_logs) > 0.3


def test_same_place_and_slot_history_beats_the_last_50(default_logs):
    aucs = signal_report.history_feature_auc(default_logs)
    assert aucs["same_place_slot_auc"] > aucs["last_50_auc"] + 0.05, aucs


def test_history_features_never_look_ahead(small_logs):
    f = signal_report.history_count_features(small_logs)
    beh = signal_report.scan(small_logs, "behaviours").collect()
    imp = signal_report.scan(small_logs, "impressions").collect()
    row = f.join(imp, on="impression_id").filter(pl.col("same_place_slot") > 0).row(0, named=True)
    earlier = beh.filter((pl.col("user_id") == row["user_id"]) & (pl.col("shop_id") == row["shop_id"])
                         & (pl.col("geohash_6") == row["geohash_6"]) & (pl.col("time_type") == row["time_type"])
                         & (pl.col("ts") < row["ts"]))
    assert earlier.height == row["same_place_slot"]


@pytest.mark.slow
def test_large_config_has_lifelong_users(tmp_path):
    """The large config's per-user activity (a year), on fewer users: a fifth pass 1,000 behaviours."""
    cfg = load_sim_config(ROOT / "configs" / "large.yaml", **{"users.users": 300, "workers": 1})
    simulate(cfg, tmp_path / "logs")
    per_user = signal_report.behaviours_per_user(tmp_path / "logs")
    assert per_user.size >= 0.95 * 300
    assert (per_user > 1000).mean() >= 0.20
