"""Options of the features job (`fin features`), importable without the job's heavy dependencies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeaturesConfig:
    max_seq_len: int = 1000  # events per user kept in the online store (and per example history)
    partitions: int = 8  # user partitions; fixed for a given output so runs are byte-identical
    validation_days: int = 7
    test_days: int = 7
    max_bad_fraction: float = 0.01
    ray_address: str | None = None  # None: start (and stop) a local Ray
    num_cpus: int | None = None  # local Ray only; default: all cores
    online_store: str = "sqlite"  # or "redis"
    redis_connection: str = "127.0.0.1:6379"
    materialize: bool = True
