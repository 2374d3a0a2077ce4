"""Auctions and revenue replay, checked where the answer is known: hand-made auctions, and simulated logs
whose true click probabilities give the exact expected revenue of any ranking."""

import numpy as np
import polars as pl
import pytest

from features.simulator import load_sim_config, simulate
from fin.auction import AuctionConfig, auction
from fin.revenue import LoggedCandidates, ReplayConfig, evaluate_policy, logged_candidates, logging_slate


def test_gsp_first_price_and_reserve():
    request = np.array([0, 0, 0, 1, 1, 0])
    quality = np.array([0.1, 0.2, 0.05, 0.3, 0.1, 0.1])
    bid = np.array([1.0, 1.0, 4.0, 1.0, 2.0, 0.5])
    slot, price = auction(request, quality, bid, AuctionConfig(slots=3))
    # request 0 by quality x bid: rows 1 (0.2, the earlier of a tie), 2 (0.2), 0 (0.1), 5 (0.05)
    assert slot.tolist() == [2, 0, 1, 0, 1, -1]
    # each pays the next ad's quality x bid over its own quality, at most its bid; the last pays the reserve
    np.testing.assert_allclose(price, [0.05 / 0.1, 0.2 / 0.2, 0.1 / 0.05, 0.2 / 0.3, 0.0, 0.0])
    slot, price = auction(request, quality, bid, AuctionConfig(slots=3, reserve=0.6))
    assert slot[5] == -1 and price[0] == 0.6 and price[4] == 0.6  # row 5 bids under the reserve
    slot, price = auction(request, quality, bid, AuctionConfig(rule="first_price", slots=2))
    assert slot.tolist() == [-1, 0, 1, 0, 1, -1] and price.tolist() == [0, 1, 4, 1, 2, 0]
    with pytest.raises(ValueError, match="auction rule"):
        AuctionConfig(rule="vickrey")


def test_a_zero_bid_prices_the_logging_slate_without_nan():
    """A bid of 0 (the contract allows it) gives its ad no quality, not NaN: the ad ranked above it pays the
    reserve, and every estimate of the logging policy stays finite (before, 0 / 0 made that price NaN, which
    turned the slot's SNIPS revenue into 0 and IPS and exact RPM into NaN)."""
    request, position = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    bid, score = np.array([1.0, 0.5, 1.0, 0.0]), np.array([0.2, 0.05, 0.2, 0.0])
    logged = LoggedCandidates(request, position, np.array([1.0, 0, 1, 0]), np.tile([[1.0, 0], [0, 1]], (2, 1)),
                              np.zeros(4, bool), oracle=np.full((4, 2), 0.5))
    slot, price = logging_slate(logged, score, bid, AuctionConfig(slots=2))
    assert price.tolist() == [0.25, 0.0, 0.0, 0.0]
    result = evaluate_policy(logged, slot, price, ReplayConfig(bootstrap=20), on_policy=True)
    assert result["snips"]["rpm"] == result["ips"]["rpm"] == 125.0 and np.isfinite(result["exact"]["rpm"])


def test_snips_counts_a_slot_a_slate_leaves_empty():
    """On-policy, every outcome is seen with weight 1: SNIPS is the logged revenue per request, as IPS and the
    exact value are, also where one request's slate is shorter than the slots (before, the empty slot was left
    out of its normaliser: 2,000 for a true 1,500 RPM)."""
    request, position, label = np.array([0, 0, 1]), np.array([0, 1, 0]), np.ones(3)
    logged = LoggedCandidates(request, position, label, np.array([[1.0, 0], [0, 1], [1, 0]]), np.ones(3, bool),
                              oracle=np.ones((3, 2)))
    result = evaluate_policy(logged, position.copy(), np.ones(3), ReplayConfig(bootstrap=20), on_policy=True)
    assert result["snips"]["rpm"] == result["ips"]["rpm"] == result["exact"]["rpm"] == 1500.0


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> pl.DataFrame:
    out = tmp_path_factory.mktemp("replay") / "logs"
    simulate(load_sim_config(days=21, **{"users.users": 300}), out)
    return pl.read_parquet(out / "ad_candidates" / "**" / "*.parquet")


def _policies(frame: pl.DataFrame, config: AuctionConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    logged = logged_candidates(frame)
    bid = frame["bid"].cast(pl.Float64).to_numpy()
    relevance = logged.oracle[:, 0]  # true click probability at the top slot
    noisy = relevance * np.exp(np.random.default_rng(1).normal(0, 0.7, relevance.size))  # a model's pCTR
    return {"oracle": auction(logged.request, relevance, bid, config),
            "model": auction(logged.request, noisy, bid, config),
            "logging": logging_slate(logged, frame["logging_score"].cast(pl.Float64).to_numpy(), bid, config)}


def test_snips_intervals_cover_the_exact_rpm(candidates):
    """On 10 disjoint sets of requests, each policy's SNIPS interval of RPM holds the exact expected RPM
    of the same policy on the same requests in most of them (95% intervals: about 9.5 of 10)."""
    config = AuctionConfig(slots=5)  # the simulator's
    chunks = candidates.with_columns((pl.col("request_id").hash(7) % 10).alias("chunk")).partition_by("chunk")
    covered: dict[str, int] = {}
    for chunk in chunks:
        logged = logged_candidates(chunk)
        for name, (slot, price) in _policies(chunk, config).items():
            result = evaluate_policy(logged, slot, price, ReplayConfig(bootstrap=300), on_policy=name == "logging")
            lo, hi = result["snips"]["rpm_interval"]
            covered[name] = covered.get(name, 0) + (lo <= result["exact"]["rpm"] <= hi)
    assert all(n >= 7 for n in covered.values()), covered


def test_estimators_hold_the_exact_value_and_rank_policies(candidates):
    config = AuctionConfig(slots=5)  # the simulator's
    logged = logged_candidates(candidates)
    results = {name: evaluate_policy(logged, slot, price, ReplayConfig(bootstrap=200), on_policy=name == "logging")
               for name, (slot, price) in _policies(candidates, config).items()}
    for name, r in results.items():
        for estimator in ("ips", "snips", "replay"):
            lo, hi = r[estimator]["rpm_interval"]
            assert lo <= r["exact"]["rpm"] <= hi, (name, estimator, r)
            lo, hi = r[estimator]["ctr_interval"]
            assert lo <= r["exact"]["ctr"] <= hi, (name, estimator, r)
    assert results["logging"]["effective_sample_size"] == results["logging"]["matched_impressions"]  # weights 1
    assert 0 < results["model"]["effective_sample_size"] < results["model"]["matched_impressions"]
    # the true ranking earns more than a noisy estimate of it, which earns more than the logging policy
    exact = {name: r["exact"]["rpm"] for name, r in results.items()}
    assert exact["oracle"] > exact["model"] > exact["logging"]
    assert results["oracle"]["snips"]["rpm"] > results["logging"]["snips"]["rpm"]
