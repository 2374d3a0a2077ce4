"""Classification metrics on numpy arrays: AUC and GAUC (rank-based, tie-aware), logloss, calibration."""

from __future__ import annotations

import numpy as np
import polars as pl


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U). NaN when only one class is present, or a score is NaN (NaN
    has no rank: ranked anyway, a model scoring NaN on every click got 1.0)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError("labels and scores must have the same shape")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
        return float("nan")
    rank_sum = _average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group (user) AUC weighted by the group's impressions; groups with one class are skipped.
    NaN where a score is NaN (as `auc`)."""
    if np.isnan(np.asarray(scores, dtype=np.float64)).any():
        return float("nan")
    df = pl.DataFrame({"g": np.asarray(groups), "y": np.asarray(labels).astype(bool),
                       "s": np.asarray(scores, dtype=np.float64)})
    per_group = (df.with_columns(r=pl.col("s").rank("average").over("g"))
                 .group_by("g").agg(n=pl.len(), pos=pl.col("y").sum(), rank_pos=pl.col("r").filter(pl.col("y")).sum())
                 .with_columns(neg=pl.col("n") - pl.col("pos"))
                 .filter((pl.col("pos") > 0) & (pl.col("neg") > 0)))
    if per_group.height == 0:
        return float("nan")
    auc_g = (per_group["rank_pos"] - per_group["pos"] * (per_group["pos"] + 1) / 2) / (per_group["pos"] * per_group["neg"])
    return float((auc_g * per_group["n"]).sum() / per_group["n"].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Sum of predicted click probabilities over observed clicks (1.0 = calibrated)."""
    clicks = float(np.sum(labels))
    return float(np.sum(probs)) / clicks if clicks else float("nan")


def calibration_curve(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Equal-count bins of the predictions: each bin's mean prediction, observed click rate and size."""
    order = np.argsort(probs, kind="mergesort")
    groups = [g for g in np.array_split(order, min(bins, probs.size)) if g.size]
    return {"predicted": [float(probs[g].mean()) for g in groups],
            "observed": [float(labels[g].mean()) for g in groups],
            "count": [int(g.size) for g in groups]}
