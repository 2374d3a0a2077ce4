import json

import pytest

from jobs.cli import build_parser
from tests.conftest import run_fin

SUBCOMMANDS = ["simulate", "validate", "features", "convert-eleme", "train", "evaluate", "promote", "schedule", "runs", "serve", "score"]


def test_every_subcommand_has_help():
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)
    for cmd in SUBCOMMANDS:
        r = run_fin(cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: fin {cmd}")


@pytest.mark.parametrize("args, message", [
    (["validate", "--logs", "/nonexistent/logs"], "fin validate: error: log folder /nonexistent/logs does not exist"),
    (["simulate", "--out", "/tmp/unused", "--config", "/nonexistent.yaml"], "fin simulate: error:"),
])
def test_errors_are_one_line_with_a_nonzero_exit(args, message):
    r = run_fin(*args)
    assert r.returncode != 0
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_simulate_then_validate_end_to_end_quietly(tmp_path):
    out = tmp_path / "logs"
    r = run_fin("simulate", "--out", str(out), "--users", "20", "--days", "3", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when not on a terminal
    assert "behaviours" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3 and manifest["config"]["users"]["users"] == 20
    v = run_fin("validate", "--logs", str(out))
    assert v.returncode == 0, v.stderr
    assert (out / "validation.json").exists()
    again = run_fin("simulate", "--out", str(out), "--users", "20", "--days", "3")
    assert again.returncode == 1 and "exists" in again.stderr
