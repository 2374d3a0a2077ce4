"""Post-hoc calibration of a model's logits: Platt scaling, pCTR = sigmoid(scale * logit + shift).

Why. The auction charges and ranks by pCTR x bid, so a model that predicts the right order but the wrong
level misprices every ad. The models under-predict on the test days because the click rate drifts up
over time; the days just before the test days (the validation split) are the nearest labelled data, so the
calibration is fitted there, at the end of `fin train` on the best epoch's validation logits.

Why Platt scaling. Two parameters fitted by minimising logloss: the fit is convex (a few Newton steps,
deterministic, no tuning), it cannot overfit the validation days, and with scale > 0 it is strictly
increasing, so every ranking by pCTR (AUC, GAUC, the order of a request's candidates by pCTR) is
unchanged while the level is corrected. Isotonic regression can bend the curve further, but it is a step
function: it ties scores that the model told apart (AUC and the order within a request change) and it
would put a table of breakpoints into every artifact and into the server's hot path. Measured on the
default simulator (FIN and DIN, 200 steps, fitted on the validation days): isotonic reached the same test
calibration as Platt (1.005 vs 1.004, 0.994 vs 0.993) and the same logloss, with AUC 0.0005-0.0007 lower
and about a hundred distinct pCTRs on the test days.

Where it is applied. `pctr` is the one function from logits to pCTR: the evaluator (`fin.evaluate`) and
the server (`serving.scoring`) both call it through `fin.artifact.Artifact.pctr`, so a served pCTR is the
offline one. An artifact without a calibration scores with the plain sigmoid, bit for bit as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fin.metrics import calibration, logloss

PLATT = "platt"


@dataclass(frozen=True)
class PlattScaling:
    """pCTR = sigmoid(scale * logit + shift); scale > 0 keeps every ranking."""

    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self):
        if not (np.isfinite(self.scale) and np.isfinite(self.shift) and self.scale > 0):
            raise ValueError(f"Platt scaling needs a finite scale > 0 and a finite shift, got {self}")


def pctr(logits: torch.Tensor, scaling: PlattScaling | None) -> torch.Tensor:
    """The model's click probability from its logits, calibrated when `scaling` is given.

    Uncalibrated: the sigmoid in the logits' dtype, as artifacts were always scored. Calibrated: in float64,
    where the affine map keeps distinct float32 logits distinct (and equal ones equal), so the ranking is
    exactly the logits' ranking."""
    if scaling is None:
        return torch.sigmoid(logits)
    return torch.sigmoid(logits.double() * scaling.scale + scaling.shift)


@dataclass(frozen=True)
class CalibrationFit:
    """A fitted calibration and what it did on the data it was fitted on."""

    scaling: PlattScaling
    examples: int
    clicks: int
    calibration_before: float  # sum of pCTR / clicks with the plain sigmoid
    calibration_after: float
    logloss_before: float
    logloss_after: float

    def to_meta(self, split: str) -> dict:
        """The artifact.json `calibration` entry."""
        return {"method": PLATT, "parameters": {"scale": self.scaling.scale, "shift": self.scaling.shift},
                split: {"examples": self.examples, "clicks": self.clicks,
                        "calibration_before": self.calibration_before, "calibration_after": self.calibration_after,
                        "logloss_before": self.logloss_before, "logloss_after": self.logloss_after}}


def from_meta(entry: dict | None) -> PlattScaling | None:
    """The scaling of an artifact.json `calibration` entry; None (uncalibrated) when there is none.

    An unknown method is an error, not "uncalibrated": serving a newer artifact's model without the
    calibration it was meant to have would misprice every ad silently."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("method") != PLATT:
        raise ValueError(f"unknown calibration {entry!r}: this code applies method {PLATT!r} only")
    try:
        return PlattScaling(scale=float(entry["parameters"]["scale"]), shift=float(entry["parameters"]["shift"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"calibration parameters missing: {entry!r} ({e})") from None


def _loss(logits: np.ndarray, labels: np.ndarray, scale: float, shift: float) -> float:
    z = scale * logits + shift
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # logloss of sigmoid(z), without overflow


def _newton(logits: np.ndarray, labels: np.ndarray, fit_scale: bool, steps: int = 50,
            tolerance: float = 1e-10) -> tuple[float, float]:
    """Minimise the mean logloss over (scale, shift), or over shift alone with scale 1, from the identity.

    Damped Newton: the loss is convex and smooth, so a step halved until the loss does not rise converges
    in a handful of steps from any start; every operation is a fixed-order reduction (deterministic)."""
    params = np.array([1.0, 0.0])
    loss = _loss(logits, labels, *params)
    for _ in range(steps):
        z = params[0] * logits + params[1]
        p = 1.0 / (1.0 + np.exp(-z))
        residual, weight = p - labels, p * (1.0 - p)
        if fit_scale:
            gradient = np.array([np.mean(residual * logits), np.mean(residual)])
            hessian = np.array([[np.mean(weight * logits * logits), np.mean(weight * logits)],
                                [np.mean(weight * logits), np.mean(weight)]])
            step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        else:
            step = np.array([0.0, np.mean(residual) / (np.mean(weight) + 1e-12)])
        size = 1.0
        while size > 1e-6:
            candidate = params - size * step
            candidate_loss = _loss(logits, labels, *candidate)
            if candidate_loss <= loss:
                break
            size /= 2
        else:
            break  # no descent left: at the minimum to float precision
        params, loss = candidate, candidate_loss
        if np.max(np.abs(size * step)) < tolerance:
            break
    return float(params[0]), float(params[1])


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> CalibrationFit | None:
    """Platt scaling of `logits` to `labels` by maximum likelihood; None when the labels have one class (a
    level cannot be fitted from them).

    A non-positive fitted scale (the logits rank the data backwards) would reverse the model's ranking;
    the fit then moves the level only (scale 1)."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=np.float64).ravel()
    if logits.shape != labels.shape:
        raise ValueError(f"{logits.size} logits but {labels.size} labels")
    clicks = int(labels.sum())
    if clicks == 0 or clicks == labels.size:
        return None
    scale, shift = _newton(logits, labels, fit_scale=True)
    if not scale > 0:
        scale, shift = _newton(logits, labels, fit_scale=False)
    scaling = PlattScaling(scale, shift)
    as_tensor = torch.from_numpy(logits)
    before = pctr(as_tensor, None).numpy()
    after = pctr(as_tensor, scaling).numpy()
    return CalibrationFit(scaling=scaling, examples=int(labels.size), clicks=clicks,
                          calibration_before=calibration(labels, before), calibration_after=calibration(labels, after),
                          logloss_before=logloss(labels, before), logloss_after=logloss(labels, after))
