"""Benchmark: Ingest into the real-time timelines (sqlite and Redis), and Score beside ingestion.

Data and model: serve_scale's (`--data DIR` shares them: a simulated city, FIN over 1,000-event histories).
The server is one `fin serve` process on 127.0.0.1 with `--behaviour-log` in a scratch folder (every
accepted event is fsynced there before the answer). Events are copies of logged behaviours with fresh
event ids, for random users, `--batch` per call. Phases, each bounded in calls and seconds:
  ingest_sqlite_c1, ingest_sqlite_c8   events/s and call p50/p99 into the default sqlite store, 1 and 8 clients
  ingest_redis_c1, ingest_redis_c8     the same with the server's Feast repository pointed at a local
                                       redis-server (the real-time events then live in Redis)
  ingest_redis_c1_batch<N>             1 client, calls of a tenth of --batch events (a page view's or an
                                       order's few events)
  score_alone, score_with_ingest       Score (200 candidates, 1,000-event histories) at concurrency 1, alone
                                       and with `--ingest-rate` events/s ingested beside it (sqlite) by
                                       another client process
Goals (issue): 5,000 events/s into Redis, ingest p99 under 10 ms, Score p99 at most 20% worse with 1,000
events/s beside it.
Usage: python benchmarks/ingest_scale.py [--data DIR] [--seconds 15] [--batch 100] [--ingest-rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _measure import report, speed_reference
from serve_scale import (
    Server,
    add_data_arguments,
    built,
    percentiles,
    request_pool,
    score_request,
    timed_calls,
    users_near,
)


def event_pool(logs: Path, size: int = 20_000):
    import polars as pl

    from features import logio

    rows = logio.read_raw(logs, "behaviours")
    return rows.sample(min(size, rows.height), seed=0).with_columns(pl.col("event_id") + 10**12)


def ingest_calls(pool, batch: int, calls: int, first_id: int) -> list:
    """`calls` IngestRequests of `batch` events each, with ids never used before, timed within the last hour
    (as real-time events are: the logged times may lie beyond the day of clock skew the server accepts)."""
    import polars as pl

    from serving.ingest import behaviour_events
    from serving.pb import ctr_scoring_pb2 as pb

    rng = np.random.default_rng(first_id)
    out = []
    for k in range(calls):
        now_ms = int(time.time() * 1000)
        rows = pool[rng.choice(pool.height, batch, replace=False)].with_columns(
            event_id=pl.int_range(batch) + first_id + k * batch,
            ts=pl.Series(now_ms - rng.integers(0, 3_600_000, batch)))
        out.append(pb.IngestRequest(events=behaviour_events(rows)))
    return out


async def ingest_phase(addr: str, calls: list, concurrency: int, seconds: float) -> dict:
    import grpc

    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(concurrency)]
    queue, latencies, accepted = iter(calls), [], 0
    deadline = time.perf_counter() + seconds

    async def client(channel):
        nonlocal accepted
        stub = pb_grpc.CtrScoringStub(channel)
        for call in queue:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            response = await stub.Ingest(call, timeout=10)  # (`x += await ...` would read x before waiting)
            accepted += response.accepted
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in channels))
    wall = time.perf_counter() - started
    for c in channels:
        await c.close()
    return {"concurrency": concurrency, "calls": len(latencies), "events": accepted,
            "events_per_s": round(accepted / wall), **percentiles(latencies)}


async def score_phase(addr: str, requests: list, seconds: float) -> dict:
    """Score at concurrency 1 for `seconds` (or until `requests` run out)."""
    import grpc

    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.CtrScoringStub(channel)
        latencies, _, _ = await timed_calls(lambda r: stub.Score(r, timeout=10), requests, 1, seconds)
    return {"requests": len(latencies), **percentiles(latencies)}


def score_beside_ingestion(addr: str, requests: list, seconds: float, logs: Path, batch: int, rate: float,
                           first_id: int) -> dict:
    """`score_phase` while another process (the order service is another client than the ad server)
    sends Ingest calls of `batch` events paced to `rate` events/s to the same server."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    ingester = context.Process(target=paced_ingestion,
                               args=(theirs, addr, str(logs), batch, rate, seconds + 2, first_id))
    ingester.start()
    ours.recv()  # its calls are built: it starts sending now
    scored = asyncio.run(score_phase(addr, requests, seconds))
    ingested, wall = ours.recv()
    ingester.join(timeout=30)
    return {**scored, "ingested_events_per_s": round(ingested / wall)}


def paced_ingestion(pipe, addr: str, logs: str, batch: int, rate: float, seconds: float, first_id: int) -> None:
    """Ingest calls paced to `rate` events/s for `seconds`; sends "ready" once its calls are built, then
    (events accepted, seconds taken)."""
    import grpc

    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    calls = ingest_calls(event_pool(Path(logs)), batch, int(rate * seconds / batch) + 1, first_id)
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.CtrScoringStub(channel)
        pipe.send("ready")
        started, ingested = time.perf_counter(), 0
        for call in calls:
            if time.perf_counter() - started > seconds:
                break
            time.sleep(max(0.0, ingested / rate - (time.perf_counter() - started)))
            ingested += stub.Ingest(call, timeout=10).accepted
        pipe.send((ingested, time.perf_counter() - started))


def redis_repo(features: Path, folder: Path, port: int) -> Path:
    """A copy of the Feast repository whose online store is the redis-server on `port`."""
    repo = folder / "feast"
    shutil.copytree(features / "feast", repo)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis", "connection_string": f"127.0.0.1:{port}"}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--batch", type=int, default=100, help="events per Ingest call")
    parser.add_argument("--ingest-rate", type=float, default=1000.0, help="events/s beside Score")
    args = parser.parse_args()
    features, models = built(args)
    logs = features.parent / "logs"
    pool = event_pool(logs)
    scratch = Path(tempfile.mkdtemp(prefix="fin-ingest-bench-"))
    calls_needed = int(args.seconds * 8_000 / args.batch)  # a phase ends at its time or when these are sent
    out = {"batch": args.batch, "speed_reference_ms_before": speed_reference(), "phases": {}}
    phases = out["phases"]

    shutil.copytree(features / "feast", scratch / "sqlite" / "feast")  # its realtime.db is this run's
    server = Server(scratch / "sqlite", models, ["--behaviour-log", str(scratch / "logs")])
    try:
        for k, concurrency in enumerate((1, 8)):
            calls = ingest_calls(pool, args.batch, calls_needed, first_id=10**13 + k * 10**10)
            phases[f"ingest_sqlite_c{concurrency}"] = asyncio.run(
                ingest_phase(server.addr, calls, concurrency, args.seconds))
        requests_pool = request_pool(features)
        rng = np.random.default_rng(0)
        requests = [score_request(u, requests_pool["candidates"], 200, rng)
                    for u in users_near(requests_pool["users"], 1000, 200)] * 5
        asyncio.run(score_phase(server.addr, requests[:20], 5))  # warm-up
        phases["score_alone"] = asyncio.run(score_phase(server.addr, requests, args.seconds))
        phases["score_with_ingest"] = score_beside_ingestion(server.addr, requests, args.seconds, logs, args.batch,
                                                             args.ingest_rate, first_id=10**13 + 2 * 10**10)
    finally:
        server.stop()

    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "yes", "--dir", str(scratch)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    redis_repo(features, scratch / "redis", port)
    server = Server(scratch / "redis", models, ["--behaviour-log", str(scratch / "logs_redis")])
    try:
        for k, concurrency in enumerate((1, 8)):
            calls = ingest_calls(pool, args.batch, calls_needed, first_id=2 * 10**13 + k * 10**10)
            phases[f"ingest_redis_c{concurrency}"] = asyncio.run(
                ingest_phase(server.addr, calls, concurrency, args.seconds))
        small = max(1, args.batch // 10)  # what one page view or order sends
        calls = ingest_calls(pool, small, calls_needed, first_id=3 * 10**13)
        phases[f"ingest_redis_c1_batch{small}"] = asyncio.run(ingest_phase(server.addr, calls, 1, args.seconds))
    finally:
        server.stop()
        redis.terminate()
        redis.wait(timeout=10)
    alone, beside = phases["score_alone"]["p99_ms"], phases["score_with_ingest"]["p99_ms"]
    out["score_p99_with_ingest_vs_alone"] = round(beside / alone, 3)
    out["speed_reference_ms_after"] = speed_reference()
    shutil.rmtree(scratch, ignore_errors=True)
    report("ingest_scale", out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
