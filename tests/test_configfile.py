"""`features.configfile`: one loader for the simulator, training, artifact and schedule configs."""

import dataclasses
import datetime
import enum
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from features.configfile import ConfigError, load_config
from features.fragments import FragmentConfig
from features.simulator import load_sim_config
from features.simulator.config import SimConfig, UserConfig
from fin.artifact import to_dict
from fin.inputs import LoaderConfig
from fin.models import ModelConfig
from fin.promotion import PromotionGate
from fin.train import TrainConfig, load_train_config
from jobs.schedule import JobSpec, ScheduleConfig, load_schedule
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"


def _error(cls, source, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, source, overrides)
    message = str(e.value)
    assert "\n" not in message  # one line, whatever went wrong
    return message


def test_unknown_keys_are_named_with_their_path_and_the_keys_that_exist(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 2\nloader:\n  batch_sise: 256\n")
    assert _error(TrainConfig, path) == (f"{path}: loader.batch_sise: unknown key (expected one of batch_size, "
                                         "max_seq_len, fragments, shuffle, seed, shared_timelines, examples_per_user, workers, "
                                         "prefetch, new_ad_days)")
    path.write_text("epoch: 2\n")
    assert _error(TrainConfig, path).startswith(f"{path}: epoch: unknown key (expected one of model, epochs, lr,")
    path.write_text("loader:\n  fragments:\n    full: 10\n")  # a section inside a section
    assert _error(TrainConfig, path).startswith(
        f"{path}: loader.fragments.full: unknown key (expected one of full_len,")


def test_wrong_types_say_what_was_expected(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("epochs: two\n")
    assert _error(TrainConfig, path) == f"{path}: epochs: expected an integer, got 'two'"
    path.write_text("epochs: '3'\n")  # a number written as text is not taken for one
    assert _error(TrainConfig, path) == f"{path}: epochs: expected an integer, got '3'"
    path.write_text("epochs: 2.5\n")
    assert "epochs: expected an integer, got 2.5" in _error(TrainConfig, path)
    path.write_text("loader: 512\n")
    assert _error(TrainConfig, path) == f"{path}: loader: expected a mapping, got 512"
    path.write_text("model_config:\n  tower: [64, wide]\n")
    assert _error(TrainConfig, path) == f"{path}: model_config.tower[1]: expected an integer, got 'wide'"
    path.write_text("loader:\n  shuffle: 1\n")
    assert _error(TrainConfig, path) == f"{path}: loader.shuffle: expected true or false, got 1"
    path.write_text("- a list\n")
    assert _error(TrainConfig, path) == f"{path}: expected a mapping of keys to values, got list"
    # two problems: both on the one line
    path.write_text("epochs: two\nlr: fast\n")
    assert _error(TrainConfig, path) == (f"{path}: epochs: expected an integer, got 'two'; "
                                         f"{path}: lr: expected a number, got 'fast'")


def test_an_integer_is_a_float_and_a_list_a_tuple(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lr: 1\nmodel_config:\n  tower: [64, 32]\n")
    config = load_config(TrainConfig, path)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.model_config.tower == (64, 32) and isinstance(config.model_config.tower, tuple)


def test_a_dataclass_check_is_one_line_too():
    assert _error(TrainConfig, {"model": "gpt"}) == "TrainConfig: unknown model 'gpt'; choose one of din, dnn, fin, sim"


def test_nested_sections_keep_the_defaults_they_do_not_name():
    config = load_config(SimConfig, {"users": {"users": 50}, "city": {"aoi_type_shares": [0.5, 0.25, 0.25]}})
    assert config.users == dataclasses.replace(UserConfig(), users=50)
    assert config.city.aoi_type_shares == (0.5, 0.25, 0.25) and config.city.name == SimConfig().city.name
    assert config.shops == SimConfig().shops
    # a fragments section is a FragmentConfig: the keys it leaves out take FragmentConfig's own defaults
    loader = load_config(LoaderConfig, {"fragments": {"full_len": 300}})
    assert loader.fragments == FragmentConfig(full_len=300)
    assert loader.batch_size == LoaderConfig().batch_size


def test_overrides_are_dotted_win_over_the_file_and_none_is_not_given(tmp_path):
    path = tmp_path / "t.json"  # JSON as well as YAML
    path.write_text(json.dumps({"epochs": 2, "lr": 0.5, "loader": {"batch_size": 32}}))
    config = load_config(TrainConfig, path, {"loader.batch_size": 256, "loader.max_seq_len": 20, "epochs": None,
                                             "model_config.embeddings.dim": 4})
    assert (config.epochs, config.lr, config.loader.batch_size, config.loader.max_seq_len) == (2, 0.5, 256, 20)
    assert config.model_config.embeddings.dim == 4
    assert _error(TrainConfig, path, {"loader.batch": 3}).startswith(
        f"{path} (override): loader.batch: unknown key (expected one of batch_size,")
    assert _error(TrainConfig, None, {"epochs": "3"}) == "TrainConfig (override): epochs: expected an integer, got '3'"
    # values computed by a program: numpy scalars are their numbers, paths their text
    assert load_config(TrainConfig, None, {"epochs": np.int64(4), "lr": np.float32(0.5)}).epochs == 4
    assert load_config(SimConfig, {"start_date": datetime.date(2026, 1, 5)}).start_date == "2026-01-05"
    # the wrappers of the simulator and training take the same overrides
    assert load_sim_config(None, **{"users.users": 7, "seed": None}).users.users == 7
    assert load_train_config(None, **{"loader.batch_size": 8}).loader.batch_size == 8


def test_enums_and_paths_are_read_from_their_text():
    class Rule(enum.Enum):
        GSP = "gsp"
        FIRST_PRICE = "first_price"

    @dataclass(frozen=True)
    class Auction:
        rule: Rule = Rule.GSP
        out: Path = Path("out")
        slots: list[int] = field(default_factory=list)

    assert load_config(Auction, {"rule": "first_price", "out": "a/b"}) == Auction(Rule.FIRST_PRICE, Path("a/b"))
    assert "rule: expected 'gsp' or 'first_price', got 'second'" in _error(Auction, {"rule": "second"})


def test_the_shipped_simulator_configs():
    assert load_sim_config(CONFIGS / "default.yaml") == SimConfig()
    assert load_sim_config(CONFIGS / "large.yaml") == dataclasses.replace(
        SimConfig(), days=365, start_date="2025-03-03", chunk_users=2000, workers=2, users=UserConfig(users=17000))


def test_the_shipped_training_configs():
    assert load_train_config(CONFIGS / "train.yaml") == TrainConfig()
    default = TrainConfig()
    assert load_train_config(CONFIGS / "lifelong.yaml") == dataclasses.replace(default, loader=dataclasses.replace(
        default.loader, max_seq_len=1000, fragments=FragmentConfig(full_len=1000, location_len=200, meal_len=200,
                                                                   recent_len=50, integrated_len=100)))


def test_the_shipped_schedule():
    base = CONFIGS.absolute() / ".." / "demo_out"
    assert load_schedule(CONFIGS / "jobs.yaml") == ScheduleConfig(
        state=base / "schedule" / "runs.sqlite", logs=base / "logs", features=base / "features",
        models=base / "models", reports=base / "reports", model="fin", baselines=("din",),
        train_args=("--epochs", "1"), ray_address=None, ray_entrypoint="fin", utc_offset_hours=8.0, retries=2,
        backoff_s=300.0, gate=PromotionGate(auc_tolerance=0.002, rpm_tolerance=0.02),
        jobs={"features": JobSpec(cron="30 2 * * *"), "embed": JobSpec(after="features"),
              "train": JobSpec(after="embed"), "evaluate": JobSpec(after="train"), "promote": JobSpec(after="evaluate")})


def test_schedule_paths_are_the_files_folder_s_and_arguments_are_text(tmp_path):
    path = tmp_path / "conf" / "jobs.yaml"
    path.parent.mkdir()
    path.write_text("state: runs.sqlite\nlogs: /data/logs\nfeatures: f\nmodels: m\nreports: r\n"
                    "train_args: [--epochs, 1]\n"
                    "jobs:\n  features: {cron: '0 3 * * *'}\n  train:\n    after: features\n")
    config = load_schedule(path)
    assert config.state == tmp_path / "conf" / "runs.sqlite" and config.logs == Path("/data/logs")
    assert config.train_args == ("--epochs", "1")
    assert config.jobs == {"features": JobSpec(cron="0 3 * * *"), "train": JobSpec(after="features")}
    path.write_text("state: s\nlogs: l\nfeatures: f\nmodels: m\n")
    assert f"{path}: reports: missing (required)" in str(pytest.raises(ValueError, load_schedule, path).value)
    path.write_text("state: s\nlogs: l\nfeatures: f\nmodels: m\nreports: r\ngate: {auc_tolerence: 0.1}\n")
    assert str(pytest.raises(ValueError, load_schedule, path).value) == (
        f"{path}: gate.auc_tolerence: unknown key (expected one of auc_tolerance, rpm_tolerance)")
    path.write_text("state: s\nlogs: l\nfeatures: f\nmodels: m\nreports: r\njobs: {features: {cron: '99 * * * *'}}\n")
    assert "cron expression '99 * * * *'" in str(pytest.raises(ValueError, load_schedule, path).value)


def test_artifact_configs_read_back_what_training_wrote():
    model = ModelConfig(dim=8, tower=(16, 8), dropout=0.1)
    loader = LoaderConfig(batch_size=64, fragments=FragmentConfig(full_len=60, match_aoi=False))
    assert load_config(ModelConfig, to_dict(model)) == model
    assert load_config(LoaderConfig, to_dict(loader)) == loader
    assert "unknown key" in _error(ModelConfig, {**to_dict(model), "depth": 3})


def test_the_loader_is_the_lowest_layer_s():
    """features/ is importable without fin/, serving/ and jobs/."""
    code = ("import sys, features.configfile; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fin', 'serving', 'jobs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_a_number_in_exponent_form_is_a_number(tmp_path):
    """`lr: 1e-3` (no dot) is text to YAML 1.1's rules, which a number field refused; it is a number, as in YAML
    1.2 and JSON. What is text stays text."""
    path = tmp_path / "train.yaml"
    path.write_text("lr: 1e-3\nsparse_lr: 2E-1\nloader:\n  batch_size: 64\n")
    config = load_train_config(path)
    assert (config.lr, config.sparse_lr, config.loader.batch_size) == (0.001, 0.2, 64)
    path.write_text("model: e5\n")
    with pytest.raises(ConfigError, match="unknown model 'e5'"):
        load_train_config(path)
