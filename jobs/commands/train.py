"""`fin train`: FIN or a baseline with TorchRec, written as a model artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fin.train import TrainConfig

    # no defaults here: a flag left out keeps the --config file's value, else TrainConfig's (shown)
    d = TrainConfig()
    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features (or its data/ folder)")
    p.add_argument("--out", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--model", help=f"model kind: fin, din, sim or dnn (default {d.model})")
    p.add_argument("--name", help="artifact name (default: the model kind)")
    p.add_argument("--config", type=Path, help="YAML/JSON training config (any subset; see configs/train.yaml)")
    p.add_argument("--workers", type=int, help=f"local worker processes (default {d.workers})")
    p.add_argument("--average-every", type=int,
                   help="with several workers, train a whole replica on each and merge the replicas every this many "
                        f"steps (local SGD; 0: one model sharded over the workers, default {d.average_every})")
    p.add_argument("--threads", type=int, help="intra-op threads of each worker on a CPU (default: the CPUs "
                                               "shared out among the workers; 1 lets trainings run side by side)")
    p.add_argument("--epochs", type=int, help=f"maximum epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int,
                   help=f"global batch size (split over workers; default {d.loader.batch_size})")
    p.add_argument("--max-steps", type=int, help=f"steps per epoch (default {d.max_steps}; 0: the whole train split)")
    p.add_argument("--max-seq-len", type=int, help=f"history events read per example (default {d.loader.max_seq_len})")
    p.add_argument("--lr", type=float, help=f"dense learning rate (Adam; default {d.lr:g})")
    p.add_argument("--sparse-lr", type=float, help=f"table learning rate (row-wise Adagrad; default {d.sparse_lr:g})")
    p.add_argument("--patience", type=int,
                   help=f"epochs without a better validation AUC before stopping (default {d.patience})")
    p.add_argument("--sharding",
                   help=f"table sharding: table_wise, row_wise or auto (the planner's choice); default {d.sharding}")
    p.add_argument("--seed", type=int, help=f"seed of the model's initialisation and of the data order "
                                            f"(default {d.seed})")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="write the artifact without its compiled scoring package (served eagerly); by default "
                        "the package is built and checked against the eager forward beside the weights")
    p.add_argument("--no-images", dest="images", action="store_const", const=False,
                   help="train without the image modality even when the data has creative embeddings "
                        "(fin embed-creatives); by default a model reads them when they are there")
    p.add_argument("--init-from", type=Path,
                   help="start from this artifact's weights (MODELS/NAME/VERSION of the same model and config)")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from fin.train import load_train_config, train
    from fin.versions import META

    config = load_train_config(args.config, **{
        "model": args.model, "epochs": args.epochs, "workers": args.workers, "threads": args.threads,
        "average_every": args.average_every,
        "sharding": args.sharding,
        "lr": args.lr, "sparse_lr": args.sparse_lr, "patience": args.patience, "max_steps": args.max_steps,
        "seed": args.seed, "loader.seed": args.seed, "compile": args.compile, "images": args.images, "loader.batch_size": args.batch_size, "loader.max_seq_len": args.max_seq_len,
    })
    if args.init_from is not None and not (args.init_from / "artifact.json").is_file():
        raise CommandError(f"--init-from {args.init_from} is not an artifact version folder (MODELS/NAME/VERSION)")
    folder = train(args.data, args.out, config, name=args.name, init_from=args.init_from)
    if folder is None:  # a worker other than rank 0 under torchrun: rank 0 writes the artifact and reports it
        emit(args, {"command": "train", "artifact": None}, str(folder))
        return 0
    meta = json.loads((folder / META).read_text())
    training = meta.get("training", {})
    result = {"command": "train", "model": meta["model"], "name": meta["name"], "version": meta["version"],
              "artifact": folder, "init_from": args.init_from, "metrics": meta.get("metrics", {}),
              "epochs": training.get("epochs"), "best_epoch": training.get("best_epoch"),
              "examples": training.get("examples"), "workers": training.get("workers"),
              "seconds": training.get("seconds"), "examples_per_s": training.get("examples_per_s"),
              "calibration": meta.get("calibration"), "compiled": meta.get("compiled")}
    emit(args, result, str(folder))  # the text: the artifact folder alone, for scripts
    return 0


COMMAND = Command(
    name="train", help="train FIN or a baseline with TorchRec; write a model artifact",
    description="Train a model on the features job's output with DistributedModelParallel "
                "(gloo on CPU, NCCL on GPU), checkpoint every epoch (a rerun resumes), stop "
                "early on validation AUC, and write MODELS/<name>/<version>/ (safetensors "
                "weights, configs, metrics, checksum) with its compiled scoring package "
                "(model.pt2, checked against the eager forward). Under torchrun each process is one "
                "worker (the way to a cluster).",
    add_arguments=add_arguments, run=run, quiet_libraries=True)
