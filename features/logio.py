"""Reading and writing contract log folders.

A log folder holds one file per world table (`shops.parquet`, ...) and one folder per log table
(`behaviours/date=YYYY-MM-DD/*.parquet`), plus `manifest.json`. Tables may also be given as CSV
(`shops.csv`, `behaviours/*.csv`), read as text so that the validator sees and quarantines values of
the wrong type instead of failing on them.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import polars as pl

from features import contract


def table_files(root: str | Path, name: str) -> list[Path]:
    """The files of one table in a log folder, in a stable order (empty when absent)."""
    root = Path(root)
    files = [p for ext in ("parquet", "csv") for p in [root / f"{name}.{ext}"] if p.is_file()]
    folder = root / name
    if folder.is_dir():
        files += sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".csv") and p.is_file())
    return files


def files_from(files: list[Path], first: date) -> list[Path]:
    """The files not in a `date=YYYY-MM-DD` partition before `first` (files outside date partitions stay)."""
    def partition_date(path: Path) -> date | None:
        for folder in path.parent.parts[::-1]:
            if folder.startswith("date="):
                try:
                    return date.fromisoformat(folder[5:])
                except ValueError:
                    return None
        return None

    return [f for f in files if (day := partition_date(f)) is None or day >= first]


def _read_file(path: Path) -> pl.DataFrame:
    if path.suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)  # every column as text; the validator casts
    return pl.read_parquet(path, hive_partitioning=False)


def read_files(files: list[Path] | list[str]) -> pl.DataFrame:
    """Many log files as one frame. Parquet files whose schemas agree are read in one parallel scan;
    otherwise file by file, combined with the most general type per column (text if needed), so nothing
    is lost before validation."""
    paths = [Path(f) for f in files]
    if all(p.suffix == ".parquet" for p in paths):
        try:
            return pl.scan_parquet(paths, hive_partitioning=False).collect()
        except (pl.exceptions.SchemaError, pl.exceptions.ComputeError):
            pass
    frames = [_read_file(p) for p in paths]
    return pl.concat(_one_type_per_column(frames), how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def _one_type_per_column(frames: list[pl.DataFrame]) -> list[pl.DataFrame]:
    """Scalar columns whose type differs across files made one type without changing a value: integers with
    whole floats (an id column with a null, as pandas writes it) as Int64, other numbers and text as text,
    which the validator casts. (The most general type would make integers and floats Float64 and round every
    id above 2^53.)"""
    types: dict[str, set[pl.DataType]] = {}
    for frame in frames:
        for column, dtype in frame.schema.items():
            types.setdefault(column, set()).add(dtype)
    target = {}
    for column, dtypes in types.items():
        if len(dtypes) < 2 or not all(t.is_numeric() or t == pl.String for t in dtypes):
            continue
        floats = [f[column] for f in frames if column in f.columns and f.schema[column].is_float()]
        whole = all(((s == s.floor()) & (s.abs() < 2.0 ** 63)).all() for s in floats)  # (nulls ignored)
        target[column] = pl.Int64 if whole and all(t.is_numeric() for t in dtypes) else pl.String
    return [frame.with_columns(pl.col(c).cast(t) for c, t in target.items() if c in frame.columns) for frame in frames]


def read_raw(root: str | Path, name: str) -> pl.DataFrame | None:
    """All rows of a table as stored, or None when the folder has no such table."""
    files = table_files(root, name)
    return read_files(files) if files else None


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / contract.MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def staging_folder(out: Path, overwrite: bool) -> Path:
    """An empty folder beside `out` to write a new output into (see `publish`). Refuses to replace a
    non-empty `out` unless `overwrite`."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` with renames only: readers see the old or the new folder, never a mix,
    and a run that dies before this leaves `target` as it was."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
