"""`fin simulate`: a city's food-ordering ad logs from the simulator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.commands.common import Command, add_json_flag, emit, progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.simulator.config import SimConfig

    d = SimConfig()  # no defaults here: a flag left out keeps the config file's value, else SimConfig's
    p.add_argument("--out", required=True, type=Path, help="output log folder")
    p.add_argument("--config", type=Path, help="YAML/JSON simulator config (any subset of keys; see configs/)")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--users", type=int, help=f"number of users (default {d.users.users})")
    p.add_argument("--days", type=int, help=f"number of days (default {d.days})")
    p.add_argument("--start-date", help=f"first local date, YYYY-MM-DD (default {d.start_date})")
    p.add_argument("--chunk-users", type=int, help=f"users simulated together; bounds memory (default {d.chunk_users})")
    p.add_argument("--workers", type=int, help=f"processes simulating chunks in parallel (default {d.workers})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--report", action="store_true", help="print the signal properties measured on the output")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from features.simulator import load_sim_config, simulate
    from features.simulator.run import chunk_bounds

    config = load_sim_config(args.config, **{
        "seed": args.seed, "days": args.days, "start_date": args.start_date, "users.users": args.users,
        "chunk_users": args.chunk_users, "workers": args.workers,
    })
    total = config.days * len(chunk_bounds(config))
    with progress(total, "chunk-day", "simulate") as bar:
        manifest = simulate(config, args.out, overwrite=args.overwrite, progress=bar.update)
    rows = manifest["rows"]
    text = (f"wrote {args.out}: {rows['behaviours']:,} behaviours, {rows['impressions']:,} impressions "
            f"({manifest['requests']:,} requests, {manifest['clicks']:,} clicks), {rows['users']:,} users, "
            f"{config.days} days, in {manifest['wall_s']:.1f}s")
    result = {"command": "simulate", "out": args.out, "rows": rows, "requests": manifest["requests"],
              "clicks": manifest["clicks"], "days": config.days, "start_date": config.start_date,
              "seed": config.seed, "seconds": manifest["wall_s"]}
    if args.report:
        from fin import signal_report

        result["report"] = signal_report.signal_report(args.out)
        text += "\n" + json.dumps(result["report"], indent=2)
    emit(args, result, text)
    return 0


COMMAND = Command(
    name="simulate", help="simulate a city's food-ordering ad logs",
    description="Simulate users, shops and ads of a city and write contract log tables "
                "(partitioned parquet) and a manifest. Deterministic for a seed.",
    add_arguments=add_arguments, run=run)
