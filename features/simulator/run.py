"""`simulate(config, out)`: build the world, run user chunks (optionally in parallel), write the log folder.

Output layout (the contract's log folder):
    OUT/aois.parquet, shops.parquet, items.parquet, users.parquet
    OUT/creatives.parquet                                   (one PNG per item)
    OUT/behaviours/date=YYYY-MM-DD/part-CCCCC.parquet
    OUT/impressions/date=YYYY-MM-DD/part-CCCCC.parquet
    OUT/ad_candidates/date=YYYY-MM-DD/part-CCCCC.parquet   (every candidate of every ad request)
    OUT/manifest.json
The folder is written under a temporary name and renamed at the end, so a run that dies leaves no
half-written log folder behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from features import contract, logio
from features.simulator.config import SimConfig
from features.simulator.engine import ChunkSimulator, ChunkStats, day_start_ms
from features.simulator.render import creative_columns
from features.simulator.world import World, build_world

ProgressFn = Callable[[int], None]


def _run_chunk(config: SimConfig, chunk: int, lo: int, hi: int, out: str, progress: ProgressFn | None = None) -> ChunkStats:
    world = build_world(config)  # deterministic; rebuilt per process rather than shipped
    return ChunkSimulator(world, chunk, lo, hi, Path(out)).run(progress)


def _creatives(world: World) -> pa.Table:
    return contract.to_table(contract.CREATIVES, creative_columns(world))


def chunk_bounds(config: SimConfig) -> list[tuple[int, int]]:
    n, size = config.users.users, max(1, config.chunk_users)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def simulate(config: SimConfig, out: str | Path, *, overwrite: bool = False,
             progress: ProgressFn | None = None) -> dict:
    """Simulate a log folder at `out`; returns the manifest plus wall time. `progress(k)` is told of k more user-chunk-days."""
    out = Path(out)
    if config.users.users < 1 or config.days < 1:
        raise ValueError("need at least one user and one day")
    started = time.perf_counter()
    tmp = logio.staging_folder(out, overwrite)

    world = build_world(config)
    tables = world.tables()
    for name, table in tables.items():
        pq.write_table(table, tmp / f"{name}.parquet")

    bounds = chunk_bounds(config)
    stats: list[ChunkStats] = []
    # the creatives are drawn while the users are simulated: both spend their time in numpy and zlib,
    # which release the GIL, so on two cores this hides most of the seconds the pictures take
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="creatives") as painter:
        creatives = painter.submit(_creatives, world)
        if config.workers <= 1 or len(bounds) == 1:
            for i, (lo, hi) in enumerate(bounds):
                stats.append(_run_chunk(config, i, lo, hi, str(tmp), progress))
        else:
            ctx = mp.get_context("spawn")  # a clean interpreter per worker; no inherited threads
            with ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx) as pool:
                futures = [pool.submit(_run_chunk, config, i, lo, hi, str(tmp)) for i, (lo, hi) in enumerate(bounds)]
                for f in futures:
                    stats.append(f.result())
                    if progress is not None:
                        progress(config.days)
        tables[contract.CREATIVES.name] = creatives.result()
    pq.write_table(tables[contract.CREATIVES.name], tmp / f"{contract.CREATIVES.name}.parquet")

    offset = config.city.utc_offset_hours
    manifest = {
        "contract_version": contract.CONTRACT_VERSION,
        "producer": "fin simulate",
        "window_start_ms": day_start_ms(config.start_date, 0, offset),
        # night-time sessions of the last day run into the next morning
        "window_end_ms": day_start_ms(config.start_date, config.days + 1, offset),
        "utc_offset_hours": offset,
        "rows": {name: t.num_rows for name, t in tables.items()} | {
            "behaviours": sum(s.behaviours for s in stats),
            "impressions": sum(s.impressions for s in stats),
            "ad_candidates": sum(s.ad_candidates for s in stats),
        },
        "requests": sum(s.requests for s in stats),
        "clicks": sum(s.clicks for s in stats),
        "examination": list(config.ads.examination),
        "config": config.to_dict(),
    }
    (tmp / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    logio.publish(tmp, out)
    return manifest | {"wall_s": round(time.perf_counter() - started, 3)}
