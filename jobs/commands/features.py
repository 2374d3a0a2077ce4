"""`fin features`: timelines, training examples and the Feast store from a log folder (a Ray job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, add_json_flag, emit, progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jobs.features_config import FeaturesConfig

    d = FeaturesConfig()
    p.add_argument("--logs", required=True, type=Path, help="log folder (contract tables, parquet)")
    p.add_argument("--out", required=True, type=Path, help="output folder (data/ is replaced, feast/ is kept)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help=f"events per user in the online store (default {d.max_seq_len})")
    p.add_argument("--partitions", type=int, default=d.partitions,
                   help=f"user partitions, one build task each (default {d.partitions})")
    p.add_argument("--validation-days", type=int, default=d.validation_days,
                   help=f"days before the test days (default {d.validation_days})")
    p.add_argument("--test-days", type=int, default=d.test_days, help=f"last days of the data (default {d.test_days})")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help=f"fail above this bad-row share (default {d.max_bad_fraction})")
    p.add_argument("--ray-address", default=d.ray_address, help="existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=d.num_cpus, help="CPUs of the local Ray (default: all)")
    p.add_argument("--online-store", choices=["sqlite", "redis"], default=d.online_store,
                   help=f"Feast online store (default {d.online_store})")
    p.add_argument("--redis", default=d.redis_connection,
                   help=f"Redis host:port for --online-store redis (default {d.redis_connection})")
    p.add_argument("--no-materialize", action="store_false", dest="materialize", default=d.materialize,
                   help="apply the Feast repository but skip materialising")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from jobs.features_config import FeaturesConfig
    from jobs.features_job import run_features

    config = FeaturesConfig(max_seq_len=args.max_seq_len, partitions=args.partitions,
                            validation_days=args.validation_days, test_days=args.test_days,
                            max_bad_fraction=args.max_bad_fraction, ray_address=args.ray_address,
                            num_cpus=args.num_cpus, online_store=args.online_store,
                            redis_connection=args.redis, materialize=args.materialize)
    steps = 3 + config.partitions  # Ray start, sharding, one per partition, Feast
    with progress(steps, "step", "features") as bar:
        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        stats = run_features(args.logs, args.out, config, step)
    v = stats["validation"]
    text = (f"wrote {args.out}/data: {stats['users']:,} users, examples "
            + ", ".join(f"{s}={n:,}" for s, n in stats["examples"].items())
            + f"; quarantined behaviours={v['behaviours']['quarantined']:,} "
            f"impressions={v['impressions']['quarantined']:,}; "
            f"Feast repo {stats['feast_repo']}; {stats['timings_s']['total_s']:.1f}s")
    result = {"command": "features", "logs": args.logs, "out": args.out, "data": args.out / "data",
              "feast_repo": stats["feast_repo"], "users": stats["users"], "examples": stats["examples"],
              "clicks": stats["clicks"], "candidates": stats["candidates"],
              "quarantined": {table: s["quarantined"] for table, s in v.items()},
              "timelines_pushed_online": stats["timelines_pushed_online"], "timings_s": stats["timings_s"],
              "seconds": stats["timings_s"]["total_s"]}
    emit(args, result, text)
    return 0


COMMAND = Command(
    name="features", help="build timelines, training examples and the Feast store (a Ray job)",
    description="Turn a log folder into per-user timelines, point-in-time training examples "
                "split by day, item/shop statistics, and a Feast repository whose online store "
                "holds each user's last --max-seq-len events. Runs on a local Ray unless "
                "--ray-address is given.",
    add_arguments=add_arguments, run=run)
