"""`fin promote`: a model version made the serving default, optionally through the promotion gate.
Imports no torch (`fin.versions`, `fin.promotion`): it starts fast."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit, say


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fin.promotion import PromotionGate

    gate = PromotionGate()
    p.add_argument("--models", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--name", required=True, help="model name (MODELS/NAME)")
    p.add_argument("--version", required=True, type=int, help="version to promote (MODELS/NAME/VERSION)")
    p.add_argument("--report", type=Path, help="gate on this evaluation report.json")
    p.add_argument("--auc-tolerance", type=float, default=gate.auc_tolerance,
                   help=f"AUC the version may lose against the default (default {gate.auc_tolerance})")
    p.add_argument("--rpm-tolerance", type=float, default=gate.rpm_tolerance,
                   help=f"share of SNIPS RPM it may lose (default {gate.rpm_tolerance})")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from fin.promotion import PromotionGate, decide
    from fin.versions import ArtifactError, promote, promoted

    candidate = f"{args.name}/{args.version}"
    result = {"command": "promote", "models": args.models, "name": args.name, "version": args.version,
              "candidate": candidate, "promoted": False, "decision": None, "decision_file": None}
    if args.report is not None:
        try:
            report = json.loads(args.report.read_text())
            current = promoted(args.models, args.name)
            decision = decide(report, candidate, None if current is None else f"{args.name}/{current}",
                              PromotionGate(args.auc_tolerance, args.rpm_tolerance))
        except (OSError, ValueError) as e:
            raise CommandError(str(e)) from None
        # promotion.json beside the report is for people; a scheduler reads the --json result
        decision_file = args.report.parent / "promotion.json"
        decision_file.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
        result.update(decision=decision.to_dict(), decision_file=decision_file)
        say(args, f"{candidate}: {'promoted' if decision.promote else 'not promoted'} "
                  f"(against {decision.current or 'no default'}): {'; '.join(decision.reasons)}")
        if not decision.promote:
            emit(args, result)
            return 0
    try:
        promote(args.models, args.name, args.version)
    except ArtifactError as e:
        raise CommandError(str(e)) from None
    result["promoted"] = True
    emit(args, result, f"{args.models}/{args.name}: version {args.version} is the default (servers pick it up at "
                       "their next scan)")
    return 0


COMMAND = Command(
    name="promote", help="make a model version the serving default (optionally through the gate)",
    description="Writes MODELS/NAME/PROMOTED: requests that pin no version get this version "
                "once a server has loaded it (running servers pick it up at their next "
                "repository scan; a version that fails to load leaves the default as it was). "
                "With --report (a fin evaluate report.json holding this version and the "
                "current default), only when the version is not worse than the default by "
                "more than the tolerances in AUC and SNIPS RPM; the decision and its reasons "
                "are printed and written to promotion.json beside the report.",
    add_arguments=add_arguments, run=run)
