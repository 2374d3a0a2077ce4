"""Benchmark: test quality of FIN against the baselines, every model trained to convergence with the defaults
(`fin train`: up to 8 epochs over the whole train split, early stop on validation AUC, best epoch kept,
calibrated on the validation days), on several simulated worlds.

Per world: `fin simulate`, `fin features`, one `fin train` per model, one `fin evaluate` of them all on the
test days (AUC, GAUC, calibration before and after, the share of the DNN-to-oracle AUC gap each closes,
revenue replay). Every model reads the same inputs (candidate, request context with the user id, price and
distance, statistics; the training-only position term); they differ in what they make of the history.
Models:
  fin            FIN over the last 1,000 events (the defaults)
  fin_200        FIN over the last 200 events (configs/history200.yaml, the earlier default)
  fin_per_example FIN over 1,000 events, examples shuffled one by one (benchmarks/per_example.yaml); slow:
                 not in the default list
  sim, din, dnn  the baselines (SIM-hard over the 1,000 events, DIN over the last 50, no history)
Worlds:
  default        the demo's world (seed 7, 2,000 users, 120 days)
  seed11         the same simulator, seed 11
  short          seed 23, 35 days (histories are short: what lifelong modelling gains least from)
Usage: python benchmarks/quality.py [--worlds default seed11 short] [--models fin fin_200 sim din dnn]
                                    [--work DIR]   (writes results/quality.json)
A world's logs and features are reused when its folder under --work has them; models are always retrained.
Worlds measured by separate runs are merged into results/quality.json, each with the commit it ran at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _measure import ROOT, report, run_sampled

WORLDS = {  # name: fin simulate options
    "default": [],
    "seed11": ["--seed", "11"],
    "short": ["--seed", "23", "--days", "35"],
}
MODELS = {  # name: fin train options
    "fin": ["--model", "fin"],
    "fin_200": ["--model", "fin", "--config", str(ROOT / "configs" / "history200.yaml")],
    "fin_per_example": ["--model", "fin", "--config", str(ROOT / "benchmarks" / "per_example.yaml")],
    "sim": ["--model", "sim"],
    "din": ["--model", "din"],
    "dnn": ["--model", "dnn"],
}
BASELINES = ("sim", "din", "dnn")
FIN = [sys.executable, "-m", "jobs.cli"]


def build_world(folder: Path, options: list[str]) -> Path:
    features = folder / "features"
    if not (features / "data" / "stats.json").exists():
        run_sampled([*FIN, "simulate", *options, "--out", str(folder / "logs"), "--overwrite"])
        if features.exists():
            shutil.rmtree(features)
        run_sampled([*FIN, "features", "--logs", str(folder / "logs"), "--out", str(features), "--no-materialize"])
    return features


def world_quality(folder: Path, options: list[str], models: list[str]) -> dict:
    features = build_world(folder, options)
    repo = folder / "models"
    if repo.exists():
        shutil.rmtree(repo)
    trained = {}
    for name in models:
        run = run_sampled([*FIN, "train", "--data", str(features), "--out", str(repo), "--name", name, "--json",
                           *MODELS[name]])
        result = json.loads(run["stdout"])
        trained[name] = {"epochs": result["epochs"], "best_epoch": result["best_epoch"],
                         "examples_per_s": round(result["examples_per_s"], 1), "train_wall_s": run["wall_s"],
                         "validation_auc": round(result["metrics"]["validation_auc"], 4)}
        print(f"{folder.name} {name}: {trained[name]}", file=sys.stderr)
    run_sampled([*FIN, "evaluate", "--data", str(features), "--repo", str(repo), "--models", *models,
                 "--out", str(folder / "report")])
    evaluated = json.loads((folder / "report" / "report.json").read_text())
    out = {"examples_test": evaluated["examples"], "oracle_auc": round(evaluated["oracle"]["auc"], 4), "models": {}}
    for key, m in evaluated["models"].items():
        name = key.split("/")[0]
        policy = (evaluated.get("revenue") or {}).get("policies", {}).get(key, {})
        out["models"][name] = {
            **trained[name], "auc": round(m["auc"], 4), "gauc": round(m["gauc"], 4),
            "logloss": round(m["logloss"], 4), "calibration": round(m["calibration"], 3),
            "calibration_uncalibrated": round(m["calibration_uncalibrated"], 3),
            "gap_closed": round(evaluated["gap_closed"].get(key, float("nan")), 3),
            "snips_rpm": round(policy["snips"]["rpm"], 1) if policy else None}
    return out


def goals(worlds: dict) -> dict:
    """Each world: FIN's lead over the best baseline (goal >= 0.01), over FIN-200 (> 0), the gap it closes
    (>= 0.75), its calibration (within [0.95, 1.05])."""
    out = {}
    for name, world in worlds.items():
        m = world["models"]
        baselines = {b: m[b]["auc"] for b in BASELINES if b in m}
        best = max(baselines, key=baselines.get) if baselines else None
        fin = m.get("fin", {})
        out[name] = {
            "best_baseline": best,
            "fin_minus_best_baseline": round(fin["auc"] - baselines[best], 4) if fin and best else None,
            "fin_minus_fin_200": round(fin["auc"] - m["fin_200"]["auc"], 4) if fin and "fin_200" in m else None,
            "fin_minus_per_example": (round(fin["auc"] - m["fin_per_example"]["auc"], 4)
                                      if fin and "fin_per_example" in m else None),
            "fin_gap_closed": fin.get("gap_closed"), "fin_calibration": fin.get("calibration")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--models", nargs="+", default=["fin", "fin_200", *BASELINES], choices=list(MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fin_quality"), help="worlds' folders")
    args = parser.parse_args()
    measured = {name: {"commit": commit(), **world_quality(args.work / name, WORLDS[name], args.models)}
                for name in args.worlds}
    # a world measured again replaces its entry; the others are kept (read now: runs of other worlds may
    # have written since this one started)
    previous = ROOT / "results" / "quality.json"
    worlds = {**(json.loads(previous.read_text())["worlds"] if previous.exists() else {}), **measured}
    report("quality", {"worlds": worlds, "goals": goals(worlds)})


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
