"""Bring-your-own models: ONNX files served through the Open Inference Protocol beside the CTR models.

A team exports its own model (`torch.onnx.export(..., external_data=False)`, or any ONNX exporter, into one
file with its weights; e.g. an infrared-visible image fusion network with two image inputs) and adds it to the repository with a declared config, as Triton's
`config.pbtxt` declares one: `fin add-onnx --models MODELS --name NAME --onnx FILE --config CONFIG.yaml`.

    max_batch_size: 16          # 0: the model has no batch dimension
    inputs:                     # every input of the graph
      - {name: infrared, datatype: FP32, dims: [1, 64, 64]}
      - {name: visible, datatype: FP32, dims: [3, 64, 64]}
    outputs:                    # those served (some or all of the graph's)
      - {name: fused, datatype: FP32, dims: [1, 64, 64]}

As in Triton, `dims` leave out the batch dimension when `max_batch_size` > 0 (the served shape is
[-1, *dims], and a request's batch may be 1 .. max_batch_size); -1 is a dimension of any size. The
version folder holds `model.onnx` and `artifact.json` (the config, the checksum); it is written only after
onnxruntime has loaded the model, found the declared tensors in its graph (names, element types, ranks,
fixed sizes) and run it once on zeros, so a broken model never lands in the repository. The server runs
it with onnxruntime on the CPU, one intra-op thread per call.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fin.versions import META, ArtifactError, Loaded, sha256, versions
from serving.tensors import DATATYPES, TensorSpec

TASK = "onnx"
PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
# KServe v2 datatype -> onnxruntime's type name
ONNX_TYPES = {"FP32": "tensor(float)", "FP64": "tensor(double)", "INT32": "tensor(int32)", "INT64": "tensor(int64)",
              "UINT8": "tensor(uint8)"}


@dataclass
class OnnxModel(Loaded):
    platform: ClassVar[str] = PLATFORM
    session: object  # onnxruntime.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int  # 0: no batch dimension

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every declared input by name -> every declared output by name; `RefusedInput` where onnxruntime
        refuses the values (an index outside a table, a size the graph fixes otherwise)."""
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        names = [o.name for o in self.outputs]
        try:
            return dict(zip(names, self.session.run(names, arrays)))
        except InvalidArgument as e:
            raise RefusedInput(f"{self.name}: the model refused the inputs: {' '.join(str(e).split())}") from None


class RefusedInput(ValueError):
    """Inputs of the declared types and shapes that the graph refuses: the caller's values, not the server."""


def read_config(config: dict) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """A declared config -> (inputs, outputs, max_batch_size), shapes as served; ValueError says what is wrong."""
    if not isinstance(config, dict):
        raise ValueError("the config is a mapping with inputs, outputs and max_batch_size")
    batch = config.get("max_batch_size", 0)
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"max_batch_size must be a whole number >= 0, not {batch!r}")

    def specs(side: str) -> list[TensorSpec]:
        entries = config.get(side)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"the config declares no {side}")
        out = []
        for e in entries:
            if not isinstance(e, dict) or not {"name", "datatype", "dims"} <= e.keys():
                raise ValueError(f"each of {side} needs name, datatype and dims: {e!r}")
            if e["datatype"] not in DATATYPES:
                raise ValueError(f"{side} {e['name']!r}: datatype {e['datatype']!r} is not one of {', '.join(DATATYPES)}")
            dims = e["dims"]
            if not isinstance(dims, list) or any(not isinstance(d, int) or d < -1 or d == 0 for d in dims):
                raise ValueError(f"{side} {e['name']!r}: dims must be a list of sizes (-1: any)")
            out.append(TensorSpec(str(e["name"]), e["datatype"], tuple(([-1] if batch else []) + dims)))
        if len({s.name for s in out}) != len(out):
            raise ValueError(f"{side} repeat a name")
        return out

    return specs("inputs"), specs("outputs"), batch


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the server's threads run calls side by side, as its forwards do
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_graph(session, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int) -> None:
    """The declared tensors against the graph's: ValueError naming the first difference. With batching, the
    graph's first dimension must take any number of rows: calls are joined along it."""
    graph = {"inputs": {t.name: t for t in session.get_inputs()}, "outputs": {t.name: t for t in session.get_outputs()}}
    if set(graph["inputs"]) != {s.name for s in inputs}:
        raise ValueError(f"the graph's inputs are {sorted(graph['inputs'])}, the config declares "
                         f"{sorted(s.name for s in inputs)}")
    for side, declared in (("inputs", inputs), ("outputs", outputs)):
        for spec in declared:
            tensor = graph[side].get(spec.name)
            if tensor is None:
                raise ValueError(f"the graph has no output {spec.name!r} (it has {sorted(graph[side])})")
            if tensor.type != ONNX_TYPES[spec.datatype]:
                raise ValueError(f"{spec.name!r} is {tensor.type} in the graph, declared {spec.datatype}")
            if len(tensor.shape) != len(spec.shape):
                raise ValueError(f"{spec.name!r} has {len(tensor.shape)} dimensions in the graph, declared "
                                 f"{list(spec.shape)}")
            for axis, (got, want) in enumerate(zip(tensor.shape, spec.shape)):
                # a size the graph fixes is declared as it is (a -1 there was advertised as any, and every other
                # size failed in onnxruntime); the batch dimension is checked below
                if isinstance(got, int) and got > 0 and got != want and (want != -1 or axis > 0 or not max_batch_size):
                    raise ValueError(f"{spec.name!r} is {tensor.shape} in the graph, declared {list(spec.shape)}")
            if max_batch_size > 1 and isinstance(tensor.shape[0], int) and tensor.shape[0] > 0:
                raise ValueError(f"{spec.name!r} has a fixed batch of {tensor.shape[0]} in the graph: export it with a "
                                 f"dynamic first dimension, or declare max_batch_size 0 or 1")


def _smoke_check(model: OnnxModel) -> None:
    arrays = {s.name: np.zeros([1 if d < 0 else d for d in s.shape], DATATYPES[s.datatype]) for s in model.inputs}
    for name, value in model.infer(arrays).items():
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValueError(f"smoke check: output {name!r} is not finite on zero inputs")


def load_onnx(path: str | Path) -> OnnxModel:
    """Load and check an ONNX version folder; raises ArtifactError with the reason."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        inputs, outputs, batch = read_config(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable ONNX {META}: {e}") from None
    if sha256(path / MODEL_FILE) != meta.get("sha256"):
        raise ArtifactError(f"{path}: checksum of {MODEL_FILE} does not match {META}")
    try:
        session = _session(path / MODEL_FILE)
        _check_graph(session, inputs, outputs, batch)
        model = OnnxModel(path, meta, session, inputs, outputs, batch)
        _smoke_check(model)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; any failure refuses the version
        raise ArtifactError(f"{path}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return model


def add_onnx(models: str | Path, name: str, onnx_file: str | Path, config: dict, version: int | None = None) -> Path:
    """Add an ONNX model to the repository as MODELS/NAME/VERSION (the next free version when None), checked
    as the server will load it before it gets its name; returns the folder. ArtifactError when it fails."""
    models, onnx_file = Path(models), Path(onnx_file)
    if not onnx_file.is_file():
        raise ArtifactError(f"{onnx_file} is not a file")
    # what the server's scan loads: a folder name of MODELS, and a version folder of ASCII digits
    if not name or name.startswith(".") or Path(name).name != name:
        raise ArtifactError(f"model name {name!r} is not one folder name (no '/', not starting with '.')")
    if version is not None and version < 1:
        raise ArtifactError(f"version {version} is not a version: versions are 1 and up")
    version = version if version is not None else max(versions(models, name), default=0) + 1
    folder = models / name / str(version)
    if folder.exists():
        raise ArtifactError(f"{folder} exists already: give another --version")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        shutil.copyfile(onnx_file, staging / MODEL_FILE)
        meta = {"name": name, "version": version, "task": TASK, "model": "onnx", "config": config,
                "sha256": sha256(staging / MODEL_FILE)}
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
        load_onnx(staging)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
