"""`fin add-onnx`: a team's own ONNX model added to the model repository with its declared config, checked
as the server will load it. Imports no torch (`serving.onnx_model`): it starts fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--name", required=True, help="model name (MODELS/NAME)")
    p.add_argument("--onnx", required=True, type=Path, help="the ONNX file, weights inside (torch.onnx.export(..., external_data=False))")
    p.add_argument("--config", required=True, type=Path,
                   help="YAML or JSON: max_batch_size, and inputs and outputs, each a list of {name, datatype, "
                        "dims} (dims without the batch dimension when max_batch_size > 0, as in Triton)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    import yaml

    from fin.versions import ArtifactError
    from serving.onnx_model import add_onnx, read_config

    try:
        config = yaml.safe_load(args.config.read_text())
        read_config(config)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CommandError(f"--config {args.config}: {e}") from None
    try:
        folder = add_onnx(args.models, args.name, args.onnx, config, args.version)
    except ArtifactError as e:
        raise CommandError(str(e)) from None
    emit(args, {"command": "add-onnx", "models": args.models, "name": args.name, "folder": folder,
                "version": int(folder.name)},
         f"{folder}: added (servers load it at their next repository scan; ModelInfer runs it)")
    return 0


COMMAND = Command(
    name="add-onnx", help="add an ONNX model with its declared config to the model repository",
    description="Copies the ONNX file into MODELS/NAME/VERSION with an artifact.json holding the "
                "config (inputs, outputs, datatypes, dims, max_batch_size) and its checksum, once "
                "onnxruntime has loaded it, found every declared tensor in its graph and run it on "
                "zeros. Servers load the version at their next scan and serve it through the Open "
                "Inference Protocol (ModelInfer, ModelMetadata, ModelReady), beside the CTR models.",
    add_arguments=add_arguments, run=run)
