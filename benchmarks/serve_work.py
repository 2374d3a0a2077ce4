"""Benchmark: the server's own work per Score request, in process and without gRPC, in CPU ms.

The same data, model and requests as `serve_scale.py` (200 candidates, users with 1,000-event timelines),
each request taken through what `fin serve` does with it on a cached timeline: parse the message, check it
(`serving.scoring.request_inputs`), read the features from the caches (`serving.online.OnlineFeatures`,
over the sqlite store), cut the fragments and run the forward (`serving.scoring.score`), and build and
serialise the response. CPU time of the same work, the fastest of several blocks, is less disturbed by
other load than latency is, but it still moves with the shared machine's speed (see the speed reference
it reports), so compare two commits by running this script at each, in turn, more than once. Reports the
fastest and the median block (ms per request) and each phase's median.
Usage: python benchmarks/serve_work.py [--data DIR] [--requests 100] [--blocks 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
from _measure import report, speed_reference
from serve_scale import add_data_arguments, built, request_pool, score_request, users_near

PHASES = ("parse", "inputs", "features", "forward", "response")


async def measure(features: Path, models: Path, requests: int, blocks: int) -> dict:
    import torch
    from feast import FeatureStore

    from fin.artifact import load_artifact
    from fin.versions import resolve
    from serving.config import ScoringConfig
    from serving.online import OnlineFeatures
    from serving.pb import ctr_scoring_pb2 as pb
    from serving.scoring import ecpm, request_inputs, score, scores_wire

    torch.set_num_threads(1)  # as `fin serve --torch-threads 1`
    pool = request_pool(features)
    users = users_near(pool["users"], 1000, 40)
    rng = np.random.default_rng(0)
    raw = [score_request(users[i % len(users)], pool["candidates"], 200, rng).SerializeToString()
           for i in range(requests)]
    artifact = load_artifact(resolve("fin", models))
    online = OnlineFeatures(FeatureStore(repo_path=str(features / "feast")))
    config = ScoringConfig()

    async def one(message: bytes) -> list[float]:
        marks = [time.thread_time()]
        request = pb.ScoreRequest.FromString(message)
        marks.append(time.thread_time())
        inputs = request_inputs(request, config)
        marks.append(time.thread_time())
        found = await online.read(inputs.user_id, inputs.candidates)
        marks.append(time.thread_time())
        pctr = score(artifact, inputs, found.timeline, found.stats)
        marks.append(time.thread_time())
        response = pb.ScoreResponse(model_name=artifact.name, model_version=artifact.version)
        response.MergeFromString(scores_wire(pctr, ecpm(pctr, inputs.bids)))
        response.SerializeToString()
        marks.append(time.thread_time())
        return list(np.diff(marks))

    online.warm_up()  # as the server does before it serves: the store's first read is slow
    for message in raw:  # fills the caches (every later request is a cache hit) and warms the model
        await one(message)
    per_block, phases = [], []
    for _ in range(blocks):
        started = time.thread_time()
        phases += [await one(message) for message in raw]
        per_block.append((time.thread_time() - started) * 1000 / len(raw))
    online.close()
    medians = np.median(np.array(phases) * 1000, axis=0)
    return {"requests_per_block": len(raw), "blocks": blocks, "candidates": 200,
            "cpu_ms_per_request": {"fastest_block": round(min(per_block), 3),
                                   "median_block": round(float(np.median(per_block)), 3)},
            "phase_median_ms": {p: round(float(m), 3) for p, m in zip(PHASES, medians)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--requests", type=int, default=100, help="requests per block")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    before = speed_reference()
    features, models = built(args)
    results = asyncio.run(measure(features, models, args.requests, args.blocks))
    report("serve_work", {"data": {"users": args.users, "days": args.days, "model": "fin (configs/lifelong.yaml)"},
                          "machine_speed_reference": {"before_ms": before, "after_ms": speed_reference()},
                          **results})


if __name__ == "__main__":
    main()
