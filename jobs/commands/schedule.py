"""`fin schedule` (the daily features -> embed -> train -> evaluate -> promote chain) and `fin runs` (its history)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit, field_default, say


def _config(path: Path):
    from jobs.schedule import load_schedule

    try:
        return load_schedule(path)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None


def add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    from jobs.schedule import ScheduleConfig

    poll_s = field_default(ScheduleConfig, "poll_s")
    p.add_argument("--config", required=True, type=Path, help="schedule YAML (see configs/jobs.yaml)")
    p.add_argument("--once", action="store_true", help="run what is due now, then exit (1 if a run failed for good)")
    p.add_argument("--poll-s", type=float,
                   help=f"seconds between checks when not --once (default: the schedule's poll_s, {poll_s:g})")
    add_json_flag(p)


def run_schedule(args: argparse.Namespace) -> int:
    import time

    from jobs.schedule import Scheduler, SchedulerBusy

    if args.json and not args.once:
        raise CommandError("--json needs --once (one run of the scheduler, one result)")
    config = _config(args.config)
    try:
        scheduler = Scheduler(config, say=lambda line: say(args, line))
    except SchedulerBusy as e:
        if not args.once:
            raise CommandError(str(e)) from None
        # a cron start while the last run goes on: nothing to do, the running one makes the due runs
        emit(args, {"command": "schedule", "config": args.config, "runs": [], "failed_for_good": [],
                    "busy": str(e)}, f"{e}: nothing run")
        return 0
    try:
        while True:
            runs = scheduler.tick()
            failed = [r for r in runs if r["status"] == "failed" and r["next_attempt"] is None]
            if args.once:
                result = {"command": "schedule", "config": args.config,
                          "runs": [{**r, "outputs": json.loads(r["outputs"])} for r in runs],
                          "failed_for_good": [r["run_id"] for r in failed]}
                emit(args, result, f"{len(runs)} run(s); {len(failed)} failed for good" if runs else "nothing due")
                return 1 if failed else 0
            time.sleep(config.poll_s if args.poll_s is None else args.poll_s)
    finally:
        scheduler.close()


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="schedule YAML (see configs/jobs.yaml)")


def run_runs(args: argparse.Namespace) -> int:
    from jobs.schedule import RunStore

    store = RunStore(_config(args.config).state)
    rows = store.all()
    store.close()
    print("| run | status | attempts | started (UTC) | seconds | outputs / error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        started = dt.datetime.fromtimestamp(r["started"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = r["error"] or r["outputs"]
        retry = "" if r["next_attempt"] is None or r["status"] == "done" else " (retry pending)"
        print(f"| {r['run_id']} | {r['status']}{retry} | {r['attempts']} | {started} | {r['seconds']:.1f} | {detail} |")
    return 0


SCHEDULE = Command(
    name="schedule", help="run the daily features -> embed -> train -> evaluate -> promote chain",
    description="Runs the scheduled jobs of a schedule file (configs/jobs.yaml): each data "
                "date's features, creative embeddings, train, evaluate and promote, by cron expression and "
                "dependency, with retries and backoff; run state in a sqlite database. "
                "--once runs what is due and exits (for cron or an external orchestrator).",
    add_arguments=add_schedule_arguments, run=run_schedule)

RUNS = Command(
    name="runs", help="list the scheduled runs and their status",
    description="Prints the run history of a schedule's database as a markdown table.",
    add_arguments=add_runs_arguments, run=run_runs)
