"""The simulator's claims, measured on its output."""

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import contract
from features.creatives import CREATIVE_SIZE, decode_pngs
from features.simulator import load_sim_config, simulate
from features.simulator.render import creative_columns, render_creatives
from features.simulator.world import build_world
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


def _world_of(logs: Path, tmp_path: Path):
    """The world a log folder was simulated from (its manifest holds the whole config)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads((logs / contract.MANIFEST_FILE).read_text())["config"]))
    return build_world(load_sim_config(config))


def _days(logs: Path, table: str) -> pl.DataFrame:
    """shop_id, item_id and the simulated day (0 = the first) of every row of a log table."""
    start = json.loads((logs / contract.MANIFEST_FILE).read_text())["window_start_ms"]
    return (signal_report.scan(logs, table).select("shop_id", "item_id", day=(pl.col("ts") - start) // 86_400_000)
            .collect())


def test_one_creative_per_item_a_png_of_the_world(small_logs, tmp_path):
    items = pl.read_parquet(small_logs / "items.parquet")
    creatives = pl.read_parquet(small_logs / f"{contract.CREATIVES.name}.parquet")
    assert creatives["item_id"].to_list() == items["item_id"].to_list()
    assert (creatives["width"] == CREATIVE_SIZE).all() and (creatives["height"] == CREATIVE_SIZE).all()
    pixels = decode_pngs(creatives["image_png"].to_list())
    assert pixels.shape == (items.height, CREATIVE_SIZE, CREATIVE_SIZE, 3)
    assert len(set(creatives["image_png"].to_list())) == items.height  # no two alike
    assert json.loads((small_logs / contract.MANIFEST_FILE).read_text())["rows"]["creatives"] == items.height


def test_creatives_are_deterministic_for_a_seed():
    """The same pictures for a seed, however many threads draw them; another seed, others."""
    config = {"shops.shops": 40}
    world = build_world(load_sim_config(**config))
    a = creative_columns(world)
    assert a["image_png"] == creative_columns(build_world(load_sim_config(**config)), threads=1)["image_png"]
    assert np.array_equal(decode_pngs(a["image_png"]), render_creatives(world))
    other = creative_columns(build_world(load_sim_config(seed=8, **config)))["image_png"]
    assert not set(a["image_png"]) & set(other)


def test_creatives_show_their_shops_appeal_which_clicks_follow(small_logs, tmp_path):
    """A creative's colourfulness follows its shop's hidden appeal, noisily (not a lookup); so does the true
    click probability of its ads."""
    world = _world_of(small_logs, tmp_path)
    creatives = pl.read_parquet(small_logs / "creatives.parquet").head(2000)
    pixels = decode_pngs(creatives["image_png"].to_list()).astype(np.float32)
    brightest, darkest = pixels.max(axis=-1), pixels.min(axis=-1)
    saturation = ((brightest - darkest) / np.maximum(brightest, 1)).mean(axis=(1, 2))
    r = np.corrcoef(saturation, world.shop_appeal[world.item_shop[creatives["item_id"].to_numpy() - 1]])[0, 1]
    assert 0.35 < r < 0.9, r
    imp = signal_report.scan(small_logs, "impressions").select("shop_id", "oracle_click_prob").collect()
    appeal = world.shop_appeal[imp["shop_id"].to_numpy() - 1]
    p = imp["oracle_click_prob"].to_numpy()
    assert p[appeal > 0].mean() > 2 * p[appeal < 0].mean()


def test_no_shop_is_seen_before_it_opens(small_logs, tmp_path):
    world = _world_of(small_logs, tmp_path)
    late = 0
    for table in (*contract.LOG_TABLES, *contract.EVALUATION_TABLES):
        rows = _days(small_logs, table)
        opens = world.shop_open_day[rows["shop_id"].to_numpy() - 1]
        assert (rows["day"].to_numpy() >= opens).all(), table
        late += int((opens > 0).sum())
    assert late > 0  # shops that opened during the week were seen


def test_places_whose_shops_have_not_opened_have_no_sessions(tmp_path):
    """Every shop opens on the last of three days: nothing happens before it, and nothing fails."""
    config = load_sim_config(days=3, **{"users.users": 20, "shops.new_share": 1.0, "shops.new_recent_share": 1.0,
                                        "shops.new_recent_days": 1})
    manifest = simulate(config, tmp_path / "logs")
    assert manifest["rows"]["impressions"] > 0
    for table in (*contract.LOG_TABLES, *contract.EVALUATION_TABLES):
        assert set(_days(tmp_path / "logs", table)["day"]) == {2}, table


def test_the_test_week_shows_new_ads(tmp_path):
    """With the default shop openings (on fewer users and days than the default city), at least 10% of the
    ads shown in the last 7 days were never shown before, and shops opened during the earlier days too."""
    config = load_sim_config(days=28, **{"users.users": 400})
    simulate(config, tmp_path / "logs")
    shown = _days(tmp_path / "logs", "impressions")
    test = shown["day"] >= config.days - 7
    before = set(shown.filter(~test)["item_id"])
    week = set(shown.filter(test)["item_id"])
    assert len(week - before) >= 0.10 * len(week), (len(week - before), len(week))
    world = build_world(config)
    opened_earlier = (world.shop_open_day > 0) & (world.shop_open_day < config.days - 7)
    shops_before = shown.filter(~test)["shop_id"].unique().to_numpy() - 1
    assert opened_earlier[shops_before].sum() >= 20
