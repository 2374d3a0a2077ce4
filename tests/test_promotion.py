"""The promotion gate: a version replaces the serving default only when it is not worse by more than the
tolerances in AUC and replayed RPM, decided on a real evaluation of both versions."""

import json
import shutil

import pytest

from fin.artifact import load_artifact, save_artifact
from fin.promotion import PromotionGate, decide
from fin.versions import Loaded, promoted
from tests.conftest import run_fin


def _report(auc: dict, rpm: dict | None) -> dict:
    report = {"models": {k: {"auc": v} for k, v in auc.items()}}
    if rpm is not None:
        report["revenue"] = {"policies": {k: {"snips": {"rpm": v}} for k, v in rpm.items()}}
    return report


def test_decisions():
    gate = PromotionGate(auc_tolerance=0.01, rpm_tolerance=0.05)
    assert decide(_report({"fin/2": 0.5}, None), "fin/2", None, gate).promote  # nothing to compare with
    assert decide(_report({"fin/1": 0.80, "fin/2": 0.795}, {"fin/1": 100, "fin/2": 96}), "fin/2", "fin/1", gate).promote
    worse_auc = decide(_report({"fin/1": 0.80, "fin/2": 0.78}, {"fin/1": 100, "fin/2": 120}), "fin/2", "fin/1", gate)
    assert not worse_auc.promote and "AUC" in worse_auc.reasons[0]
    worse_rpm = decide(_report({"fin/1": 0.80, "fin/2": 0.85}, {"fin/1": 100, "fin/2": 90}), "fin/2", "fin/1", gate)
    assert not worse_rpm.promote and "RPM" in worse_rpm.reasons[1]
    no_replay = decide(_report({"fin/1": 0.80, "fin/2": 0.80}, None), "fin/2", "fin/1", gate)
    assert no_replay.promote and "not checked" in no_replay.reasons[1]
    with pytest.raises(ValueError, match="evaluate both"):
        decide(_report({"fin/2": 0.8}, None), "fin/2", "fin/1", gate)


def test_an_undefined_metric_promotes_no_candidate():
    """A candidate whose AUC or RPM is undefined (NaN in memory, null in a report file) is not promoted; an
    incumbent's undefined metric is not compared (before, NaN compared as "within" and null raised)."""
    gate = PromotionGate()
    for undefined in (float("nan"), None):
        auc_gone = decide(_report({"fin/1": 0.80, "fin/2": undefined}, {"fin/1": 100, "fin/2": 100}), "fin/2", "fin/1", gate)
        assert not auc_gone.promote and "undefined" in auc_gone.reasons[0]
        rpm_gone = decide(_report({"fin/1": 0.80, "fin/2": 0.80}, {"fin/1": 100, "fin/2": undefined}), "fin/2", "fin/1",
                          gate)
        assert not rpm_gone.promote or undefined is None  # (a null RPM reads as no replay)
        old_gone = decide(_report({"fin/1": undefined, "fin/2": 0.80}, None), "fin/2", "fin/1", gate)
        assert old_gone.promote and "not compared" in old_gone.reasons[0]
        first = decide(_report({"fin/1": undefined}, None), "fin/1", None, gate)  # no default yet: still kept out
        assert not first.promote and "undefined" in first.reasons[0]
    with pytest.raises(ValueError, match="has no fin/1"):
        decide(_report({}, None), "fin/1", None, gate)


def test_a_worse_version_is_kept_but_not_promoted(trained_models, features_job, tmp_path):
    """fin/2 is fin/1 with its output negated (AUC becomes 1 - AUC: one of them is clearly worse), fin/3 a
    copy of the better one. After promoting the better one, the gate keeps the worse one out and lets the
    copy in."""
    out, _ = features_job
    models = tmp_path / "models"
    shutil.copytree(trained_models[1]["fin"], models / "fin" / "1")
    first = load_artifact(models / "fin" / "1")
    weights = first.model.state_dict()
    last = max((k for k in weights if k.startswith("tower.")), key=lambda k: int(k.split(".")[1]))
    layer = last.rsplit(".", 1)[0]
    negated = {k: -v if k.startswith(layer + ".") else v for k, v in weights.items()}
    save_artifact(models, "fin", "fin", negated, first.model.config, first.loader, {}, first.meta["training"])

    def evaluate(*versions: int) -> dict:
        r = run_fin("evaluate", "--data", str(out), "--repo", str(models), "--models",
                    *(f"fin/{v}" for v in versions), "--out", str(tmp_path / "report"), "--bootstrap", "20")
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / "report" / "report.json").read_text())

    aucs = {v: evaluate(1, 2)["models"][f"fin/{v}"]["auc"] for v in (1, 2)}
    better, worse = sorted(aucs, key=aucs.get, reverse=True)
    assert aucs[better] > aucs[worse] + 0.05
    shutil.copytree(models / "fin" / str(better), models / "fin" / "3")
    meta = json.loads((models / "fin" / "3" / "artifact.json").read_text())
    (models / "fin" / "3" / "artifact.json").write_text(json.dumps({**meta, "version": 3}))
    assert run_fin("promote", "--models", str(models), "--name", "fin", "--version", str(better)).returncode == 0

    evaluate(1, 2, 3)
    report = str(tmp_path / "report" / "report.json")
    r = run_fin("promote", "--models", str(models), "--name", "fin", "--version", str(worse), "--report", report)
    assert r.returncode == 0 and f"fin/{worse}: not promoted (against fin/{better}): AUC" in r.stdout, r.stdout + r.stderr
    assert promoted(models, "fin") == better and (models / "fin" / str(worse)).is_dir()  # kept, not promoted
    assert json.loads((tmp_path / "report" / "promotion.json").read_text())["promote"] is False
    r = run_fin("promote", "--models", str(models), "--name", "fin", "--version", "3", "--report", report)
    assert r.returncode == 0 and "fin/3: promoted" in r.stdout, r.stdout + r.stderr
    assert promoted(models, "fin") == 3


def test_a_version_is_named_by_its_folder(tmp_path):
    """A version folder copied to roll back keeps the artifact.json of the version it came from: responses name
    the folder a request pins, not that (before, they named a version that was not loaded)."""
    (tmp_path / "3").mkdir()
    assert Loaded(tmp_path / "3", {"name": "fin", "version": 1}).version == 3
