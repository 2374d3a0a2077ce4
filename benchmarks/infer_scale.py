"""Benchmark: ModelInfer (Open Inference Protocol) for a vision model, with and without server-side batching.

The model: the repository's example image classifier (`serving.vision`, two conv blocks) at 64 x 64 RGB, the
size of an ad creative, written into a scratch repository beside nothing else. One `fin serve` process on
127.0.0.1 (`--infer-batch 64`: ModelInfer calls waiting together share one forward; then `--infer-batch 1`:
one forward per call), its Feast repository serve_scale's (`--data DIR`). Calls of one image each
(batch 1), sent by asyncio clients with 1 and 8 calls in flight, each phase bounded in calls and seconds.
Reported: images/s and the call's p50/p99, per phase, and batched against unbatched at 8 in flight.
Usage: python benchmarks/infer_scale.py [--data DIR] [--seconds 10]
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
from serve_scale import Server, add_data_arguments, built, percentiles, timed_calls

SIZE = 64


def infer_requests(count: int, seed: int = 0, model: str = "creative_cnn", size: int = SIZE) -> list:
    """ModelInfer calls of one random 3 x size x size FP32 image each."""
    from serving.pb import inference_v2_pb2 as pb

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = rng.random((1, 3, size, size), dtype=np.float32)
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="image", datatype="FP32", shape=image.shape)
        request.raw_input_contents.append(image.tobytes())
        out.append(request)
    return out


async def infer_phase(addr: str, requests: list, concurrency: int, seconds: float) -> dict:
    import grpc

    from serving.pb import inference_v2_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request in requests[:20]:  # the connection and the first forwards
            await stub.ModelInfer(request, timeout=10)
        latencies, _, wall = await timed_calls(lambda r: stub.ModelInfer(r, timeout=10), requests, concurrency,
                                               seconds)
    return {"concurrency": concurrency, "calls": len(latencies), "images_per_s": round(len(latencies) / wall, 1),
            **percentiles(latencies)}


def batching_phases(features: Path, models: Path, requests: list, seconds: float) -> dict:
    """`infer_phase` at 1 and 8 calls in flight, against one `fin serve` with `--infer-batch 64` and one
    with `--infer-batch 1`."""
    phases = {}
    for batch in (64, 1):
        server = Server(features, models, ["--infer-batch", str(batch)])
        try:
            for concurrency in (1, 8):
                phases[f"infer_batch{batch}_c{concurrency}"] = asyncio.run(
                    infer_phase(server.addr, requests, concurrency, seconds))
                print(phases, file=sys.stderr, flush=True)
        finally:
            server.stop()
    return phases


def main() -> None:
    from serving.vision import SmallCNNConfig, write_example

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    args = parser.parse_args()
    features, _ = built(args)
    scratch = Path(tempfile.mkdtemp(prefix="fin-infer-bench-"))
    write_example(scratch / "models", name="creative_cnn", config=SmallCNNConfig(size=SIZE, width=32))
    requests = infer_requests(int(args.seconds * 4000))
    out = {"model": f"serving.vision small_cnn, 3 x {SIZE} x {SIZE}, width 32", "images_per_call": 1,
           "speed_reference_ms_before": speed_reference(), "phases": {}}
    try:
        out["phases"] = batching_phases(features, scratch / "models", requests, args.seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    phases = out["phases"]
    out["c8_images_per_s_batched_vs_unbatched"] = round(
        phases["infer_batch64_c8"]["images_per_s"] / phases["infer_batch1_c8"]["images_per_s"], 2)
    out["speed_reference_ms_after"] = speed_reference()
    report("infer_scale", out)


if __name__ == "__main__":
    main()
