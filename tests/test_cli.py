import json
import subprocess
import sys
from pathlib import Path

import pytest

from fin.versions import promoted
from jobs.cli import build_parser
from tests.conftest import ROOT, TRAIN_CONFIG, run_fin

SUBCOMMANDS = ["simulate", "validate", "features", "convert-eleme", "add-onnx", "train-encoder", "embed-creatives",
               "train", "evaluate", "promote", "schedule", "runs", "serve", "score", "ingest"]


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


def _result(r) -> dict:
    """A --json run's result: stdout is exactly one line, a JSON object."""
    assert r.returncode in (0, 1, 3), r.stderr
    assert r.stdout.count("\n") == 1, r.stdout
    result = json.loads(r.stdout)
    assert isinstance(result, dict)
    return result


def test_simulate_and_validate_print_their_result_as_json(tmp_path):
    out = tmp_path / "logs"
    r = run_fin("simulate", "--out", str(out), "--users", "20", "--days", "3", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    result = _result(r)
    assert result["command"] == "simulate" and result["out"] == str(out) and result["days"] == 3
    assert result["rows"]["users"] == 20 and result["rows"]["behaviours"] > 0 and result["requests"] > 0
    assert result["seconds"] > 0
    assert r.stderr.startswith(f"wrote {out}: ")  # the usual text, for logs

    v = run_fin("validate", "--logs", str(out), "--out", str(tmp_path / "checked"), "--json")
    result = _result(v)
    assert v.returncode == 0 and result["passed"] is True and result["failed_tables"] == []
    assert Path(result["summary"]) == tmp_path / "checked" / "validation.json" and Path(result["summary"]).exists()
    assert result["tables"]["impressions"]["rows"] > 0 and "quarantined" in result["tables"]["impressions"]

    # a failed validation still prints its result, then the one-line error and exit status 3
    v = run_fin("validate", "--logs", str(out), "--out", str(tmp_path / "strict"), "--max-bad-fraction", "-1",
                "--json")
    assert v.returncode == 3
    result = _result(v)
    assert result["passed"] is False and "impressions" in result["failed_tables"]
    assert v.stderr.splitlines()[-1].startswith("fin validate: error: bad-row fraction above")


def test_convert_eleme_prints_its_result_as_json(tmp_path):
    out = tmp_path / "logs"
    r = run_fin("convert-eleme", "--csv", str(ROOT / "tests" / "fixtures" / "eleme_sample.csv"), "--out", str(out),
                "--json")
    assert r.returncode == 0, r.stderr
    result = _result(r)
    assert result["out"] == str(out) and result["rows"]["impressions"] > 0 and result["quarantined_rows"] > 0
    assert Path(result["quarantine"]).exists()


def test_the_chain_s_commands_print_what_the_scheduler_reads(features_logs, tmp_path):
    """features -> train -> evaluate -> promote as `fin schedule` runs them: each --json result holds the
    fields the scheduler takes (output folder, artifact and version, report, promotion decision)."""
    features, models = tmp_path / "features", tmp_path / "models"
    r = run_fin("features", "--logs", str(features_logs), "--out", str(features), "--max-seq-len", "50",
                "--partitions", "2", "--validation-days", "3", "--test-days", "3", "--num-cpus", "2",
                "--no-materialize", "--json")
    assert r.returncode == 0, r.stderr
    result = _result(r)
    assert result["out"] == str(features) and result["data"] == str(features / "data")
    assert 0 < result["users"] <= 60 and result["examples"]["train"] > 0 and result["seconds"] > 0
    assert "wrote" in r.stderr

    config = tmp_path / "train.yaml"
    config.write_text(json.dumps(TRAIN_CONFIG))
    trained = []
    for extra in ([], ["--init-from", str(models / "fin" / "1")]):
        r = run_fin("train", "--data", str(features), "--out", str(models), "--config", str(config), *extra, "--json")
        assert r.returncode == 0, r.stderr
        trained.append(_result(r))
    first, second = trained
    assert (first["model"], first["name"], first["version"]) == ("fin", "fin", 1) and first["init_from"] is None
    assert first["artifact"] == str(models / "fin" / "1") and 0 <= first["metrics"]["validation_auc"] <= 1
    assert second["version"] == 2 and second["init_from"] == str(models / "fin" / "1")

    r = run_fin("promote", "--models", str(models), "--name", "fin", "--version", "1", "--json")
    result = _result(r)
    assert result["promoted"] is True and result["decision"] is None and promoted(models, "fin") == 1

    report = tmp_path / "report"
    r = run_fin("evaluate", "--data", str(features), "--repo", str(models), "--models", "fin/2", "fin/1",
                "--out", str(report), "--bootstrap", "5", "--json")
    assert r.returncode == 0, r.stderr
    result = _result(r)
    assert result["report"] == str(report / "report.json") and Path(result["report"]).exists()
    assert set(result["models"]) == {"fin/1", "fin/2"} and 0 <= result["models"]["fin/2"]["auc"] <= 1
    assert set(result["snips_rpm"]) >= {"fin/1", "fin/2"}
    assert "| fin/2 |" in r.stderr  # the markdown report, for logs

    # a gate no version passes (it must gain 1 AUC): kept, not promoted, and the reasons say why
    r = run_fin("promote", "--models", str(models), "--name", "fin", "--version", "2", "--report",
                result["report"], "--auc-tolerance", "-1", "--json")
    assert r.returncode == 0, r.stderr
    result = _result(r)
    assert result["promoted"] is False and result["decision"]["promote"] is False
    assert any("AUC" in reason for reason in result["decision"]["reasons"]) and promoted(models, "fin") == 1
    assert Path(result["decision_file"]) == report / "promotion.json"


def test_schedule_once_prints_its_runs_as_json(tmp_path):
    schedule = tmp_path / "jobs.yaml"
    schedule.write_text("state: state/runs.sqlite\nlogs: no-logs\nfeatures: f\nmodels: m\nreports: r\nretries: 0\n"
                        "jobs: {features: {cron: '* * * * *'}, train: {after: features}}\n")
    r = run_fin("schedule", "--config", str(schedule), "--once", "--json")
    assert r.returncode == 1  # a run failed for good
    result = _result(r)
    (run,) = result["runs"]
    assert run["run_id"].startswith("features:") and run["status"] == "failed" and run["outputs"] == {}
    assert "does not exist" in run["error"] and result["failed_for_good"] == [run["run_id"]]
    assert "attempt 1" in r.stderr  # the scheduler's progress lines leave stdout to the JSON
    r = run_fin("schedule", "--config", str(schedule), "--json")
    assert r.returncode == 1 and r.stderr == "fin schedule: error: --json needs --once (one run of the scheduler, " \
                                             "one result)\n"


def test_promote_and_help_import_no_torch(tmp_path):
    (tmp_path / "fin" / "1").mkdir(parents=True)
    code = ("import sys; from jobs.cli import main; "
            f"assert main(['promote', '--models', {str(tmp_path)!r}, '--name', 'fin', '--version', '1']) == 0; "
            "print(sorted(m for m in ('torch', 'polars', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]" and "version 1 is the default" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    assert r.returncode == 0 and r.stdout.startswith("usage: fin") and "convert-eleme" in r.stdout
