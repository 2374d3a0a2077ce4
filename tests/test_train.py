"""`fin train`: DistributedModelParallel on gloo, N workers = 1 worker, resume after a kill, early stop, artifacts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

import fin.train
from fin.artifact import load_artifact
from fin.loader import ExampleStream
from fin.train import TrainConfig, load_train_config, train
from fin.versions import WEIGHTS, ArtifactError, resolve, versions
from tests.conftest import TRAIN_CONFIG


def _config(**changes) -> TrainConfig:
    return load_train_config(None, **{**TRAIN_CONFIG, "model": "fin", **changes})


LOADER, SMALL = _config().loader, _config().model_config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_worker(trained_models):
    return trained_models[1]["fin"]


def test_artifact_is_plain_and_complete(one_worker, features_job):
    out, _ = features_job
    meta = json.loads((one_worker / "artifact.json").read_text())
    assert one_worker.name == "1" and meta["version"] == 1 and meta["model"] == "fin"
    assert meta["training"]["workers"] == 1 and set(meta["training"]["plan"].values()) == {"table_wise"}
    assert not (one_worker.parent / ".checkpoint").exists()  # removed once the artifact is written
    artifact = load_artifact(one_worker)
    assert artifact.loader == LOADER and artifact.model.config == SMALL
    weights = _weights(one_worker)
    assert weights["sparse.sequence.embeddings.item.weight"].shape == (SMALL.embeddings.rows["item"], 8)
    batch = next(iter(ExampleStream(out / "data", "test", LOADER)))
    with torch.no_grad():
        assert torch.isfinite(artifact.model(batch)).all()


def test_the_calibration_is_fitted_on_the_validation_days_with_the_saved_weights(one_worker, features_job):
    """artifact.json's calibration is the best epoch's fit to the validation split: the saved weights'
    validation pCTR has the stored level before calibration and level 1 after it."""
    from fin.evaluate import examples, predict
    from fin.metrics import calibration

    out, _ = features_job
    entry = json.loads((one_worker / "artifact.json").read_text())["calibration"]
    assert entry["method"] == "platt" and entry["parameters"]["scale"] > 0
    fitted = entry["validation"]
    labels = examples(out / "data", "validation")
    preds = labels.join(predict(load_artifact(one_worker), out / "data", "validation"), on="impression_id")
    assert preds.height == fitted["examples"] and int(preds["label"].sum()) == fitted["clicks"]
    before = calibration(preds["label"].to_numpy(), preds["pctr_uncalibrated"].to_numpy())
    assert before == pytest.approx(fitted["calibration_before"], rel=1e-4)
    assert calibration(preds["label"].to_numpy(), preds["pctr"].to_numpy()) == pytest.approx(1.0, abs=1e-4)
    assert fitted["calibration_after"] == pytest.approx(1.0, abs=1e-6)
    assert fitted["logloss_after"] <= fitted["logloss_before"]


def test_broken_artifacts_are_refused(one_worker, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(one_worker, bad)
    with open(bad / WEIGHTS, "r+b") as f:  # flip bytes in the weights
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(bad)
    shutil.copytree(one_worker, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "artifact.json").read_text())
    (tmp_path / "old" / "artifact.json").write_text(json.dumps({**meta, "contract_version": "0.1"}))
    with pytest.raises(ArtifactError, match="contract"):
        load_artifact(tmp_path / "old")
    with pytest.raises(ArtifactError, match="no versions"):
        resolve("nothing", tmp_path)
    # a folder named by a digit that is no number to int() ("²") is no version (before, it broke every read of
    # the model's versions, fin train's last step among them)
    shutil.copytree(one_worker, tmp_path / "models" / "fin" / "3")
    (tmp_path / "models" / "fin" / "²").mkdir()
    assert versions(tmp_path / "models", "fin") == [3] and resolve("fin", tmp_path / "models").name == "3"


def test_two_workers_train_like_one(one_worker, features_job, tmp_path, monkeypatch):
    """Same global batches split over 2 gloo workers with row-wise tables: the same weights as 1 worker."""
    out, _ = features_job
    # run where a folder of the same name holds another artifact: the run reports the folder it wrote (before,
    # with several workers it reported the newest version found by the name, this one)
    shutil.copytree(one_worker, tmp_path / "elsewhere" / "two" / "5")
    monkeypatch.chdir(tmp_path / "elsewhere")
    two = train(out / "data", tmp_path / "models", _config(workers=2, sharding="row_wise"), name="two")
    assert two == tmp_path / "models" / "two" / "1"
    meta = json.loads((two / "artifact.json").read_text())
    assert meta["training"]["workers"] == 2 and "row_wise" in meta["training"]["plan"].values()
    assert meta["training"]["examples"] == json.loads((one_worker / "artifact.json").read_text())["training"]["examples"]
    initial = train(out / "data", tmp_path, _config(lr=0.0, sparse_lr=0.0), name="untrained")
    moved = _max_difference(_weights(one_worker), _weights(initial))
    assert moved > 1e-3  # training changed the weights ...
    assert _max_difference(_weights(one_worker), _weights(two)) < 1e-3 * moved * 10  # ... and 2 workers the same way


def test_warm_start_begins_at_the_given_artifact(one_worker, features_job, tmp_path):
    """With learning rates 0, a run warm-started from an artifact ends with that artifact's weights exactly
    (row-wise sharding on 2 workers too: sharding keeps the loaded tables); a mismatched model is refused."""
    out, _ = features_job
    still = train(out / "data", tmp_path, _config(lr=0.0, sparse_lr=0.0, max_steps=2), name="still", init_from=one_worker)
    assert _max_difference(_weights(one_worker), _weights(still)) == 0
    assert json.loads((still / "artifact.json").read_text())["training"]["init_from"] == str(one_worker)
    two = train(out / "data", tmp_path, _config(lr=0.0, sparse_lr=0.0, max_steps=2, workers=2, sharding="row_wise"),
                name="still2", init_from=one_worker)
    assert _max_difference(_weights(one_worker), _weights(two)) == 0
    with pytest.raises(ValueError, match="cannot start from"):
        train(out / "data", tmp_path, _config(model="dnn", max_steps=1), name="other", init_from=one_worker)


def test_early_stop_keeps_the_best_epoch(features_job, tmp_path):
    out, _ = features_job
    folder = train(out / "data", tmp_path, _config(epochs=4, patience=1, max_steps=1, lr=0.0, sparse_lr=0.0))
    training = json.loads((folder / "artifact.json").read_text())["training"]
    assert training["epochs"] == 2 and training["best_epoch"] == 1  # no epoch can beat a model that never changes


def _threads_named(name: str) -> set[str]:
    """The ids of this process's threads called `name`."""
    named = set()
    for task in os.listdir("/proc/self/task"):
        try:
            if (Path("/proc/self/task") / task / "comm").read_text().strip() == name:
                named.add(task)
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return named


def test_a_lone_worker_s_epochs_start_no_openmp_team_on_gloo_s_threads(features_job, tmp_path):
    """Between epochs a lone worker scores, gathers and checkpoints without gloo collectives: a collective
    over a large tensor starts an OpenMP team on gloo's thread (its threads take that thread's name), after
    which libgomp sleeps between parallel regions and every later step ran at half speed."""
    out, _ = features_job
    gloo_threads, intra_op = [], []

    def log(message: str) -> None:
        if message.startswith(("train ", "epoch ")):  # the process group is up: before epoch 1, after each
            gloo_threads.append(_threads_named("pt_gloo_runloop"))
            intra_op.append(torch.get_num_threads())

    threads = torch.get_num_threads()
    try:
        train(out / "data", tmp_path, _config(epochs=2, patience=2, max_steps=2, threads=1), log=log)
    finally:
        torch.set_num_threads(threads)
    # no thread of that name started after epoch 1 began (threads of earlier tests' process groups may end)
    assert len(gloo_threads) == 3 and gloo_threads[0] and not (gloo_threads[1] | gloo_threads[2]) - gloo_threads[0]
    assert intra_op == [1, 1, 1]  # the `threads` asked for (2 CPUs here would give 2)


@pytest.mark.parametrize(("model", "workers"), [("din", []), ("din", ["--workers", "2", "--average-every", "3"]),
                                               ("dnn", [])], ids=["one", "replicas", "dnn"])
def test_resume_after_kill_gives_the_uninterrupted_result(features_job, tmp_path, model, workers):
    """A run killed after its first epoch's checkpoint and rerun ends as an uninterrupted run does: one worker,
    two replicas (`fin.local_sgd`; rank 0 writes the checkpoint, both read it), and a model with a weight that
    never has a gradient (the DNN's event encoder: no Adam state is saved for it; its rerun failed to load)."""
    out, _ = features_job
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"model": model, "epochs": 3, "patience": 3, "max_steps": 4,
                                  "loader": {"batch_size": 64, "max_seq_len": 50},
                                  "model_config": {"dim": 16, "tower": [32], "embeddings": {"dim": 8}}}))
    args = ["train", "--data", str(out / "data"), "--config", str(config), *workers]
    fin = Path(sys.executable).parent / "fin"
    env = {k: v for k, v in os.environ.items() if k != "FIN_DEBUG"}

    killed = subprocess.Popen([str(fin), *args, "--out", str(tmp_path / "killed")], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pointer = tmp_path / "killed" / model / ".checkpoint" / "latest.json"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and json.loads(pointer.read_text())["progress"]["epoch"] >= 1):
        assert killed.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / model / "1").exists()

    resumed = subprocess.run([str(fin), *args, "--out", str(tmp_path / "killed")], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "epoch 1/3" not in resumed.stderr

    straight = subprocess.run([str(fin), *args, "--out", str(tmp_path / "straight")], env=env, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a, b = _weights(tmp_path / "killed" / model / "1"), _weights(tmp_path / "straight" / model / "1")
    assert _max_difference(a, b) < 1e-5
    training = json.loads((tmp_path / "straight" / model / "1" / "artifact.json").read_text())["training"]
    assert training["examples"] == 3 * 4 * 64  # every step's global batch, over all workers
    # the best epoch's calibration survives the kill in the checkpoint, whichever epoch was best
    calibrations = [json.loads((tmp_path / run / model / "1" / "artifact.json").read_text())["calibration"]
                    ["parameters"] for run in ("killed", "straight")]
    for key in ("scale", "shift"):
        assert calibrations[0][key] == pytest.approx(calibrations[1][key], abs=1e-4)


class _Killed(Exception):
    pass


def test_a_kill_between_the_best_weights_and_the_checkpoint_ships_one_epochs_best(features_job, tmp_path,
                                                                                  monkeypatch):
    """The best weights are written before the checkpoint's pointer moves. A run killed between the two, whose
    rerun of that epoch no longer beats the best (another order of float sums, dropout), ships the best epoch's
    weights with that epoch's AUC (before, one `best.safetensors` replaced in place: the killed epoch's weights
    under another epoch's AUC and calibration). The AUCs are set: 0.6, then 0.7 for the killed epoch 2, 0.5
    for its rerun."""
    out, _ = features_job
    aucs, best, kept = iter([0.6, 0.7, 0.5]), {}, []
    validation, save, save_best = fin.train._validation, fin.train.Checkpoints.save, fin.train.Checkpoints.save_best
    monkeypatch.setattr(fin.train, "_validation", lambda *args: (next(aucs), *validation(*args)[1:]))

    def saving_best(self, weights, epoch):
        best.setdefault(epoch, {k: v.clone() for k, v in weights.items()})
        save_best(self, weights, epoch)

    def saving(self, model, optimizer, progress):
        if progress.epoch == 2 and not kept:
            kept.append(progress.epoch)
            raise _Killed
        save(self, model, optimizer, progress)

    monkeypatch.setattr(fin.train.Checkpoints, "save_best", saving_best)
    monkeypatch.setattr(fin.train.Checkpoints, "save", saving)
    config = _config(model="din", epochs=2, patience=2, max_steps=2)
    with pytest.raises(_Killed):
        train(out / "data", tmp_path, config)
    assert sorted(best) == [1, 2]  # epoch 2 was best, and killed before its checkpoint
    folder = train(out / "data", tmp_path, config)  # resumes after epoch 1
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["training"]["best_epoch"] == 1 and meta["metrics"]["validation_auc"] == 0.6
    assert _max_difference(_weights(folder), best[1]) == 0.0


def test_a_validation_split_of_one_class_trains_and_says_so(features_job, tmp_path):
    """Validation labels of one class have no AUC: the first epoch is kept, patience ends the run, and the artifact
    is written uncalibrated (before, no epoch was ever best and the run failed reading the best weights)."""
    out, _ = features_job
    data = tmp_path / "data"
    shutil.copytree(out / "data", data)
    for part in (data / "examples").rglob("*.parquet"):
        if "validation" in str(part):
            frame = pl.read_parquet(part)
            frame.with_columns(pl.lit(0, dtype=frame["label"].dtype).alias("label")).write_parquet(part)
    messages = []
    folder = train(data, tmp_path / "models", _config(model="dnn", epochs=3, patience=1, max_steps=2),
                   log=messages.append)
    def refuse(constant):
        raise ValueError(f"artifact.json holds {constant}, which JSON has not")
    meta = json.loads((folder / "artifact.json").read_text(), parse_constant=refuse)  # -Infinity before
    assert meta["metrics"]["validation_auc"] is None and meta["training"]["history"][0]["validation_auc"] is None
    assert meta["training"]["best_epoch"] == 1 and meta["training"]["epochs"] == 2
    assert meta.get("calibration") is None and any("uncalibrated" in m for m in messages)


def test_fin_trains_on_the_window_its_artifact_is_scored_on(features_job, tmp_path):
    """FIN's location, meal and integrated fragments are cut from the whole window, older than its full
    fragment's `full_len` too: with `max_seq_len` above `full_len`, training reads the same window the artifact's
    readers do, so the artifact's validation AUC is its weights' (before, training read only `full_len`
    events and `fin evaluate` scored other fragments than it was trained and validated on)."""
    from fin.evaluate import examples, predict
    from fin.metrics import auc

    out, _ = features_job
    loader = {**TRAIN_CONFIG["loader"], "max_seq_len": 50, "fragments": {**TRAIN_CONFIG["loader"]["fragments"], "full_len": 10}}
    folder = train(out / "data", tmp_path, _config(max_steps=4, loader=loader), log=lambda message: None)
    artifact = load_artifact(folder)
    assert artifact.loader.max_seq_len == 50
    scored = examples(out / "data", "validation").join(predict(artifact, out / "data", "validation"), on="impression_id")
    expected = json.loads((folder / "artifact.json").read_text())["metrics"]["validation_auc"]
    assert auc(scored["label"].to_numpy(), scored["pctr_uncalibrated"].to_numpy()) == pytest.approx(expected, abs=1e-6)


def test_one_training_of_a_name_at_a_time_and_checkpoints_of_this_data_only(features_job, tmp_path):
    """A second training of a name while one runs is refused before it touches the shared checkpoint folder
    (before, it deleted the first one's checkpoints and the first failed at its end). A checkpoint is resumed
    only on the data it was written on: the folder however spelled, and not once it is rebuilt in place."""
    from features import locks
    from features.dataset import EXAMPLES, Dataset
    from fin.train import TrainingBusy, _fingerprint

    out, _ = features_job
    running = locks.hold(tmp_path / "models" / "fin" / ".checkpoint.lock")
    (tmp_path / "models" / "fin" / ".checkpoint").mkdir()
    (tmp_path / "models" / "fin" / ".checkpoint" / "latest.json").write_text("{}")
    with pytest.raises(TrainingBusy, match="another fin train of fin"):
        train(out / "data", tmp_path / "models", _config(max_steps=1))
    assert (tmp_path / "models" / "fin" / ".checkpoint" / "latest.json").read_text() == "{}"
    running.close()

    data = tmp_path / "features"
    shutil.copytree(out, data)
    config = _config()
    assert _fingerprint(data, config, 1) == _fingerprint(data / "data", config, 1)
    # a rerun with --no-compile (after a failed compile) or other threads resumes the epochs trained
    assert _fingerprint(data, config, 1) == _fingerprint(data, _config(compile=True, threads=1), 1)
    assert _fingerprint(data, config, 1) != _fingerprint(data, _config(lr=0.5), 1)
    before = _fingerprint(data / "data", config, 1)
    part = Dataset.at(data).parts(EXAMPLES, "train")[0]
    pl.read_parquet(part).head(5).write_parquet(part)  # the day's rebuild
    assert _fingerprint(data / "data", config, 1)["data_files"] != before["data_files"]


def test_a_model_reading_more_events_than_the_online_store_keeps_is_told(features_job):
    """The features job kept 50 events per user online: a FIN reading 100 is warned that served requests read
    fewer; one reading 50, or a DIN reading its recent 10 of 100, is not."""
    from fin.train import _warn_of_a_shorter_online_window

    out, _ = features_job
    for model, max_seq_len, warned in (("fin", 100, True), ("fin", 50, False), ("din", 100, False)):
        messages = []
        config = _config(model=model, loader={**TRAIN_CONFIG["loader"], "max_seq_len": max_seq_len})
        _warn_of_a_shorter_online_window(out / "data", config, messages.append)
        assert bool(messages) == warned and all("--max-seq-len 50" in m for m in messages)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: sim\nloader:\n  batch_size: 32\nmodel_config:\n  tower: [8, 4]\n")
    config = load_train_config(path, **{"epochs": 5, "loader.max_seq_len": 20, "lr": None})
    assert (config.model, config.epochs, config.loader.batch_size, config.loader.max_seq_len) == ("sim", 5, 32, 20)
    assert config.model_config.tower == (8, 4) and config.lr == TrainConfig().lr
    with pytest.raises(ValueError, match="loader.batch: unknown key"):
        load_train_config(None, **{"loader.batch": 3})
    with pytest.raises(ValueError, match="threads must be 0"):
        load_train_config(None, threads=-1)
    with pytest.raises(ValueError, match="max_steps must be 0"):  # before, -1 trained no step and wrote a version
        load_train_config(None, max_steps=-1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):  # before, a ZeroDivisionError mid-epoch
        load_train_config(None, **{"loader.batch_size": 0})


def test_shipped_configs_load_and_train_yaml_is_the_defaults():
    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_train_config(root / "train.yaml") == TrainConfig()
    lifelong = load_train_config(root / "lifelong.yaml")
    assert lifelong.loader.max_seq_len == lifelong.loader.fragments.full_len == 1000
