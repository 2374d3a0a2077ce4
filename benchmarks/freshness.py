"""Benchmark: what real-time behaviour buys. The test week of a simulated city is served through a real
`fin serve` in time order, every logged request with all its logged ad candidates, scored by FIN and DIN,
once per way of keeping the online store:
  frozen     the store as a features run the day before the week left it (timelines and statistics), all week
  daily      each day, the store as that day's daily features run leaves it (the timelines up to the day
             before, the day's statistics): what a daily job gives
  realtime   the statistics daily as above, the timelines as of the week's start, and every logged behaviour
             ingested through the server's Ingest API before the requests that came after it
For each: AUC, GAUC, logloss and calibration over the shown candidates (the impressions), and the revenue
replay of each model's auction over all the logged candidates (SNIPS RPM with its bootstrap interval, and
the exact expected RPM under the simulator's true click probabilities), beside `fin evaluate`'s figures
of the same artifacts; realtime must equal them (`realtime_max_abs_pctr_diff`: per candidate, served
against `fin.evaluate.predict`).
The store is set back and moved forward by `features.online.write_as_of` (a copy of the sqlite store);
the server runs with no feature caching (--timeline-staleness-s 0 --stats-staleness-s 0) so a day's
writes are read at once.

World: the demo's (`fin simulate` defaults: 2,000 users, 120 days; the last 7 days are the test week), kept
under --work; FIN and DIN are trained there with `fin train`'s defaults unless --work already has them
(e.g. --work /tmp/fin_quality/default after benchmarks/quality.py).
Usage: python benchmarks/freshness.py [--work DIR] [--epochs N] [--days N]   (writes results/freshness.json)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import ROOT, report, run_sampled
from quality import FIN, build_world
from serve_scale import Server

sys.path.insert(0, str(ROOT))

MODELS = ("fin", "din")
MODES = ("frozen", "daily", "realtime")


def trained(features: Path, repo: Path, epochs: int | None) -> dict[str, Path]:
    """Each model's newest artifact under `repo`, trained first where missing."""
    from fin.versions import versions

    for name in MODELS:
        if not versions(repo, name):
            run_sampled([*FIN, "train", "--data", str(features), "--out", str(repo), "--model", name, "--name", name,
                         *(["--epochs", str(epochs)] if epochs else [])])
    return {name: repo / name / str(versions(repo, name)[-1]) for name in MODELS}


def figures(frame, scores: dict[str, np.ndarray]) -> dict:
    """Per model: quality over the shown candidates and the revenue replay over all of them."""
    from fin.evaluate import metrics, revenue_of

    shown = frame["impression_id"].is_not_null().to_numpy()
    columns = {c: frame[c].fill_null(0).to_numpy()[shown] for c in ("label", "user_id", "time_type", "city_id")}
    replay = revenue_of(frame, scores)["policies"]
    out = {}
    for model, pctr in scores.items():
        m = metrics(columns["label"], pctr[shown], columns["user_id"], columns["time_type"], columns["city_id"])
        policy = replay[model]
        out[model] = {"auc": round(m["auc"], 4), "gauc": round(m["gauc"], 4), "logloss": round(m["logloss"], 4),
                      "calibration": round(m["calibration"], 3), "snips_rpm": round(policy["snips"]["rpm"], 1),
                      "snips_rpm_interval": [round(x, 1) for x in policy["snips"]["rpm_interval"]],
                      "exact_rpm": round(policy["exact"]["rpm"], 1) if "exact" in policy else None}
    return out


def serve_week(mode: str, features: Path, logs: Path, artifacts: dict[str, Path], requests, scratch: Path) -> dict:
    """One replay of the week through a fresh server over a fresh copy of the store; per model the served
    pCTR of every candidate (row_id, pctr), and the replay's counts."""
    import grpc
    import polars as pl
    from feast import FeatureStore

    from features import logio
    from features.aggregates import local_day_start_ms
    from features.online import write_as_of
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc
    from serving.replay import replay_in_time_order

    folder = scratch / mode
    shutil.copytree(features / "feast", folder / "feast", ignore=shutil.ignore_patterns("realtime.db*"))
    for name, path in artifacts.items():
        shutil.copytree(path, folder / "models" / name / path.name)
    data = features / "data"
    max_len = json.loads((data / "stats.json").read_text())["config"]["max_seq_len"]
    offset = json.loads((logs / "manifest.json").read_text())["utc_offset_hours"]
    store = FeatureStore(repo_path=str(folder / "feast"))
    start = local_day_start_ms(requests[0].day, offset)
    write_as_of(store, data, start, max_len)

    def new_day(day: int) -> None:
        if mode != "frozen" and day != requests[0].day:
            write_as_of(store, data, local_day_start_ms(day, offset), max_len, timelines=mode == "daily")

    behaviours = None
    if mode == "realtime":
        behaviours = logio.read_raw(logs, "behaviours").filter(pl.col("ts") >= start)
    server = Server(folder, folder / "models", ["--behaviour-log", str(folder / "logs"), "--timeline-staleness-s",
                                                "0", "--stats-staleness-s", "0"])
    try:
        with grpc.insecure_channel(server.addr) as channel:
            started = time.perf_counter()
            replayed = replay_in_time_order(pb_grpc.CtrScoringStub(channel), requests, behaviours, list(MODELS),
                                            new_day)
            seconds = time.perf_counter() - started
    finally:
        server.stop()
    return {"scores": replayed.scores, "ingested": replayed.ingested, "refused": replayed.refused,
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fin-freshness",
                        help="the world's folder (logs, features, models), reused when present")
    parser.add_argument("--epochs", type=int, help="fin train --epochs for models trained here (default: fin train's)")
    parser.add_argument("--days", type=int, help="replay only the first N test days (default: the whole week)")
    args = parser.parse_args()

    import polars as pl

    from features.dataset import CANDIDATES, Dataset
    from fin.artifact import load_artifact
    from fin.evaluate import SCORE, evaluate, predict
    from serving.replay import logged_requests

    features = build_world(args.work, [])
    logs = args.work / "logs"
    artifacts = trained(features, args.work / "models", args.epochs)
    data = features / "data"
    frame = Dataset.at(data).scan(CANDIDATES, "test")
    if args.days:
        frame = frame.filter(pl.col("day") < pl.col("day").min() + args.days)
    frame = frame.collect()
    where = pl.col("request_id").is_in(frame["request_id"].unique().implode())
    requests = logged_requests(data, "test", where=where, rows=CANDIDATES)
    loaded = {name: load_artifact(path) for name, path in artifacts.items()}

    def aligned(rows: pl.DataFrame) -> np.ndarray:  # pCTR per row of `frame`, from (row_id, pctr)
        return frame.select("candidate_id").join(rows, left_on="candidate_id", right_on="row_id", how="left",
                                                 maintain_order="left")["pctr"].to_numpy()

    offline = {name: aligned(predict(a, data, "test", dataset=CANDIDATES).rename({"candidate_id": "row_id"})
                             .select("row_id", pl.col(SCORE).alias("pctr"))) for name, a in loaded.items()}
    evaluated = evaluate(data, list(loaded.values())) if not args.days else None
    scratch = Path(tempfile.mkdtemp(prefix="fin-freshness-"))
    modes = {}
    for mode in MODES:
        run = serve_week(mode, features, logs, artifacts, requests, scratch)
        scores = {name: aligned(rows) for name, rows in run["scores"].items()}
        modes[mode] = {"figures": figures(frame, scores), "ingested_events": run["ingested"],
                       "refused_events": run["refused"], "replay_s": run["seconds"],
                       "max_abs_pctr_diff_vs_predict": {n: float(np.abs(scores[n] - offline[n]).max()) for n in scores}}
        print(f"{mode}: {modes[mode]}", file=sys.stderr)
    shutil.rmtree(scratch, ignore_errors=True)

    fin_evaluate = None
    if evaluated is not None:
        policies = evaluated["revenue"]["policies"]
        fin_evaluate = {key.split("/")[0]: {"auc": round(m["auc"], 4), "gauc": round(m["gauc"], 4),
                                            "snips_rpm": round(policies[key]["snips"]["rpm"], 1)}
                        for key, m in evaluated["models"].items()}
    realtime, frozen, daily = (modes[m]["figures"] for m in ("realtime", "frozen", "daily"))
    report("freshness", {
        "world": {"work": str(args.work), "requests": len(requests), "candidates": frame.height,
                  "impressions": int(frame["impression_id"].is_not_null().sum()), "days": frame["day"].n_unique()},
        "artifacts": {name: str(path) for name, path in artifacts.items()},
        "modes": modes,
        "offline_predict": figures(frame, offline),
        "fin_evaluate": fin_evaluate,
        "realtime_minus_frozen": {n: {k: round(realtime[n][k] - frozen[n][k], 4) for k in ("auc", "gauc")} |
                                  {"snips_rpm": round(realtime[n]["snips_rpm"] - frozen[n]["snips_rpm"], 1)}
                                  for n in MODELS},
        "realtime_minus_daily": {n: {k: round(realtime[n][k] - daily[n][k], 4) for k in ("auc", "gauc")} |
                                 {"snips_rpm": round(realtime[n]["snips_rpm"] - daily[n]["snips_rpm"], 1)}
                                 for n in MODELS},
    })


if __name__ == "__main__":
    main()
