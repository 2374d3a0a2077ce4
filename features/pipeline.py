"""The data steps of the features job, as plain functions over files: no Ray here.

`jobs.features_job` runs them, fanning the per-group and per-partition steps out as Ray tasks:
  1. `Plan.of`: what a run derives from its logs before any work (the data window, the split days, the
     tables and files to read) and where it writes;
  2. `validate_world`: the world tables, checked against the contract (bad rows quarantined), and the ad
     creatives, when the logs have them, copied into the dataset;
  3. `shard_logs` (one call per group of log files): split the rows by user partition into scratch shards,
     so that every row of a user lands in the same partition;
  4. `build_partition_files` (one call per partition): validate, build timelines, examples and candidates
     (`features.build`), write the partition's parts of the dataset, and encode its online timelines;
  5. `write_statistics` and `dataset_stats`: point-in-time item/shop statistics and the run's counts;
  6. `publish`: the new dataset replaces the old one with renames only;
  7. `apply_feast`: apply the Feast repository and bring the online store up to date.
The layout written is `features.dataset`'s (docs/design.md, "Offline dataset").
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from features import aggregates, contract, logio
from features.build import SplitDays, build_partition
from features.dataset import (
    CANDIDATES,
    DATA,
    EVALUATION_SPLITS,
    EVENT_TIMESTAMP,
    EXAMPLES,
    FEAST,
    PART,
    SPLITS,
    STATS_VIEWS,
    TIMELINE_VIEW,
    Dataset,
)
from features.online import ENTITY, encode_timelines, write_encoded_timelines
from features.validate import ValidationConfig, data_window, validate_tables

# zstd's fastest level: a third less time to write than its default, and files about 5% larger
_OUTPUT_PARQUET = {"compression": "zstd", "compression_level": 1}
# scratch, read once on this machine: no compression or statistics, the cheapest parquet to write
_SCRATCH_PARQUET = {"compression": "uncompressed", "statistics": False}
_OPTIONAL_TABLE = "ad_candidates"  # read when the logs have it (what revenue replay needs)
ORDER = "_order"  # a shard row's place in its table's input order (`shard_logs`)


def check_logs(logs: Path) -> None:
    """Refuse a log folder the job cannot read, before any work."""
    if not logs.is_dir():
        raise FileNotFoundError(f"log folder {logs} does not exist")
    for table in contract.LOG_TABLES:
        files = logio.table_files(logs, table)
        if not files:
            raise ValueError(f"{logs} has no {table} (expected {logs}/{table}/**/*.parquet)")
        if any(f.suffix != ".parquet" for f in files):
            raise ValueError(f"{table}: the features job reads parquet only; convert CSV logs first")


@dataclass(frozen=True)
class Plan:
    """What a run derives from its logs before any work, and where it writes."""

    logs: Path
    out: Path
    tables: tuple[str, ...]  # the log tables to read: the optional ad candidates go along when present
    window: tuple[int, int]
    offset: float  # hours from UTC of the logs' local time
    last_day: int
    split: SplitDays
    evaluation_from: date  # the first candidate files to read

    @classmethod
    def of(cls, logs: Path, out: Path, validation_days: int, test_days: int) -> Plan:
        with_candidates = bool(logio.table_files(logs, _OPTIONAL_TABLE))
        manifest = logio.read_manifest(logs) or {}
        offset = float(manifest.get("utc_offset_hours", 8.0))
        window = data_window(logs, ValidationConfig())
        last_day = int((window[1] - 1 + offset * 3_600_000) // aggregates.DAY_MS)
        split = SplitDays.last_days(last_day, validation_days, test_days)
        # a day early: partitions written with another UTC offset than the manifest's still cover the window
        evaluation_from = date(1970, 1, 1) + timedelta(days=split.validation_start - 1)
        return cls(logs, out, (*contract.LOG_TABLES, *([_OPTIONAL_TABLE] if with_candidates else [])), window,
                   offset, last_day, split, evaluation_from)

    @property
    def with_candidates(self) -> bool:
        return _OPTIONAL_TABLE in self.tables

    @property
    def staging(self) -> Path:  # the new dataset, renamed into place once complete
        return self.out / f".{DATA}.staging"

    @property
    def work(self) -> Path:  # scratch: the logs split by user partition, removed once built
        return self.out / ".shards"

    @property
    def encoded(self) -> Path:  # scratch: timelines encoded for the online store, removed at the end
        return self.out / ".online_values"

    @property
    def dataset(self) -> Dataset:  # where the published dataset lives
        return Dataset(self.out / DATA)

    def file_groups(self, groups_per_table: int) -> list[tuple[str, int, list[str]]]:
        """(table, group, files) for `shard_logs`: each table's files in up to `groups_per_table` groups. Of the
        ad candidates, only the evaluation days' files are read (the only candidates kept)."""
        out = []
        for table in self.tables:
            files = logio.table_files(self.logs, table)
            if table == _OPTIONAL_TABLE:
                files = logio.files_from(files, self.evaluation_from)
            if files:
                names = np.array([str(f) for f in files])
                out += [(table, i, g.tolist()) for i, g in enumerate(np.array_split(names, min(len(names),
                                                                                          groups_per_table)))]
        return out


def partition_of(user_id: pl.Series, partitions: int) -> np.ndarray:
    """User -> partition, stable across runs and machines (a multiplicative hash of the id). An id that is no
    integer (text in a CSV log) goes with the missing ones to the partition of 0, whose validation
    quarantines it: sharding runs before validation and must not fail on what validation reports."""
    ids = user_id.cast(pl.Int64, strict=False).fill_null(0).to_numpy().astype(np.uint64)
    return ((ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(partitions)


def shard_logs(files: list[str], table: str, group: int, work: str, partitions: int) -> int:
    """Read a group of log files and split their rows by user partition into parquet shards under `work`;
    returns the rows read."""
    rows = logio.read_files(files)
    part = (partition_of(rows["user_id"], partitions) if "user_id" in rows.columns
            else np.zeros(rows.height, dtype=np.uint64))
    # each row's place in the table's input order (groups are in file order): which of two rows with one id
    # in different partitions came first (`ids_seen_elsewhere`)
    order = pl.int_range(rows.height, dtype=pl.Int64) + (group << 32)
    rows = rows.with_columns(_p=pl.Series(part.astype(np.int32)), **{ORDER: order})
    for (p,), shard in rows.partition_by("_p", as_dict=True).items():
        path = Path(work) / table / f"p={p:05d}" / f"g-{group:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        shard.drop("_p").write_parquet(path, **_SCRATCH_PARQUET)
    return rows.height


def ids_seen_elsewhere(work: str, table: str) -> dict[int, list[int]]:
    """Per user partition, the rows (their input order) whose id the table's first row with that id, in
    another partition, holds: a partition's validation sees only its own rows, so two rows of one id and
    different users would both be kept, where `fin validate` keeps the first."""
    key = contract.TABLES[table].key
    shards = sorted((Path(work) / table).glob("p=*/*.parquet"))
    # (a shard without the key column holds rows its partition's validation quarantines as missing it)
    shards = [f for f in shards if key is not None and key in pl.read_parquet_schema(f)]
    if not shards:
        return {}
    # (a key of text, from a CSV log, is compared as the integer it reads as)
    rows = pl.concat([pl.scan_parquet(f).select(pl.col(key).cast(pl.Int64, strict=False), ORDER)
                      .with_columns(p=pl.lit(int(f.parent.name[2:]))) for f in shards]).drop_nulls(key).collect()
    first = rows.sort(ORDER).group_by(key, maintain_order=True).agg(first_p=pl.col("p").first(),
                                                                    partitions=pl.col("p").n_unique())
    later = rows.join(first.filter(pl.col("partitions") > 1), on=key).filter(pl.col("p") != pl.col("first_p"))
    return {int(p): list(orders) for p, orders in later.group_by("p").agg(pl.col(ORDER)).iter_rows()}


def build_partition_files(p: int, work: str, staging: str, encoded: str | None, known_keys: dict,
                          window: tuple[int, int], split: SplitDays, max_seq_len: int, utc_offset_hours: float,
                          with_candidates: bool, seen_elsewhere: dict[str, list[int]] | None = None) -> dict:
    """Build one user partition from its shards and write its parts of the dataset into `staging`, and (unless
    `encoded` is None) its online timelines encoded for the store into `encoded`, scratch written to the store
    only once the whole run has passed; returns counts and small tables."""
    elsewhere: dict[str, pl.Series] = {}

    def read(table: str) -> pl.DataFrame:
        files = sorted(str(f) for f in (Path(work) / table / f"p={p:05d}").glob("*.parquet"))
        if not files:
            return pl.from_arrow(contract.TABLES[table].schema.empty_table())
        rows = logio.read_files(files)
        elsewhere[table] = rows[ORDER].is_in((seen_elsewhere or {}).get(table, []))
        return rows.drop(ORDER)

    t0 = time.perf_counter()
    behaviours, impressions = read("behaviours"), read("impressions")
    candidates = read(_OPTIONAL_TABLE) if with_candidates else None
    t1 = time.perf_counter()
    out = build_partition(behaviours, impressions, known_keys=known_keys, window=window, split=split,
                          max_seq_len=max_seq_len, utc_offset_hours=utc_offset_hours, candidates=candidates,
                          seen_elsewhere=elsewhere)
    t2 = time.perf_counter()
    dataset, name = Dataset(Path(staging)), PART.format(p)

    def write(df: pl.DataFrame, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        df.write_parquet(folder / name, **_OUTPUT_PARQUET)

    write(out.timelines, dataset.timelines)
    write(out.online_timelines, dataset.online_timelines())
    if encoded is not None:
        encode_timelines(out.online_timelines).write_parquet(Path(encoded) / name, **_SCRATCH_PARQUET)
    for s, df in out.examples.items():
        write(df, dataset.rows(EXAMPLES, s))
    for s, df in out.candidates.items():
        write(df, dataset.rows(CANDIDATES, s))
    for table, result in out.validation.items():
        if result.quarantine.height:
            write(result.quarantine, dataset.quarantine(table))
    lengths = out.timelines.select(pl.col("ts").list.len()).to_series().to_numpy()
    return {
        "newest_event": out.online_timelines[EVENT_TIMESTAMP].max(),
        "partition": p,
        "seconds": {"read": t1 - t0, "build": t2 - t1, "write": time.perf_counter() - t2},
        "validation": {t: {"rows": r.rows, "quarantined": r.quarantine.height, "reasons": r.reasons}
                       for t, r in out.validation.items()},
        EXAMPLES: {s: df.height for s, df in out.examples.items()},
        CANDIDATES: {s: df.height for s, df in out.candidates.items()},
        "labels": {s: int(df["label"].sum()) for s, df in out.examples.items()},
        "timeline_lengths": lengths,
        "counts": {"item_id": out.item_counts, "shop_id": out.shop_counts},
    }


def validate_world(plan: Plan) -> tuple[dict, dict]:
    """Validate the world tables, the optional ones when present (quarantining bad rows into the staged
    dataset, and writing the clean creatives into it); returns their clean ids and a summary."""
    known: dict = {}
    summary = {}
    staged = Dataset(plan.staging)
    names = (*contract.WORLD_TABLES, *contract.OPTIONAL_WORLD_TABLES)
    for name, result in validate_tables(plan.logs, names, plan.window, known).items():
        summary[name] = {"rows": result.rows, "quarantined": result.quarantine.height, "reasons": result.reasons}
        if result.quarantine.height:
            folder = staged.quarantine(name)
            folder.mkdir(parents=True, exist_ok=True)
            result.quarantine.write_parquet(folder / PART.format(0))
        if name == contract.CREATIVES.name:
            result.clean.write_parquet(staged.creatives, **_OUTPUT_PARQUET)
    return known, summary


def write_statistics(plan: Plan, results: list[dict]) -> dict[str, datetime | None]:
    """Write the point-in-time item and shop statistics from the partitions' counts; returns the newest row
    of each Feast view's source (its materialisation end)."""
    first_day = int((plan.window[0] + plan.offset * 3_600_000) // aggregates.DAY_MS)
    newest: dict[str, datetime | None] = {}
    for key, view in STATS_VIEWS.items():
        counts = pl.concat([r["counts"][key] for r in results])
        stats = aggregates.point_in_time_stats(counts, key, first_day, plan.last_day, plan.offset)
        stats.write_parquet(Dataset(plan.staging).stats_source(key), **_OUTPUT_PARQUET)
        newest[view] = stats[EVENT_TIMESTAMP].max()
    newest[TIMELINE_VIEW] = max((r["newest_event"] for r in results if r["newest_event"] is not None), default=None)
    return newest


def dataset_stats(plan: Plan, config: dict, world: dict, results: list[dict], max_seq_len: int) -> dict:
    """The run's counts (what stats.json holds): rows and quarantined rows per table and reason, users,
    timeline lengths, examples, clicks and candidates per split."""
    validation = dict(world)
    for table in (results[0]["validation"] if results else ()):
        rows = sum(r["validation"][table]["rows"] for r in results)
        quarantined = sum(r["validation"][table]["quarantined"] for r in results)
        reasons: dict[str, int] = {}
        for r in results:
            for k, v in r["validation"][table]["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        validation[table] = {"rows": rows, "quarantined": quarantined, "reasons": dict(sorted(reasons.items()))}
    for s in validation.values():
        s["bad_fraction"] = round(s["quarantined"] / s["rows"], 6) if s["rows"] else 0.0
    lengths = np.concatenate([r["timeline_lengths"] for r in results]) if results else np.zeros(0)
    pct = {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)} if lengths.size else {}
    return {
        "logs": str(plan.logs.resolve()),
        "config": config,
        "window_start_ms": plan.window[0], "window_end_ms": plan.window[1],
        "split_days": {"validation_start": plan.split.validation_start, "test_start": plan.split.test_start},
        "validation": validation,
        "users": int(lengths.size),
        "timeline_length": pct | {"max": int(lengths.max()) if lengths.size else 0,
                                  "over_max_seq_len": int((lengths > max_seq_len).sum())},
        EXAMPLES: {s: sum(r[EXAMPLES][s] for r in results) for s in SPLITS},
        "clicks": {s: sum(r["labels"][s] for r in results) for s in SPLITS},
        CANDIDATES: {s: sum(r[CANDIDATES].get(s, 0) for r in results) for s in EVALUATION_SPLITS},
    }


def publish(plan: Plan, stats: dict, max_bad_fraction: float) -> None:
    """Write stats.json and move the staged dataset into place, unless a table's bad-row share passes
    `max_bad_fraction` (then nothing is written and the previous dataset stays)."""
    failed = [t for t, s in stats["validation"].items() if s["bad_fraction"] > max_bad_fraction]
    if failed:
        shutil.rmtree(plan.staging, ignore_errors=True)
        raise ValueError(f"bad-row fraction above {max_bad_fraction:.2%} in {', '.join(failed)}: "
                         f"nothing written (run fin validate for details)")
    Dataset(plan.staging).stats_file.write_text(json.dumps(stats, indent=2, sort_keys=True))
    logio.publish(plan.staging, plan.dataset.root)


TIMELINE_DIGESTS = "timeline_digests.parquet"  # beside the Feast repository: what the last run pushed


def push_timelines(store, encoded: Path, digests: Path, first: bool) -> int:
    """Write to the online store the users whose timeline differs from what the last run pushed (a digest per
    user of its encoded row, kept in `digests`), or every user on the `first` run, one partition at a time,
    from the values the build steps encoded; then keep this run's digests. A user whose newest event is old
    changes too: a late event, or a day's log delivered late (pushing only users with events past the last
    run's newest left those online timelines without them for good). This skips the offline read that
    `materialize` would do over the source files, and Feast's element-by-element conversion of list values
    (see `features.online`)."""
    previous = None if first or not digests.exists() else pl.read_parquet(digests)
    pushed, kept = 0, []
    for part in sorted(encoded.glob("*.parquet")):
        rows = pl.read_parquet(part)
        digest = rows.select(ENTITY, pl.struct(pl.all()).hash().alias("digest"))
        kept.append(digest)
        if previous is not None:
            rows = rows.join(digest.join(previous, on=[ENTITY, "digest"], how="anti").select(ENTITY), on=ENTITY,
                             how="semi", maintain_order="left")
        pushed += write_encoded_timelines(store, rows)
    staged = digests.with_name(digests.name + ".tmp")  # kept once every user is written, whole or not at all
    (pl.concat(kept) if kept else pl.DataFrame(schema={ENTITY: pl.Int64, "digest": pl.UInt64})).write_parquet(staged)
    staged.replace(digests)
    return pushed


@dataclass(frozen=True)
class OnlineStoreConfig:
    kind: str = "sqlite"  # or "redis"
    redis_connection: str = "127.0.0.1:6379"
    materialize: bool = True  # False: apply the repository only


def apply_feast(plan: Plan, store_config: OnlineStoreConfig, newest: dict[str, datetime | None]) -> dict:
    """Apply the repository, then bring each view's online values up to its newest row: everything on the
    first run, incrementally afterwards (the registry's materialisation intervals are the watermarks).
    Watermarks sit at the newest row, not the window end, so a later run's newer rows always lie after them."""
    from feast import FeatureStore

    from features.feast_repo import definitions

    start = datetime.fromtimestamp(plan.window[0] / 1000, tz=timezone.utc)
    ends = {view: (t or start) + timedelta(milliseconds=1) for view, t in newest.items()}
    repo = plan.out / FEAST
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(definitions.store_yaml(store_config.kind,
                                                                    store_config.redis_connection))
    started = time.perf_counter()
    store = FeatureStore(repo_path=str(repo))
    store.apply(definitions.objects(plan.dataset.feast_sources.resolve()))
    applied = time.perf_counter()
    pushed = 0
    if store_config.materialize:
        with contextlib.redirect_stdout(io.StringIO()):  # Feast prints its progress
            for view, end in ends.items():
                fv = store.get_feature_view(view)
                since = fv.most_recent_end_time
                if view == TIMELINE_VIEW:
                    pushed = push_timelines(store, plan.encoded, repo / TIMELINE_DIGESTS, since is None)
                    store.registry.apply_materialization(fv, store.project, since or start, end)
                else:
                    # the days since the last run, and its newest day again: a day's statistics recomputed
                    # with impressions delivered late (an incremental run from the watermark skipped them)
                    newest_day = end - timedelta(milliseconds=1)
                    store.materialize(start_date=start if since is None else min(since, newest_day), end_date=end,
                                      feature_views=[view])
    return {"repo": str(repo), "apply_s": round(applied - started, 3), "timelines_pushed": pushed,
            "materialize_s": round(time.perf_counter() - applied, 3)}
