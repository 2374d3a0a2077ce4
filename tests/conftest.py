import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.simulator import load_sim_config, simulate
from jobs.features_job import FeaturesConfig, run_features
from serving.metrics import scrape
from serving.pb import ctr_scoring_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
# fixtures that simulate a city, run the features job (Ray, Feast), train models or start services: a test
# using one is in the integration tier, which `make test` runs and `make test-fast` skips
INTEGRATION_FIXTURES = frozenset({"default_logs", "features_logs", "features_job", "trained_models", "redis_server"})


# the test files that take longest, longest first (seconds in one process on 2 cores, 2026-12-07: 310, 215,
# 210, 165, 120, 110, 110, 105, 90; the rest under 70): `make test` hands whole files to two processes
# (pytest-xdist --dist loadfile) in collection order, and they end together when no long file starts last
LONGEST_FILES = ("test_ingest.py", "test_creatives.py", "test_schedule.py", "test_serving.py", "test_models.py",
                 "test_features_job.py", "test_cli.py", "test_batching.py", "test_train.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    first = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONGEST_FILES)))  # stable: a file's order kept


@pytest.fixture(scope="session")
def default_logs(tmp_path_factory) -> Path:
    """The embedded default simulation (what `make demo` generates)."""
    out = tmp_path_factory.mktemp("default") / "logs"
    simulate(load_sim_config(), out)
    return out


@pytest.fixture(scope="session")
def small_logs(tmp_path_factory) -> Path:
    """A few users over a week: fast to build, enough rows of every table."""
    out = tmp_path_factory.mktemp("small") / "logs"
    simulate(load_sim_config(days=7, **{"users.users": 40}), out)
    return out


def run_fin(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The installed console command, as a user runs it (stdout/stderr are pipes, not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "FIN_DEBUG"}
    fin = Path(sys.executable).parent / "fin"
    return subprocess.run([str(fin), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


FEATURES_CONFIG = FeaturesConfig(max_seq_len=50, partitions=3, validation_days=3, test_days=3, num_cpus=2)


@pytest.fixture(scope="session")
def features_logs(tmp_path_factory) -> Path:
    """Two weeks of 60 users: every split has examples."""
    out = tmp_path_factory.mktemp("flogs") / "logs"
    simulate(load_sim_config(days=14, **{"users.users": 60}), out)
    return out


@pytest.fixture(scope="session")
def features_job(features_logs, tmp_path_factory):
    """The features job's output over `features_logs` (real local Ray, real Feast)."""
    out = tmp_path_factory.mktemp("fout") / "out"
    return out, run_features(features_logs, out, FEATURES_CONFIG)


# compile=False: the artifacts of these tests are scored eagerly, and each package build takes ~15 s here;
# `trained_models` builds the packages the serving tests score with
# 30 steps (about the whole train split): AUCs clearly away from 0.5 (the promotion gate test compares a version
# with its negation)
TRAIN_CONFIG = dict(epochs=1, max_steps=30, compile=False, loader=dict(batch_size=64, max_seq_len=50, fragments=dict(
    full_len=50, location_len=20, meal_len=20, recent_len=10, integrated_len=20)),
    model_config=dict(dim=16, heads=2, tower=[32], sim_len=10, embeddings=dict(dim=8)))


@pytest.fixture(scope="session")
def trained_models(features_job, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Small FIN and DNN artifacts trained for a few steps on `features_job` (one worker, gloo), each with
    its compiled scoring package."""
    from fin.train import load_train_config, train

    out, _ = features_job
    models = tmp_path_factory.mktemp("models")
    return models, {kind: train(out / "data", models, load_train_config(None, **{**TRAIN_CONFIG, "model": kind, "compile": True}))
                    for kind in ("fin", "dnn")}


class Running:
    """`fin serve` as a user starts it, on 127.0.0.1 and a free port, with clients for its services."""

    started: "list[Running]" = []  # every server the tests started (`_no_server_outlives_its_test`)

    def __init__(self, models: Path, feast_repo: Path, *args: str, credentials=None):
        fin = Path(sys.executable).parent / "fin"
        # (stderr to a file, not a pipe: a server that logs more than a pipe holds before the test reads it would
        # block on its next log line)
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(fin), "serve", "--models", str(models), "--feast-repo", str(feast_repo),
                                      "--port", "0", "--poll-s", "0.3", *args],
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        Running.started.append(self)
        line = self.proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line + self.logged()
        self.addr = line.split()[2].rstrip(";")
        self.metrics_urls = line.split("metrics on ")[1].split()  # one per server process
        self.channel = (grpc.secure_channel(f"localhost:{self.addr.rsplit(':', 1)[1]}", credentials) if credentials
                        else grpc.insecure_channel(self.addr))
        self.stub = ctr_scoring_pb2_grpc.CtrScoringStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service="fin_ads.v1.CtrScoring"), timeout=5).status

    def metric(self, name: str, process: int = 0, **labels) -> float:
        """One sample of a server process's Prometheus metrics (0 when absent)."""
        return scrape(self.metrics_urls[process], name, **labels)

    def stop(self, close_channel: bool = True) -> tuple[int, str]:
        """SIGTERM, as an orchestrator stops the server; its exit status and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)
        if close_channel:
            self.channel.close()
        return self.proc.returncode, self.logged()

    def logged(self) -> str:
        """What the server wrote to stderr so far."""
        self.stderr.seek(0)
        return self.stderr.read()


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    """A test that fails before it stops its server must not leave `fin serve` running: a server the test
    started (module fixtures' servers start before it) and left running is stopped when the test ends."""
    before = len(Running.started)
    yield
    for running in Running.started[before:]:
        if running.proc.poll() is None:
            running.proc.send_signal(signal.SIGTERM)  # its other processes stop with it
            try:
                running.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                running.proc.kill()
                running.proc.communicate()
    del Running.started[before:]


def wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that take a port, not port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A local redis-server on 127.0.0.1 that keeps its data across a stop and a start (append-only file)."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server is missing: `make test` installs it (Debian package redis-server)"
        self.folder = folder
        self.port = free_port()
        self.proc = None

    def start(self) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen([self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "yes", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    if server.proc.poll() is None:
        server.stop()


class RayHead:
    """`ray start --head` as an operator runs it: the dashboard (job submission API) on 127.0.0.1 only."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="fin-ray-")  # short: Ray's socket paths must fit 107 bytes
        # the dashboard agent's HTTP port too: at its default (52365) it collides with any other local Ray (a
        # features job in the other test process), and the head then has no agent to take jobs
        ports = [free_port(), free_port(), free_port()]
        self.address = f"http://127.0.0.1:{ports[1]}"
        bin_dir = Path(sys.executable).parent
        # the job drivers run `fin` from the head's PATH; auth is off on this loopback-only test cluster
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.ray = str(bin_dir / "ray")
        started = subprocess.run(
            [self.ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports[0]),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports[1]), "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(ports[2]),
             "--num-cpus", "2", "--temp-dir", self.folder, "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr

    def stop(self) -> None:
        """Kills this head's processes alone: those whose command line names its folder (the GCS server, the
        raylet, the dashboard) and all they started (workers, which retitle themselves, and job drivers).
        `ray stop` would kill every Ray on the machine: the other test process's local Rays with them."""
        def names_folder(process: psutil.Process) -> bool:
            try:
                return any(self.folder in arg for arg in process.cmdline())
            except psutil.Error:
                return False

        ours = {p.pid: p for p in psutil.process_iter() if names_folder(p)}
        for process in list(ours.values()):
            with contextlib.suppress(psutil.Error):
                ours.update((child.pid, child) for child in process.children(recursive=True))
        for process in ours.values():
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(list(ours.values()), timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


class Clock:
    """A settable clock (UTC) for the scheduler, started at a local time."""

    def __init__(self, local: datetime, utc_offset_hours: float = 8):
        self.t = (local - timedelta(hours=utc_offset_hours)).replace(tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **delta) -> None:
        self.t += timedelta(**delta)


def outcomes(runs: list[dict]) -> list[tuple[str, str]]:
    """(job, status) of a scheduler tick's runs, in order."""
    return [(r["job"], r["status"]) for r in runs]


def errors(runs: list[dict]) -> dict[str, str]:
    """The failed runs' errors by run id: what an assertion on `outcomes` should show when it fails."""
    return {r["run_id"]: r["error"] for r in runs if r["error"]}
