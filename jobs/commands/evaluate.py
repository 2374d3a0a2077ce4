"""`fin evaluate`: model artifacts compared on a split (AUC, GAUC, calibration, RPM replay)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit, progress

# what --json carries of each model's metrics (the report.json beside it has them all)
MODEL_METRICS = ("model", "path", "examples", "auc", "gauc", "logloss", "calibration", "calibration_uncalibrated")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fin.auction import RULES, AuctionConfig
    from fin.revenue import ReplayConfig

    auction, replay = AuctionConfig(), ReplayConfig()
    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features (or its data/ folder)")
    p.add_argument("--models", required=True, nargs="+",
                   help="artifacts: version folders (MODELS/fin/3), model folders (newest version) or, with "
                        "--repo, name[/version]")
    p.add_argument("--repo", type=Path, help="model repository for name[/version] specs")
    p.add_argument("--out", required=True, type=Path, help="report folder (report.md, report.json)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="default test")
    p.add_argument("--auction", default=auction.rule, choices=list(RULES),
                   help=f"revenue replay: price rule (default {auction.rule}, generalised second price)")
    p.add_argument("--slots", type=int, default=auction.slots,
                   help="revenue replay: ads per request (default: the logging policy's)")
    p.add_argument("--reserve", type=float, default=auction.reserve,
                   help=f"revenue replay: least price per click (default {auction.reserve:g})")
    p.add_argument("--bootstrap", type=int, default=replay.bootstrap,
                   help=f"revenue replay: bootstrap resamples for the intervals (default {replay.bootstrap})")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from fin.artifact import load_artifact
    from fin.auction import AuctionConfig
    from fin.evaluate import evaluate, markdown, write_report
    from fin.revenue import ReplayConfig
    from fin.versions import resolve

    artifacts = [load_artifact(resolve(spec, args.repo)) for spec in args.models]
    try:
        auction = AuctionConfig(rule=args.auction, slots=args.slots, reserve=args.reserve)
    except ValueError as e:
        raise CommandError(str(e)) from None
    with progress(None, "rows", "evaluate") as bar:
        report = evaluate(args.data, artifacts, args.split, progress=bar.update, auction_config=auction,
                          replay=ReplayConfig(bootstrap=args.bootstrap))
    paths = write_report(report, args.out)
    revenue = report.get("revenue") or {}
    result = {"command": "evaluate", "out": args.out, "report": paths[0], "markdown": paths[1],
              "split": report["split"], "examples": report["examples"], "clicks": report["clicks"],
              "models": {key: {k: m[k] for k in MODEL_METRICS if k in m} for key, m in report["models"].items()},
              # SNIPS RPM per ranking policy (the promotion gate's revenue measure); null without a replay
              "snips_rpm": {key: p["snips"]["rpm"] for key, p in revenue.get("policies", {}).items()} or None}
    emit(args, result, f"{markdown(report)}\nwrote {paths[0]} and {paths[1]}")
    return 0


COMMAND = Command(
    name="evaluate", help="compare model artifacts on a split: AUC, GAUC, calibration, RPM replay",
    description="Score a split of the features job's output with each model artifact and "
                "report AUC, GAUC, logloss, calibration, AUC by meal slot and by city, and the "
                "simulator's oracle ceiling when the data has it; when the logs had every ad "
                "candidate (ad_candidates), also each model's RPM and CTR replayed under an "
                "auction against the logging policy (markdown + JSON).",
    add_arguments=add_arguments, run=run, quiet_libraries=True)
