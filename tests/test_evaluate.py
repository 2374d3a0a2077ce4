"""`fin evaluate`: metrics of artifacts and of the oracle on a split, as markdown and strict JSON."""

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from features.fragments import fragment
from fin.artifact import load_artifact
from fin.evaluate import ORACLE, evaluate, examples, markdown, predict
from fin.inputs import FRAGMENT_CONTEXT, Batch, Histories, LoaderConfig
from fin.loader import ExampleStream
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
        logits = artifact.model(batch).double()
    platt = artifact.meta["calibration"]["parameters"]  # what fin train fitted on the validation days
    joined = pl.DataFrame({"impression_id": batch.row_id.numpy()}).join(preds, on="impression_id",
                                                                                 maintain_order="left")
    np.testing.assert_allclose(joined["pctr"].to_numpy(),
                               torch.sigmoid(platt["scale"] * logits + platt["shift"]).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(joined["pctr_uncalibrated"].to_numpy(), torch.sigmoid(logits).numpy(),
                               rtol=1e-5, atol=1e-7)


def _each_its_own(batch: Batch, config: LoaderConfig) -> Batch:
    """The same examples with a copy of their request's history each (`request_of` None), cut by `fragment()`."""
    request, h = batch.request_of, batch.histories
    lengths = (h.end - h.start)[request]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    index = torch.repeat_interleave(h.start[request] - offsets[:-1], lengths) + torch.arange(int(offsets[-1]))
    history = {k: v[index] for k, v in batch.history.items()}
    ts = batch.ts[request]
    fragments = fragment(offsets, history, {"ts": ts, **{c: batch.ids[c] for c in FRAGMENT_CONTEXT}}, config.fragments)
    return dataclasses.replace(batch, ts=ts, request_context={c: batch.ids[c] for c in FRAGMENT_CONTEXT},
                               histories=Histories(offsets, history, offsets[:-1], offsets[1:]),
                               fragments=fragments, request_of=None)


def test_candidates_of_one_request_score_as_with_their_own_histories(trained_models, features_job):
    out, _ = features_job
    for path in trained_models[1].values():
        artifact = load_artifact(path)
        config = dataclasses.replace(artifact.loader, shuffle=False, batch_size=256)
        batch = next(iter(ExampleStream(out / "data", "test", config, dataset="candidates")))
        assert batch.request_of is not None and batch.ts.numel() < len(batch)
        with torch.no_grad():
            torch.testing.assert_close(artifact.model(batch), artifact.model(_each_its_own(batch, config)),
                                       rtol=1e-5, atol=1e-5)


def test_report_compares_models_with_the_oracle(trained_models, features_job):
    out, _ = features_job
    report = evaluate(out / "data", [load_artifact(p) for p in trained_models[1].values()], "test")
    frame = examples(out / "data", "test")
    assert set(report["models"]) == {"fin/1", "dnn/1"} and report["examples"] == frame.height
    oracle = report[ORACLE]
    assert abs(oracle["auc"] - auc(frame["label"].to_numpy(), frame["oracle_click_prob"].to_numpy())) < 1e-12
    assert oracle["auc"] > max(m["auc"] for m in report["models"].values())  # the ceiling is a ceiling here
    labels = frame["label"].to_numpy()
    for key, m in report["models"].items():  # calibrated: the level moves, the ranking and so AUC do not
        preds = frame.select("impression_id").join(predict(load_artifact(m["path"]), out / "data", "test"),
                                                   on="impression_id", maintain_order="left")
        assert m["calibration_method"] == "platt"
        assert m["calibration"] == pytest.approx(_pctr_over_clicks(labels, preds["pctr"]), rel=1e-12)
        assert m["calibration_uncalibrated"] == pytest.approx(_pctr_over_clicks(labels, preds["pctr_uncalibrated"]),
                                                              rel=1e-12)
        assert abs(m["calibration"] - m["calibration_uncalibrated"]) > 1e-3
        assert m["auc"] == pytest.approx(auc(labels, preds["pctr_uncalibrated"].to_numpy()), abs=1e-6)
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
    assert "| calibration | calibration uncalibrated |" in text
    fin = report["models"]["fin/1"]
    assert (f"| {fin['calibration']:.3f} | {fin['calibration_uncalibrated']:.3f} | "
            f"{fin['logloss_uncalibrated']:.4f} |") in text


def _pctr_over_clicks(labels: np.ndarray, pctr: pl.Series) -> float:
    """Sum of pCTR over clicks, written out here rather than taken from fin.metrics."""
    return float(pctr.sum()) / float(labels.sum())


def test_revenue_replay_ranks_every_logged_candidate(trained_models, features_job):
    """Each model's slates come from its pCTR on every logged candidate (shown or not) through the auction;
    the logging policy's own replay is its observed revenue; the report compares and states lifts."""
    from fin.auction import AuctionConfig, auction
    from fin.evaluate import LOGGING, revenue
    from fin.revenue import ReplayConfig, logged_candidates

    out, _ = features_job
    artifacts = [load_artifact(p) for p in trained_models[1].values()]
    rev = revenue(out / "data", artifacts, "test", replay=ReplayConfig(bootstrap=50))
    frame = pl.read_parquet(out / "data" / "candidates" / "test" / "*.parquet")
    assert rev["candidates"] == frame.height > examples(out / "data", "test").height  # unshown ones too
    assert set(rev["policies"]) == {LOGGING, "fin/1", "dnn/1", ORACLE}
    assert rev["auction"] == {"rule": "gsp", "slots": 5, "reserve": 0.0}
    # the FIN policy is its predictions on the candidates, auctioned
    preds = frame.select("candidate_id").join(predict(artifacts[0], out / "data", "test", dataset="candidates"),
                                              on="candidate_id", maintain_order="left")
    logged = logged_candidates(frame)
    slot, price = auction(logged.request, preds["pctr"].to_numpy(), frame["bid"].cast(pl.Float64).to_numpy(),
                          AuctionConfig(slots=5))
    true_clicks = np.where(slot >= 0, logged.oracle[np.arange(slot.size), np.clip(slot, 0, None)], 0)
    fin = rev["policies"]["fin/1"]
    assert fin["exact"]["rpm"] == pytest.approx(1000 * (true_clicks * price).sum() / logged.requests)
    assert fin["ads_shown_per_request"] == pytest.approx((slot >= 0).sum() / logged.requests)
    # on-policy: every weight is 1, and all estimators read the observed clicks
    logging = rev["policies"][LOGGING]
    assert logging["effective_sample_size"] == logging["matched_impressions"] == (frame["position"].is_not_null()).sum()
    assert logging["ips"]["rpm"] == pytest.approx(logging["snips"]["rpm"])
    lift = fin["lift_over"][LOGGING]
    assert lift["rpm"] == pytest.approx(fin["snips"]["rpm"] / logging["snips"]["rpm"] - 1)
    assert lift["rpm_interval"][0] <= lift["rpm"] <= lift["rpm_interval"][1]
    assert "dnn/1" in fin["lift_over"]  # the first model against each other one
    text = markdown({**evaluate(out / "data", artifacts[:1], "test"), "revenue": rev})
    assert "## Revenue replay" in text and "| logging policy |" in text and "fin/1 over dnn/1" in text


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
    for plot in ("calibration.png", "auc_by_meal_slot.png", "revenue.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert "## Revenue replay" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Evaluation on test")
    missing = run_fin("evaluate", "--data", str(out / "data"), "--repo", str(models), "--models", "sim",
                      "--out", str(tmp_path / "r2"))
    assert missing.returncode == 1 and "no versions of model 'sim'" in missing.stderr
