"""`fin features`: logs -> timelines, point-in-time examples, item/shop statistics, and the Feast store.

A Ray job in two stages of Ray tasks, both vectorised with polars:
  1. shard: each task reads a group of log files and splits the rows by user partition into parquet
     shards (rows of one user always land in the same partition);
  2. build (one Ray task per partition): validate the partition's rows against the contract
     (quarantining bad ones), build its users' timelines, point examples into them, split by day,
     count impressions/clicks per item and shop, and encode its users' last events for the online store.
The driver then turns the counts into point-in-time statistics, writes the stats JSON, moves the new
dataset into place in one rename, and applies and materialises the Feast repository.

Output folder:
    OUT/data/            the dataset of this run (replaced as a whole by the next run)
        timelines/part-PPPPP.parquet          one row per user, list columns (full history)
        examples/{train,validation,test}/part-PPPPP.parquet   one row per impression + history_len
        feast_sources/user_timeline/part-PPPPP.parquet   last max_seq_len events per user (what serving reads)
        feast_sources/{item,shop}_stats.parquet   point-in-time daily stats (training joins these too)
        quarantine/<table>/part-*.parquet     bad rows with a reason
        stats.json
    OUT/feast/           Feast repository: feature_store.yaml, registry, sqlite online store (kept across runs)
    OUT/.shards/, OUT/.online_values/   scratch of a run (logs split by partition; timelines encoded for
                         the online store), removed by its end
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from features import aggregates, contract, logio
from features.build import EVALUATION_SPLITS, SPLITS, SplitDays, build_partition
from features.online import TIMELINE_VIEW, encode_timelines, write_encoded_timelines
from features.validate import ValidationConfig, data_window, validate_tables
from jobs.features_config import FeaturesConfig

DATA, FEAST = "data", "feast"
# zstd's fastest level: a third less time to write than its default, and files about 5% larger
_OUTPUT_PARQUET = {"compression": "zstd", "compression_level": 1}
# scratch, read once on this machine: no compression or statistics, the cheapest parquet to write
_SCRATCH_PARQUET = {"compression": "uncompressed", "statistics": False}
_MAX_RAY_TEMP_LEN = 40  # Ray puts ~65 more characters of session and socket names under it; AF_UNIX allows 107


# ---------------------------------------------------------------------------- Ray
class _RaySession:
    """Starts a local Ray (temp dir inside the output folder, usage stats off) or joins a cluster."""

    def __init__(self, config: FeaturesConfig, out: Path):
        import ray

        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray gives its GCS server 30 s to write its port file; on a loaded 2-core machine that start has
        # timed out ("Timed out waiting for file .../gcs_server_port_..."). Wait longer instead of failing.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        self.ray, self.started = ray, False
        self.temp_dir: Path | None = None
        if ray.is_initialized():
            return
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                      configure_logging=False)
        if config.ray_address:
            ray.init(address=config.ray_address, **kwargs)
        else:
            temp = (out / ".ray").resolve()
            if len(str(temp)) > _MAX_RAY_TEMP_LEN:  # too long for Ray's sockets: use a short private dir
                temp = Path(tempfile.mkdtemp(prefix="fin-ray-"))
            temp.mkdir(parents=True, exist_ok=True)
            self.temp_dir = temp
            ray.init(num_cpus=config.num_cpus, _temp_dir=str(temp), **kwargs)
        self.started = True

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def _partition_of(user_id: pl.Series, partitions: int) -> np.ndarray:
    """User -> partition, stable across runs and machines (a multiplicative hash of the id)."""
    ids = user_id.fill_null(0).to_numpy().astype(np.uint64)
    return ((ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(partitions)


def _shard_task(files: list[str], table: str, group: int, work: str, partitions: int) -> int:
    """Ray task: read a group of log files and split their rows by user partition into parquet shards."""
    rows = logio.read_files(files)
    part = (_partition_of(rows["user_id"], partitions) if "user_id" in rows.columns
            else np.zeros(rows.height, dtype=np.uint64))
    rows = rows.with_columns(_p=pl.Series(part.astype(np.int32)))
    for (p,), shard in rows.partition_by("_p", as_dict=True).items():
        path = Path(work) / table / f"p={p:05d}" / f"g-{group:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        shard.drop("_p").write_parquet(path, **_SCRATCH_PARQUET)
    return rows.height


def _build_task(p: int, work: str, staging: str, encoded: str | None, known_keys: dict, window: tuple[int, int],
                split: SplitDays, max_seq_len: int, utc_offset_hours: float, with_candidates: bool) -> dict:
    """Ray task: build one user partition and write its parts, and (unless `encoded` is None) its online
    timelines encoded for the store into `encoded`, scratch written to the store only once the whole run
    has passed; returns counts and small tables."""
    def read(table: str) -> pl.DataFrame:
        files = sorted(str(f) for f in (Path(work) / table / f"p={p:05d}").glob("*.parquet"))
        if not files:
            return pl.from_arrow(contract.TABLES[table].schema.empty_table())
        return logio.read_files(files)

    t0 = time.perf_counter()
    behaviours, impressions = read("behaviours"), read("impressions")
    candidates = read("ad_candidates") if with_candidates else None
    t1 = time.perf_counter()
    out = build_partition(behaviours, impressions, known_keys=known_keys, window=window, split=split,
                          max_seq_len=max_seq_len, utc_offset_hours=utc_offset_hours, candidates=candidates)
    t2 = time.perf_counter()
    root, name = Path(staging), f"part-{p:05d}.parquet"

    def write(df: pl.DataFrame, *parts: str) -> None:
        path = root.joinpath(*parts, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(path, **_OUTPUT_PARQUET)

    write(out.timelines, "timelines")
    write(out.online_timelines, "feast_sources", "user_timeline")
    if encoded is not None:
        encode_timelines(out.online_timelines).write_parquet(Path(encoded) / name, **_SCRATCH_PARQUET)
    for s, df in out.examples.items():
        write(df, "examples", s)
    for s, df in out.candidates.items():
        write(df, "candidates", s)
    for table, result in out.validation.items():
        if result.quarantine.height:
            write(result.quarantine, "quarantine", table)
    lengths = out.timelines.select(pl.col("ts").list.len()).to_series().to_numpy()
    return {
        "newest_event": out.online_timelines["event_timestamp"].max(),
        "partition": p,
        "seconds": {"read": t1 - t0, "build": t2 - t1, "write": time.perf_counter() - t2},
        "validation": {t: {"rows": r.rows, "quarantined": r.quarantine.height, "reasons": r.reasons}
                       for t, r in out.validation.items()},
        "examples": {s: df.height for s, df in out.examples.items()},
        "candidates": {s: df.height for s, df in out.candidates.items()},
        "labels": {s: int(df["label"].sum()) for s, df in out.examples.items()},
        "timeline_lengths": lengths,
        "item_counts": out.item_counts,
        "shop_counts": out.shop_counts,
    }


# ---------------------------------------------------------------------------- the job
def _world(logs: Path, window: tuple[int, int], staging: Path) -> tuple[dict, dict]:
    """Validate the world tables (quarantining bad rows); returns their clean ids and a summary."""
    known: dict = {}
    summary = {}
    for name, result in validate_tables(logs, contract.WORLD_TABLES, window, known).items():
        summary[name] = {"rows": result.rows, "quarantined": result.quarantine.height, "reasons": result.reasons}
        if result.quarantine.height:
            path = staging / "quarantine" / name / "part-00000.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            result.quarantine.write_parquet(path)
    return known, summary


def _push_timelines(store, encoded: Path, since: datetime | None) -> int:
    """Write users whose newest event is after `since` (all when None) to the online store, one partition
    at a time, from the values the build tasks encoded. This skips the offline read that `materialize`
    would do over the source files, and Feast's element-by-element conversion of list values (see
    `features.online`)."""
    pushed = 0
    for part in sorted(encoded.glob("*.parquet")):
        rows = pl.read_parquet(part)
        if since is not None:
            rows = rows.filter(pl.col("event_timestamp") > since)
        pushed += write_encoded_timelines(store, rows)
    return pushed


def _feast(out: Path, data: Path, encoded: Path, config: FeaturesConfig, start: datetime,
           ends: dict[str, datetime]) -> dict:
    """Apply the repository, then bring each view's online values up to its newest row: everything on the
    first run, incrementally afterwards (the registry's materialisation intervals are the watermarks).
    Watermarks sit at the newest row, not the window end, so a later run's newer rows always lie after them."""
    from feast import FeatureStore

    from features.feast_repo import definitions

    repo = out / FEAST
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(definitions.store_yaml(config.online_store, config.redis_connection))
    started = time.perf_counter()
    store = FeatureStore(repo_path=str(repo))
    store.apply(definitions.objects((data / "feast_sources").resolve()))
    applied = time.perf_counter()
    pushed = 0
    if config.materialize:
        with contextlib.redirect_stdout(io.StringIO()):  # Feast prints its progress
            for view, end in ends.items():
                fv = store.get_feature_view(view)
                since = fv.most_recent_end_time
                if view == TIMELINE_VIEW:
                    pushed = _push_timelines(store, encoded, since)
                    store.registry.apply_materialization(fv, store.project, since or start, end)
                elif since is None:
                    store.materialize(start_date=start, end_date=end, feature_views=[view])
                else:
                    store.materialize_incremental(end_date=end, feature_views=[view])
    return {"repo": str(repo), "apply_s": round(applied - started, 3), "timelines_pushed": pushed,
            "materialize_s": round(time.perf_counter() - applied, 3)}


@dataclass(frozen=True)
class _Plan:
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
    def of(cls, logs: Path, out: Path, config: FeaturesConfig) -> "_Plan":
        with_candidates = bool(logio.table_files(logs, "ad_candidates"))
        manifest = logio.read_manifest(logs) or {}
        offset = float(manifest.get("utc_offset_hours", 8.0))
        window = data_window(logs, ValidationConfig())
        last_day = int((window[1] - 1 + offset * 3_600_000) // aggregates.DAY_MS)
        split = SplitDays.last_days(last_day, config.validation_days, config.test_days)
        # a day early: partitions written with another UTC offset than the manifest's still cover the window
        evaluation_from = date(1970, 1, 1) + timedelta(days=split.validation_start - 1)
        return cls(logs, out, (*contract.LOG_TABLES, *(["ad_candidates"] if with_candidates else [])), window,
                   offset, last_day, split, evaluation_from)

    @property
    def staging(self) -> Path:  # the new dataset, renamed into place once complete
        return self.out / f".{DATA}.staging"

    @property
    def work(self) -> Path:  # scratch: the logs split by user partition, removed once built
        return self.out / ".shards"

    @property
    def encoded(self) -> Path:  # scratch: timelines encoded for the online store, removed at the end
        return self.out / ".online_values"


def run_features(logs: str | Path, out: str | Path, config: FeaturesConfig = FeaturesConfig(),
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run the whole job; returns the stats also written to OUT/data/stats.json."""
    logs, out = Path(logs), Path(out)
    say = progress or (lambda _: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not logs.is_dir():
        raise FileNotFoundError(f"log folder {logs} does not exist")
    for table in contract.LOG_TABLES:
        files = logio.table_files(logs, table)
        if not files:
            raise ValueError(f"{logs} has no {table} (expected {logs}/{table}/**/*.parquet)")
        if any(f.suffix != ".parquet" for f in files):
            raise ValueError(f"{table}: the features job reads parquet only; convert CSV logs first")
    plan = _Plan.of(logs, out, config)
    out.mkdir(parents=True, exist_ok=True)
    for d in (plan.staging, plan.work, plan.encoded):
        shutil.rmtree(d, ignore_errors=True)
    plan.staging.mkdir()
    plan.encoded.mkdir()
    try:
        return _build_and_publish(plan, config, say, t0, timings)
    finally:
        shutil.rmtree(plan.encoded, ignore_errors=True)


def _build_and_publish(plan: _Plan, config: FeaturesConfig, say: Callable[[str], None], t0: float,
                       timings: dict[str, float]) -> dict:
    logs, out, window, split, offset = plan.logs, plan.out, plan.window, plan.split, plan.offset
    staging, work = plan.staging, plan.work
    known, world_summary = _world(logs, window, staging)
    timings["world_s"] = time.perf_counter() - t0

    say("starting Ray")
    t = time.perf_counter()
    session = _RaySession(config, out)
    timings["ray_start_s"] = time.perf_counter() - t
    # Feast takes seconds to import and is needed only at the end: import it while the driver waits on
    # Ray's tasks (not before: it would slow Ray's start, which needs the driver's CPU too)
    threading.Thread(target=importlib.import_module, args=("feast",), name="import-feast", daemon=True).start()
    try:
        import ray

        t = time.perf_counter()
        say("sharding the logs by user")
        shard = ray.remote(num_cpus=1)(_shard_task)
        shard_refs = []
        # two file groups per CPU: few tasks (each has a fixed cost), all CPUs busy
        n_groups = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        for table in plan.tables:
            files = logio.table_files(logs, table)
            if table == "ad_candidates":  # only the evaluation days' candidates are kept: read no others
                files = logio.files_from(files, plan.evaluation_from)
            if not files:
                continue
            files = [str(f) for f in files]
            groups = np.array_split(np.array(files), min(len(files), n_groups))
            shard_refs += [shard.remote(g.tolist(), table, i, str(work.resolve()), config.partitions)
                           for i, g in enumerate(groups)]
        ray.get(shard_refs)
        timings["shard_s"] = time.perf_counter() - t

        t = time.perf_counter()
        keys_ref = ray.put(known)
        task = ray.remote(num_cpus=1)(_build_task)
        encoded = str(plan.encoded.resolve()) if config.materialize else None
        pending = [task.remote(p, str(work.resolve()), str(staging.resolve()), encoded, keys_ref, window, split,
                               config.max_seq_len, offset, "ad_candidates" in plan.tables)
                   for p in range(config.partitions)]
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            say(f"built partition {len(results)}/{config.partitions}")
        timings["build_s"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        session.close()
        shutil.rmtree(work, ignore_errors=True)
        timings["ray_stop_s"] = time.perf_counter() - t
    results.sort(key=lambda r: r["partition"])

    t = time.perf_counter()
    first_day = int((window[0] + offset * 3_600_000) // aggregates.DAY_MS)
    newest: dict[str, datetime] = {}
    for key, name in (("item_id", "item_stats"), ("shop_id", "shop_stats")):
        counts = pl.concat([r[f"{key.split('_')[0]}_counts"] for r in results])
        stats = aggregates.point_in_time_stats(counts, key, first_day, plan.last_day, offset)
        stats.write_parquet(staging / "feast_sources" / f"{name}.parquet", **_OUTPUT_PARQUET)
        newest[name] = stats["event_timestamp"].max()
    newest["user_timeline"] = max((r["newest_event"] for r in results if r["newest_event"] is not None), default=None)
    timings["aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()

    stats = _stats(logs, config, window, split, world_summary, results)
    failed = [t for t, s in stats["validation"].items() if s["bad_fraction"] > config.max_bad_fraction]
    if failed:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"bad-row fraction above {config.max_bad_fraction:.2%} in {', '.join(failed)}: "
                         f"nothing written (run fin validate for details)")
    (staging / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    logio.publish(staging, out / DATA)
    timings["stats_and_swap_s"] = time.perf_counter() - t

    say("applying and materialising the Feast repository")
    start = datetime.fromtimestamp(window[0] / 1000, tz=timezone.utc)
    ends = {view: (t or start) + timedelta(milliseconds=1) for view, t in newest.items()}
    feast = _feast(out, out / DATA, plan.encoded, config, start, ends)
    timings.update(feast_apply_s=feast["apply_s"], feast_materialize_s=feast["materialize_s"])
    timings["total_s"] = time.perf_counter() - t0
    per_task = {k: round(sum(r["seconds"][k] for r in results), 3) for k in ("read", "build", "write")}
    run = {"timings_s": {k: round(v, 3) for k, v in timings.items()}, "build_task_seconds_total": per_task,
           "feast_repo": feast["repo"], "timelines_pushed_online": feast["timelines_pushed"]}
    (out / DATA / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True))
    return stats | run


def _stats(logs: Path, config: FeaturesConfig, window, split: SplitDays, world: dict, results: list[dict]) -> dict:
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
        "logs": str(logs.resolve()),
        "config": asdict(config),
        "window_start_ms": window[0], "window_end_ms": window[1],
        "split_days": {"validation_start": split.validation_start, "test_start": split.test_start},
        "validation": validation,
        "users": int(lengths.size),
        "timeline_length": pct | {"max": int(lengths.max()) if lengths.size else 0,
                                  "over_max_seq_len": int((lengths > config.max_seq_len).sum())},
        "examples": {s: sum(r["examples"][s] for r in results) for s in SPLITS},
        "clicks": {s: sum(r["labels"][s] for r in results) for s in SPLITS},
        "candidates": {s: sum(r["candidates"].get(s, 0) for r in results) for s in EVALUATION_SPLITS},
    }
