"""Offline revenue replay: a ranking policy's RPM and CTR estimated from the logged ad requests.

Input: the `ad_candidates` log (every candidate of every request, with the logging policy's probability
of showing it at each slot, the slot it was shown in and the click) and, for the policy to evaluate, the
slot it would give each candidate and the price per click it would charge (`fin.auction`).

The estimators rest on the logged click model being per slot: whether an ad shown at slot k is clicked
depends on the ad and k, not on the other ads shown. For slot k of request r, the policy's ad a gets a
logged outcome only when the logging policy also showed a at k; weighting that outcome by
1 / P_log(a at k) gives an unbiased estimate of the policy's revenue at that slot:
- IPS: the mean over requests of sum_k w_rk x revenue_rk, w_rk = [logged a at k] / P_log(a at k);
- SNIPS: per slot, sum_r w_rk revenue_rk / sum_r w_rk (self-normalised: less variance, a small bias),
  summed over slots;
- replay (matching): per slot, the mean logged revenue over the explored requests (ranked uniformly at
  random by the logging policy) in which the policy's ad sat at that slot; unbiased only for explored
  traffic, which is all it uses.
Each comes with a bootstrap interval over requests and the effective sample size (sum w)^2 / sum w^2.
With the simulator's true click probabilities (`oracle_slot_click_probs`) the exact expected value of
the same policy on the same requests is computed too, the yardstick of the estimators.

RPM = 1000 x revenue / ad requests (revenue per thousand served pages of up to `slots` ads); CTR =
clicks / ads shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from features.contract import CANDIDATE_ORACLE_COLUMNS
from fin.auction import AuctionConfig, prices, ranks

ESTIMATORS = ("replay", "ips", "snips")


@dataclass(frozen=True)
class ReplayConfig:
    bootstrap: int = 200  # resamples of the requests
    level: float = 0.95  # two-sided interval
    seed: int = 0


@dataclass
class LoggedCandidates:
    """The ad_candidates log as flat arrays (one entry per candidate), requests numbered 0..R-1."""

    request: np.ndarray  # int [N]
    position: np.ndarray  # int [N], the slot the logging policy showed it in, -1 when not shown
    label: np.ndarray  # float [N], the click (0 when not shown)
    propensity: np.ndarray  # float [N, slots], P(the logging policy shows it at slot k)
    explored: np.ndarray  # bool [N], its request was ranked uniformly at random
    oracle: np.ndarray | None = None  # float [N, slots], true P(click) when shown at slot k (simulator)

    @property
    def requests(self) -> int:
        return int(self.request.max()) + 1 if self.request.size else 0

    @property
    def slots(self) -> int:
        return self.propensity.shape[1]


def _interval(samples: np.ndarray, config: ReplayConfig, scale: float = 1.0) -> list[float]:
    """The two-sided `config.level` percentile interval of bootstrap samples (NaN samples ignored)."""
    tail = (1 - config.level) / 2 * 100
    return [scale * float(np.nanpercentile(samples, q)) for q in (tail, 100 - tail)]


def _per_request_slot(logged: LoggedCandidates, slot: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum of `values` [N] over the candidates at each (request, slot) -> [R, slots] (slot -1 dropped)."""
    out = np.zeros((logged.requests, logged.slots))
    shown = slot >= 0
    np.add.at(out, (logged.request[shown], slot[shown]), values[shown])
    return out


def evaluate_policy(logged: LoggedCandidates, slot: np.ndarray, price: np.ndarray,
                    config: ReplayConfig = ReplayConfig(), on_policy: bool = False) -> dict:
    """RPM and CTR of the policy that shows candidate i at `slot[i]` (-1: not shown) for `price[i]` per
    click: each estimator with its bootstrap interval, the effective sample size, and (with the oracle)
    the exact expected value. `on_policy`: the slots are the logging policy's own (`logging_slate`), every
    outcome is observed and weighs 1 (its slots are one draw of a random policy, not a fixed ranking)."""
    return evaluate_policies(logged, {"policy": (slot, price, on_policy)}, config)["policy"]


def evaluate_policies(logged: LoggedCandidates, policies: dict[str, tuple[np.ndarray, np.ndarray, bool]],
                      config: ReplayConfig = ReplayConfig(), baselines: tuple[str, ...] = ()) -> dict:
    """`evaluate_policy` of each (slot, price, on_policy), all on the same bootstrap resamples of the
    requests, so that each policy's SNIPS RPM and CTR lift over each of `baselines` comes with a paired
    interval (`lift_over[baseline]`)."""
    r = logged.requests
    rng = np.random.default_rng(config.seed)
    resamples = rng.multinomial(r, np.full(r, 1.0 / r), size=config.bootstrap).astype(float)  # [B, R]
    results, samples = {}, {}
    for name, (slot, price, on_policy) in policies.items():
        results[name], samples[name] = _evaluate(logged, slot, price, on_policy, resamples, config)
    for baseline in baselines:
        base = samples[baseline]
        for name in policies:
            if name == baseline:
                continue
            lift = {}
            for i, metric in enumerate(("rpm", "ctr")):
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = samples[name][i] / base[i] - 1
                reference = results[baseline]["snips"][metric]
                point = results[name]["snips"][metric] / reference - 1 if reference else math.nan  # a lift over nothing
                lift[metric] = point
                lift[f"{metric}_interval"] = _interval(ratios, config)
            results[name].setdefault("lift_over", {})[baseline] = lift
    return results


def _evaluate(logged: LoggedCandidates, slot: np.ndarray, price: np.ndarray, on_policy: bool,
              resamples: np.ndarray, config: ReplayConfig) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """One policy: the summary, and its SNIPS revenue and CTR per bootstrap resample (for paired lifts)."""
    if slot.max(initial=-1) >= logged.slots:
        raise ValueError(f"the policy uses slot {slot.max()} but the log has {logged.slots} slots")
    r = logged.requests
    matched = (slot >= 0) & (logged.position == slot)
    p = logged.propensity[np.arange(slot.size), np.clip(slot, 0, None)]
    weight = np.where(matched, 1.0 if on_policy else 1.0 / p, 0.0)
    revenue, clicks = logged.label * price, logged.label
    replayed = matched & (logged.explored | on_policy)  # replay reads explored traffic (all of it on-policy)
    parts = {  # [R, slots] sums per request and slot
        "w": _per_request_slot(logged, slot, weight),
        # a slot the policy leaves empty earns nothing, with certainty: weight 1 in SNIPS's normaliser (without,
        # requests whose slates are shorter than the slots lifted the slot's mean: 2,000 for a true 1,500 RPM)
        "empty": (_per_request_slot(logged, slot, np.ones(slot.size)) == 0).astype(float),
        "w_revenue": _per_request_slot(logged, slot, weight * revenue),
        "w_clicks": _per_request_slot(logged, slot, weight * clicks),
        "m": _per_request_slot(logged, slot, replayed.astype(float)),
        "m_revenue": _per_request_slot(logged, slot, np.where(replayed, revenue, 0.0)),
        "m_clicks": _per_request_slot(logged, slot, np.where(replayed, clicks, 0.0)),
    }
    shown_per_request = float((slot >= 0).sum()) / max(r, 1)

    def estimates(counts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Revenue and clicks per request by each estimator, for request counts [K, R] -> [K] each."""
        s = {k: counts @ v for k, v in parts.items()}  # [K, slots]
        n = counts.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "ips": (s["w_revenue"].sum(1) / n, s["w_clicks"].sum(1) / n),
                "snips": (np.nan_to_num(s["w_revenue"] / (s["w"] + s["empty"])).sum(1),
                          np.nan_to_num(s["w_clicks"] / (s["w"] + s["empty"])).sum(1)),
                "replay": (np.nan_to_num(s["m_revenue"] / s["m"]).sum(1),
                           np.nan_to_num(s["m_clicks"] / s["m"]).sum(1)),
            }

    point = estimates(np.ones((1, r)))
    boot = estimates(resamples)
    per_shown = 1.0 / shown_per_request if shown_per_request else 0.0
    result: dict = {"requests": r, "ads_shown_per_request": round(shown_per_request, 4),
                    "effective_sample_size": round(float(weight.sum() ** 2 / max((weight ** 2).sum(), 1e-12)), 1),
                    "matched_impressions": int(matched.sum())}
    for name in ESTIMATORS:
        b_revenue, b_clicks = boot[name]
        result[name] = {
            "rpm": 1000 * float(point[name][0][0]),
            "rpm_interval": _interval(b_revenue, config, 1000),
            "ctr": float(point[name][1][0]) * per_shown,
            "ctr_interval": _interval(b_clicks, config, per_shown),
        }
    if logged.oracle is not None:
        shown = slot >= 0
        true_clicks = np.where(shown, logged.oracle[np.arange(slot.size), np.clip(slot, 0, None)], 0.0)
        result["exact"] = {"rpm": 1000 * float((true_clicks * price).sum()) / max(r, 1),
                           "ctr": float(true_clicks.sum()) / max(float(shown.sum()), 1.0)}
    return result, (boot["snips"][0], boot["snips"][1] * per_shown)


def logged_candidates(frame: pl.DataFrame) -> LoggedCandidates:
    """Arrays of an ad_candidates table, requests numbered 0..R-1 in request id order."""
    frame = frame.with_columns(pl.col("request_id").rank("dense").cast(pl.Int64).alias("_request") - 1)
    oracle = CANDIDATE_ORACLE_COLUMNS[0]
    return LoggedCandidates(
        request=frame["_request"].to_numpy(),
        position=frame["position"].fill_null(-1).cast(pl.Int64).to_numpy(),
        label=frame["label"].fill_null(0).cast(pl.Float64).to_numpy(),
        propensity=np.stack(frame["slot_propensities"].to_numpy()).astype(np.float64),
        explored=frame["explored"].cast(pl.Boolean).to_numpy(),
        oracle=(np.stack(frame[oracle].to_numpy()).astype(np.float64)
                if oracle in frame.columns and frame[oracle].null_count() == 0 else None),
    )


def logging_slate(logged: LoggedCandidates, logging_score: np.ndarray, bid: np.ndarray,
                  config: AuctionConfig) -> tuple[np.ndarray, np.ndarray]:
    """The logging policy's own slots (what it showed) and its prices under `config`'s rule: its ranking
    is the logged order, then the unshown candidates by its score; its quality factor is score / bid."""
    shown = logged.position >= 0
    rest = ranks(logged.request, logging_score, ~shown)
    rank = np.where(shown, logged.position, logged.slots + rest)
    kept = shown & (logged.position < config.slots)  # with fewer slots than logged: its top ones
    # (a bid of 0, which the contract allows, has no quality: 0, so no price above it is NaN)
    quality = np.divide(logging_score, bid, out=np.zeros(bid.shape), where=bid > 0)
    return np.where(kept, logged.position, -1), prices(logged.request, rank, quality, bid, config)
