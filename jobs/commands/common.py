"""What every `fin` command shares: the command record, expected errors and exit codes, the progress bar,
time arguments and the result printer (text, or one JSON object with --json)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_VALIDATION_FAILED = 3
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """An expected failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Command:
    """One subcommand: its options next to its handler. `add_arguments` runs only for the command that is
    run (or asked for --help), so a command's config classes are imported only then."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    quiet_libraries: bool = False  # silence torch's and TorchRec's notices (commands that load models)


def progress(total: int | None, unit: str, desc: str):
    """A progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=None, file=sys.stderr, dynamic_ncols=True)


def time_ms(text: str) -> int:
    """Milliseconds since the epoch, from an integer or an ISO date/time (UTC unless an offset is given)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use milliseconds or ISO like 2026-03-02T00:00+08:00)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def field_default(cls: type, name: str) -> Any:
    """A dataclass field's default, also for classes with required fields (which cannot be made bare)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout (the usual text goes to stderr)")


def say(args: argparse.Namespace, text: str) -> None:
    """A line of a command's text: on stdout, or on stderr with --json (stdout then holds only the JSON)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def emit(args: argparse.Namespace, result: dict, text: str = "") -> None:
    """A command's result: `text` on stdout; with --json, `result` as one JSON line on stdout and `text`
    on stderr, where a job's log still has it (the JSON line is what a scheduler reads)."""
    if text:
        say(args, text)
    if getattr(args, "json", False):
        print(json.dumps(json_ready(result), sort_keys=True), flush=True)


def json_ready(value: Any) -> Any:
    """Strict JSON: paths as text, NaN and infinities (an AUC of one class, a lift over nothing) as null."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
