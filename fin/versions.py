"""A model repository's layout, without loading any model (so commands that only read or move the
pointers, such as `fin promote` and `fin schedule`, start without torch):

    MODELS/<name>/<version>/model.safetensors   every weight, whole (gathered from the shards), no pickle
    MODELS/<name>/<version>/artifact.json       what `fin.artifact` writes next to it
    MODELS/<name>/PROMOTED                      the version requests get when they pin none

Versions are integers counted up per name; a version folder appears by one rename once complete.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

WEIGHTS, META = "model.safetensors", "artifact.json"
PROMOTED = "PROMOTED"


class ArtifactError(Exception):
    """An artifact that must not be used, with the reason."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Loaded:
    """A loaded version folder of a model repository: its path and its artifact.json."""

    path: Path
    meta: dict

    @property
    def name(self) -> str:
        """The model folder's name, what a request names (a version copied under another name keeps the
        artifact.json of the model it was copied from), as `version` is the version folder's."""
        return self.path.parent.name if is_version(self.path.name) else self.meta["name"]

    @property
    def version(self) -> int:
        """The version folder's number, what a request pins (a folder copied to roll back keeps the artifact.json
        of the version it was copied from: that number named a version not loaded)."""
        return int(self.path.name) if is_version(self.path.name) else int(self.meta["version"])


def versions(models: Path, name: str) -> list[int]:
    folder = Path(models) / name
    return sorted(int(p.name) for p in folder.glob("*") if p.is_dir() and is_version(p.name)) if folder.is_dir() else []


def is_version(name: str) -> bool:
    """A version folder's name: ASCII digits ("²" is a digit to `str.isdigit` and no number to `int`)."""
    return name.isascii() and name.isdigit()


def promote(models: str | Path, name: str, version: int) -> None:
    """Make `version` of model `name` the serving default (atomically: a server never reads half a file)."""
    folder = Path(models) / name
    if version not in versions(models, name):
        raise ArtifactError(f"{folder / str(version)} is not an artifact version")
    staging = folder / f".{PROMOTED}.tmp"
    staging.write_text(f"{version}\n")
    staging.replace(folder / PROMOTED)


def promoted(models: str | Path, name: str) -> int | None:
    """The promoted version of model `name`, or None when none is (or the pointer is unreadable)."""
    try:
        return int((Path(models) / name / PROMOTED).read_text().strip())
    except (OSError, ValueError):
        return None


def resolve(spec: str | Path, models: str | Path | None = None) -> Path:
    """An artifact folder from a version folder's path, a model folder's path (its newest version), or
    `name` / `name/version` inside the repository `models`."""
    path = Path(spec)
    if (path / META).exists():
        return path
    if path.is_dir() and versions(path.parent, path.name):
        return path / str(versions(path.parent, path.name)[-1])
    if models is None:
        raise ArtifactError(f"no model artifact at {path}")
    name, _, version = str(spec).partition("/")
    if not version:
        found = versions(models, name)
        if not found:
            raise ArtifactError(f"no versions of model {name!r} under {models}")
        version = str(found[-1])
    folder = Path(models) / name / version
    if not (folder / META).exists():
        raise ArtifactError(f"no model artifact at {folder}")
    return folder
