"""Platt scaling of the logits: the fit, its effect on level and ranking, and its trip through an artifact."""

import json

import numpy as np
import pytest
import torch

from fin.artifact import load_artifact, save_artifact
from fin.calibration import PlattScaling, fit_platt, from_meta, pctr
from fin.inputs import requests_batch
from fin.metrics import auc, calibration
from fin.models import MODELS
from fin.versions import ArtifactError
from serving.scoring import score_requests
from tests.test_batching import _requests
from tests.test_models import CONFIG, LOADER


def _logistic(scale: float, shift: float, n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model whose clicks follow sigmoid(scale * logit + shift): the fit should find both."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.0, 1.5, n).astype(np.float32)
    clicks = rng.random(n) < 1.0 / (1.0 + np.exp(-(scale * logits.astype(np.float64) + shift)))
    return logits, clicks.astype(np.float32)


@pytest.mark.parametrize("scale, shift", [(0.7, 0.4), (1.3, -0.5), (1.0, 0.0)])
def test_the_fit_recovers_the_logistic_model(scale, shift):
    logits, labels = _logistic(scale, shift)
    fit = fit_platt(logits, labels)
    # standard errors at n = 200,000 are about 0.005 for both: 0.03 is six of them
    assert fit.scaling.scale == pytest.approx(scale, abs=0.03)
    assert fit.scaling.shift == pytest.approx(shift, abs=0.03)
    assert fit_platt(logits, labels) == fit  # deterministic


def test_calibrated_predictions_match_the_clicks_they_were_fit_on():
    """A model that under-predicts (its clicks come from logit + 0.6) is at level 1 after the fit, and its
    logloss falls; the fit's own before/after figures are the metrics of `pctr`."""
    logits, labels = _logistic(1.0, 0.6)
    fit = fit_platt(logits, labels)
    before = pctr(torch.from_numpy(logits), None).numpy()
    after = pctr(torch.from_numpy(logits), fit.scaling).numpy()
    assert calibration(labels, before) < 0.8
    assert calibration(labels, after) == pytest.approx(1.0, abs=1e-6)  # the shift's score equation
    assert fit.calibration_after == pytest.approx(calibration(labels, after), rel=1e-12)
    assert fit.calibration_before == pytest.approx(calibration(labels, before), rel=1e-6)
    assert fit.logloss_after < fit.logloss_before
    assert (fit.examples, fit.clicks) == (labels.size, int(labels.sum()))


def test_the_ranking_is_unchanged():
    """Equal logits stay equal and distinct ones keep their order, so AUC is the logits' AUC exactly."""
    logits, labels = _logistic(0.5, 1.0, n=50_000)
    logits[::7] = logits[3]  # ties among the logits
    scaling = fit_platt(logits, labels).scaling
    assert scaling.scale != pytest.approx(1.0, abs=0.1)  # a real change of slope, not a shift only
    calibrated = pctr(torch.from_numpy(logits), scaling).numpy()
    order = np.argsort(logits, kind="stable")
    assert np.array_equal(order, np.argsort(calibrated, kind="stable"))
    assert np.array_equal(np.diff(logits[order]) == 0, np.diff(calibrated[order]) == 0)
    assert auc(labels, calibrated) == auc(labels, logits)


def test_a_backward_model_is_shifted_not_reversed_and_one_class_is_not_fitted():
    logits, labels = _logistic(-1.0, 0.3)  # the logits rank the clicks backwards
    fit = fit_platt(logits, labels)
    assert fit.scaling.scale == 1.0 and fit.calibration_after == pytest.approx(1.0, abs=1e-6)
    assert fit_platt(logits, np.zeros_like(labels)) is None
    assert fit_platt(logits, np.ones_like(labels)) is None
    with pytest.raises(ValueError, match="scale > 0"):
        PlattScaling(scale=0.0, shift=1.0)


@pytest.fixture(scope="module")
def model_and_weights():
    torch.manual_seed(0)
    model = MODELS["fin"](CONFIG).eval()
    return model, model.state_dict()


def _save(tmp_path, weights, calibration_entry):
    return save_artifact(tmp_path, "fin", "fin", weights, CONFIG, LOADER, {}, {}, calibration=calibration_entry)


def test_the_artifact_keeps_the_calibration_and_the_server_applies_it(tmp_path, model_and_weights):
    model, weights = model_and_weights
    logits, labels = _logistic(0.8, 0.5, n=20_000)
    fit = fit_platt(logits, labels)
    folder = _save(tmp_path, weights, fit.to_meta("validation"))
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["calibration"]["method"] == "platt"
    assert meta["calibration"]["validation"]["calibration_after"] == pytest.approx(1.0, abs=1e-6)
    artifact = load_artifact(folder)
    assert artifact.calibration == fit.scaling  # the floats round-trip through JSON exactly

    requests = _requests(3, candidates=5)
    with torch.inference_mode():
        raw = model(requests_batch(requests, LOADER)).double()
    expected = torch.sigmoid(fit.scaling.scale * raw + fit.scaling.shift).numpy()
    served = np.concatenate(score_requests(artifact, requests))
    np.testing.assert_allclose(served, expected, rtol=1e-6)
    assert not np.allclose(served, torch.sigmoid(raw).numpy(), rtol=1e-3)  # calibration changed the numbers


def test_an_artifact_without_calibration_scores_as_before(tmp_path, model_and_weights):
    """Artifacts written before calibration existed load and score with the float32 sigmoid, bit for bit."""
    model, weights = model_and_weights
    artifact = load_artifact(_save(tmp_path, weights, None))
    assert "calibration" not in artifact.meta and artifact.calibration is None
    requests = _requests(3, candidates=5)
    with torch.inference_mode():
        before = torch.sigmoid(model(requests_batch(requests, LOADER))).numpy().astype(np.float64)
    assert np.array_equal(np.concatenate(score_requests(artifact, requests)), before)


def test_an_unknown_calibration_is_refused(tmp_path, model_and_weights):
    """A calibration this code cannot apply must not be served as if there were none."""
    _, weights = model_and_weights
    folder = _save(tmp_path, weights, {"method": "isotonic", "parameters": {"x": [0.0], "y": [0.1]}})
    with pytest.raises(ArtifactError, match="unknown calibration"):
        load_artifact(folder)
    with pytest.raises(ValueError, match="parameters missing"):
        from_meta({"method": "platt", "parameters": {"scale": 1.0}})
