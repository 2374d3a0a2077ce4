"""`fin schedule`: the daily chain features -> embed -> train -> evaluate -> promote, one run of each job per
data date.

A data date is a local day of logs; at the local time `now`, the chain of yesterday is the one due (older
dates are not caught up: every job works on all logs so far, and the newest data supersedes them). A job
with a cron expression is due once it has fired after its data date ended; a job with `after` once that
job is done for the same date. Run state lives in a small sqlite database: run id = job:date, status,
attempts, outputs, timings, the error. A job done for a date is never run again; a failed one is retried
after `backoff_s x 2^(attempt - 1)` up to `retries` more times, then stays failed and is reported.

Each run is the `fin` command of its job with --json, its output in STATE/logs/; what the scheduler takes
from a run (the artifact, the report, the promotion decision) is the command's JSON result, the last line
of its output that is a JSON object (`command_result`). Without `ray_address` it runs
as a local process (the features job on a local Ray it starts); with `ray_address`, a cluster's dashboard
address, it is submitted to that cluster through Ray's job submission API (`jobs.ray_jobs`), the features
job joining the cluster it runs on. Embed puts every creative of the new features run (new ads included)
through the repository's creative encoder into the Feast item view (`fin embed-creatives`): a features run
replaces the dataset, and a model that reads creatives must find this run's embeddings; it is skipped, and
says why, when the logs have no creatives or the repository no encoder. Train makes a new version of
`model`, starting from the serving default's weights (`warm_start`) when that version reads the same inputs
(a creative embedding of the width this data has, or none), from scratch otherwise (the run says why);
evaluate scores it beside the current serving default (and `baselines`) with revenue replay; promote makes
it the default only through the gate (`fin.promotion`), and a running server picks the promotion up at its
next repository scan.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from cronsim import CronSim, CronSimError

from features import locks
from features.configfile import load_config, read_config_file
from features.dataset import Dataset
from features.item_embeddings import embeddings_width
from fin.promotion import PromotionGate
from fin.versions import META, promoted, versions
from fin.vision import ENCODER
from jobs.ray_jobs import RayJobTarget

JOBS = ("features", "embed", "train", "evaluate", "promote")


@dataclass(frozen=True)
class JobSpec:
    cron: str | None = None
    after: str | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    state: Path  # the run database; job logs go to STATE's folder / logs
    logs: Path
    features: Path
    models: Path
    reports: Path  # one evaluation report per data date
    model: str = "fin"
    baselines: tuple[str, ...] = ()  # other models of the repository evaluated beside it (newest versions)
    encoder: str = ENCODER  # the repository's creative encoder (its newest version embeds)
    features_args: tuple[str, ...] = ()
    embed_args: tuple[str, ...] = ()
    train_args: tuple[str, ...] = ()
    evaluate_args: tuple[str, ...] = ()
    ray_address: str | None = None  # a Ray cluster's dashboard (http://HEAD:8265): runs are submitted there
    ray_entrypoint: str = "fin"  # the fin command on the cluster's nodes
    ray_runtime_env: dict = field(default_factory=dict)  # passed to Ray's job submission as is
    warm_start: bool = True  # train from the serving default's weights (else from scratch)
    utc_offset_hours: float = 8.0  # the local time of cron expressions and data dates
    retries: int = 2
    backoff_s: float = 60.0
    timeout_s: float = 6 * 3600.0  # per run
    poll_s: float = 60.0  # seconds between checks of a long-running `fin schedule` (without --once)
    gate: PromotionGate = field(default_factory=PromotionGate)
    jobs: dict[str, JobSpec] = field(default_factory=lambda: {
        "features": JobSpec(cron="30 2 * * *"), "embed": JobSpec(after="features"), "train": JobSpec(after="embed"),
        "evaluate": JobSpec(after="train"), "promote": JobSpec(after="evaluate")})

    def __post_init__(self):
        if self.ray_address is not None:
            self.ray_target()  # fails early on an address that is not a dashboard's
            relative = [k for k in ("state", "logs", "features", "models", "reports")
                        if not getattr(self, k).is_absolute()]
            if relative:
                raise ValueError(f"with ray_address, {', '.join(relative)} must be absolute paths: "
                                 "the runs' commands run on the cluster, in another folder")
        for name, spec in self.jobs.items():
            if name not in JOBS:
                raise ValueError(f"unknown job {name!r}: jobs are {', '.join(JOBS)}")
            if spec.after is not None and spec.after not in self.jobs:
                raise ValueError(f"job {name} runs after {spec.after!r}, which is not scheduled")
            if spec.cron is None and spec.after is None:
                raise ValueError(f"job {name} needs a cron expression or a job to run after")
            if spec.cron is not None:
                check_cron(spec.cron)  # fails early on a bad expression

    def ray_target(self) -> RayJobTarget | None:
        return None if self.ray_address is None else RayJobTarget(self.ray_address, self.ray_entrypoint,
                                                                  self.ray_runtime_env)


def check_cron(expression: str) -> None:
    """A five-field cron expression (minute hour day-of-month month day-of-week), else ValueError."""
    if len(expression.split()) != 5:  # cronsim also takes a leading seconds field, which cron has not
        raise ValueError(f"cron expression {expression!r} needs 5 fields: minute hour day month weekday")
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except CronSimError as e:
        raise ValueError(f"cron expression {expression!r}: {e}") from None


def last_fire(expression: str, at_or_before: datetime) -> datetime | None:
    """The last time at or before `at_or_before` (naive, local) that the cron expression fired; None when
    it did not in 50 years. As in cron, when both day fields are restricted a day matches either."""
    # CronSim steps back one second before it looks for a match: start one second later, so that a fire
    # at `at_or_before` itself counts
    start = at_or_before.replace(microsecond=0) + timedelta(seconds=1)
    return next(CronSim(expression, start, reverse=True), None)


PATHS = ("state", "logs", "features", "models", "reports")
ARGUMENT_LISTS = ("baselines", "features_args", "embed_args", "train_args", "evaluate_args")


def load_schedule(path: str | Path) -> ScheduleConfig:
    """A schedule YAML file; relative paths are relative to the file's folder."""
    path = Path(path)
    raw = read_config_file(path)
    root = path.parent.absolute()
    # resolved before validation: with ray_address, ScheduleConfig itself insists on absolute paths
    raw.update({k: str(root / raw[k]) for k in PATHS if isinstance(raw.get(k), str)})
    # command-line arguments and model names are text, even where YAML reads a number (`--epochs`, 1)
    raw.update({k: [str(x) for x in raw[k]] for k in ARGUMENT_LISTS if isinstance(raw.get(k), list)})
    # `jobs:` left empty keeps the default chain; a job written with no settings is JobSpec()'s
    if not raw.get("jobs"):
        raw.pop("jobs", None)
    elif isinstance(raw["jobs"], dict):
        raw["jobs"] = {name: {} if spec is None else spec for name, spec in raw["jobs"].items()}
    return load_config(ScheduleConfig, raw, label=str(path))


class RunStore:
    """Run history in sqlite: one row per run (job, data date)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("""CREATE TABLE IF NOT EXISTS runs (
            run_id TEXT PRIMARY KEY, job TEXT, data_date TEXT, status TEXT, attempts INTEGER,
            next_attempt REAL, started REAL, finished REAL, seconds REAL, outputs TEXT, error TEXT)""")
        self.db.commit()

    def get(self, run_id: str) -> dict | None:
        cur = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([c[0] for c in cur.description], row))

    def put(self, run: dict) -> None:
        columns = list(run)
        self.db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [run[c] for c in columns])
        self.db.commit()

    def all(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY data_date, started")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def unfinished_dates(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT data_date FROM runs WHERE status = 'failed' AND next_attempt IS NOT NULL")]

    def close(self) -> None:
        self.db.close()


def _fin(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *args]


def command_result(output: str) -> dict:
    """What a fin command printed with --json: the last line of its output that is a JSON object. A Ray
    job's logs interleave the command's stderr and Ray's own lines with its stdout, so every line is tried."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict):
                return result
    raise RuntimeError("the command printed no JSON result")


class SchedulerBusy(RuntimeError):
    """Another scheduler holds the same state database."""


def _hold(state: Path):
    """An exclusive lock beside the state database, held while the scheduler lives: two schedulers on one state
    (a cron `--once` started again while the last still runs) each ran a due job for the same data date. The
    system drops the lock with its process, so a killed scheduler leaves none behind."""
    lock = locks.hold(Path(state).with_name(Path(state).name + ".lock"))
    if lock is None:
        raise SchedulerBusy(f"another fin schedule is running on {state}")
    return lock


class Scheduler:
    def __init__(self, config: ScheduleConfig, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 say: Callable[[str], None] = lambda _: None):
        self.config, self.clock, self.say = config, clock, say
        self._lock = _hold(config.state)
        self.store = RunStore(config.state)
        self.ray = config.ray_target()
        self.ray_job: str | None = None  # the submission id of the run in progress, when submitted to Ray
        self.order = self._order()

    def _order(self) -> list[str]:
        """Jobs, each after the one it depends on."""
        done: list[str] = []
        while len(done) < len(self.config.jobs):
            ready = [n for n, s in self.config.jobs.items() if n not in done and (s.after is None or s.after in done)]
            if not ready:
                raise ValueError("the schedule's job dependencies form a cycle")
            done += ready
        return done

    def _local(self, t: datetime) -> datetime:
        return (t.astimezone(UTC) + timedelta(hours=self.config.utc_offset_hours)).replace(tzinfo=None)

    def tick(self) -> list[dict]:
        """Run every job that is due now (in dependency order, each date's chain as far as it goes);
        returns the runs made."""
        now = self._local(self.clock())
        dates = sorted({(now.date() - timedelta(days=1)).isoformat(), *self.store.unfinished_dates()})
        made = []
        for day in dates:
            for job in self.order:
                run = self._maybe_run(job, day, now)
                if run is not None:
                    made.append(run)
        return made

    def _due(self, job: str, day: str, now: datetime) -> bool:
        spec = self.config.jobs[job]
        if spec.after is not None:
            before = self.store.get(f"{spec.after}:{day}")
            if before is None or before["status"] != "done":
                return False
        if spec.cron is not None:  # due once it fired after the data date ended
            day_end = datetime.combine(date.fromisoformat(day) + timedelta(days=1), datetime.min.time())
            fired = last_fire(spec.cron, now)
            return fired is not None and fired >= day_end
        return True

    def _maybe_run(self, job: str, day: str, now: datetime) -> dict | None:
        run_id = f"{job}:{day}"
        previous = self.store.get(run_id)
        if previous is not None and (previous["status"] == "done" or previous["next_attempt"] is None
                                     or self._local(datetime.fromtimestamp(previous["next_attempt"], UTC))
                                     > now):
            return None
        if not self._due(job, day, now):
            return None
        attempts = (previous["attempts"] if previous else 0) + 1
        started = self.clock().timestamp()
        self.say(f"{run_id}: attempt {attempts}")
        t = time.perf_counter()
        self.ray_job = None
        try:
            outputs, error = getattr(self, f"_{job}")(day, attempts), None
            if self.ray_job:
                outputs["ray_job"] = self.ray_job
        except Exception as e:  # noqa: BLE001 - a failed run is recorded and retried, the scheduler goes on
            outputs, error = {}, str(e)
        seconds = time.perf_counter() - t
        retry = error is not None and attempts <= self.config.retries
        run = {"run_id": run_id, "job": job, "data_date": day, "status": "failed" if error else "done",
               "attempts": attempts, "started": started, "finished": started + seconds,
               "next_attempt": started + self.config.backoff_s * 2 ** (attempts - 1) if retry else None,
               "seconds": round(seconds, 3), "outputs": json.dumps(outputs), "error": error}
        self.store.put(run)
        self.say(f"{run_id}: {run['status']}" + (f" ({error.splitlines()[-1] if error else ''})" if error else ""))
        return run

    # ---------------------------------------------------------------------------- the jobs
    def _command(self, run_id: str, attempt: int, args: list[str]) -> dict:
        """Run one fin command with --json, locally or as a Ray job; its output goes to
        STATE/logs/<run>.<attempt>.log. Returns the command's JSON result."""
        logs = self.config.state.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{run_id.replace(':', '_')}.{attempt}.log"
        args = [*args, "--json"]
        if self.ray is None:
            proc = subprocess.run(_fin(*args), capture_output=True, text=True, timeout=self.config.timeout_s,
                                  check=False)
            output, stdout = proc.stdout + proc.stderr, proc.stdout
            failure = f"exited {proc.returncode}" if proc.returncode else None
            last = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1]
        else:
            job = self.ray.run(args, f"fin-{run_id.replace(':', '-')}-{attempt}", self.config.timeout_s)
            self.ray_job = job.submission_id
            output = stdout = job.logs if job.ok else f"{job.logs}\n{job.message}"
            failure, last = None if job.ok else f"Ray job {job.submission_id} {job.status.lower()}", job.last_line
            self.say(f"{run_id}: Ray job {job.submission_id} {job.status.lower()}")
        log.write_text(output)
        if failure:
            raise RuntimeError(f"fin {args[0]} {failure}: {last}")
        try:
            return command_result(stdout)
        except RuntimeError as e:
            raise RuntimeError(f"fin {args[0]}: {e}") from None

    def _outputs(self, job: str, day: str) -> dict:
        return json.loads(self.store.get(f"{job}:{day}")["outputs"])

    def _features(self, day: str, attempt: int) -> dict:
        c = self.config
        ray = ["--ray-address", "auto"] if self.ray else []  # as a Ray job: join the cluster it runs on
        result = self._command(f"features:{day}", attempt, ["features", "--logs", str(c.logs),
                                                            "--out", str(c.features), *ray, *c.features_args])
        return {"features": result["out"], "users": result["users"], "examples": result["examples"]}

    def _embed(self, day: str, attempt: int) -> dict:
        c = self.config
        if not Dataset.at(c.features).creatives.exists():
            return {"skipped": "the features run has no creatives"}
        encoder = c.models / c.encoder
        if not versions(c.models, c.encoder):
            return {"skipped": f"no creative encoder at {encoder} (fin train-encoder)"}
        ray = ["--ray-address", "auto"] if self.ray else []
        result = self._command(f"embed:{day}", attempt, ["embed-creatives", "--data", str(c.features),
                                                         "--encoder", str(encoder), *ray, *c.embed_args])
        return {"encoder": result["encoder"], "creatives": result["creatives"], "dim": result["dim"]}

    def _image_width(self) -> int:
        """The width of the creative embeddings this run's training reads (0: none)."""
        if "--no-images" in self.config.train_args:
            return 0
        return embeddings_width(Dataset.at(self.config.features))

    def _train(self, day: str, attempt: int) -> dict:
        c = self.config
        current = promoted(c.models, c.model) if c.warm_start else None
        outputs: dict = {}
        if current is not None:
            meta = json.loads((c.models / c.model / str(current) / META).read_text())
            width, reads = meta["model_config"].get("image_dim", 0), self._image_width()
            if width != reads:  # its weights do not fit this run's model: start afresh rather than fail every day
                outputs["init_skipped"] = (f"{c.model}/{current} reads creative embeddings of width {width}, "
                                           f"this run {reads}: trained from scratch")
                current = None
        start = ["--init-from", str(c.models / c.model / str(current))] if current else []
        result = self._command(f"train:{day}", attempt, ["train", "--data", str(c.features), "--out", str(c.models),
                                                         "--model", c.model, "--name", c.model, *start, *c.train_args])
        return {"artifact": result["artifact"], "version": result["version"], "init_from": current,
                "metrics": result["metrics"], **outputs}

    def _evaluate(self, day: str, attempt: int) -> dict:
        c = self.config
        new = self._outputs("train", day)["version"]
        current = promoted(c.models, c.model)
        specs = [f"{c.model}/{new}", *([f"{c.model}/{current}"] if current not in (None, new) else []),
                 *c.baselines]
        result = self._command(f"evaluate:{day}", attempt, [
            "evaluate", "--data", str(c.features), "--repo", str(c.models), "--models", *specs,
            "--out", str(c.reports / day), *c.evaluate_args])
        return {"report": result["report"], "models": specs}

    def _promote(self, day: str, attempt: int) -> dict:
        c = self.config
        new, report = self._outputs("train", day)["version"], self._outputs("evaluate", day)["report"]
        # the decision comes from the command's JSON result (promotion.json beside the report is for people)
        result = self._command(f"promote:{day}", attempt, [
            "promote", "--models", str(c.models), "--name", c.model, "--version", str(new), "--report", report,
            "--auc-tolerance", str(c.gate.auc_tolerance), "--rpm-tolerance", str(c.gate.rpm_tolerance)])
        return {"version": new, "promoted": result["promoted"], "reasons": result["decision"]["reasons"]}

    def close(self) -> None:
        self.store.close()
        self._lock.close()
