"""Benchmark: Score latency and throughput of `fin serve` with FIN over 1000-long timelines, from a client process.

Data: a simulated city over a year (configs/large.yaml with fewer users), built by `fin features` with the
default 1,000-event online timelines in the sqlite Feast store. Model: FIN with the lifelong config
(1,000 history events), trained for a few steps (latency does not depend on how well it is trained), with its
compiled package (a model trained before packages existed is trained again).
The server is `fin serve` on 127.0.0.1, by default one process per core (`--processes 2 --workers 1`);
this script is the client (grpc.aio), sending each request over the next of `--connections` connections
(as the many hosts of an ad server fleet would; the kernel gives each connection to one server process, so
a handful of connections can load the processes unevenly: each phase reports their shares). The measured
server scores with the artifact's compiled package (`fin.compiled`, fin serve's default); in the same run, the
same server with the eager model (`--eager`) is measured at concurrency 1 and 8, and the goals are reported
with their ratios against it.

Requests: users with a full 1,000-event timeline, the request time just after their last event (so the
whole stored timeline is history), 200 candidates drawn from the logged test impressions. Each phase is
bounded in requests and seconds:
- concurrency 1: p50/p99 end to end, with the server's own split (features read, model);
- concurrency 8: requests/s, candidates/s and p99;
- the naive baseline: the same requests scored one candidate per call (the model once per candidate);
- growth: 50 -> 1,000 candidates (1,000-event histories) and 100 -> 1,000 history events (200 candidates; the
  same users, the request time set so that that many stored events come before it);
- server RSS with FIN loaded, after the load;
- a machine speed reference (`_measure.speed_reference`, ms of a fixed workload) before and after: runs on
  this shared machine differ by tens of percent, and the reference says how fast the machine was.
Timelines are cached by the server (30 s staleness by default): the first phase sends one request per
user, so every timeline comes from the online store; the later phases cycle over those users, and the
server's cache hit rate is reported with each phase.
Usage: python benchmarks/serve_scale.py [--data DIR] [--requests 300] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from _measure import ROOT, report, run_sampled, speed_reference

sys.path.insert(0, str(ROOT))

LIFELONG = ROOT / "configs" / "lifelong.yaml"
FIN = [sys.executable, "-m", "jobs.cli"]
HISTORY_LENGTHS = (100, 250, 500, 1000)
WARM_UP_USERS = 20
CONCURRENCY = 8
ONLINE_EVENTS = 1000  # `fin features --max-seq-len` default: the online store keeps the last 1,000 events
CANDIDATE_COUNTS = (50, 100, 200, 500, 1000)


def build(folder: Path, users: int, days: int, steps: int) -> tuple[Path, Path]:
    """The features job's output (online store materialised) and a model repository with FIN in it."""
    features, models = folder / "features", folder / "models"
    if not (features / "data" / "stats.json").exists():
        run_sampled([*FIN, "simulate", "--config", str(ROOT / "configs" / "large.yaml"), "--users", str(users),
                     "--days", str(days), "--out", str(folder / "logs"), "--overwrite"])
        run_sampled([*FIN, "features", "--logs", str(folder / "logs"), "--out", str(features),
                     "--validation-days", "2", "--test-days", "2"])
    if not list(models.glob("fin/*/model.pt2")):
        run_sampled([*FIN, "train", "--data", str(features), "--out", str(models), "--model", "fin",
                     "--config", str(LIFELONG), "--epochs", "1", "--max-steps", str(steps)])
    return features, models


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where the serving benchmarks' data and model are, or how to make them."""
    parser.add_argument("--data", type=Path, help="folder to keep (or reuse) the logs, features and model in "
                                                  "(the serving benchmarks share it)")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--train-steps", type=int, default=30)


def built(args: argparse.Namespace) -> tuple[Path, Path]:
    """`build` from the options of `add_data_arguments` (a temporary folder without --data)."""
    return build(args.data or Path(tempfile.mkdtemp(prefix="fin-serve-bench-")), args.users, args.days,
                 args.train_steps)


def request_pool(features: Path, seed: int = 0) -> dict:
    """Users by stored timeline length, with the time just after their last event, and a candidate pool."""
    import polars as pl

    from serving.scoring import CANDIDATE_IDS, CANDIDATE_NUMBERS

    data = features / "data"
    users = (pl.scan_parquet(data / "timelines" / "*.parquet")
             .select("user_id", pl.col("ts").list.len().alias("events"),
                     pl.col("ts").list.tail(ONLINE_EVENTS).alias("stored_ts"))
             .collect())
    places = (pl.scan_parquet(data / "examples" / "test" / "*.parquet")
              .select("user_id", "geohash_12", "city_id").unique("user_id", keep="first").collect())
    users = users.join(places, on="user_id")
    columns = [*CANDIDATE_IDS, *CANDIDATE_NUMBERS]
    cands = (pl.scan_parquet(data / "examples" / "test" / "*.parquet").select(columns).collect()
             .sample(1000, with_replacement=True, seed=seed).fill_null(0))
    return {"users": users, "candidates": cands}


def score_request(user: dict, cands, n: int, rng: np.random.Generator, history: int | None = None):
    """A request of `n` candidates at a time after the user's last stored event, or, with `history`, just
    after the stored event that leaves `history` events before the request (the model reads only those)."""
    from serving.pb import ctr_scoring_pb2 as pb
    from serving.scoring import CANDIDATE_IDS, CANDIDATE_NUMBERS

    rows = cands[rng.choice(len(cands), n, replace=False)]
    stored = user["stored_ts"]
    ts = stored[-1] + 60_000 if history is None or history >= len(stored) else stored[history - 1] + 1
    context = pb.Context(ts_ms=int(ts), geohash=user["geohash_12"],
                         city_id=user["city_id"] or 0)
    return pb.ScoreRequest(user_id=user["user_id"], context=context, candidates=[
        pb.Candidate(**{field: r[column] for column, field in CANDIDATE_IDS.items()},
                     **{field: r[field] for field in CANDIDATE_NUMBERS}) for r in rows.iter_rows(named=True)])


def users_near(users, events: int, count: int) -> list[dict]:
    """Up to `count` users whose stored timeline (the last ONLINE_EVENTS) is within 20% of `events` long,
    the closest first."""
    import polars as pl

    stored = pl.col("events").clip(upper_bound=ONLINE_EVENTS)
    near = users.filter(stored.is_between(int(events * 0.8), int(events * 1.2)))
    return near.sort((stored - events).abs(), "user_id").head(count).to_dicts()


class Server:
    def __init__(self, features: Path, models: Path, options: list[str]):
        self.proc = psutil.Popen([*FIN, "serve", "--models", str(models), "--feast-repo", str(features / "feast"),
                                  "--port", "0", *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving on"):
            raise RuntimeError(f"fin serve did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.addr = line.split()[2].rstrip(";")
        self.metrics_urls = line.split("metrics on ")[1].split()  # one per server process

    def metric(self, name: str, **labels) -> float:
        """A metric summed over the server's processes."""
        return sum(self.metric_by_process(name, **labels))

    def metric_by_process(self, name: str, **labels) -> list[float]:
        from serving.metrics import scrape

        return [scrape(url, name, **labels) for url in self.metrics_urls]

    def processes(self) -> list[psutil.Process]:
        """The server's processes (not multiprocessing's helper processes)."""
        return [self.proc, *(p for p in self.proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline()))]

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used."""
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.processes()))

    def memory_mb(self) -> dict:
        """RSS and peak RSS of each server process."""
        def peak(pid: int) -> int:
            return next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM"))

        return {"rss_mb": [round(p.memory_info().rss / 2**20, 1) for p in self.processes()],
                "peak_rss_mb": [round(peak(p.pid) / 2**20, 1) for p in self.processes()]}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


async def timed_calls(call, requests: list, concurrency: int, seconds: float) -> tuple[list[float], list, float]:
    """`await call(request)` for each of `requests` in order, `concurrency` at a time, until they run out or
    `seconds` pass: each call's seconds and response (in completion order), and the wall time."""
    latencies, responses, queue = [], [], iter(requests)
    deadline = time.perf_counter() + seconds

    async def caller():
        for request in queue:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            responses.append(await call(request))
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, responses, time.perf_counter() - started


async def run_phase(stubs: list, requests: list, concurrency: int, seconds: float) -> dict:
    """Send `requests` (each once, in order, each over the next connection) with `concurrency` calls in
    flight, stopping after `seconds`."""
    rotation = itertools.cycle(stubs)
    latencies, responses, wall = await timed_calls(lambda r: next(rotation).Score(r, timeout=10), requests,
                                                   concurrency, seconds)
    server_ms = {k: [getattr(r.timing, k) for r in responses] for k in ("total_ms", "features_ms", "model_ms")}
    candidates = sum(len(r.candidates) for r in requests[:len(latencies)])
    return {"concurrency": concurrency, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1), "candidates_per_s": round(candidates / wall),
            **percentiles(latencies),
            "server_p50_ms": {k: round(float(np.median(v)), 2) for k, v in server_ms.items()}}


async def naive_phase(stub, requests: list, seconds: float) -> dict:
    """Each request scored one candidate per call, in order (concurrency 1): the model runs once per candidate."""
    from serving.pb import ctr_scoring_pb2 as pb

    totals = []
    deadline = time.perf_counter() + seconds
    for request in requests:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        for candidate in request.candidates:
            await stub.Score(pb.ScoreRequest(user_id=request.user_id, context=request.context,
                                             candidates=[candidate]), timeout=10)
        totals.append(time.perf_counter() - t)
    return {"requests": len(totals), "calls": len(totals) * len(requests[0].candidates), **percentiles(totals)}


def connections(server: Server, count: int) -> list:
    """`count` channels, each its own TCP connection (a local subchannel pool), so that a server with several
    processes sees several connections to spread."""
    import grpc

    return [grpc.aio.insecure_channel(server.addr, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


async def measure(server: Server, pool: dict, args, full_run: bool = True) -> dict:
    """The phases against one running server (`full_run` False: warm-up, store reads, concurrency 1 and 8
    only)."""
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    users, cands = pool["users"], pool["candidates"]
    full = users_near(users, 1000, 10_000)
    if len(full) < 2 * WARM_UP_USERS:
        raise SystemExit(f"only {len(full)} users have ~1,000-event timelines; simulate more users or days")

    def requests(group: list[dict], n: int, count: int, history: int | None = None) -> list:
        return [score_request(group[i % len(group)], cands, n, rng, history) for i in range(count)]

    def counts() -> dict[str, float]:
        return {"hit": server.metric("fin_feature_cache_total", cache="timeline", result="hit"),
                "miss": server.metric("fin_feature_cache_total", cache="timeline", result="miss"),
                "forwards": server.metric("fin_forward_requests_count"),
                "forward_requests": server.metric("fin_forward_requests_sum")}

    channels = connections(server, args.connections)
    stubs = [pb_grpc.CtrScoringStub(c) for c in channels]

    def scored() -> np.ndarray:
        return np.array(server.metric_by_process("fin_requests_total", method="Score", code="OK"))

    async def phase(reqs, concurrency):
        before, cpu, by_process = counts(), (server.cpu_s(), time.process_time()), scored()
        out = await run_phase(stubs, reqs, concurrency, args.seconds)
        out["cpu_ms_per_request"] = {
            "server": round((server.cpu_s() - cpu[0]) * 1000 / out["requests"], 2),
            "client": round((time.process_time() - cpu[1]) * 1000 / out["requests"], 2)}
        d = {k: v - before[k] for k, v in counts().items()}
        out["timeline_cache_hit_rate"] = round(d["hit"] / max(d["hit"] + d["miss"], 1), 3)
        out["requests_per_forward"] = round(d["forward_requests"] / max(d["forwards"], 1), 2)
        # each connection stays on the process the kernel gave it (SO_REUSEPORT): with few connections the
        # processes' shares can be uneven, and the busier one sets the tail
        out["requests_by_process"] = (scored() - by_process).astype(int).tolist()
        return out

    try:
        warm, cold = full[:WARM_UP_USERS], full[WARM_UP_USERS:]
        # first forwards of every process (each connection goes to one of them), and the connections
        await run_phase(stubs, requests(warm, args.candidates, 25 * CONCURRENCY), CONCURRENCY, 60)
        main = requests(full, args.candidates, args.requests)
        out = {"users_with_1000_events": len(full), "candidates": args.candidates}
        # each user's first request: its timeline comes from the online store, not the cache (both servers, so
        # that their concurrency 1 phases read cached timelines alike)
        out["concurrency_1_store_reads"] = await phase(requests(cold, args.candidates, len(cold)), 1)
        out["concurrency_1"] = await phase(main, 1)
        out["concurrency_8"] = await phase(requests(full, args.candidates, args.requests * 4), CONCURRENCY)
        if not full_run:
            return out
        out["naive_per_candidate"] = await naive_phase(stubs[0], main, args.seconds)
        out["speedup_vs_naive_p50"] = round(out["naive_per_candidate"]["p50_ms"] / out["concurrency_1"]["p50_ms"], 1)
        growth = max(args.requests // 3, 20)
        out["by_candidates"] = {n: await phase(requests(full, n, growth), 1) for n in CANDIDATE_COUNTS}
        out["by_history_events"] = {n: await phase(requests(full, args.candidates, growth, history=n), 1)
                                    for n in HISTORY_LENGTHS}
        return out
    finally:
        for channel in channels:
            await channel.close()


def served(features: Path, models: Path, pool: dict, args, options: str, full_run: bool) -> dict:
    server = Server(features, models, options.split())
    try:
        idle = server.memory_mb()
        results = {"serve_options": options, **asyncio.run(measure(server, pool, args, full_run))}
        results["server_memory"] = {"after_start": idle, "after_load": server.memory_mb()}
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300, help="requests per phase (concurrency 8: 4x)")
    parser.add_argument("--seconds", type=float, default=30, help="time limit per phase")
    parser.add_argument("--connections", type=int, default=32, help="client connections, used in turn")
    parser.add_argument("--serve-options", default="--processes 2 --workers 1",
                        help="options of the measured fin serve (default: one process per core of this machine)")
    parser.add_argument("--baseline-options", default="--processes 2 --workers 1 --eager",
                        help="options of the server measured for comparison at concurrency 1 and 8 (default: "
                             "the same server scoring with the eager model)")
    args = parser.parse_args()
    reference_before = speed_reference()
    features, models = built(args)
    pool = request_pool(features)
    results = served(features, models, pool, args, args.serve_options, full_run=True)
    baseline = served(features, models, pool, args, args.baseline_options, full_run=False)
    c1, c8 = results["concurrency_1"], results["concurrency_8"]
    base1, base8 = baseline["concurrency_1"], baseline["concurrency_8"]
    results["goals"] = {"c1_p50_le_5ms": c1["p50_ms"] <= 5, "c1_p99_le_15ms": c1["p99_ms"] <= 15,
                        "c8_ge_300_rps": c8["requests_per_s"] >= 300, "c8_p99_le_50ms": c8["p99_ms"] <= 50}
    results["vs_baseline_server"] = {
        "c1_p50": round(c1["p50_ms"] / base1["p50_ms"], 3), "c1_p99": round(c1["p99_ms"] / base1["p99_ms"], 3),
        "c8_requests_per_s": round(c8["requests_per_s"] / base8["requests_per_s"], 3),
        "c8_p99": round(c8["p99_ms"] / base8["p99_ms"], 3)}
    speed = {"before_ms": reference_before, "after_ms": speed_reference()}
    report("serve_scale", {"data": {"users": args.users, "days": args.days, "model": "fin (configs/lifelong.yaml)"},
                           "machine_speed_reference": speed,
                           **results, "baseline_server": baseline})


if __name__ == "__main__":
    main()
