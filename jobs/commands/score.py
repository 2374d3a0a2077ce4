"""`fin score`: a small client of the CTR scoring API (one request from JSON, or logged requests replayed)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from jobs.commands.common import Command, CommandError
from jobs.commands.serve import read_token


def add_arguments(p: argparse.ArgumentParser) -> None:
    from serving.config import ServerConfig

    sd = ServerConfig(models=Path(), feast_repo=Path())
    addr = f"{sd.host}:{sd.port}"  # where `fin serve` listens by default
    p.add_argument("--addr", default=addr, help=f"server address (default {addr})")
    p.add_argument("--request", type=Path, help="a ScoreRequest as JSON; the response is printed as JSON")
    p.add_argument("--replay", type=Path, help="the features job's output: replay its logged requests")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="with --replay (default test)")
    p.add_argument("--requests", type=int, default=3, help="with --replay: how many (default 3)")
    p.add_argument("--model", help="model name to ask for (default: the request's, else the server's default)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline per call in seconds (default 5)")
    p.add_argument("--wait", type=float, default=0, help="first wait up to this many seconds for the server to serve")
    p.add_argument("--brief", action="store_true",
                   help="with --request: one line per candidate instead of the response as JSON")
    p.add_argument("--tls-ca", type=Path, help="PEM certificate to trust: connect with TLS")
    p.add_argument("--auth-token-file", type=Path, help="file holding the server's bearer token")


def _channel(args: argparse.Namespace):
    import grpc

    if args.tls_ca is None:
        return grpc.insecure_channel(args.addr)
    try:
        return grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(args.tls_ca.read_bytes()))
    except OSError as e:
        raise CommandError(f"cannot read --tls-ca: {e}") from None


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from serving.pb import ctr_scoring_pb2 as pb
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    if (args.request is None) == (args.replay is None):
        raise CommandError("give one of --request FILE or --replay FEAT")
    if args.request is not None:
        try:
            requests = [(json_format.Parse(args.request.read_text(), pb.ScoreRequest()), None)]
        except (OSError, json_format.ParseError) as e:
            raise CommandError(f"cannot read a ScoreRequest from {args.request}: {e}") from None
    else:
        from serving.replay import logged_requests

        requests = [(r.request, r.labels) for r in logged_requests(args.replay, args.split, args.requests)]
        if not requests:
            raise CommandError(f"no {args.split} requests under {args.replay}")
    token = read_token(args.auth_token_file)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with _channel(args) as channel:
        if args.wait:
            _wait_until_serving(channel, args.wait)
        stub = pb_grpc.CtrScoringStub(channel)
        for request, labels in requests:
            if args.model:
                request.model_name = args.model
            try:
                response = stub.Score(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as e:
                raise CommandError(f"{e.code().name}: {e.details()}") from None
            if labels is None and args.brief:
                _print_replayed(request, response, [0] * len(request.candidates))
            elif labels is None:
                print(json_format.MessageToJson(response, indent=2))
            else:
                _print_replayed(request, response, labels)
    return 0


def _wait_until_serving(channel, seconds: float) -> None:
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"the server was not serving within {seconds:g} s")
        time.sleep(0.2)


def _print_replayed(request, response, labels: list[int]) -> None:
    when = dt.datetime.fromtimestamp(request.context.ts_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = [f for f in ("cold_start_user", "degraded_features") if getattr(response, f)]
    print(f"user {request.user_id} at {when}, {request.context.geohash[:6]}: {response.model_name}/"
          f"{response.model_version}, {response.timing.total_ms:.1f} ms (features {response.timing.features_ms:.1f}, "
          f"model {response.timing.model_ms:.1f}){' ' + ', '.join(flags) if flags else ''}")
    for c, s, label in zip(request.candidates, response.scores, labels):
        print(f"  item {c.item_id:>7}  shop {c.shop_id:>5}  bid {c.bid:5.2f}  pCTR {s.pctr:.4f}  eCPM {s.ecpm:7.2f}"
              f"  {'clicked' if label else ''}")


COMMAND = Command(
    name="score", help="send ScoreRequests to a server and print the responses",
    description="A small client of the CTR scoring API: sends one ScoreRequest written in "
                "the protobuf JSON mapping (proto/serving/pb/ctr_scoring.proto), or replays "
                "logged requests of a split of the features job's output.",
    add_arguments=add_arguments, run=run)
