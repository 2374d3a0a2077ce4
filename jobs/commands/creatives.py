"""`fin train-encoder` and `fin embed-creatives`: the creative encoder trained on a features run's creatives,
and every creative embedded into the Feast item view that FIN reads."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit, field_default, progress, say


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from fin.vision import ENCODER, EncoderTrainConfig

    d = EncoderTrainConfig()
    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features (or its data/ folder)")
    p.add_argument("--out", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--name", default=ENCODER, help=f"artifact name (default {ENCODER})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the train-split creatives (default {d.epochs})")
    p.add_argument("--embedding-dim", type=int, default=d.encoder.embedding_dim,
                   help=f"width of the embedding (default {d.encoder.embedding_dim})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    add_json_flag(p)


def run_train(args: argparse.Namespace) -> int:
    from fin.versions import META
    from fin.vision import EncoderTrainConfig, train_encoder

    d = EncoderTrainConfig()
    config = replace(d, epochs=args.epochs, seed=args.seed,
                     encoder=replace(d.encoder, embedding_dim=args.embedding_dim))
    if min(config.epochs, config.encoder.embedding_dim) < 1:
        raise CommandError("--epochs and --embedding-dim must be at least 1")
    with progress(config.epochs, "epoch", "creative encoder") as bar:
        try:
            folder = train_encoder(args.data, args.out, config, args.name, log=lambda m: say(args, m),
                                   progress=bar.update)
        except FileNotFoundError as e:
            raise CommandError(str(e)) from None
    meta = json.loads((folder / META).read_text())
    emit(args, {"command": "train-encoder", "artifact": folder, "name": meta["name"], "version": meta["version"],
                "training": meta["training"]}, str(folder))
    return 0


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    from jobs.creatives_job import EmbedConfig

    p.add_argument("--data", required=True, type=Path, help="the output folder of fin features")
    p.add_argument("--encoder", required=True, type=Path,
                   help="the creative encoder: MODELS/NAME (its newest version) or MODELS/NAME/VERSION")
    p.add_argument("--ray-address", help="a Ray cluster to run on (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-materialize", dest="materialize", action="store_false",
                   help="write the view's source only; leave the online store as it is")
    chunk = field_default(EmbedConfig, "chunk")
    p.add_argument("--chunk", type=int, default=chunk, help=f"creatives per Ray task (default {chunk})")
    add_json_flag(p)


def run_embed(args: argparse.Namespace) -> int:
    from fin.versions import ArtifactError, resolve
    from jobs.creatives_job import EmbedConfig, embed_creatives
    from serving.vision import load_vision

    try:
        encoder = resolve(args.encoder)
        load_vision(encoder)  # refused here, with the reason, rather than in every task
    except ArtifactError as e:
        raise CommandError(f"--encoder {args.encoder}: {e}") from None
    if args.chunk < 1:
        raise CommandError("--chunk must be at least 1")
    config = EmbedConfig(chunk=args.chunk, ray_address=args.ray_address, num_cpus=args.num_cpus,
                         materialize=args.materialize)
    try:
        result = embed_creatives(args.data, encoder, config, progress=lambda m: say(args, m))
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    emit(args, {"command": "embed-creatives", "encoder": encoder, **result},
         f"embedded {result['creatives']} creatives ({result['dim']} values each) into {result['source']}"
         + (f"; materialised in {result['feast_repo']}" if result["feast_repo"] and args.materialize else ""))
    return 0


TRAIN = Command(
    name="train-encoder", help="train the creative encoder on a features run's creatives",
    description="Train a ResNet (MONAI's, randomly initialised: nothing is downloaded) on the creatives of "
                "the items shown in the train split, to predict each item's category and click rate from its "
                "image; write it as a vision artifact (MODELS/NAME/VERSION) that servers serve through "
                "ModelInfer and fin embed-creatives runs.",
    add_arguments=add_train_arguments, run=run_train, quiet_libraries=True)

EMBED = Command(
    name="embed-creatives", help="embed every creative into the Feast item view FIN reads",
    description="A Ray job: every creative of a features run through the creative encoder, written as the "
                "item_creative feature view's source and materialised into the online store. fin train "
                "then reads the embeddings as FIN's image modality; servers read them online.",
    add_arguments=add_embed_arguments, run=run_embed, quiet_libraries=True)
