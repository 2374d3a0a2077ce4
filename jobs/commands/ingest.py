"""`fin ingest`: replay a log folder's behaviours into a server's Ingest API (tests, benchmarks, back-fills)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jobs.commands.common import Command, CommandError, add_json_flag, emit, progress, time_ms
from jobs.commands.score import _channel, _wait_until_serving
from jobs.commands.serve import read_token


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serving.config import ServerConfig

    sd = ServerConfig(models=Path(), feast_repo=Path())
    addr = f"{sd.host}:{sd.port}"
    p.add_argument("--addr", default=addr, help=f"server address (default {addr})")
    p.add_argument("--logs", type=Path, help="log folder whose behaviours are replayed")
    p.add_argument("--events", type=Path, help="instead of --logs: an IngestRequest as JSON (protobuf JSON mapping)")
    p.add_argument("--since", type=time_ms, help="first event time (ms or ISO; default: the first event)")
    p.add_argument("--until", type=time_ms, help="replay events before this time (ms or ISO; default: all)")
    p.add_argument("--limit", type=int, help="at most this many events (the earliest)")
    p.add_argument("--batch", type=int, default=500, help="events per Ingest call (default 500)")
    p.add_argument("--speed", type=float, default=0.0,
                   help="replay at this many times the logged pace (e.g. 60: an hour a minute); 0: as fast as "
                        "the server takes them (default)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    p.add_argument("--wait", type=float, default=0, help="first wait up to this many seconds for the server to serve")
    p.add_argument("--tls-ca", type=Path, help="PEM certificate to trust: connect with TLS")
    p.add_argument("--auth-token-file", type=Path, help="file holding the server's bearer token")
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    import grpc
    import polars as pl

    from features import logio
    from serving.ingest import behaviour_events
    from serving.pb import ctr_scoring_pb2 as pb
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    if args.batch < 1 or args.speed < 0:
        raise CommandError("--batch must be at least 1 and --speed at least 0")
    if (args.logs is None) == (args.events is None):
        raise CommandError("give one of --logs DIR or --events FILE.json")
    if args.events is not None:
        rows = _events_file(args.events)
    else:
        rows = logio.read_raw(args.logs, "behaviours")
        if rows is None:
            raise CommandError(f"no behaviours under {args.logs}")
    rows = rows.with_columns(pl.col("ts").cast(pl.Int64, strict=False)).sort("ts", "event_id", nulls_last=True)
    if args.since is not None:
        rows = rows.filter(pl.col("ts") >= args.since)
    if args.until is not None:
        rows = rows.filter(pl.col("ts") < args.until)
    if args.limit is not None:
        rows = rows.head(args.limit)
    token = read_token(args.auth_token_file)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    totals = {"events": rows.height, "accepted": 0, "duplicates": 0, "refused": 0}
    started = time.perf_counter()
    with _channel(args) as channel, progress(rows.height, "event", "ingest") as bar:
        if args.wait:
            _wait_until_serving(channel, args.wait)
        stub = pb_grpc.CtrScoringStub(channel)
        first_ts = rows["ts"][0] if rows.height else 0
        for lo in range(0, rows.height, args.batch):
            chunk = rows.slice(lo, args.batch)
            if args.speed > 0 and chunk["ts"][0] is not None:  # wait for the batch's first event's moment
                time.sleep(max(0.0, (chunk["ts"][0] - first_ts) / 1000 / args.speed - (time.perf_counter() - started)))
            try:
                response = stub.Ingest(pb.IngestRequest(events=behaviour_events(chunk)), timeout=args.timeout,
                                       metadata=metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise CommandError(f"{e.code().name}: {e.details()}") from None
                totals["refused"] += chunk.height  # every event of the call failed the contract
            else:
                totals["accepted"] += response.accepted
                totals["duplicates"] += response.duplicates
                totals["refused"] += len(response.refused)
            bar.update(chunk.height)
    seconds = time.perf_counter() - started
    result = {"command": "ingest", **totals, "seconds": round(seconds, 3),
              "events_per_s": round(rows.height / seconds, 1) if seconds > 0 else None}
    emit(args, result, f"ingested {totals['accepted']:,} of {rows.height:,} events ({totals['duplicates']:,} already "
                       f"stored, {totals['refused']:,} refused) in {seconds:.1f} s")
    return 0


def _events_file(path: Path):
    """An IngestRequest written as JSON -> rows of the contract's behaviours table."""
    from google.protobuf import json_format

    from serving.ingest import behaviour_rows
    from serving.pb import ctr_scoring_pb2 as pb

    try:
        request = json_format.Parse(path.read_text(), pb.IngestRequest())
    except (OSError, json_format.ParseError) as e:
        raise CommandError(f"cannot read an IngestRequest from {path}: {e}") from None
    return behaviour_rows(request.events, 0.0)  # local time fields are the server's to derive


COMMAND = Command(
    name="ingest", help="replay a log folder's behaviours into a server's Ingest API",
    description="Sends the behaviours of a log folder (in time order, optionally a time range), or the events of "
                "an IngestRequest JSON file, to a running "
                "`fin serve` through Ingest, in batches, as fast as it takes them or at a multiple of the "
                "logged pace; prints how many were accepted, already stored or refused.",
    add_arguments=add_arguments, run=run)
