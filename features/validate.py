"""Validation of log folders against the contract: bad rows go to quarantine with a reason, never vanish.

Checks per table, all declared by its `contract.TableSpec`:
    missing_column:C   a required column is absent from the table
    bad_type:C         a value that does not parse as the column's type (e.g. text in a number column)
    null:C             a required column is null
    out_of_range:C     outside the declared range, not finite, or too large for the column's type
    bad_geohash:C      not a geohash of the declared precision
    ts_outside_window  timestamp outside the data's window (the manifest's, or a given one)
    duplicate_id:C     the row id was already seen (the first occurrence is kept)
    unknown_fk:C       refers to a row absent from the (validated) referenced table
    bad_png:C          an image column's value is not a decodable 8-bit RGB PNG
    png_size:C         an image decodes to another width x height than its row declares
A row failing several checks lists every reason, joined by ';'. Each quarantined row keeps all of its
original columns as they were read.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features import contract, creatives, geohash, logio
from features.contract import TableSpec

REASON = "reason"
_PLAUSIBLE_START_MS = int(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)


@dataclass(frozen=True)
class ValidationConfig:
    max_bad_fraction: float = 0.01  # per table; above it validation fails
    window_start_ms: int | None = None  # default: the manifest's window, else 2000-01-01 .. now + 1 day
    window_end_ms: int | None = None


@dataclass
class TableResult:
    name: str
    rows: int
    clean: pl.DataFrame
    quarantine: pl.DataFrame
    reasons: dict[str, int]
    notes: list[str] = field(default_factory=list)
    copies: int = 0  # exact copies of kept rows, dropped (neither clean nor quarantined: nothing is lost)

    @property
    def bad_fraction(self) -> float:
        return self.quarantine.height / self.rows if self.rows else 0.0

    def summary(self) -> dict:
        return {"rows": self.rows, "clean": self.clean.height, "quarantined": self.quarantine.height,
                "copies_dropped": self.copies,
                "bad_fraction": round(self.bad_fraction, 6), "reasons": dict(sorted(self.reasons.items())),
                "notes": self.notes}


@dataclass
class ValidationReport:
    logs: str
    window: tuple[int, int]
    max_bad_fraction: float
    tables: dict[str, TableResult]

    @property
    def failed_tables(self) -> list[str]:
        return [n for n, t in self.tables.items() if t.bad_fraction > self.max_bad_fraction]

    @property
    def passed(self) -> bool:
        return not self.failed_tables

    def summary(self) -> dict:
        return {"logs": self.logs, "window_start_ms": self.window[0], "window_end_ms": self.window[1],
                "max_bad_fraction": self.max_bad_fraction, "passed": self.passed,
                "failed_tables": self.failed_tables,
                "tables": {n: t.summary() for n, t in self.tables.items()}}


@functools.cache  # a handful of types, asked for per column of every call
def _polars_type(arrow_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"x": pa.array([], type=arrow_type)}))["x"].dtype


def validate_table(raw: pl.DataFrame, spec: TableSpec, *, window: tuple[int, int],
                   known_keys: dict[str, pl.Series | None], seen_elsewhere: pl.Series | None = None) -> TableResult:
    """Validate one table. `known_keys[table]` holds the clean ids of each referenced table (None: absent).
    `seen_elsewhere` (bool per row): rows whose id an earlier row outside `raw` holds (the features job
    validates one user partition at a time), quarantined as duplicates as a repeat within `raw` is."""
    notes: list[str] = []
    extra = [c for c in raw.columns if c not in spec.schema.names]
    if extra:
        notes.append(f"ignored columns not in the contract: {', '.join(extra)}")
    checks: list[tuple[str, pl.Expr]] = []
    typed: dict[str, pl.Expr] = {}
    for f in spec.schema:
        target = _polars_type(f.type)
        is_list = isinstance(target, pl.List)  # a list column: types and ranges apply to its elements
        element = target.inner if is_list else target
        wide = (pl.Int64 if element.is_integer() else pl.Float64 if element.is_float()
                else pl.Binary if element == pl.Binary else pl.String)
        wide = pl.List(wide) if is_list else wide
        if f.name not in raw.columns:
            if f.name in spec.required:
                checks.append((f"missing_column:{f.name}", pl.lit(True)))
            typed[f.name] = pl.lit(None, dtype=target)
            continue
        src = pl.col(f.name)
        if is_list and not isinstance(raw.schema[f.name], pl.List):  # text (a CSV log) holds no list: bad_type
            value = pl.lit(None, dtype=wide)
        else:
            value = src.cast(wide, strict=False)
        if wide == pl.String or (is_list and raw.schema[f.name] == wide):
            bad_type = pl.lit(False)
        else:
            bad_type = src.is_not_null() & value.is_null()
            if raw.schema[f.name].is_float() and wide == pl.Int64:  # 1.5 in an id column is not an id
                bad_type = bad_type | (src.is_not_null() & (src != src.floor()))
        checks.append((f"bad_type:{f.name}", bad_type))
        if f.name in spec.required:
            checks.append((f"null:{f.name}", src.is_null()))
        x = pl.element() if is_list else value
        out_of_range = pl.lit(False)
        if element.is_float():
            out_of_range = x.is_nan() | x.is_infinite()
        rng = spec.ranges.get(f.name)
        if rng is not None:
            if rng.lo is not None:
                out_of_range = out_of_range | ((x <= rng.lo) if rng.lo_open else (x < rng.lo))
            if rng.hi is not None:
                out_of_range = out_of_range | (x > rng.hi)
        if is_list:  # a null element is no value in range either (`list.any` alone would skip it)
            out_of_range = value.list.eval(out_of_range.fill_null(True)).list.any()
        narrow = value.cast(target, strict=False)
        out_of_range = out_of_range | (value.is_not_null() & narrow.is_null())  # does not fit the column type
        if element.is_float():  # a finite value past a float column's range casts to infinity, not to null
            out_of_range = out_of_range | (narrow.list.eval(pl.element().is_infinite()).list.any() if is_list
                                           else narrow.is_infinite())
        checks.append((f"out_of_range:{f.name}", out_of_range.fill_null(False)))
        if f.name in spec.geohashes:
            ok = value.str.contains(geohash.pattern(spec.geohashes[f.name]))
            checks.append((f"bad_geohash:{f.name}", value.is_not_null() & ~ok.fill_null(False)))
        if f.name == spec.timestamp:
            checks.append(("ts_outside_window", value.is_not_null() & ((value < window[0]) | (value >= window[1]))))
        if f.name in spec.foreign_keys:
            ref = spec.foreign_keys[f.name]
            keys = known_keys.get(ref)
            if keys is None:
                notes.append(f"skipped unknown_fk:{f.name} (no {ref} table)")
            else:
                checks.append((f"unknown_fk:{f.name}", value.is_not_null() & ~value.is_in(keys.implode())))
        if f.name in spec.images:
            checks += _image_checks(raw, f.name, spec.images[f.name])
        typed[f.name] = narrow

    # One pass evaluates every check over the whole table (duplicates need all rows) and types every column;
    # the reasons are spelled out only for the rows that failed a check.
    flags = [bad.fill_null(False).alias(f"_check{i}") for i, (_, bad) in enumerate(checks)]
    columns = raw.lazy().select(*flags, **typed).collect().get_columns()
    masks, clean = columns[:len(checks)], pl.DataFrame(columns[len(checks):])
    bad_rows = np.column_stack([m.to_numpy() for m in masks]).any(axis=1)  # every table has checks
    copies = np.zeros(raw.height, bool)
    if spec.key in raw.columns:
        repeated, copies = _repeated_ids(clean, spec.key, ~bad_rows, seen_elsewhere)
        duplicates = repeated & ~copies
        checks.append((f"duplicate_id:{spec.key}", None))  # (found above, not by an expression: named only)
        masks.append(pl.Series(f"_check{len(masks)}", duplicates))
        bad_rows |= duplicates
        if copies.any():
            notes.append(f"dropped {int(copies.sum())} exact copies of kept rows (a delivery retried)")
    if bad_rows.any():
        failed = pl.DataFrame([m.filter(bad_rows) for m in masks])
        reason = pl.concat_str([pl.when(m.name).then(pl.lit(name)) for m, (name, _) in zip(masks, checks)],
                               separator=";", ignore_nulls=True)
        quarantine = raw.filter(bad_rows).with_columns(failed.select(reason.alias(REASON)))
    else:
        quarantine = raw.clear().with_columns(pl.Series(REASON, [], pl.String))
    if (bad_rows | copies).any():
        clean = clean.filter(~(bad_rows | copies))
    return TableResult(spec.name, raw.height, clean, quarantine, reason_counts(quarantine), notes, int(copies.sum()))


def _repeated_ids(typed: pl.DataFrame, key: str, passing: np.ndarray,
                  seen_elsewhere: pl.Series | None) -> tuple[np.ndarray, np.ndarray]:
    """Which rows repeat the id of an earlier row that passes every other check (or of one outside the table,
    `seen_elsewhere`), and which of those are exact copies of that row (a delivery retried: the same event
    twice). A failing row does not claim its id: its corrected re-send is kept, as ingestion keeps it."""
    rows = pl.DataFrame({"k": typed[key], "passing": passing}).with_row_index("row")
    first = rows.filter(pl.col("passing") & pl.col("k").is_not_null()).group_by("k").agg(pl.col("row").min().alias("first"))
    first = rows.join(first, on="k", how="left", maintain_order="left")["first"]
    later = (first.is_not_null() & (rows["row"] > first)).to_numpy()  # than the first passing row of its id
    repeated = later.copy()
    if seen_elsewhere is not None:  # (a row of another partition's user: never a copy of one here)
        repeated |= np.asarray(seen_elsewhere, bool) & typed[key].is_not_null().to_numpy()
    copies = np.zeros(typed.height, bool)
    candidates = np.flatnonzero(later & passing)
    if candidates.size:
        them, originals = typed[candidates], typed[first.to_numpy()[candidates].astype(np.int64)]
        same = np.logical_and.reduce([them[c].eq_missing(originals[c]).to_numpy() for c in typed.columns])
        copies[candidates[same]] = True
    return repeated, copies


def _image_checks(raw: pl.DataFrame, column: str, size_columns: tuple[str, str]) -> list[tuple[str, pl.Expr]]:
    """bad_png and png_size of an image column: each image decoded once, here, rather than in the query."""
    def declared(name: str) -> np.ndarray:  # NaN where absent or not a number (other checks report those)
        if name not in raw.columns:
            return np.full(raw.height, np.nan)
        return raw[name].cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy()

    blobs = raw[column].cast(pl.Binary, strict=False).to_list()
    problems = creatives.check_pngs(blobs, declared(size_columns[0]), declared(size_columns[1]))
    return [(f"{code}:{column}", pl.lit(pl.Series(problems == code, dtype=pl.Boolean)))
            for code in (creatives.BAD_PNG, creatives.PNG_SIZE)]


def check_arrays(spec: TableSpec, columns: Mapping[str, np.ndarray],
                 window: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """The checks of `spec` on columns that already hold their types (what a server builds from a typed
    message), as (reason, failing rows) with `validate_table`'s names and order: the same rules run by
    numpy for calls of a few events, where each polars query costs a millisecond
    (tests/test_ingest_checks.py keeps the two equal). Numbers are numpy masked arrays (masked: null), text is
    an object array (None: null). Not covered, as such columns cannot arrive here: list columns and values
    of another type; foreign keys are not checked (the referenced tables live with the job), nor are repeated
    ids (the caller keeps each id's first passing copy, as `validate_table` does)."""
    rows = len(next(iter(columns.values())))
    out: list[tuple[str, np.ndarray]] = []
    for f in spec.schema:
        if f.name not in columns:
            if f.name in spec.required:
                out.append((f"missing_column:{f.name}", np.ones(rows, bool)))
            continue
        target = _polars_type(f.type)
        if isinstance(target, pl.List):
            raise ValueError(f"{f.name}: list columns are checked by validate_table only")
        column = columns[f.name]
        text = target == pl.String
        null = np.equal(column, None) if text else np.ma.getmaskarray(column)
        if f.name in spec.required:
            out.append((f"null:{f.name}", null))
        if not text:
            values = np.ma.getdata(column)
            bad = np.zeros(rows, bool)
            if target.is_float():
                bad |= ~np.isfinite(values)
            rng = spec.ranges.get(f.name)
            with np.errstate(invalid="ignore"):
                if rng is not None and rng.lo is not None:
                    bad |= (values <= rng.lo) if rng.lo_open else (values < rng.lo)
                if rng is not None and rng.hi is not None:
                    bad |= values > rng.hi
                if target.is_integer():  # does not fit the column type
                    info = np.iinfo(f.type.to_pandas_dtype())
                    bad |= (values < info.min) | (values > info.max)
            out.append((f"out_of_range:{f.name}", bad & ~null))
        if f.name in spec.geohashes:
            cell = re.compile(geohash.pattern(spec.geohashes[f.name]))
            out.append((f"bad_geohash:{f.name}", np.array([v is not None and cell.fullmatch(v) is None
                                                           for v in column], bool)))
        if f.name == spec.timestamp:
            values = np.ma.getdata(column)
            out.append(("ts_outside_window", ~null & ((values < window[0]) | (values >= window[1]))))
    return out


def reason_counts(quarantine: pl.DataFrame) -> dict[str, int]:
    """Rows per reason of a quarantine frame (a row with several reasons counts once for each)."""
    if quarantine.height == 0:
        return {}
    counts = quarantine.select(pl.col(REASON).str.split(";").explode()).group_by(REASON).len()
    return {r: int(n) for r, n in counts.iter_rows()}


def data_window(root: str | Path, config: ValidationConfig) -> tuple[int, int]:
    manifest = logio.read_manifest(root) or {}
    now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    start = config.window_start_ms if config.window_start_ms is not None else manifest.get("window_start_ms", _PLAUSIBLE_START_MS)
    end = config.window_end_ms if config.window_end_ms is not None else manifest.get("window_end_ms", now_ms + 86_400_000)
    if start >= end:
        raise ValueError(f"empty data window [{start}, {end})")
    return int(start), int(end)


def validate_tables(root: Path, names: tuple[str, ...], window: tuple[int, int],
                    known: dict[str, pl.Series | None]) -> dict[str, TableResult]:
    """Validate the named tables present in a log folder, in order. `known` (table -> clean ids, None when
    the table is absent) is read for foreign keys and extended with each validated table's ids."""
    results: dict[str, TableResult] = {}
    for name in names:
        spec = contract.TABLES[name]
        raw = logio.read_raw(root, name)
        if raw is None:
            known[name] = None
            continue
        results[name] = validate_table(raw, spec, window=window, known_keys=known)
        known[name] = results[name].clean[spec.key] if spec.key else None
    return results


def validate_logs(root: str | Path, config: ValidationConfig = ValidationConfig()) -> ValidationReport:
    """Validate every contract table present in a log folder (world tables first, for foreign keys)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"log folder {root} does not exist")
    window = data_window(root, config)
    results = validate_tables(root, (*contract.WORLD_TABLES, *contract.OPTIONAL_WORLD_TABLES, *contract.LOG_TABLES,
                                     *contract.EVALUATION_TABLES), window, {})
    if not any(n in results for n in contract.LOG_TABLES):
        raise ValueError(f"{root} holds no behaviours or impressions (expected {root}/behaviours/...)")
    return ValidationReport(str(root), window, config.max_bad_fraction, results)


def write_report(report: ValidationReport, out: str | Path) -> Path:
    """Write quarantine/<table>.parquet for every table with bad rows, and validation.json; returns the JSON path."""
    out = Path(out)
    qdir = out / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    for name in contract.TABLES:  # (a table absent this time leaves no quarantine of an earlier run behind)
        result, path = report.tables.get(name), qdir / f"{name}.parquet"
        if result is not None and result.quarantine.height:
            tmp = path.with_suffix(".parquet.tmp")
            result.quarantine.write_parquet(tmp)
            tmp.replace(path)
        elif path.exists():
            path.unlink()  # from an earlier run of different input
    summary = out / "validation.json"
    summary.write_text(json.dumps(report.summary(), indent=2))
    return summary
