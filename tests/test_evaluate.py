"""`fin evaluate`: metrics of artifacts and of the oracle on a split, as markdown and strict JSON."""

import json

import numpy as np
import polars as pl
import torch

from fin.artifact import load_artifact
from fin.data import ExampleStream
from fin.evaluate import ORACLE, evaluate, examples, markdown, predict
from fin.metrics import auc
from tests.conftest import run_fin


def test_predictions_are_the_artifact_model_on_the_shared_loader(trained_models, features_job):
    out, _ = features_job
    artifact = load_artifact(trained_models[1]["fin"])
    preds = predict(artifact, out / "data", "test", batch_size=100)
    frame = examples(out / "data", "test")
    assert preds.height == frame.height and preds["impression_id"].n_unique() == frame.height
    batch = next(iter(ExampleStream(out / "data", "test", artifact.loader)))
    with torch.no_grad():
        direct = torch.sigmoid(artifact.model(batch)).numpy()
    joined = pl.DataFrame({"impression_id": batch.impression_id.numpy()}).join(preds, on="impression_id",
                                                                                 maintain_order="left")
    np.testing.assert_allclose(joined["pctr"].to_numpy(), direct, rtol=1e-5, atol=1e-7)


def test_report_compares_models_with_the_oracle(trained_models, features_job):
    out, _ = features_job
    report = evaluate(out / "data", [load_artifact(p) for p in trained_models[1].values()], "test")
    frame = examples(out / "data", "test")
    assert set(report["models"]) == {"fin/1", "dnn/1"} and report["examples"] == frame.height
    oracle = report[ORACLE]
    assert abs(oracle["auc"] - auc(frame["label"].to_numpy(), frame["oracle_click_prob"].to_numpy())) < 1e-12
    assert oracle["auc"] > max(m["auc"] for m in report["models"].values())  # the ceiling is a ceiling here
    for m in (*report["models"].values(), oracle):
        assert 0 <= m["auc"] <= 1 and 0 <= m["gauc"] <= 1 and m["logloss"] > 0 and m["calibration"] > 0
        assert set(m["auc_by_meal_slot"]) <= {"breakfast", "lunch", "afternoon_tea", "dinner", "night"}
        assert list(m["auc_by_city"]) == [str(c) for c in sorted(frame["city_id"].unique())]
    gap = report["gap_closed"]
    assert gap["dnn/1"] == 0.0
    expected = (report["models"]["fin/1"]["auc"] - report["models"]["dnn/1"]["auc"]) / (oracle["auc"] -
                                                                                     report["models"]["dnn/1"]["auc"])
    assert abs(gap["fin/1"] - expected) < 1e-12
    text = markdown(report)
    assert "| oracle |" in text and "| fin/1 |" in text and "TAUC" in text and "CAUC" in text


def test_cli_writes_markdown_and_strict_json(trained_models, features_job, tmp_path):
    out, _ = features_job
    models, _ = trained_models
    result = run_fin("evaluate", "--data", str(out / "data"), "--repo", str(models), "--models", "fin", "dnn/1",
                     "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert "| fin/1 |" in result.stdout and "| oracle |" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text(),
                        parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN / Infinity
    assert set(report["models"]) == {"fin/1", "dnn/1"}
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Evaluation on test")
    missing = run_fin("evaluate", "--data", str(out / "data"), "--repo", str(models), "--models", "sim",
                      "--out", str(tmp_path / "r2"))
    assert missing.returncode == 1 and "no versions of model 'sim'" in missing.stderr
