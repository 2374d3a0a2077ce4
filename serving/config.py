"""The server's settings, in a module that imports nothing heavy (the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CreativeConfig:
    """Creative embeddings for models that read creatives (`serving.creatives`)."""

    cache_size: int = 200_000  # items
    staleness_s: float = 3600.0  # a cached embedding is re-read after this long (a new encoder's values)
    max_embedded: int = 16  # creatives embedded in-process per request (the rest are scored without)


@dataclass(frozen=True)
class ScoringConfig:
    max_candidates: int = 1000  # per request
    batch_candidates: int = 2000  # per forward: requests waiting together share one forward up to this
    utc_offset_hours: float = 8.0  # local time of the served city: meal slot, weekday and hour come from it

    def __post_init__(self):
        if not -14 <= self.utc_offset_hours <= 14:  # (NaN too: every Score failed reading its local time)
            raise ValueError(f"utc_offset_hours {self.utc_offset_hours} is not a UTC offset (-14 to 14 hours)")


@dataclass(frozen=True)
class OnlineConfig:
    timeline_cache_size: int = 10_000  # users
    timeline_staleness_s: float = 30.0  # a cached timeline is re-read after this long
    stats_cache_size: int = 100_000  # items, and as many shops
    stats_staleness_s: float = 300.0
    read_timeout_s: float = 0.5  # a read slower than this counts as failed
    outage_backoff_s: float = 1.0  # after a failed read, requests skip the store this long
    realtime_max_events: int = 1000  # per user, the newest ingested events kept (the timelines' own bound)
    ingest_max_events: int = 1000  # per Ingest call
    # the ingest worker's CPU priority: "idle" (SCHED_IDLE: any other work preempts it, so Score calls go
    # first and ingestion takes the CPU time they leave) or "normal"
    ingest_priority: str = "idle"


@dataclass(frozen=True)
class ServerConfig:
    models: Path
    feast_repo: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    default_model: str = "fin"  # serves requests that name no model (else the only model loaded)
    metrics_port: int = 0  # Prometheus /metrics on host:port (0: any free port)
    poll_s: float = 5.0  # how often the model repository is checked for new versions
    compiled: bool = True  # score with a version's compiled package when it has one that passes its check
    torch_threads: int = 1  # intra-op threads per forward
    workers: int = 2  # eager forwards that may run at once (and store reads), per process
    creative_encoder: str = "creative_encoder"  # the repository's model that embeds creatives the store lacks
    creatives: CreativeConfig = field(default_factory=CreativeConfig)
    infer_batch: int = 64  # rows (images) of waiting ModelInfer calls joined into one vision forward (1: none)
    processes: int = 1  # server processes on the port: one Python process uses about one core
    drain_delay_s: float = 1.0  # on shutdown, NOT_SERVING first and calls still accepted this long (see stop)
    grace_s: float = 10.0  # then how long shutdown waits for calls in flight
    tls_cert: Path | None = None  # PEM certificate chain and private key: serve TLS instead of plaintext
    tls_key: Path | None = None
    auth_token: str | None = None  # when set, calls need `authorization: Bearer <token>` (health excepted)
    behaviour_log: Path | None = None  # log folder ingested behaviours go to (None: Ingest is refused)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        ports = [f"{name} {port}" for name, port in (("port", self.port), ("metrics_port", self.metrics_port))
                 if not 0 <= port <= 65535]
        if ports:  # (gRPC would listen on the port modulo 65536)
            raise ValueError(f"{', '.join(ports)}: a port is 0 (any free one) to 65535")
