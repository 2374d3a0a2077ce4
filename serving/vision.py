"""Vision models in the same repository as the CTR models, served through the Open Inference Protocol.

A vision artifact is `MODELS/<name>/<version>/` with `model.safetensors` (weights, no pickle) and
`artifact.json`: {"task": "vision", "model": <architecture>, "config": {...}, "inputs": [...], "outputs":
[...], "sha256": ...}, the inputs and outputs declared as Open Inference Protocol tensors (name, datatype,
shape with -1 for any size). The architecture comes from `ARCHITECTURES` (by "model"), the weights from the
file. `creative_encoder` (`fin.vision`) embeds ad creatives; `small_cnn` is a small image classifier, and
`write_example` builds one locally (seeded random weights, no download) to prove the path end to end.

A loaded model runs in inference form (`for_inference`): batch norms folded into the convolutions before
them and activations in channels-last layout, which the CPU's convolution kernels run fastest. The
creative encoder embeds a creative in 1.05 against 1.66 ms, 16 in 8.4 against 19.6 ms (one thread); every
reader (ModelInfer, the embedding job, the server's in-process embedding) loads through here, so they agree.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn
from torch.fx.experimental.optimization import fuse

from fin.versions import META, WEIGHTS, ArtifactError, Loaded, sha256
from fin.vision import TASK as TASK  # the artifact task the repository loads with this module
from fin.vision import CreativeEncoder, CreativeEncoderConfig, write_vision_artifact
from serving.tensors import TensorSpec


@dataclass(frozen=True)
class SmallCNNConfig:
    channels: int = 3
    size: int = 32  # square images of size x size
    width: int = 16
    classes: int = 10


class SmallCNN(nn.Module):
    """Two conv blocks, global average pooling, a linear classifier: FP32 images [N, C, H, W] -> logits and
    probabilities."""

    outputs = ("logits", "probabilities")

    def __init__(self, config: SmallCNNConfig):
        super().__init__()
        w = config.width
        self.features = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(2 * w, config.classes)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.features(images).flatten(1))
        return {"logits": logits, "probabilities": torch.softmax(logits, -1)}


# architecture name -> (module, config); each module returns a dict of its named `outputs`
ARCHITECTURES = {"small_cnn": (SmallCNN, SmallCNNConfig), "creative_encoder": (CreativeEncoder, CreativeEncoderConfig)}


@dataclass
class VisionModel(Loaded):
    platform: ClassVar[str] = "pytorch_safetensors"
    module: nn.Module  # eval mode, CPU
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @torch.inference_mode()
    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The declared input by name -> every declared output by name."""
        out = self.module(inputs[self.inputs[0].name].contiguous(memory_format=torch.channels_last))
        return {spec.name: out[spec.name] for spec in self.outputs}


def for_inference(module: nn.Module) -> nn.Module:
    """An eval-mode module in inference form: batch norms folded into their convolutions (the module traced
    by torch.fx; one that does not trace keeps its batch norms) and weights in channels-last layout."""
    module = module.eval()
    try:
        module = fuse(module)
    except Exception as e:  # noqa: BLE001 - an architecture that does not trace is served unfused
        logging.getLogger(__name__).info("%s runs unfused: %s", type(module).__name__, e)
    return module.to(memory_format=torch.channels_last)


def _specs(values: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(v["name"], v["datatype"], tuple(int(s) for s in v["shape"])) for v in values]


def load_vision(path: str | Path) -> VisionModel:
    """Load and check a vision artifact; raises ArtifactError with the reason."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        kind, config = meta["model"], meta["config"]
        inputs, outputs = _specs(meta["inputs"]), _specs(meta["outputs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable vision {META}: {e}") from None
    if kind not in ARCHITECTURES:
        raise ArtifactError(f"{path}: unknown vision model {kind!r}")
    module_cls, config_cls = ARCHITECTURES[kind]
    if len(inputs) != 1 or inputs[0].datatype != "FP32" or not outputs or \
            any(o.name not in module_cls.outputs or o.datatype != "FP32" for o in outputs):
        raise ArtifactError(f"{path}: {kind} takes one FP32 input and returns FP32 "
                            f"{', '.join(module_cls.outputs)}")
    if sha256(path / WEIGHTS) != meta.get("sha256"):
        raise ArtifactError(f"{path}: checksum of {WEIGHTS} does not match {META}")
    module = module_cls(config_cls(**config))
    try:
        module.load_state_dict(load_file(str(path / WEIGHTS)))
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not fit {kind}: {str(e).splitlines()[0]}") from None
    return VisionModel(path, meta, for_inference(module), inputs, outputs)


def write_example(models: str | Path, name: str = "small_cnn", version: int = 1, seed: int = 0,
                  config: SmallCNNConfig = SmallCNNConfig()) -> Path:
    """A small image classifier with seeded random weights, written as a vision artifact."""
    torch.manual_seed(seed)
    return write_vision_artifact(
        models, name, SmallCNN(config), "small_cnn", asdict(config), version=version,
        inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, config.channels, config.size, config.size]}],
        outputs=[{"name": output, "datatype": "FP32", "shape": [-1, config.classes]} for output in SmallCNN.outputs])


def smoke_check_vision(model: VisionModel) -> None:
    spec = model.inputs[0]
    shape = [1 if s < 0 else s for s in spec.shape]
    out = model.infer({spec.name: torch.zeros(shape)})
    if any(not torch.isfinite(v).all() for v in out.values()):
        raise ValueError("smoke check: non-finite outputs")
