"""The `fin` command line: the parser assembled from the commands of `jobs.commands`, and `main`.

Errors are printed as one line (`fin <command>: error: ...`) with a non-zero exit status; set
FIN_DEBUG=1 to see the traceback instead. Progress bars go to stderr and only on a terminal. Job
commands take --json: their result as one JSON object on stdout (what `fin schedule` reads).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection

from jobs.commands import COMMANDS
from jobs.commands.common import EXIT_ERROR, EXIT_INTERRUPTED, CommandError


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `only`, the options of those commands alone (the others are listed by
    name and help): a command's options read its config classes' defaults, which may import a lot."""
    parser = argparse.ArgumentParser(prog="fin", description="FIN ads ranking system: simulate, validate and "
                                     "convert food-ordering ad logs, build features, train, evaluate and serve models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        if only is None or command.name in only:
            command.add_arguments(p)
        p.set_defaults(command_spec=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the top-level parser has no options but --help: the first other word names the command
    named = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only={named} if named else set()).parse_args(argv)
    command = args.command_spec
    if command.quiet_libraries:
        from fin.quiet import quiet_library_notices

        quiet_library_notices()
    try:
        return command.run(args)
    except CommandError as e:
        print(f"fin {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"fin {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one clear line for the user; the traceback on request
        if os.environ.get("FIN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fin {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
