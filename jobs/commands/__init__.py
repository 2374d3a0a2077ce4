"""The `fin` subcommands, one module each: a command's options (`add_arguments`) sit next to its handler
(`run`). Modules import only the standard library at import time; config classes (for the options'
defaults) and the libraries a command needs are imported when that command runs."""

from jobs.commands import (
    add_onnx,
    convert_eleme,
    creatives,
    evaluate,
    features,
    ingest,
    promote,
    schedule,
    score,
    serve,
    simulate,
    train,
    validate,
)
from jobs.commands.common import Command

# in the order `fin --help` lists them
COMMANDS: tuple[Command, ...] = (
    simulate.COMMAND, validate.COMMAND, features.COMMAND, creatives.TRAIN, creatives.EMBED, train.COMMAND, evaluate.COMMAND, serve.COMMAND,
    promote.COMMAND, schedule.SCHEDULE, schedule.RUNS, score.COMMAND, ingest.COMMAND, add_onnx.COMMAND, convert_eleme.COMMAND,
)
