"""`fin schedule`: cron expressions, and two simulated days through features -> embed -> train -> evaluate -> promote
on a fake clock, against the real jobs (the features job on a real local Ray): a failed run is retried
after its backoff, a done run never again, a worse model is kept but not promoted, and training starts
from the serving default's weights; the third day's runs are submitted to a Ray cluster (a real local head
with its dashboard on 127.0.0.1) through Ray's job submission API. The repository has no creative encoder here:
embed is done and says it skipped (tests/test_creatives.py runs it with one)."""

import dataclasses
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from features.simulator import load_sim_config, simulate
from fin.promotion import PromotionGate
from fin.versions import promoted
from jobs.ray_jobs import RayJobResult
from jobs.schedule import (
    JobSpec,
    ScheduleConfig,
    Scheduler,
    SchedulerBusy,
    check_cron,
    command_result,
    last_fire,
    load_schedule,
)
from tests.conftest import ROOT, Clock, RayHead, errors, outcomes, run_fin


def test_cron_last_fire():
    daily = "30 2 * * *"
    assert last_fire(daily, datetime(2026, 3, 5, 2, 30)) == datetime(2026, 3, 5, 2, 30)  # a fire at the moment counts
    assert last_fire(daily, datetime(2026, 3, 5, 2, 30, 0, 500)) == datetime(2026, 3, 5, 2, 30)
    assert last_fire(daily, datetime(2026, 3, 5, 2, 29, 59)) == datetime(2026, 3, 4, 2, 30)
    assert last_fire("0 */6 * * 1-5", datetime(2026, 11, 28, 7, 1)) == datetime(2026, 11, 27, 18, 0)  # Saturday
    assert last_fire("0 9 * * 0", datetime(2026, 11, 27, 7, 1)) == datetime(2026, 11, 22, 9, 0)  # Sunday
    assert last_fire("0 9 * * 7", datetime(2026, 11, 27, 7, 1)) == datetime(2026, 11, 22, 9, 0)  # 7 is Sunday too
    assert last_fire("0 0 1,15 * *", datetime(2026, 11, 27)) == datetime(2026, 11, 15)
    # both day fields restricted: the 14th OR a Friday (2026-11-13 is a Friday, the 14th a Saturday)
    assert last_fire("0 0 14 * 5", datetime(2026, 11, 19)) == datetime(2026, 11, 14)
    assert last_fire("0 0 14 * 5", datetime(2026, 11, 13, 12)) == datetime(2026, 11, 13)
    with pytest.raises(ValueError, match="Bad minute"):
        check_cron("61 * * * *")
    with pytest.raises(ValueError, match="5 fields"):
        check_cron("* * *")
    with pytest.raises(ValueError, match="5 fields"):
        check_cron("0 30 2 * * *")  # a seconds field is not cron's
    with pytest.raises(ValueError, match="cron expression"):
        ScheduleConfig(state=Path("s"), logs=Path("l"), features=Path("f"), models=Path("m"), reports=Path("r"),
                       jobs={"features": JobSpec(cron="30 25 * * *")})


def test_the_shipped_schedule_loads():
    config = load_schedule(ROOT / "configs" / "jobs.yaml")
    assert config.model == "fin" and config.jobs["promote"].after == "evaluate"
    assert config.logs == ROOT / "configs" / ".." / "demo_out" / "logs"


def test_one_scheduler_at_a_time_runs_on_a_state(tmp_path):
    """A second scheduler on the same state database is refused while the first lives (two `--once` from cron
    each ran the same due job for the same date); `fin schedule --once` then runs nothing and exits 0; once
    the first is gone, the next one starts."""
    config = dataclasses.replace(load_schedule(ROOT / "configs" / "jobs.yaml"), state=tmp_path / "runs.sqlite",
                                 jobs={"features": JobSpec(cron="30 2 * * *")})
    first = Scheduler(config)
    with pytest.raises(SchedulerBusy, match="another fin schedule is running"):
        Scheduler(config)
    (tmp_path / "jobs.yaml").write_text((ROOT / "configs" / "jobs.yaml").read_text().replace(
        "../demo_out/schedule/runs.sqlite", str(tmp_path / "runs.sqlite")))
    busy = run_fin("schedule", "--config", str(tmp_path / "jobs.yaml"), "--once")
    assert busy.returncode == 0 and "another fin schedule is running" in busy.stdout + busy.stderr
    first.close()
    Scheduler(config).close()


def test_a_ray_jobs_last_line_is_the_commands():
    """Ray's own lines in a job's logs come in any order with the command's; a failed job's message ends
    with the logs' tail when the logs came too early to hold it."""
    ray_lines = ("2026-11-27 10:28:05,976\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
                 "Running entrypoint for job fin-x-1: fin-x features\n")
    error = "/bin/sh: 1: fin-x: not found"
    assert RayJobResult("fin-x-1", "FAILED", f"{error}\n{ray_lines}", "").last_line == error
    message = f"Job entrypoint command failed with exit code 127, last available logs:\n{ray_lines}{error}\n"
    assert RayJobResult("fin-x-1", "FAILED", ray_lines, message).last_line == error


def test_a_commands_json_result_is_found_among_the_other_lines():
    """A Ray job's logs interleave the command's stderr and Ray's own lines with its stdout: the result is
    the last line that is a JSON object."""
    logs = ("2026-11-27 10:28:05,976\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
            '{"command": "train", "version": 1}\n'
            '{"command": "train", "version": 2, "artifact": "/m/fin/2"}\n'
            "epoch 1/1: train logloss 0.41\n"
            "[1, 2]\n"
            "{not json}\n"
            "wrote /m/fin/2 (best epoch 1, validation AUC 0.61)\n")
    assert command_result(logs) == {"command": "train", "version": 2, "artifact": "/m/fin/2"}
    with pytest.raises(RuntimeError, match="no JSON result"):
        command_result("wrote /m/fin/2\n[1, 2]\n")


@pytest.mark.integration  # the real chain: Ray, Feast, training and a Ray cluster
def test_two_days_through_the_chain(tmp_path):
    logs = tmp_path / "logs"
    sim = dict(days=24, **{"users.users": 200})  # 2026-03-02 .. 2026-03-25
    simulate(load_sim_config(**sim), logs)
    config = ScheduleConfig(
        state=tmp_path / "schedule" / "runs.sqlite", logs=logs, features=tmp_path / "features",
        models=tmp_path / "models", reports=tmp_path / "reports",
        features_args=("--max-seq-len", "50", "--partitions", "2", "--validation-days", "2", "--test-days", "4",
                       "--num-cpus", "2", "--no-materialize"),
        train_args=("--epochs", "1", "--max-steps", "60", "--batch-size", "256", "--max-seq-len", "50", "--no-compile"),
        evaluate_args=("--bootstrap", "20"), retries=1, backoff_s=600,
        gate=PromotionGate(auc_tolerance=0.01, rpm_tolerance=1.0))
    clock = Clock(datetime(2026, 3, 26, 1, 0))  # local time, before the 02:30 cron
    scheduler = Scheduler(config, clock)
    assert scheduler.tick() == []  # nothing due yet

    # day 1 (data date 2026-03-25): a corrupt log file fails the features run; it is retried after its backoff
    part = min((logs / "behaviours").rglob("*.parquet"))
    saved = part.read_bytes()
    part.write_bytes(b"not parquet")
    clock.advance(hours=2)  # 03:00
    runs = scheduler.tick()
    assert [(r["run_id"], r["status"]) for r in runs] == [("features:2026-03-25", "failed")]
    assert runs[0]["next_attempt"] is not None and "fin features exited" in runs[0]["error"]
    part.write_bytes(saved)
    clock.advance(minutes=5)
    assert scheduler.tick() == []  # still backing off
    clock.advance(minutes=6)
    runs = scheduler.tick()
    assert outcomes(runs) == [("features", "done"), ("embed", "done"), ("train", "done"),
                                                        ("evaluate", "done"), ("promote", "done")], errors(runs)
    assert scheduler.store.get("features:2026-03-25")["attempts"] == 2
    assert "no creative encoder" in scheduler.store.get("embed:2026-03-25")["outputs"]
    assert promoted(config.models, "fin") == 1  # the first version: nothing to compare with
    assert scheduler.tick() == []  # done runs are not run again

    # day 2 (2026-03-26): new logs arrive; this day's model starts from scratch and is not trained
    # (learning rates 0): worse
    shutil.rmtree(logs)
    simulate(load_sim_config(**{**sim, "days": 25}), logs)
    untrained = dataclasses.replace(config, train_args=(*config.train_args, "--lr", "0", "--sparse-lr", "0"),
                                    warm_start=False)
    scheduler.close()
    scheduler = Scheduler(untrained, clock)
    clock.advance(days=1)
    runs = scheduler.tick()
    assert outcomes(runs) == [("features", "done"), ("embed", "done"), ("train", "done"),
                                                        ("evaluate", "done"), ("promote", "done")], errors(runs)
    outputs = scheduler.store.get("promote:2026-03-26")["outputs"]
    assert '"promoted": false' in outputs and "AUC" in outputs
    assert promoted(config.models, "fin") == 1 and (config.models / "fin" / "2").is_dir()  # kept, not promoted
    assert (config.reports / "2026-03-26" / "report.md").exists()
    scheduler.close()

    # day 3, submitted to a Ray cluster (a local head with its dashboard on 127.0.0.1) through Ray's job
    # submission API: warm start from the serving default (fin/1) with learning rates 0 gives fin/1's model
    # again: not worse, promoted. The first attempt's job fails on the cluster (no such command there).
    head = RayHead()
    try:
        warm = dataclasses.replace(untrained, warm_start=True, ray_address=head.address)
        scheduler = Scheduler(dataclasses.replace(warm, ray_entrypoint="fin-not-installed"), clock)
        clock.advance(days=1)
        runs = scheduler.tick()
        assert [(r["run_id"], r["status"]) for r in runs] == [("features:2026-03-27", "failed")]
        assert "fin features Ray job fin-features-2026-03-27-1-" in runs[0]["error"], runs[0]["error"]
        assert "failed" in runs[0]["error"] and "not found" in runs[0]["error"]
        scheduler.close()

        scheduler = Scheduler(warm, clock)
        clock.advance(minutes=11)
        runs = scheduler.tick()
        assert outcomes(runs) == [("features", "done"), ("embed", "done"), ("train", "done"),
                                                            ("evaluate", "done"), ("promote", "done")], errors(runs)
        assert '"init_from": 1' in scheduler.store.get("train:2026-03-27")["outputs"]
        assert '"ray_job": "fin-train-2026-03-27-1-' in scheduler.store.get("train:2026-03-27")["outputs"]
        assert promoted(config.models, "fin") == 3
        assert "wrote" in (config.state.parent / "logs" / "features_2026-03-27.2.log").read_text()
        scheduler.close()

        jobs = {j.submission_id.rsplit("-", 1)[0]: j for j in JobSubmissionClient(head.address).list_jobs()}
        assert sorted((name, j.status.name) for name, j in jobs.items()) == [
            ("fin-evaluate-2026-03-27-1", "SUCCEEDED"), ("fin-features-2026-03-27-1", "FAILED"),
            ("fin-features-2026-03-27-2", "SUCCEEDED"), ("fin-promote-2026-03-27-1", "SUCCEEDED"),
            ("fin-train-2026-03-27-1", "SUCCEEDED")]
        # the features job joined the cluster it ran on instead of starting a Ray of its own
        assert jobs["fin-features-2026-03-27-2"].entrypoint.startswith("fin features --logs")
        assert "--ray-address auto" in jobs["fin-features-2026-03-27-2"].entrypoint
    finally:
        head.stop()
    with pytest.raises(ValueError, match="dashboard"):
        dataclasses.replace(config, ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="absolute"):
        dataclasses.replace(warm, logs=Path("logs"))

    yaml = tmp_path / "jobs.yaml"
    yaml.write_text("\n".join(f"{k}: {Path(v).resolve()}" for k, v in (
        ("state", config.state), ("logs", logs), ("features", config.features), ("models", config.models),
        ("reports", config.reports))))
    listing = run_fin("runs", "--config", str(yaml))
    assert listing.returncode == 0 and listing.stdout.count("| done |") == 15, listing.stdout + listing.stderr
    assert "features:2026-03-25 | done | 2 |" in listing.stdout

