"""Offline evaluation of model artifacts on a split of the features job's output (docs/design.md, "Evaluation").

For each model: AUC, GAUC (by user), logloss, calibration, AUC by meal slot (TAUC) and by city (CAUC).
On simulated data the same metrics of the simulator's true click probability give the ceiling
("oracle"). Predictions come from the artifact alone (`fin.artifact.load_artifact`) through the same
loader and `fragment()` as training, so the server can be checked against `predict`. pCTR is the
artifact's calibrated pCTR (`Artifact.pctr`, what the server returns); the calibration and logloss of the
plain sigmoid are reported beside it, so the report shows what the calibration changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from features import contract
from features.dataset import CANDIDATES, EXAMPLES, ROW_IDS, SPLITS, Dataset
from fin.artifact import Artifact
from fin.auction import AuctionConfig, auction
from fin.calibration import pctr
from fin.loader import ExampleStream
from fin.metrics import auc, calibration, calibration_curve, gauc, logloss
from fin.revenue import ReplayConfig, evaluate_policies, logged_candidates, logging_slate

ORACLE = "oracle"
SCORE = "pctr"
UNCALIBRATED = "pctr_uncalibrated"  # the plain sigmoid of the logits, as artifacts without calibration score


@torch.inference_mode()
def predict(artifact: Artifact, data: str | Path, split: str = "test", batch_size: int = 4096,
            progress: Callable[[int], None] | None = None, dataset: str = EXAMPLES) -> pl.DataFrame:
    """pCTR of every row of `split` of `dataset` (examples or candidates): columns <row id>, pctr (calibrated
    when the artifact has a calibration) and pctr_uncalibrated."""
    loader = dataclasses.replace(artifact.loader, shuffle=False, batch_size=batch_size)
    ids, scores, plain = [], [], []
    images = artifact.model.config.image_dim > 0
    for batch in ExampleStream(data, split, loader, dataset=dataset, images=images, training=False):
        logits = artifact.model(batch)
        ids.append(batch.row_id.numpy())
        scores.append(artifact.pctr(logits).numpy().astype(np.float64))
        plain.append(pctr(logits, None).numpy().astype(np.float64))
        if progress:
            progress(len(batch))
    return pl.DataFrame({ROW_IDS[dataset]: np.concatenate(ids), SCORE: np.concatenate(scores),
                         UNCALIBRATED: np.concatenate(plain)})


def _scores(artifact: Artifact, data: str | Path, split: str, frame: pl.DataFrame, dataset: str,
            progress: Callable[[int], None] | None) -> pl.DataFrame:
    """`predict` of each row of `frame` (rows of `dataset`), in its order; every row must get one."""
    key = ROW_IDS[dataset]
    preds = frame.select(key).join(predict(artifact, data, split, progress=progress, dataset=dataset),
                                   on=key, how="left", maintain_order="left")
    if preds[SCORE].null_count():
        raise ValueError(f"{artifact.path}: no prediction for {preds[SCORE].null_count()} {dataset}")
    return preds


def examples(data: str | Path, split: str = "test") -> pl.DataFrame:
    """The columns evaluation reads, one row per example of `split`."""
    columns = ["impression_id", "user_id", "item_id", "label", "time_type", "city_id", *contract.ORACLE_COLUMNS]
    frame = Dataset.at(data).scan(EXAMPLES, split)
    present = [c for c in columns if c in frame.collect_schema().names()]
    return frame.select(present).collect()


def metrics(labels: np.ndarray, scores: np.ndarray, users: np.ndarray, slots: np.ndarray,
            cities: np.ndarray) -> dict:
    by_slot = {contract.MealSlot(int(s)).name.lower(): auc(labels[slots == s], scores[slots == s])
               for s in np.unique(slots)}
    by_city = {str(int(c)): auc(labels[cities == c], scores[cities == c]) for c in np.unique(cities)}
    return {"examples": int(labels.size), "auc": auc(labels, scores), "gauc": gauc(labels, scores, users),
            "logloss": logloss(labels, scores), "calibration": calibration(labels, scores),
            "calibration_curve": calibration_curve(labels, scores),
            "auc_by_meal_slot": by_slot, "auc_by_city": by_city}


def evaluate(data: str | Path, artifacts: list[Artifact], split: str = "test",
             progress: Callable[[int], None] | None = None, auction_config: AuctionConfig | None = None,
             replay: ReplayConfig = ReplayConfig()) -> dict:
    """The report: per model (and the oracle when the data has it) metrics on `split`, and the revenue
    replay when the data has the split's ad candidates."""
    frame = examples(data, split)
    if frame.height == 0:
        raise ValueError(f"no {split} examples under {data}")
    columns = {c: frame[c].to_numpy() for c in ("label", "user_id", "time_type", "city_id")}

    def scored(scores: np.ndarray) -> dict:
        return metrics(columns["label"], scores, columns["user_id"], columns["time_type"], columns["city_id"])

    models, predictions = {}, {}
    for artifact in artifacts:
        preds = _scores(artifact, data, split, frame, EXAMPLES, progress)
        predictions[f"{artifact.name}/{artifact.version}"] = preds[SCORE].to_numpy()
        plain = preds[UNCALIBRATED].to_numpy()
        models[f"{artifact.name}/{artifact.version}"] = {
            "model": artifact.meta["model"], "path": str(artifact.path),
            "calibration_method": None if artifact.calibration is None else artifact.meta["calibration"]["method"],
            **scored(preds[SCORE].to_numpy()),
            "calibration_uncalibrated": calibration(columns["label"], plain),
            "logloss_uncalibrated": logloss(columns["label"], plain)}
    report = {"data": str(data), "split": split, "examples": frame.height, "clicks": int(columns["label"].sum()),
              "models": models}
    oracle = contract.ORACLE_COLUMNS[0]
    if oracle in frame.columns and frame[oracle].null_count() == 0:
        report[ORACLE] = scored(frame[oracle].to_numpy().astype(np.float64))
    report["gap_closed"] = _gap_closed(report)
    logged = scored_candidates(data, artifacts, split, progress)  # once: the replay and the cold/warm split
    report["revenue"] = None if logged is None else revenue_of(*logged, auction_config, replay)
    report["cold_start"] = cold_start(data, split, frame, predictions, logged, auction_config, replay)
    return report


COLD, WARM = "cold", "warm"


def new_items(data: str | Path, split: str) -> np.ndarray:
    """The items first shown in `split`: no impression in any split before it (a new ad's case)."""
    earlier = SPLITS[:SPLITS.index(split)]
    dataset = Dataset.at(data)
    seen = pl.concat([dataset.scan(EXAMPLES, s).select("item_id") for s in earlier]).unique().collect() \
        if earlier else pl.DataFrame({"item_id": []}, schema={"item_id": pl.Int64})
    shown = dataset.scan(EXAMPLES, split).select("item_id").unique().collect()
    return np.sort(shown.join(seen, on="item_id", how="anti")["item_id"].to_numpy())


def cold_start(data: str | Path, split: str, frame: pl.DataFrame, predictions: dict[str, np.ndarray],
               logged: tuple[pl.DataFrame, dict[str, np.ndarray]] | None, auction_config: AuctionConfig | None,
               replay: ReplayConfig) -> dict | None:
    """AUC, GAUC, calibration and RPM of each model on the impressions of cold-start ads (first shown in
    `split`) and of warm ones, apart. Calibration (sum of pCTR / clicks) apart, because a level fitted on the
    validation days, where few ads are new, says nothing of how a model prices new ones. RPM: the revenue
    replay of an auction among each request's cold (warm) candidates only, so each figure says how well a
    model ranks that kind of ad. None when the split has no cold-start ad."""
    cold_items = new_items(data, split)
    if cold_items.size == 0:
        return None
    cold = np.isin(frame["item_id"].to_numpy(), cold_items)
    labels, users = frame["label"].to_numpy(), frame["user_id"].to_numpy()
    oracle = contract.ORACLE_COLUMNS[0]
    scores = dict(predictions)
    if oracle in frame.columns and frame[oracle].null_count() == 0:
        scores[ORACLE] = frame[oracle].to_numpy().astype(np.float64)
    out: dict = {"new_items": int(cold_items.size), "models": {}}
    for kind, rows in ((COLD, cold), (WARM, ~cold)):
        out[f"{kind}_examples"], out[f"{kind}_clicks"] = int(rows.sum()), int(labels[rows].sum())
        for key, s in scores.items():
            out["models"].setdefault(key, {})[kind] = {"auc": auc(labels[rows], s[rows]),
                                                       "gauc": gauc(labels[rows], s[rows], users[rows]),
                                                       "calibration": calibration(labels[rows], s[rows])}
    if logged is not None:  # the split's logged candidates and each model's pCTR of them
        candidates, by_model = logged
        is_cold = np.isin(candidates["item_id"].to_numpy(), cold_items)
        for kind, rows in ((COLD, is_cold), (WARM, ~is_cold)):
            if not rows.any():
                continue
            rev = revenue_of(candidates.filter(pl.Series(rows)), {k: v[rows] for k, v in by_model.items()},
                             auction_config, replay)
            for key, r in rev["policies"].items():
                entry = out["models"].setdefault(key, {}).setdefault(kind, {})
                entry["rpm"] = r["snips"]["rpm"]
                if r.get("exact"):  # simulated data: the true expected RPM of the same slates
                    entry["exact_rpm"] = r["exact"]["rpm"]
    return out


LOGGING = "logging policy"


def revenue(data: str | Path, artifacts: list[Artifact], split: str = "test",
            auction_config: AuctionConfig | None = None, replay: ReplayConfig = ReplayConfig(),
            progress: Callable[[int], None] | None = None) -> dict | None:
    """RPM and CTR replay (`revenue_of`) of every model's pCTR on the split's logged candidates; None
    without logged candidates."""
    logged = scored_candidates(data, artifacts, split, progress)
    return None if logged is None else revenue_of(*logged, auction_config, replay)


def scored_candidates(data: str | Path, artifacts: list[Artifact], split: str = "test",
                      progress: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, dict[str, np.ndarray]] | None:
    """The split's logged candidates and each model's pCTR of them (model -> pCTR per row); None without
    logged candidates."""
    parts = Dataset.at(data).parts(CANDIDATES, split)
    if not parts:
        return None
    frame = pl.read_parquet(parts)
    return frame, {f"{a.name}/{a.version}": _scores(a, data, split, frame, CANDIDATES, progress)[SCORE].to_numpy()
                   for a in artifacts}


def revenue_of(frame: pl.DataFrame, scores: dict[str, np.ndarray], auction_config: AuctionConfig | None = None,
               replay: ReplayConfig = ReplayConfig()) -> dict:
    """RPM and CTR replay (`fin.revenue`) of each model ranking the logged candidates (`frame`, rows of the
    candidates dataset) by its pCTR (`scores`: model -> pCTR per row of `frame`) x bid under the auction,
    against the logging policy (and the oracle ranking on simulated data), with lifts over the logging
    policy and of the first model over each other."""
    logged = logged_candidates(frame)
    config = auction_config or AuctionConfig()
    if config.slots is None:
        config = dataclasses.replace(config, slots=logged.slots)
    if config.slots > logged.slots:
        raise ValueError(f"the auction has {config.slots} slots but the logging policy's log has {logged.slots}")
    bid = frame["bid"].cast(pl.Float64).to_numpy()
    request = logged.request
    policies = {LOGGING: (*logging_slate(logged, frame["logging_score"].cast(pl.Float64).to_numpy(), bid, config),
                          True)}
    for model, pctr_of_rows in scores.items():
        policies[model] = (*auction(request, pctr_of_rows, bid, config), False)
    if logged.oracle is not None:
        policies[ORACLE] = (*auction(request, logged.oracle[:, 0], bid, config), False)
    results = evaluate_policies(logged, policies, replay, baselines=(LOGGING, *list(scores)[1:]))
    return {"requests": logged.requests, "candidates": frame.height, "auction": dataclasses.asdict(config),
            "bootstrap": dataclasses.asdict(replay), "policies": results}


def _gap_closed(report: dict) -> dict[str, float]:
    """Share of the AUC gap between the DNN baseline and the oracle that each model closes."""
    dnn = [m["auc"] for m in report["models"].values() if m["model"] == "dnn"]
    if ORACLE not in report or not dnn:
        return {}
    floor, ceiling = dnn[0], report[ORACLE]["auc"]
    return {key: (m["auc"] - floor) / (ceiling - floor) for key, m in report["models"].items()
            if ceiling > floor}


def _number(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    rows = dict(report["models"])
    if ORACLE in report:
        rows[ORACLE] = report[ORACLE]
    slots = sorted({s for m in rows.values() for s in m["auc_by_meal_slot"]},
                   key=lambda s: contract.MealSlot[s.upper()])
    cities = sorted({c for m in rows.values() for c in m["auc_by_city"]}, key=int)
    lines = [f"# Evaluation on {report['split']}: {report['examples']:,} examples, {report['clicks']:,} clicks", "",
             "| model | AUC | GAUC | logloss | calibration | calibration uncalibrated | logloss uncalibrated | "
             "gap closed |", "|---|---|---|---|---|---|---|---|"]
    for key, m in rows.items():
        lines.append(f"| {key} | {_number(m['auc'])} | {_number(m['gauc'])} | {_number(m['logloss'])} | "
                     f"{_number(m['calibration'], 3)} | {_number(m.get('calibration_uncalibrated'), 3)} | "
                     f"{_number(m.get('logloss_uncalibrated'))} | {_number(report['gap_closed'].get(key), 3)} |")
    lines += ["", "AUC by meal slot (TAUC)", "", "| model | " + " | ".join(slots) + " |",
              "|---|" + "---|" * len(slots)]
    lines += [f"| {key} | " + " | ".join(_number(m["auc_by_meal_slot"].get(s)) for s in slots) + " |"
              for key, m in rows.items()]
    lines += ["", "AUC by city (CAUC)", "", "| model | " + " | ".join(cities) + " |", "|---|" + "---|" * len(cities)]
    lines += [f"| {key} | " + " | ".join(_number(m["auc_by_city"].get(c)) for c in cities) + " |"
              for key, m in rows.items()]
    lines += ["", "calibration = sum of pCTR / clicks (1 = the right level). pCTR is each artifact's calibrated "
              "pCTR, as served (fitted on the validation days by `fin train`; the ranking and so AUC are those of "
              "the logits); \"uncalibrated\" is the plain sigmoid of the same logits.",
              "", "gap closed = (AUC - AUC of DNN) / (AUC of the oracle - AUC of DNN); the oracle scores with the "
              "simulator's true click probability."]
    if report.get("revenue"):
        lines += ["", *_revenue_markdown(report["revenue"])]
    if report.get("cold_start"):
        lines += ["", *_cold_start_markdown(report["cold_start"])]
    return "\n".join(lines) + "\n"


def _cold_start_markdown(cold: dict) -> list[str]:
    lines = [f"## Cold-start ads: {cold['new_items']:,} ads first shown in this split ({cold['cold_examples']:,} "
             f"impressions, {cold['cold_clicks']:,} clicks) and warm ads ({cold['warm_examples']:,} impressions)", "",
             "| model | cold AUC | cold GAUC | cold calibration | cold RPM (SNIPS) | cold RPM (exact) | warm AUC | "
             "warm GAUC | warm calibration | warm RPM (SNIPS) | warm RPM (exact) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in cold["models"].items():
        c, w = m.get(COLD, {}), m.get(WARM, {})
        lines.append(f"| {key} | {_number(c.get('auc'))} | {_number(c.get('gauc'))} | {_number(c.get('calibration'), 3)} | "
                     f"{_number(c.get('rpm'), 1)} | {_number(c.get('exact_rpm'), 1)} | {_number(w.get('auc'))} | "
                     f"{_number(w.get('gauc'))} | {_number(w.get('calibration'), 3)} | {_number(w.get('rpm'), 1)} | "
                     f"{_number(w.get('exact_rpm'), 1)} |")
    lines += ["", "RPM here: an auction among each request's cold (warm) candidates only, estimated from the logged "
              "clicks (SNIPS; few logged clicks of cold ads make it noisy) and, on simulated data, exact (the true "
              "click probabilities of the same slates). A model with the image modality reads each ad's creative "
              "embedding; one without reads ids and statistics alone. Calibration: sum of pCTR / clicks."]
    return lines


def _percent(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _interval(pair: list[float], fmt) -> str:
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def _revenue_markdown(rev: dict) -> list[str]:
    a, b = rev["auction"], rev["bootstrap"]
    level = f"{100 * b['level']:.0f}%"
    lines = [f"## Revenue replay: {rev['requests']:,} logged requests, {rev['candidates']:,} candidates; "
             f"{a['rule']} auction, {a['slots']} slots, reserve {a['reserve']:g}", "",
             f"| policy | RPM (SNIPS) | {level} interval | RPM lift over the logging policy | CTR (SNIPS) | CTR lift | "
             "RPM (IPS) | RPM (replay) | effective sample size | exact RPM | exact CTR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    money, ctr = (lambda x: f"{x:.1f}"), (lambda x: f"{100 * x:.2f}%")
    for name, r in rev["policies"].items():
        lift = r.get("lift_over", {}).get(LOGGING)
        exact = r.get("exact", {})
        lines.append(
            f"| {name} | {money(r['snips']['rpm'])} | {_interval(r['snips']['rpm_interval'], money)} | "
            + (f"{_percent(lift['rpm'])} {_interval(lift['rpm_interval'], _percent)} | " if lift else "- | ")
            + f"{ctr(r['snips']['ctr'])} | " + (f"{_percent(lift['ctr'])} | " if lift else "- | ")
            + f"{money(r['ips']['rpm'])} | {money(r['replay']['rpm'])} | {r['effective_sample_size']:,.0f} | "
            + (f"{money(exact['rpm'])} | {ctr(exact['ctr'])} |" if exact else "- | - |"))
    first = next((n for n in rev["policies"] if n not in (LOGGING, ORACLE)), None)
    for other, lift in rev["policies"].get(first, {}).get("lift_over", {}).items():
        if other != LOGGING:
            lines.append(f"\n{first} over {other}: RPM {_percent(lift['rpm'])} {_interval(lift['rpm_interval'], _percent)}, "
                         f"CTR {_percent(lift['ctr'])} {_interval(lift['ctr_interval'], _percent)} (paired bootstrap).")
    lines += ["", "RPM: revenue per 1,000 ad requests (price per click under the auction x clicks). Each model "
              "ranks every logged candidate of a request by pCTR x bid; the estimators weight the logged clicks "
              "by the logging policy's probability of the same ad at the same slot (IPS, self-normalised per "
              "slot: SNIPS) or read its uniformly random traffic (replay); exact: the simulator's true click "
              "probabilities of the same slates. Intervals: bootstrap over requests."]
    return lines


def _finite(value):
    """NaN (an AUC of one class) or infinity (a lift over nothing) -> null: strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """report.json, report.md and the plots (PNG) in `out`."""
    from fin.report_plots import write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(markdown(report))
    write_plots(report, out)
    return out / "report.json", out / "report.md"
