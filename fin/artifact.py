"""Model artifacts: what training writes and what the evaluator and the server load (and nothing else).

    MODELS/<name>/<version>/model.safetensors   every weight, whole (gathered from the shards), no pickle
    MODELS/<name>/<version>/artifact.json       model kind, model and loader configs, data contract version,
                                                training metrics, sha256 of model.safetensors, the
                                                calibration fitted on the validation days (`fin.calibration`),
                                                and the compiled package's entry (`compiled`)
    MODELS/<name>/<version>/model.pt2           the compiled scoring package (`fin.compiled`), when it built
                                                and passed its check against the eager forward

The repository's layout (versions, the promoted pointer, resolving a name) is `fin.versions`, which needs
no torch. A version folder appears by one rename once complete, so a reader never sees half an artifact.
Loading checks the checksum and the contract version and refuses the artifact with `ArtifactError`
otherwise. An artifact without a `calibration` entry (written before calibration existed) loads and scores
with the plain sigmoid, as it always did; `Artifact.pctr` is the one way from logits to pCTR. A package
is loaded only when asked (the server): one that is missing, fails its checksum or does not load leaves the
artifact scoring eagerly, with the reason in `Artifact.package_note`; it never refuses the artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from features.configfile import load_config
from features.contract import CONTRACT_VERSION
from fin.calibration import PlattScaling, from_meta
from fin.calibration import pctr as calibrated_pctr
from fin.compiled import PACKAGE, CompiledScorer, build_package, load_package
from fin.inputs import LoaderConfig, ScoringRequest
from fin.models import MODELS, CTRModel, ModelConfig
from fin.versions import META, WEIGHTS, ArtifactError, Loaded, sha256, versions


def to_dict(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass
class Artifact(Loaded):
    model: CTRModel  # unsharded, on CPU, in eval mode
    loader: LoaderConfig
    calibration: PlattScaling | None = None  # None: the plain sigmoid (artifacts without calibration)
    package: CompiledScorer | None = None  # the compiled forward, when loaded (None: the eager model scores)
    package_note: str = "not loaded"  # why the package scores or does not

    def pctr(self, logits: torch.Tensor) -> torch.Tensor:
        """The served and evaluated pCTR of this model's logits."""
        return calibrated_pctr(logits, self.calibration)


def save_artifact(models: str | Path, name: str, model_kind: str, weights: dict[str, torch.Tensor],
                  model_config: ModelConfig, loader: LoaderConfig, metrics: dict, training: dict,
                  calibration: dict | None = None, compile_with: Sequence[ScoringRequest] | None = None) -> Path:
    """Write a new version of `name` under `models`; returns its folder. `calibration` is the artifact.json
    entry of `fin.calibration.CalibrationFit.to_meta` (None: the artifact is scored uncalibrated). With
    `compile_with` (held-out requests to check it on), the compiled scoring package is built beside the
    weights before the version appears (`fin.compiled.build_package`)."""
    folder = Path(models) / name
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / WEIGHTS))
        meta = {
            "name": name, "model": model_kind, "contract_version": CONTRACT_VERSION,
            "model_config": to_dict(model_config), "loader_config": to_dict(loader),
            "metrics": metrics, "training": training, "sha256": sha256(staging / WEIGHTS),
        }
        if calibration is not None:
            meta["calibration"] = calibration
        if compile_with is not None:
            model = MODELS[model_kind](model_config)
            model.load_state_dict(weights)
            meta["compiled"] = build_package(staging, model.eval(), loader, from_meta(calibration), compile_with)
        while True:  # another writer may take a version number first: count on
            version = (versions(models, name) or [0])[-1] + 1
            (staging / META).write_text(json.dumps({**meta, "version": version}, indent=2, sort_keys=True) + "\n")
            try:
                os.rename(staging, folder / str(version))
                return folder / str(version)
            except OSError:
                if not (folder / str(version)).exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_artifact(path: str | Path, package: bool = False) -> Artifact:
    """The artifact at `path`, refused with ArtifactError when broken; with `package`, its compiled forward
    too when it has one that loads (`Artifact.package_note` says why not otherwise)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable {META}: {e}") from None
    major = str(meta.get("contract_version", "")).split(".")[0]
    if major != CONTRACT_VERSION.split(".")[0]:
        raise ArtifactError(f"{path}: data contract {meta.get('contract_version')!r} does not match this "
                            f"code's {CONTRACT_VERSION!r}")
    if not (path / WEIGHTS).exists() or sha256(path / WEIGHTS) != meta.get("sha256"):
        raise ArtifactError(f"{path}: checksum of {WEIGHTS} does not match {META}")
    if meta.get("model") not in MODELS:
        raise ArtifactError(f"{path}: unknown model kind {meta.get('model')!r}")
    try:
        # an artifact written before the attentions' intensity existed (no key) was trained without it
        written = {"intensity": False, **meta["model_config"]}
        config = load_config(ModelConfig, written, label=f"{path / META} model_config")
        loader = load_config(LoaderConfig, meta["loader_config"], label=f"{path / META} loader_config")
        model = MODELS[meta["model"]](config)
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path}: weights or configs do not fit the model: {e}") from None
    try:
        scaling = from_meta(meta.get("calibration"))
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
    artifact = Artifact(path=path, meta=meta, model=model.eval(), loader=loader, calibration=scaling)
    if package:
        artifact.package, artifact.package_note = _package(path, meta.get("compiled") or {}, loader,
                                                           model.config.image_dim)
    return artifact


def _package(path: Path, entry: dict, loader: LoaderConfig, image_dim: int) -> tuple[CompiledScorer | None, str]:
    if "package" not in entry:
        return None, f"no package ({entry.get('error', 'not compiled')})"
    file = path / entry["package"]
    if entry["package"] != PACKAGE or not file.exists() or sha256(file) != entry.get("sha256"):
        return None, f"package {file.name} is missing or its checksum does not match {META}"
    try:
        return CompiledScorer(load_package(file), loader.max_seq_len, image_dim), "compiled"
    except Exception as e:  # noqa: BLE001 - e.g. built by another torch: the eager model serves
        return None, f"package {file.name} does not load: {type(e).__name__}: {e}"[:500]
