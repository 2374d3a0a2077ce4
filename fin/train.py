"""Training: DistributedModelParallel over N workers, epoch checkpoints with resume, early stop, artifact.

Workers. `train()` with `workers=N` starts N local processes (gloo on CPU, NCCL on GPU). Under `torchrun`
(which sets RANK / WORLD_SIZE / MASTER_ADDR) each launched process is one worker instead; that is the way
to several machines:

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        $(which fin) train --data DATA --model fin --out MODELS

Every worker walks the same global batches and builds its own slice (`fin.loader.ExampleStream`). Each
worker's loss is its slice's summed loss over the global batch size, times the world size, so data
parallelism's gradient average over workers equals one worker's gradient on the global batch. TorchRec
sums the table gradients over workers instead of averaging; the tables' row-wise Adagrad is invariant
to the gradient's scale, so N workers train as one does (tested to a tolerance). With `average_every=k`
each worker instead trains a whole replica on its share of every global batch, and the replicas are merged
every k steps and at each epoch's end (`fin.local_sgd`): on CPUs, where a collective every step costs more
than a second worker gives.

Checkpoints. After every epoch the sharded model and optimizer state are saved with
torch.distributed.checkpoint under `MODELS/<name>/.checkpoint/epoch-<k>` (a pointer file names the last
complete one); a rerun of the same command resumes there. Early stopping on validation AUC keeps the
best epoch's weights, which go into the artifact (`fin.artifact`); the checkpoints are then removed.

Calibration. The validation pass that scores each epoch also fits Platt scaling (`fin.calibration`) to
its logits, gathered over the workers; the fit of the best epoch is kept in the checkpoint's progress (a
resumed run keeps it without rescoring) and goes into the artifact, so no extra pass over the data.

One worker, no collectives. A lone worker gathers, checkpoints and scores without gloo. A gloo collective
over a large CPU tensor copies it with OpenMP on gloo's own thread, which starts a second OpenMP team that
lives as long as the process group; with more OpenMP threads than CPUs libgomp stops spin-waiting between
parallel regions and sleeps instead (a futex wake per region), and every later step paid for it: the epochs
after the first ran at half the first's speed (benchmarks/README.md, "Epochs after the first").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner
from tqdm import tqdm

from features import locks
from features.configfile import load_config
from features.dataset import EXAMPLES, Dataset
from features.item_embeddings import embeddings_source, embeddings_width
from fin.artifact import load_artifact, save_artifact, to_dict
from fin.calibration import fit_platt
from fin.inputs import STAT_KEYS, LoaderConfig, scoring_requests
from fin.loader import ExampleStream
from fin.local_sgd import Peers, Replicas
from fin.metrics import auc
from fin.models import MODELS, ModelConfig
from fin.quiet import quiet_library_notices
from fin.sharding import SHARDINGS, full_state_dict, plan_summary, shard
from fin.versions import META

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    model: str = "fin"
    epochs: int = 8  # at most: training stops once validation AUC has not improved for `patience` epochs
    lr: float = 6e-3  # dense weights (Adam)
    sparse_lr: float = 0.1  # tables (row-wise Adagrad)
    patience: int = 1  # epochs without a better validation AUC before stopping
    max_steps: int | None = 0  # per epoch (0 or None: the whole train split)
    workers: int = 1
    # 0: the workers train one model (tables sharded over them, gradients reduced every step); k > 0: each
    # worker trains a whole replica on its share of every global batch and the replicas are merged every k
    # steps and at the end of each epoch (`fin.local_sgd`)
    average_every: int = 0
    # intra-op threads of each CPU worker (0: the CPUs this process may run on, shared out among the local
    # workers; `taskset` or a container's CPU set limits them). FIN's step is
    # thousands of small operations: one thread trains it as fast as two on 2 cores, so two trainings side
    # by side with one thread each do twice the work (benchmarks/README.md, "Threads")
    threads: int = 0
    sharding: str = "table_wise"
    seed: int = 0
    # build the artifact's compiled scoring package (`fin.compiled`), checked on held-out requests
    compile: bool = True
    check_requests: int = 32  # validation requests the package is checked on against the eager forward
    # read the creative embeddings (`fin embed-creatives`) as an image modality when the data has them
    images: bool = True
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(sorted(MODELS))}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}; choose one of {', '.join(SHARDINGS)}")
        if min(self.workers, self.epochs, self.patience) < 1:
            raise ValueError("workers, epochs and patience must be at least 1")
        if self.average_every < 0:
            raise ValueError("average_every must be 0 (one sharded model) or more (replicas merged every k steps)")
        if self.threads < 0:
            raise ValueError("threads must be 0 (the CPUs shared out among the workers) or more")
        if (self.max_steps or 0) < 0:
            raise ValueError("max_steps must be 0 (the whole train split each epoch) or more")


@dataclass
class Progress:
    """What a checkpoint remembers besides the tensors."""

    epoch: int = 0  # epochs completed
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_calibration: dict | None = None  # artifact.json's `calibration` entry, fitted at the best epoch
    history: list[dict] = field(default_factory=list)
    examples: int = 0
    seconds: float = 0.0


def load_train_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """TrainConfig from a YAML/JSON file (any subset of its fields, nested) with `overrides` on top.

    Override keys may be dotted (`loader.batch_size`); None values are ignored.
    """
    return load_config(TrainConfig, path, overrides)


def _finite(auc: float) -> float | None:
    """An AUC as artifact.json holds it: None where it is undefined (validation labels of one class), since
    JSON has no -Infinity."""
    return auc if math.isfinite(auc) else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(data: str | Path, models: str | Path, config: TrainConfig = TrainConfig(), name: str | None = None,
          log: Log = _stderr, init_from: str | Path | None = None) -> Path:
    """Train `config.model` on the features job's output `data`; returns the new artifact's folder. With
    `init_from` (an artifact version folder of the same model kind and config), training starts from its
    weights (a warm start, e.g. from yesterday's model) instead of a random initialisation."""
    name = name or config.model
    config = with_image_modality(Path(data), config, log)
    _warn_of_a_shorter_online_window(Path(data), config, log)
    args = (Path(data), Path(models), config, name, None if init_from is None else Path(init_from))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: this process is one worker
        return _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *args, log)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), LOCAL_WORLD_SIZE=str(config.workers))
    if config.workers == 1:
        return _worker(0, 1, *args, log)
    with tempfile.TemporaryDirectory(prefix="fin-train-") as scratch:  # where rank 0 says what it wrote
        written = Path(scratch) / "artifact"
        torch.multiprocessing.spawn(_spawned, args=(config.workers, written, *args), nprocs=config.workers)
        return Path(written.read_text())


def with_image_modality(data: Path, config: TrainConfig, log: Log = _stderr) -> TrainConfig:
    """The config with `model_config.image_dim` set to the width of the data's creative embeddings when
    `config.images` and the data has them (0 otherwise)."""
    dataset = Dataset.at(data)
    dim = embeddings_width(dataset) if config.images else 0
    if config.images and not dim:
        log(f"no creative embeddings at {embeddings_source(dataset)}: training without the image modality")
    return dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, image_dim=dim))


def _warn_of_a_shorter_online_window(data: Path, config: TrainConfig, log: Log) -> None:
    """Say so when the model reads more events of a history than the features job keeps in the online store
    (`fin features --max-seq-len`): served requests would then read shorter histories than training did."""
    stats = Dataset.at(data).stats_file
    online = json.loads(stats.read_text()).get("config", {}).get("max_seq_len") if stats.exists() else None
    window = _window(config)
    if online is not None and window > online:
        log(f"warning: the model reads the last {window} events of a history, the online store keeps {online} "
            f"(fin features --max-seq-len {online}): served requests will read fewer than training does; "
            f"train with --max-seq-len {online} or build the features with --max-seq-len {window}")


def _window(config: TrainConfig) -> int:
    """The most recent events of each history the model reads: `max_seq_len`, or fewer where the model reads
    fewer (`events_read`: DIN's recent 50, none for the DNN)."""
    reads = MODELS[config.model].events_read(config.loader.fragments)  # None: the whole window
    return config.loader.max_seq_len if reads is None else min(config.loader.max_seq_len, reads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, written: Path, *args) -> None:
    quiet_library_notices()
    folder = _worker(rank, world, *args, _stderr if rank == 0 else (lambda message: None))
    if rank == 0:  # the folder it wrote, not the newest version of the name (another run's, or none of this)
        written.write_text(str(folder))


def _worker(rank: int, world: int, data: Path, models: Path, config: TrainConfig, name: str,
            init_from: Path | None, log: Log) -> Path:
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    device = torch.device(f"cuda:{rank % local_world}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(config.threads or max(1, cpus // local_world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    peers = None
    if world > 1 and config.average_every > 0:  # to TorchRec each replica is a lone worker (`fin.local_sgd`)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        peers = Peers(rank, world)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        return _fit(rank, world, device, data, models, config, name, init_from, log, peers)
    finally:
        dist.destroy_process_group()


def _warm_start(model: torch.nn.Module, init_from: Path, config: TrainConfig) -> None:
    """Load an artifact's weights into the unsharded model (sharding keeps them: tested)."""
    artifact = load_artifact(init_from)
    if artifact.meta["model"] != config.model or to_dict(artifact.model.config) != to_dict(config.model_config):
        raise ValueError(f"cannot start from {init_from}: it is a {artifact.meta['model']} model with another "
                         f"config than this {config.model} run's")
    model.load_state_dict(artifact.model.state_dict())


class TrainingBusy(RuntimeError):
    """Another training of the same name in the same repository is running: they would share its checkpoints."""


def _fit(rank, world, device, data, models, config, name, init_from, log, peers: Peers | None) -> Path | None:
    # one training of a name at a time in a repository (the schedule's daily run and someone's experiment):
    # both would read, replace and delete the one checkpoint folder; held by the first worker for the run
    lock = locks.hold(models / name / ".checkpoint.lock") if rank == 0 else None
    if rank == 0 and lock is None:
        raise TrainingBusy(f"another fin train of {name} is running in {models} (it holds {name}/.checkpoint)")
    try:
        return _fit_held(rank, world, device, data, models, config, name, init_from, log, peers)
    finally:
        if lock is not None:
            lock.close()


def _fit_held(rank, world, device, data, models, config, name, init_from, log, peers: Peers | None) -> Path | None:
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(config.seed)
    model = MODELS[config.model](config.model_config)
    if init_from is not None:
        _warm_start(model, init_from, config)
    barrier = peers.barrier if peers else dist.barrier  # the replicas meet in their own group (`fin.local_sgd`)
    model = shard(model, device, config.sharding, config.sparse_lr,
                  min(dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=config.lr))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    checkpoints = Checkpoints(models / name / ".checkpoint", _fingerprint(data, config, world, init_from), rank,
                              barrier)
    progress = checkpoints.restore(model, optimizer, dense, log)
    replicas = Replicas(model, optimizer, peers, config.average_every) if peers else None
    log(f"train {name}: {config.model}, {world} worker(s) on {device.type}, tables {_plan_text(model)}"
        + (f", replicas merged every {config.average_every} steps" if peers else ""))

    # fragments are cut where the model runs: on a GPU the loader ships timeline slices and pointers only;
    # and it ships no event older than the model reads (DIN's 50, none for the DNN: the same fragments)
    on_host = device.type == "cpu"
    loader = dataclasses.replace(config.loader, max_seq_len=_window(config))
    images = config.model_config.image_dim > 0
    train_stream = ExampleStream(data, "train", loader, rank, world, cut=on_host, images=images)
    # replicas are one model after each epoch's merge: each scores the whole split alike, as a lone worker does
    validation = ExampleStream(data, "validation", dataclasses.replace(loader, shuffle=False),
                               *((0, 1) if peers else (rank, world)), cut=on_host, images=images)
    train_stream.pin_memory = validation.pin_memory = device.type == "cuda"
    while progress.epoch < config.epochs and progress.epoch - progress.best_epoch < config.patience:
        started = time.perf_counter()
        train_stream.epoch = progress.epoch  # the data order depends on (seed, epoch) only: resumable
        with tqdm(total=config.max_steps or None, unit="step", desc=f"epoch {progress.epoch + 1}", leave=False,
                  disable=None if rank == 0 else True, file=sys.stderr, dynamic_ncols=True) as bar:
            loss_sum, examples = _train_epoch(model, optimizer, train_stream, world, config.max_steps, device,
                                              bar.update, replicas)
        seconds = time.perf_counter() - started
        val_auc, val_logits, val_labels = _validation(model, validation, device)
        progress.epoch += 1
        progress.examples += examples
        progress.seconds += seconds
        progress.history.append({"epoch": progress.epoch, "train_logloss": loss_sum / max(examples, 1),
                                 "validation_auc": _finite(val_auc), "examples_per_s": examples / seconds})
        # a collective when sharded: every worker joins; merged replicas are one model, rank 0's is written
        weights = full_state_dict(model) if rank == 0 or peers is None else None
        # (a validation split of one class has no AUC (-inf): its first epoch is kept, then patience runs out)
        if val_auc > progress.best_auc or progress.best_epoch == 0:
            progress.best_auc, progress.best_epoch = val_auc, progress.epoch
            fit = fit_platt(val_logits, val_labels)  # every worker fits the same gathered arrays alike
            progress.best_calibration = None if fit is None else fit.to_meta("validation")
            checkpoints.save_best(weights, progress.epoch)
        checkpoints.save(model, optimizer, progress)
        log(f"epoch {progress.epoch}/{config.epochs}: train logloss {loss_sum / max(examples, 1):.4f}, "
            f"validation AUC {val_auc:.4f}, {examples / seconds:,.0f} examples/s")
    if progress.epoch < config.epochs:
        log(f"early stop: validation AUC did not improve for {config.patience} epoch(s)")

    if rank != 0:
        barrier()
        return None
    training = {"workers": world, "device": device.type, "sharding": config.sharding, "plan": plan_summary(model),
                "epochs": progress.epoch, "best_epoch": progress.best_epoch, "history": progress.history,
                "examples": progress.examples, "seconds": round(progress.seconds, 3),
                "examples_per_s": progress.examples / max(progress.seconds, 1e-9), "train_config": to_dict(config),
                "data": str(data), "init_from": None if init_from is None else str(init_from)}
    check = _held_out_requests(data, loader, config.check_requests, images) if config.compile else None
    if check is not None:
        log(f"compiling the scoring package, checked on {len(check)} validation requests")
    folder = save_artifact(models, name, config.model, checkpoints.best(progress.best_epoch), config.model_config,
                           config.loader,
                           {"validation_auc": _finite(progress.best_auc)}, training, calibration=progress.best_calibration,
                           compile_with=check)
    compiled = json.loads((folder / META).read_text()).get("compiled")
    if compiled is not None:
        log("compiled package: " + (f"max pCTR difference from eager {compiled['max_abs_pctr_difference']:.2g}, "
                                    f"{compiled['seconds']:.0f} s" if "package" in compiled
                                    else f"none ({compiled['error']}); the model is served eagerly"))
    checkpoints.clear()
    log(f"wrote {folder} (best epoch {progress.best_epoch}, validation AUC {progress.best_auc:.4f}; "
        f"{_calibration_text(progress.best_calibration)})")
    barrier()
    return folder


def _held_out_requests(data: Path, loader, count: int, images: bool) -> list:
    """The first `count` logged requests of the validation split, as a server receives them."""
    stream = ExampleStream(data, "validation", dataclasses.replace(loader, shuffle=False, workers=0), 0, 1,
                           images=images)
    batch = next(iter(stream), None)
    return [] if batch is None else scoring_requests(batch, count)


def _plan_text(model) -> str:
    kinds = sorted(set(plan_summary(model).values()))
    return "/".join(kinds)


def _train_epoch(model, optimizer, stream: ExampleStream, world: int, max_steps: int | None,
                 device: torch.device, on_step: Callable[[int], object] = lambda n: None,
                 replicas: Replicas | None = None) -> tuple[float, int]:
    model.train()
    loss_sum, examples = 0.0, 0
    for step, batch in enumerate(stream):
        if max_steps and step >= max_steps:
            break
        batch = batch.to(device).cut(stream.config.fragments)
        logits, auxiliary = model(batch, auxiliary=True)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label, reduction="none")
        loss = (losses.sum() + auxiliary.sum()) * world / batch.global_size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if replicas is not None:
            replicas.stepped()
        loss_sum += float(losses.detach().sum())
        examples += len(batch)
        on_step(1)
    if replicas is not None:
        replicas.merge()  # the epoch ends with one model: validation, checkpoint and artifact are any replica's
    totals = torch.tensor([loss_sum, examples], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors
    (replicas.peers.all_reduce if replicas else dist.all_reduce)(totals)
    return float(totals[0]), int(totals[1])


def _calibration_text(entry: dict | None) -> str:
    if entry is None:
        return "uncalibrated: the validation labels have one class"
    fitted = entry["validation"]
    return (f"{entry['method']} calibration, validation sum of pCTR / clicks {fitted['calibration_before']:.3f} "
            f"-> {fitted['calibration_after']:.3f}")


@torch.no_grad()
def _validation(model, stream: ExampleStream, device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation AUC and the logits and labels it was computed from, gathered over every worker."""
    model.eval()
    scores, labels = [], []
    for batch in stream:
        scores.append(model(batch.to(device).cut(stream.config.fragments)).float().cpu().numpy())
        labels.append(batch.label.numpy())
    mine = (np.concatenate(scores or [np.zeros(0)]), np.concatenate(labels or [np.zeros(0)]))
    gathered: list = [mine]
    if dist.get_world_size() > 1:  # a lone worker has them all (module docstring: no collectives)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    logits, labels = np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])
    value = auc(labels, logits)
    return -math.inf if math.isnan(value) else value, logits, labels


def _fingerprint(data: Path, config: TrainConfig, world: int, init_from: Path | None = None) -> dict:
    """What must match for a checkpoint to be resumed: the dataset (its folder however spelled, and its files'
    names, sizes and times, so that a dataset rebuilt in place, as the daily schedule does, starts afresh
    rather than resuming the last day's epochs), the config, the workers and the warm start."""
    dataset = Dataset.at(data)
    parts = [p for split in ("train", "validation") for p in dataset.parts(EXAMPLES, split)]
    files = sorted({*parts, *map(dataset.timeline_part, parts), *(dataset.stats_source(key) for key in STAT_KEYS)})
    identity = hashlib.sha256("\n".join(f"{p.relative_to(dataset.root)} {p.stat().st_size} {p.stat().st_mtime_ns}"
                                         for p in files if p.exists()).encode()).hexdigest()
    # (what is done after training or only paces it may change on a rerun: `--no-compile` after a failed
    # compile, other threads, would otherwise throw the trained epochs away)
    trained = dataclasses.replace(config, compile=TrainConfig.compile, check_requests=TrainConfig.check_requests,
                                  threads=TrainConfig.threads)
    return {"data": str(dataset.root.resolve()), "data_files": identity, "config": to_dict(trained), "world": world,
            "init_from": None if init_from is None else str(init_from.resolve())}


class Checkpoints:
    """Epoch checkpoints of a sharded model and its optimizer (torch.distributed.checkpoint)."""

    def __init__(self, folder: Path, fingerprint: dict, rank: int, barrier: Callable[[], object]):
        self.folder, self.fingerprint, self.rank, self.barrier = folder, fingerprint, rank, barrier
        # every worker holds the whole model (a lone worker, or merged replicas): rank 0 writes it and every
        # worker reads it, with no collectives (module docstring)
        self.whole = dist.get_world_size() == 1

    @property
    def _pointer(self) -> Path:
        return self.folder / "latest.json"

    def restore(self, model, optimizer, dense, log: Log) -> Progress:
        if not self._pointer.exists():
            self._reset()
            return Progress()
        latest = json.loads(self._pointer.read_text())
        if latest["fingerprint"] != self.fingerprint:
            log(f"ignoring the checkpoint in {self.folder}: it is of another data, config or worker count")
            self._reset()
            return Progress()
        dense.init_state()  # Adam's state must exist to be loaded into
        checkpoint = str(self.folder / latest["checkpoint"])
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=checkpoint, no_dist=self.whole)
        # a weight that never had a gradient (the DNN's event encoder: it reads no history) has no Adam state
        # in the checkpoint; it keeps the zero state `init_state` gave it
        state["optimizer"] = optimizer.state_dict()
        dcp.load({"optimizer": state["optimizer"]}, checkpoint_id=checkpoint, no_dist=self.whole,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(**latest["progress"])
        log(f"resumed from {self.folder / latest['checkpoint']} (epoch {progress.epoch} done)")
        return progress

    def _reset(self) -> None:
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        self.barrier()

    def save(self, model, optimizer, progress: Progress) -> None:
        name = f"epoch-{progress.epoch}"
        if self.rank == 0 or not self.whole:
            dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                     checkpoint_id=str(self.folder / name), no_dist=self.whole)
        self.barrier()  # every worker's shards are on disk before the pointer moves
        if self.rank == 0:
            tmp = self._pointer.with_suffix(".tmp")
            tmp.write_text(json.dumps({"checkpoint": name, "fingerprint": self.fingerprint,
                                       "progress": dataclasses.asdict(progress)}))
            os.replace(tmp, self._pointer)
            for old in self.folder.glob("epoch-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            for old in self.folder.glob("best-*.safetensors"):  # only the pointer's best epoch is read
                if old != self._best(progress.best_epoch):
                    old.unlink()
        self.barrier()

    def _best(self, epoch: int) -> Path:
        return self.folder / f"best-{epoch}.safetensors"

    def save_best(self, weights: dict[str, torch.Tensor] | None, epoch: int) -> None:
        """The weights of `epoch`, the best so far, under a name of its own: until the pointer moves (`save`),
        a rerun reads the previous best epoch's, so a run killed between the two keeps best weights, AUC and
        calibration of one epoch."""
        if weights is not None:  # rank 0
            save_file(weights, str(self.folder / "best.tmp"))
            os.replace(self.folder / "best.tmp", self._best(epoch))

    def best(self, epoch: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._best(epoch)))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
