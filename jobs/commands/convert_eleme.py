"""`fin convert-eleme`: the public Ele.me CTR dataset CSV into contract logs."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, add_json_flag, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from features.eleme import TIMEDIFF_MS, ElemeConfig

    d = ElemeConfig()
    p.add_argument("--csv", required=True, type=Path, help="dataset CSV file (with header)")
    p.add_argument("--out", required=True, type=Path, help="output log folder")
    p.add_argument("--timediff-unit", choices=list(TIMEDIFF_MS), default=d.timediff_unit,
                   help=f"unit of timediff_list (default {d.timediff_unit})")
    p.add_argument("--utc-offset-hours", type=float, default=d.utc_offset_hours,
                   help=f"local time of the data (default {d.utc_offset_hours:g})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from features.eleme import ElemeConfig, convert_eleme

    config = ElemeConfig(timediff_unit=args.timediff_unit, utc_offset_hours=args.utc_offset_hours)
    manifest = convert_eleme(args.csv, args.out, config, overwrite=args.overwrite)
    rows = manifest["rows"]
    quarantine = args.out / "quarantine" / "eleme_rows.parquet"
    emit(args, {"command": "convert-eleme", "csv": args.csv, "out": args.out, "rows": rows,
                "quarantined_rows": manifest["quarantined_rows"], "quarantine": quarantine},
         f"wrote {args.out}: {rows['impressions']:,} impressions, {rows['behaviours']:,} behaviours from histories, "
         f"{manifest['quarantined_rows']:,} malformed rows in {args.out}/quarantine/eleme_rows.parquet")
    return 0


COMMAND = Command(
    name="convert-eleme", help="convert the public Ele.me CTR dataset CSV into contract logs",
    description="Map the Ele.me CTR dataset layout (one impression per row, per-request "
                "history lists) into contract tables: rows become impressions, their history "
                "lists become de-duplicated behaviours, and the world tables are derived. "
                "Malformed rows go to OUT/quarantine/eleme_rows.parquet with a reason.",
    add_arguments=add_arguments, run=run)
