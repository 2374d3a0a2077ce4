import os
import subprocess
import sys
from pathlib import Path

import pytest

from features.simulator import load_sim_config, simulate
from jobs.features_job import FeaturesConfig, run_features

ROOT = Path(__file__).resolve().parents[1]


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


TRAIN_CONFIG = dict(epochs=1, max_steps=6, loader=dict(batch_size=64, max_seq_len=50, fragments=dict(
    full_len=50, location_len=20, meal_len=20, recent_len=10, integrated_len=20)),
    model_config=dict(dim=16, heads=2, tower=[32], sim_len=10, embeddings=dict(dim=8)))


@pytest.fixture(scope="session")
def trained_models(features_job, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Small FIN and DNN artifacts trained for a few steps on `features_job` (one worker, gloo)."""
    from fin.train import load_train_config, train

    out, _ = features_job
    models = tmp_path_factory.mktemp("models")
    return models, {kind: train(out / "data", models, load_train_config(None, model=kind, **TRAIN_CONFIG))
                    for kind in ("fin", "dnn")}
