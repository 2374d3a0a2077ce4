"""`fin features` as a Ray job: logs -> timelines, point-in-time examples, item/shop statistics, Feast.

The data steps are `features.pipeline`'s (plain functions over files); this module holds what is Ray's:
the session (a local Ray, or a cluster with --ray-address) and the fan-out of the two parallel stages,
one task per group of log files (sharding rows by user partition) and one task per partition (building
it). The driver runs the rest: the world tables, statistics, publishing the dataset in one rename, and
the Feast repository. The output layout is `features.dataset`'s.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from features import pipeline
from features.pipeline import OnlineStoreConfig, Plan
from jobs.features_config import FeaturesConfig

_MAX_RAY_TEMP_LEN = 40  # Ray puts ~65 more characters of session and socket names under it; AF_UNIX allows 107
_LOCAL_STARTS = 3  # tries at starting a local Ray


# ---------------------------------------------------------------------------- Ray
class RaySession:
    """Starts a local Ray (temp dir inside the output folder, usage stats off) or joins a cluster at
    `address`."""

    def __init__(self, address: str | None, num_cpus: int | None, out: Path):
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
        if address:
            ray.init(address=address, **kwargs)
        else:
            temp = (out / ".ray").resolve()
            if len(str(temp)) > _MAX_RAY_TEMP_LEN:  # too long for Ray's sockets: use a short private dir
                temp = Path(tempfile.mkdtemp(prefix="fin-ray-"))
            temp.mkdir(parents=True, exist_ok=True)
            self.temp_dir = temp
            for attempt in range(_LOCAL_STARTS):
                try:
                    ray.init(num_cpus=num_cpus, _temp_dir=str(temp), **kwargs)
                    break
                except Exception as error:
                    # On a loaded 2-core machine a local start has timed out two ways: the GCS server wrote no
                    # port file ("Timed out waiting for file"), or the raylet did not register within Ray's
                    # fixed 30 s ("The current node timed out during startup"); the next start came up.
                    if "timed out" not in str(error).lower() or attempt == _LOCAL_STARTS - 1:
                        raise
                    ray.shutdown()
                    _stop_leftovers(temp)
                    logging.getLogger(__name__).warning("local Ray did not start (%s); starting it again", error)
        self.started = True

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_leftovers(temp: Path) -> None:
    """Kills what a failed local start left running (its GCS server, raylet, monitors): the processes this
    one started whose command line names the start's temp dir. They would otherwise hold CPU the next start
    needs and outlive the job."""
    import psutil

    def names_temp(process: psutil.Process) -> bool:
        try:
            return any(str(temp) in arg for arg in process.cmdline())
        except psutil.Error:
            return False

    left = [p for p in psutil.Process().children(recursive=True) if names_temp(p)]
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)


def run_features(logs: str | Path, out: str | Path, config: FeaturesConfig = FeaturesConfig(),
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run the whole job; returns the stats also written to OUT/data/stats.json, and the run's timings."""
    logs, out = Path(logs), Path(out)
    say = progress or (lambda _: None)
    t0 = time.perf_counter()
    pipeline.check_logs(logs)
    plan = Plan.of(logs, out, config.validation_days, config.test_days)
    out.mkdir(parents=True, exist_ok=True)
    for d in (plan.staging, plan.work, plan.encoded):
        shutil.rmtree(d, ignore_errors=True)
    plan.staging.mkdir()
    plan.encoded.mkdir()
    try:
        return _run(plan, config, say, t0)
    finally:
        shutil.rmtree(plan.encoded, ignore_errors=True)


def _run(plan: Plan, config: FeaturesConfig, say: Callable[[str], None], t0: float) -> dict:
    timings: dict[str, float] = {}
    known, world_summary = pipeline.validate_world(plan)
    timings["world_s"] = time.perf_counter() - t0

    say("starting Ray")
    t = time.perf_counter()
    session = RaySession(config.ray_address, config.num_cpus, plan.out)
    timings["ray_start_s"] = time.perf_counter() - t
    # Feast takes seconds to import and is needed only at the end: import it while the driver waits on
    # Ray's tasks (not before: it would slow Ray's start, which needs the driver's CPU too)
    threading.Thread(target=importlib.import_module, args=("feast",), name="import-feast", daemon=True).start()
    try:
        import ray

        t = time.perf_counter()
        say("sharding the logs by user")
        shard = ray.remote(num_cpus=1)(pipeline.shard_logs)
        work = str(plan.work.resolve())
        # two file groups per CPU: few tasks (each has a fixed cost), all CPUs busy
        groups = plan.file_groups(2 * max(1, int(ray.cluster_resources().get("CPU", 1))))
        ray.get([shard.remote(files, table, i, work, config.partitions) for table, i, files in groups])
        elsewhere = {table: pipeline.ids_seen_elsewhere(work, table) for table in plan.tables}
        timings["shard_s"] = time.perf_counter() - t

        t = time.perf_counter()
        keys_ref = ray.put(known)
        build = ray.remote(num_cpus=1)(pipeline.build_partition_files)
        encoded = str(plan.encoded.resolve()) if config.materialize else None
        pending = [build.remote(p, work, str(plan.staging.resolve()), encoded, keys_ref, plan.window, plan.split,
                                config.max_seq_len, plan.offset, plan.with_candidates,
                                {table: rows[p] for table, rows in elsewhere.items() if p in rows})
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
        shutil.rmtree(plan.work, ignore_errors=True)
        timings["ray_stop_s"] = time.perf_counter() - t
    results.sort(key=lambda r: r["partition"])

    t = time.perf_counter()
    newest = pipeline.write_statistics(plan, results)
    timings["aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = pipeline.dataset_stats(plan, asdict(config), world_summary, results, config.max_seq_len)
    pipeline.publish(plan, stats, config.max_bad_fraction)
    timings["stats_and_swap_s"] = time.perf_counter() - t

    say("applying and materialising the Feast repository")
    store = OnlineStoreConfig(config.online_store, config.redis_connection, config.materialize)
    feast = pipeline.apply_feast(plan, store, newest)
    timings.update(feast_apply_s=feast["apply_s"], feast_materialize_s=feast["materialize_s"])
    timings["total_s"] = time.perf_counter() - t0
    per_task = {k: round(sum(r["seconds"][k] for r in results), 3) for k in ("read", "build", "write")}
    run = {"timings_s": {k: round(v, 3) for k, v in timings.items()}, "build_task_seconds_total": per_task,
           "feast_repo": feast["repo"], "timelines_pushed_online": feast["timelines_pushed"]}
    plan.dataset.run_file.write_text(json.dumps(run, indent=2, sort_keys=True))
    return stats | run
