"""Benchmark: one Score request's time at concurrency 1, part by part, against this design's floor.

Prints JSON and writes results/serve_floor.json.

The same data, model and requests as serve_scale.py and serve_work.py: 200 candidates, users with
1,000-event timelines, timelines cached by the server. Every part below is measured once per round, the
rounds one after the other, so that a change of the shared machine's speed shows in all parts alike:
- end_to_end: `fin serve` as serve_scale.py runs it (one process per core), from this process over
  loopback gRPC, one call at a time;
- grpc_round_trip: the same request and response messages through a grpc.aio server in another process
  whose handler does nothing but build the response (transport, both sides' message parsing and
  serialisation, the event loops);
- read_candidates: the parsed message's 200 candidates into arrays, and the request checks
  (`serving.scoring.request_inputs`);
- features: the cached timeline and statistics lookups (`serving.online.OnlineFeatures.read`);
- forward: `serving.scoring.score` in this process on one thread (fragments, embeddings, attention, tower),
  with the eager model;
- forward_compiled: the same, through the artifact's compiled package (`fin.compiled`: the whole forward,
  fragments included, one call into AOTInductor's code); the two alternate request by request;
- forward_alone, forward_compiled_alone: the same two, each over all the requests in turn (as a server runs
  only one of them: its caches hold its own path's weights and intermediates);
- forward_ops_replayed: every torch operation of the same forwards, recorded once and replayed back to back
  on the recorded inputs: the forward's cost if the Python around its operations cost nothing;
- forward_kernels_replayed: only the operations that do the arithmetic (matrix products, attention,
  embedding gathers; `KERNELS`), replayed the same way.
floor_ms.ops_without_python = grpc_round_trip + read_candidates + features + forward_ops_replayed: the eager
design's latency if the Python around its tensor operations cost nothing (no thread hand-off either);
floor_ms.arithmetic_only puts forward_kernels_replayed in place of the replayed operations: what is left
if fragments, padding, masks and conversions cost nothing as well; floor_ms.compiled puts forward_compiled
there. end_to_end is measured against the compiled server (`fin serve`'s default) and end_to_end_eager
against `fin serve --eager`, in turn in each round. Figures are medians over requests (ms); each round also
reports the machine speed reference of `_measure` (ms of a fixed workload).
Usage: python benchmarks/serve_floor.py [--data DIR] [--requests 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _measure import report, speed_reference
from serve_scale import Server, add_data_arguments, built, request_pool, run_phase, score_request, users_near

# aten operations that do the arithmetic of a forward (the rest move, pad, mask, index or convert)
KERNELS = ("linear", "matmul", "scaled_dot_product_attention", "embedding", "index_select")
SERVE_OPTIONS = ["--processes", "2", "--workers", "1"]


def median_ms(seconds: list[float]) -> float:
    return round(float(np.median(seconds)) * 1000, 3)


def echo_server() -> None:
    """A grpc.aio CtrScoring server whose Score only builds a response of one score per candidate."""
    import grpc

    from serving.pb import ctr_scoring_pb2 as pb
    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc
    from serving.scoring import scores_wire

    class Echo(pb_grpc.CtrScoringServicer):
        async def Score(self, request, context):
            zeros = np.zeros(len(request.candidates))
            response = pb.ScoreResponse(model_name="echo", model_version=1)
            response.MergeFromString(scores_wire(zeros, zeros))
            return response

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_CtrScoringServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"serving on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


class RecordedOps:
    """Every aten operation of some code, with its inputs, to run again without the Python around it."""

    def __init__(self, run):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append((func, args, kwargs or {}))
                return func(*args, **(kwargs or {}))

        with Record():
            run()

    def replay(self, only: tuple[str, ...] | None = None) -> float:
        """Seconds to run the recorded operations (those named in `only`) once more, back to back."""
        calls = [c for c in self.calls if only is None or c[0].overloadpacket.__name__ in only]
        started = time.perf_counter()
        for func, args, kwargs in calls:
            func(*args, **kwargs)
        return time.perf_counter() - started


class InProcess:
    """The server's per-request parts in this process, over cached features, on one thread."""

    def __init__(self, features: Path, models: Path):
        from feast import FeatureStore

        from fin.artifact import load_artifact
        from fin.versions import resolve
        from serving.config import ScoringConfig
        from serving.online import OnlineFeatures

        self.artifact = load_artifact(resolve("fin", models))
        self.compiled = load_artifact(resolve("fin", models), package=True)
        if self.compiled.package is None:
            raise SystemExit(f"{self.compiled.path} has no compiled package: {self.compiled.package_note}")
        self.online = OnlineFeatures(FeatureStore(repo_path=str(features / "feast")))
        self.config = ScoringConfig()

    async def prepare(self, messages: list) -> None:
        """Fill the caches (as the server's first requests do), warm the model up and record each forward."""
        import torch

        from serving.scoring import request_inputs, score

        self.messages, self.prepared = messages, []
        self.online.warm_up()  # as the server does before it serves: the store's first read is slow
        for message in messages:
            inputs = request_inputs(message, self.config)
            found = await self.online.read(inputs.user_id, inputs.candidates)
            if found.degraded or found.timeline is None:
                raise RuntimeError(f"user {inputs.user_id}'s timeline could not be read from the online store")
            self.prepared.append((inputs, found.timeline, found.stats))
        for args in self.prepared[:20]:
            score(self.artifact, *args)
            score(self.compiled, *args)
        with torch.inference_mode():
            self.recorded = [RecordedOps(lambda a=args: score(self.artifact, *a)) for args in self.prepared]

    async def measure(self) -> dict:
        import torch

        from serving.scoring import request_inputs, score

        times = {k: [] for k in ("read_candidates", "features", "forward", "forward_compiled",
                                 "forward_ops_replayed", "forward_kernels_replayed")}
        for message, args, ops in zip(self.messages, self.prepared, self.recorded):
            started = time.perf_counter()
            inputs = request_inputs(message, self.config)
            times["read_candidates"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await self.online.read(inputs.user_id, inputs.candidates)
            times["features"].append(time.perf_counter() - started)
            started = time.perf_counter()
            score(self.artifact, *args)
            times["forward"].append(time.perf_counter() - started)
            started = time.perf_counter()
            score(self.compiled, *args)
            times["forward_compiled"].append(time.perf_counter() - started)
            with torch.inference_mode():
                times["forward_ops_replayed"].append(ops.replay())
                times["forward_kernels_replayed"].append(ops.replay(KERNELS))
        # each path on its own over every request, as a server runs only one of them (the interleaved
        # figures above give each path the caches the other one left)
        for key, artifact in (("forward_alone", self.artifact), ("forward_compiled_alone", self.compiled)):
            times[key] = []
            for args in self.prepared:
                started = time.perf_counter()
                score(artifact, *args)
                times[key].append(time.perf_counter() - started)
        return {k: median_ms(v) for k, v in times.items()}


async def client_phase(addr: str, messages: list) -> dict:
    """Score calls to `addr`, one at a time, after a few to open the connection: p50/p99 ms and the server's
    own timing (p50 ms)."""
    import grpc

    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        stubs = [pb_grpc.CtrScoringStub(channel)]
        await run_phase(stubs, messages[:40], 1, 30)
        out = await run_phase(stubs, messages, 1, 60)
        return {"p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"], "server_p50_ms": out["server_p50_ms"]}


async def measure(server: Server, eager: Server, echo_addr: str, parts: InProcess, messages: list,
                  rounds: int) -> tuple[dict, list[dict]]:
    """The operation counts of a forward (median over the requests) and each round's figures."""
    await parts.prepare(messages)
    counts = [(len(r.calls), sum(c[0].overloadpacket.__name__ in KERNELS for c in r.calls)) for r in parts.recorded]
    ops = {"all": int(np.median([c[0] for c in counts])), "arithmetic": int(np.median([c[1] for c in counts]))}
    out = []
    for _ in range(rounds):
        r = {"machine_speed_reference_ms": speed_reference(),
             "end_to_end": await client_phase(server.addr, messages),
             "end_to_end_eager": await client_phase(eager.addr, messages),
             "grpc_round_trip": (await client_phase(echo_addr, messages))["p50_ms"],
             **await parts.measure()}
        fixed = r["grpc_round_trip"] + r["read_candidates"] + r["features"]
        r["floor_ms"] = {"ops_without_python": round(fixed + r["forward_ops_replayed"], 3),
                         "arithmetic_only": round(fixed + r["forward_kernels_replayed"], 3),
                         "compiled": round(fixed + r["forward_compiled"], 3)}
        r["forward_compiled_vs_eager"] = round(r["forward_compiled"] / r["forward"], 3)
        r["forward_compiled_vs_eager_alone"] = round(r["forward_compiled_alone"] / r["forward_alone"], 3)
        print(r, file=sys.stderr, flush=True)
        out.append(r)
    return ops, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--requests", type=int, default=200, help="requests per part and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        return echo_server()
    import torch

    torch.set_num_threads(1)  # as `fin serve --torch-threads 1`
    features, models = built(args)
    pool = request_pool(features)
    users = users_near(pool["users"], 1000, 40)
    rng = np.random.default_rng(0)
    messages = [score_request(users[i % len(users)], pool["candidates"], 200, rng) for i in range(args.requests)]
    server = Server(features, models, SERVE_OPTIONS)
    eager = Server(features, models, [*SERVE_OPTIONS, "--eager"])
    echo = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        echo_addr = echo.stdout.readline().split()[2]
        ops, rounds = asyncio.run(measure(server, eager, echo_addr, InProcess(features, models), messages,
                                          args.rounds))
    finally:
        server.stop()
        eager.stop()
        echo.terminate()
        echo.wait()
    report("serve_floor", {"data": {"users": args.users, "days": args.days, "model": "fin (configs/lifelong.yaml)"},
                           "serve_options": " ".join(SERVE_OPTIONS), "candidates": 200, "requests": len(messages),
                           "operations_per_forward": ops, "goal_c1_p50_ms": 5.0,
                           "goal_forward_compiled_vs_eager": 0.5, "rounds_ms": rounds})


if __name__ == "__main__":
    main()
