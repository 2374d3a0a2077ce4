"""Benchmark: the creative encoder's ModelInfer endpoint, and Score when some candidates are new ads whose
creatives the server embeds itself.

Input: a features run with its creative embeddings (`fin embed-creatives`) and a model repository holding the
creative encoder and FIN trained with creatives, e.g. `make demo`'s demo_out/features and demo_out/models.
One `fin serve` process on 127.0.0.1 each time, each phase bounded in calls and seconds.
  1. ModelInfer, one creative (3 x 64 x 64 FP32) per call, 1 and 8 calls in flight, with server-side batching
     (`--infer-batch 64`) and without (`--infer-batch 1`): images/s, p50/p99.
  2. Score, 200 candidates of the test week per request, concurrency 1: every candidate's embedding in the
     store (all known), against the same requests with a share of the candidates replaced by ads the store
     has never seen, each with its creative (`creative_png`), which the server embeds (fresh ids per request:
     no cache helps). Reported: p50/p99 and their ratio to all-known; with FIN's compiled package (when its
     artifact has one) and with `fin serve --eager`, one server after the other.
Usage: python benchmarks/creatives_scale.py --data demo_out/features --models demo_out/models [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _measure import report, speed_reference
from infer_scale import batching_phases, infer_requests
from serve_scale import Server, percentiles, request_pool, score_request, timed_calls

CANDIDATES = 200


def creative_requests(encoder: Path, count: int) -> list:
    from serving.vision import load_vision

    return infer_requests(count, model="creative_encoder", size=load_vision(encoder).inputs[0].shape[-1])


def score_requests(features: Path, count: int, unknown_share: float, seed: int = 0) -> list:
    """`count` requests of CANDIDATES test-week candidates; in each, `unknown_share` of them become ads no store
    knows (ids no item has), each carrying the creative of the item it replaces."""
    import polars as pl

    from features.dataset import Dataset

    pool = request_pool(features, seed)
    creatives = pl.read_parquet(Dataset.at(features).creatives, columns=["item_id", "image_png"])
    png_of = dict(zip(creatives["item_id"].to_list(), creatives["image_png"].to_list()))
    users = pool["users"].filter(pl.col("events") > 100).to_dicts()
    rng = np.random.default_rng(seed)
    out, fresh_id = [], 10**12
    for i in range(count):
        request = score_request(users[i % len(users)], pool["candidates"], CANDIDATES, rng)
        for c in rng.choice(CANDIDATES, int(round(unknown_share * CANDIDATES)), replace=False):
            candidate = request.candidates[int(c)]
            candidate.creative_png = png_of.get(candidate.item_id, b"")
            candidate.item_id, fresh_id = fresh_id, fresh_id + 1
        out.append(request)
    return out


async def score_phase(addr: str, requests: list, seconds: float) -> dict:
    import grpc

    from serving.pb import ctr_scoring_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.CtrScoringStub(channel)
        latencies, responses, wall = await timed_calls(lambda r: stub.Score(r, timeout=30), requests, 1, seconds)
    embedded = sum(len(r.creatives_embedded) for r in responses)
    return {"calls": len(latencies), "requests_per_s": round(len(latencies) / wall, 1),
            "creatives_embedded_per_call": round(embedded / max(len(responses), 1), 2), **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="fin features output with creative embeddings")
    parser.add_argument("--models", type=Path, required=True, help="repository with creative_encoder and fin")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--unknown-share", type=float, default=0.1, help="of a request's candidates, new ads")
    args = parser.parse_args()
    from fin.versions import resolve

    encoder = resolve(args.models / "creative_encoder")
    out = {"encoder": str(encoder), "speed_reference_ms_before": speed_reference(), "infer": {}, "score": {}}
    scratch = Path(tempfile.mkdtemp(prefix="fin-creatives-bench-"))
    try:  # ModelInfer alone: a repository with the encoder only
        shutil.copytree(encoder, scratch / "creative_encoder" / encoder.name)
        requests = creative_requests(encoder, int(args.seconds * 4000))
        out["infer"] = batching_phases(args.data, scratch, requests, args.seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    calls = int(args.seconds * 300)
    unknown = f"unknown_{args.unknown_share:g}"
    for mode, flags in (("compiled", []), ("eager", ["--eager"])):  # the package when FIN has one, and without
        server = Server(args.data, args.models, flags)
        out["score"][mode] = phases = {}
        try:
            warm = score_requests(args.data, 20, 0.0, seed=1)
            asyncio.run(score_phase(server.addr, warm, args.seconds))  # connections, caches of the store's rows
            for name, share in (("all_known", 0.0), (unknown, args.unknown_share), ("all_known_again", 0.0)):
                phases[name] = asyncio.run(score_phase(server.addr, score_requests(args.data, calls, share),
                                                       args.seconds))
                print(mode, phases, file=sys.stderr, flush=True)
        finally:
            server.stop()
        phases["p99_unknown_vs_known"] = round(phases[unknown]["p99_ms"] / phases["all_known"]["p99_ms"], 2)
        phases["p50_unknown_vs_known"] = round(phases[unknown]["p50_ms"] / phases["all_known"]["p50_ms"], 2)
    out["score_p99_compiled_vs_eager"] = round(out["score"]["compiled"]["all_known"]["p99_ms"]
                                               / out["score"]["eager"]["all_known"]["p99_ms"], 2)
    out["speed_reference_ms_after"] = speed_reference()
    report("creatives_scale", out)


if __name__ == "__main__":
    main()
