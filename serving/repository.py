"""The server's view of a model repository folder: which model versions are loaded and serve.

`refresh()` looks for version folders it has not seen (`MODELS/<name>/<version>/`), loads each with
`fin.artifact.load_artifact` (checksum, contract version, model kind) and runs a smoke check (a cold-start
and a long-history request must give finite probabilities). A CTR version's compiled package
(`fin.compiled`) scores it when the package loads and gives the eager model's pCTRs on the smoke requests
(within `fin.compiled.TOLERANCE`); otherwise the version is served eagerly, with the reason logged and in
`Artifact.package_note`: a package never refuses a version. A version that passes is swapped in by
replacing one dict reference, so a request sees either the old set or the new one, never a half-loaded
model; one that fails is refused with its reason, logged and counted, and whatever served before keeps
serving. A refused version is retried only when its artifact.json changes. Requests name a model (or
get the default model) and may pin a version; otherwise the model's promoted version serves
(`MODELS/<name>/PROMOTED`, written by `fin.versions.promote`; kept loaded however old), or, before any
promotion, the newest loaded version.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.item_embeddings import ItemEmbeddings
from features.sequences import TIMELINE_FIELDS
from fin.artifact import Artifact, load_artifact
from fin.compiled import TOLERANCE
from fin.inputs import CANDIDATE_NUMBERS, CONTEXT_FEATURES, TARGET_FEATURES
from fin.versions import META, promoted, versions
from serving import onnx_model, vision
from serving.scoring import EMPTY_TIMELINE, RequestInputs, score

log = logging.getLogger("fin.serving")


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Change:
    action: str  # "loaded", "refused", "promoted" or "unloaded" (its folder was removed)
    name: str
    version: int
    reason: str = ""


@dataclass(frozen=True)
class _Serving:
    """What serves: name -> version -> loaded model, and name -> the loaded promoted version (the default)."""

    models: dict[str, dict[int, Artifact | vision.VisionModel | onnx_model.OnnxModel]]
    defaults: dict[str, int]


def smoke_check(artifact: Artifact) -> None:
    """Score a cold-start request and a request with a long synthetic history; raise if anything is off.
    Eagerly first; then, if the artifact has a package, drop it (and say why) unless it gives the same."""
    rng = np.random.default_rng(0)
    n, events = 4, artifact.loader.max_seq_len
    candidates = {c: rng.integers(1, 1000, n) for c in TARGET_FEATURES} | {c: rng.random(n) for c in CANDIDATE_NUMBERS}
    inputs = RequestInputs(user_id=1, context={"ts": 10**12, **{c: 1 for c in CONTEXT_FEATURES}},
                           candidates=candidates, bids=np.ones(n))
    history = {f: rng.integers(0, 5, events) for f in TIMELINE_FIELDS}
    history["ts"] = np.arange(events, dtype=np.int64)
    dim = artifact.model.config.image_dim  # a model that reads creatives: half the candidates have one
    images = ItemEmbeddings.of(candidates["item_id"][: n // 2], rng.normal(size=(n // 2, dim))) if dim else None
    package, artifact.package = artifact.package, None
    eager = []
    for timeline in (EMPTY_TIMELINE, history):
        p = score(artifact, inputs, timeline, None, images)
        if p.shape != (n,) or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
            raise ValueError(f"smoke check: bad probabilities {p}")
        eager.append(p)
    if package is not None:
        try:
            worst = max(float(np.max(np.abs(package.pctr(inputs.with_features(t, None, images)) - p)))
                        for t, p in zip((EMPTY_TIMELINE, history), eager, strict=True))
        except Exception as e:  # noqa: BLE001 - a package that cannot score leaves the version eager
            artifact.package_note = f"package fails on the smoke requests: {type(e).__name__}: {e}"[:500]
            return
        if not worst <= TOLERANCE:
            artifact.package_note = f"package pCTRs differ from the eager model's by {worst:.3g} on the smoke requests"
            return
        artifact.package = package


class ModelRepository:
    def __init__(self, root: str | Path, keep_versions: int = 2, default_model: str = "fin", compiled: bool = True):
        """`compiled`: load each CTR version's compiled package (False: every version scores eagerly)."""
        self.root, self.keep_versions, self.default_model = Path(root), keep_versions, default_model
        self.compiled = compiled
        self.serving = _Serving({}, {})  # replaced whole by refresh(); never changed in place
        self.refused: dict[tuple[str, int], float] = {}  # (name, version) -> artifact.json's mtime when refused
        self._lock = threading.Lock()  # one refresh at a time; readers never take it

    def close(self) -> None:
        """Let go of every loaded version: a compiled package deletes the copy torch unpacked it into (under
        the temporary folder) when it is released, which a process's exit does not do."""
        with self._lock:
            self.serving = _Serving({}, {})

    def names(self) -> list[str]:
        return sorted(self.serving.models)

    def versions(self, name: str) -> list[int]:
        return sorted(self.serving.models.get(name, {}))

    def get(self, name: str | None = None, version: int | None = None) -> Artifact | vision.VisionModel | onnx_model.OnnxModel:
        serving = self.serving  # one read of the reference: a consistent view
        models = serving.models
        if not name:  # the default model, or the only one loaded
            if self.default_model in models or len(models) != 1:
                name = self.default_model
            else:
                name = next(iter(models))
        loaded = models.get(name)
        if not loaded:
            raise ModelNotFound(f"model {name!r} is not loaded (loaded: {', '.join(sorted(models)) or 'none'})")
        if version is None:
            default = serving.defaults.get(name)
            return loaded[default] if default in loaded else loaded[max(loaded)]
        if version not in loaded:
            raise ModelNotFound(f"model {name!r} version {version} is not loaded (loaded: {sorted(loaded)})")
        return loaded[version]

    def refresh(self) -> list[Change]:
        """Load new versions and the promoted ones; returns what changed. A model's default is its promoted
        version once that has loaded (a promoted version that fails keeps the previous default), else its
        newest loaded version."""
        with self._lock:
            changes, models = [], {n: dict(v) for n, v in self.serving.models.items()}
            defaults = dict(self.serving.defaults)
            for name in sorted(p.name for p in self.root.glob("*") if p.is_dir() and not p.name.startswith(".")):
                on_disk = versions(self.root, name)
                wanted = set(on_disk[-self.keep_versions:])
                chosen = promoted(self.root, name)
                if chosen is not None:
                    wanted.add(chosen)
                for version in sorted(wanted):
                    if version in models.get(name, {}) or self._still_refused(name, version):
                        continue
                    changes.append(self._load(name, version, models))
                if chosen is not None and chosen in models.get(name, {}) and defaults.get(name) != chosen:
                    defaults[name] = chosen
                    changes.append(Change("promoted", name, chosen))
                    log.info("model %s version %s is the default (promoted)", name, chosen)
                # a version whose folder was removed (a rollback by deleting the newest) is unloaded, unless nothing
                # else of the model is loaded (left loaded, a removed newest made each scan load an older version
                # that the eviction by age below dropped again)
                loaded = models.get(name, {})
                for version in [v for v in sorted(loaded) if v not in on_disk and v != defaults.get(name)]:
                    if len(loaded) > 1:
                        del loaded[version]
                        changes.append(Change("unloaded", name, version))
                        log.info("model %s version %s unloaded: its folder is gone", name, version)
            for name, loaded in models.items():  # keep the newest few versions of each model, and its default
                for old in sorted(loaded)[:-self.keep_versions]:
                    if old != defaults.get(name):
                        del loaded[old]
            self.serving = _Serving(models, defaults)  # the swap: one reference
            return changes

    def _still_refused(self, name: str, version: int) -> bool:
        stamp = self.refused.get((name, version))
        return stamp is not None and stamp == _stamp(self.root / name / str(version))

    def _load(self, name: str, version: int, models: dict) -> Change:
        folder = self.root / name / str(version)
        try:
            task = _task(folder)
            if task == vision.TASK:
                artifact = vision.load_vision(folder)
                vision.smoke_check_vision(artifact)
            elif task == onnx_model.TASK:
                artifact = onnx_model.load_onnx(folder)  # checked against its graph and run on zeros
            else:
                artifact = load_artifact(folder, package=self.compiled)
                smoke_check(artifact)
                if self.compiled and artifact.package is None:
                    log.warning("model %s version %s scores eagerly: %s", name, version, artifact.package_note)
        except Exception as e:  # noqa: BLE001 - any failure refuses the version; the server keeps serving
            self.refused[(name, version)] = _stamp(folder)
            log.error("refused model %s version %s: %s", name, version, e)
            return Change("refused", name, version, str(e))
        models.setdefault(name, {})[version] = artifact
        self.refused.pop((name, version), None)
        log.info("loaded model %s version %s (%s%s)", name, version, artifact.meta["model"],
                 ", compiled" if getattr(artifact, "package", None) is not None else "")
        return Change("loaded", name, version)


def _task(folder: Path) -> str:
    """"vision" for vision artifacts; CTR artifacts (fin train's) have no task field."""
    try:
        return json.loads((folder / META).read_text()).get("task", "ctr")
    except (OSError, ValueError, AttributeError):
        return "ctr"  # load_artifact then says what is wrong


def _stamp(folder: Path) -> float:
    try:
        return (folder / META).stat().st_mtime
    except OSError:
        return -1.0
