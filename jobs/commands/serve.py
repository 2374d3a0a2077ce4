"""`fin serve`: the gRPC server (CTR scoring, Open Inference Protocol, health, metrics), hot model reload."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, CommandError


def read_token(path: Path | None) -> str | None:
    """A bearer token from its file (None: no file given)."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CommandError(f"cannot read the token file: {e}") from None
    if not token:
        raise CommandError(f"the token file {path} is empty")
    return token


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serving.config import ServerConfig

    sd = ServerConfig(models=Path(), feast_repo=Path())
    p.add_argument("--models", required=True, type=Path, help="model repository folder (MODELS)")
    p.add_argument("--feast-repo", required=True, type=Path, help="the Feast repository (FEAT/feast of fin features)")
    p.add_argument("--host", default=sd.host, help=f"address to listen on (default {sd.host})")
    p.add_argument("--port", type=int, default=sd.port, help=f"port (default {sd.port}; 0: any free port)")
    p.add_argument("--default-model", default=sd.default_model,
                   help=f"model for requests that name none (default {sd.default_model}; else the only model loaded)")
    p.add_argument("--metrics-port", type=int, default=sd.metrics_port,
                   help=f"Prometheus /metrics port on --host (default {sd.metrics_port}: any free port, printed)")
    p.add_argument("--max-candidates", type=int, default=sd.scoring.max_candidates,
                   help=f"largest candidate list accepted (default {sd.scoring.max_candidates})")
    p.add_argument("--batch-candidates", type=int, default=sd.scoring.batch_candidates,
                   help="requests waiting together share one forward up to this many candidates "
                        f"(default {sd.scoring.batch_candidates}; 1: one request per forward)")
    p.add_argument("--utc-offset-hours", type=float, default=sd.scoring.utc_offset_hours,
                   help=f"local time of the city (default {sd.scoring.utc_offset_hours:g})")
    p.add_argument("--poll-s", type=float, default=sd.poll_s,
                   help=f"seconds between model repository scans (default {sd.poll_s:g})")
    p.add_argument("--eager", action="store_true",
                   help="score every model with its eager forward, even a version with a compiled package "
                        "(by default a version's package scores it once it passes its check at load)")
    p.add_argument("--torch-threads", type=int, default=sd.torch_threads,
                   help=f"intra-op threads per forward (default {sd.torch_threads})")
    p.add_argument("--workers", type=int, default=sd.workers,
                   help=f"eager forwards (and store reads) that may run at once (default {sd.workers}); a "
                        "version's compiled package is called on the event loop")
    p.add_argument("--infer-batch", type=int, default=sd.infer_batch,
                   help="rows (images) of ModelInfer calls waiting together joined into one forward of a vision "
                        f"model (default {sd.infer_batch}; an ONNX model: up to its max_batch_size; 1: one call "
                        "per forward)")
    p.add_argument("--processes", type=int, default=sd.processes,
                   help=f"server processes sharing the port (default {sd.processes}); one Python process uses "
                        "about one core, so give one per core for throughput")
    p.add_argument("--timeline-staleness-s", type=float, default=sd.online.timeline_staleness_s,
                   help="seconds a user's stored timeline is cached before it is read again (default "
                        f"{sd.online.timeline_staleness_s:g}; ingested events are read on every request)")
    p.add_argument("--stats-staleness-s", type=float, default=sd.online.stats_staleness_s,
                   help="seconds an item's or shop's statistics are cached before they are read again (default "
                        f"{sd.online.stats_staleness_s:g})")
    p.add_argument("--behaviour-log", type=Path,
                   help="log folder (the one fin features reads) that ingested behaviours are appended to, durably "
                        "before each Ingest answers; without it the server refuses Ingest calls")
    p.add_argument("--ingest-priority", choices=("idle", "normal"), default=sd.online.ingest_priority,
                   help="CPU priority of the process that checks and writes ingested behaviours (default "
                        f"{sd.online.ingest_priority}: it takes the CPU time scoring leaves, so Score calls go first)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve TLS instead of plaintext")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding a token: calls must send `authorization: Bearer <token>` (health excepted)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from serving.config import OnlineConfig, ScoringConfig, ServerConfig
    from serving.server import log_to_stderr, serve

    for name, path in (("--models", args.models), ("--feast-repo", args.feast_repo)):
        if not path.is_dir():
            raise CommandError(f"{name} {path} is not a folder")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("give both --tls-cert and --tls-key, or neither")
    if args.processes < 1 or args.workers < 1 or args.infer_batch < 1:
        raise CommandError("--processes, --workers and --infer-batch must be at least 1")
    if args.timeline_staleness_s < 0 or args.stats_staleness_s < 0:
        raise CommandError("--timeline-staleness-s and --stats-staleness-s must be at least 0")
    log_to_stderr()
    config = ServerConfig(models=args.models, feast_repo=args.feast_repo, host=args.host, port=args.port,
                          default_model=args.default_model, metrics_port=args.metrics_port, poll_s=args.poll_s,
                          torch_threads=args.torch_threads, workers=args.workers, processes=args.processes,
                          infer_batch=args.infer_batch,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=read_token(args.auth_token_file),
                          behaviour_log=args.behaviour_log, compiled=not args.eager,
                          scoring=ScoringConfig(max_candidates=args.max_candidates,
                                                batch_candidates=args.batch_candidates,
                                                utc_offset_hours=args.utc_offset_hours),
                          online=OnlineConfig(timeline_staleness_s=args.timeline_staleness_s,
                                              stats_staleness_s=args.stats_staleness_s,
                                              ingest_priority=args.ingest_priority))

    def ready(port, server, metrics_ports):
        urls = " ".join(f"http://{args.host}:{p}/metrics" for p in metrics_ports)
        print(f"serving on {args.host}:{port}; models: {', '.join(server.repository.names()) or 'none yet'}; "
              f"processes: {args.processes}; metrics on {urls}", flush=True)

    asyncio.run(serve(config, ready))
    return 0


COMMAND = Command(
    name="serve", help="serve CTR scoring and model endpoints over gRPC, with hot model reload",
    description="Start the gRPC server: the CTR scoring API (fin_ads.v1.CtrScoring), the "
                "Open Inference Protocol (inference.GRPCInferenceService, KServe v2) for "
                "vision and other models, grpc.health.v1 health checking (NOT_SERVING until "
                "a model loads), reflection, and Prometheus metrics. Models come from the "
                "repository folder, which is watched for new versions; a version that fails "
                "to load or its smoke check is refused and the serving one stays. Stops on "
                "SIGTERM/SIGINT after draining calls.",
    add_arguments=add_arguments, run=run, quiet_libraries=True)
