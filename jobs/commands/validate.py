"""`fin validate`: a log folder against the data contract, bad rows to quarantine."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import EXIT_VALIDATION_FAILED, Command, CommandError, add_json_flag, emit, time_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.validate import ValidationConfig

    d = ValidationConfig()
    p.add_argument("--logs", required=True, type=Path, help="log folder to check")
    p.add_argument("--out", type=Path, help="where quarantine/ and validation.json go (default: --logs)")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help=f"per-table threshold (default {d.max_bad_fraction})")
    p.add_argument("--window-start", type=time_ms, help="earliest valid timestamp (ms or ISO; default: manifest)")
    p.add_argument("--window-end", type=time_ms, help="first invalid timestamp (ms or ISO; default: manifest)")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from features.validate import ValidationConfig, validate_logs, write_report

    config = ValidationConfig(max_bad_fraction=args.max_bad_fraction, window_start_ms=args.window_start,
                              window_end_ms=args.window_end)
    report = validate_logs(args.logs, config)
    summary_path = write_report(report, args.out or args.logs)
    lines = []
    for name, t in report.tables.items():
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(t.reasons.items())) or "-"
        lines.append(f"{name:12s} rows={t.rows:<10,} quarantined={t.quarantine.height:<8,} ({t.bad_fraction:.2%})  "
                     f"{reasons}")
        lines += [f"{'':12s} note: {note}" for note in t.notes]
    lines.append(f"summary: {summary_path}")
    emit(args, {"command": "validate", **report.summary(), "out": args.out or args.logs, "summary": summary_path},
         "\n".join(lines))
    if not report.passed:
        raise CommandError(f"bad-row fraction above {args.max_bad_fraction:.2%} in: {', '.join(report.failed_tables)}",
                           EXIT_VALIDATION_FAILED)
    return 0


COMMAND = Command(
    name="validate", help="check a log folder against the data contract",
    description="Check every table of a log folder against the data contract. Bad rows go to "
                "OUT/quarantine/<table>.parquet with a reason; counts go to OUT/validation.json. "
                f"Exits {EXIT_VALIDATION_FAILED} when a table's bad fraction passes the threshold.",
    add_arguments=add_arguments, run=run)
