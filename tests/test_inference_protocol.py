"""The Open Inference Protocol (KServe v2) endpoints, reached with Triton's own client (`tritonclient`),
and a fuzz test of every method of the server.

This module must not import `serving.pb.inference_v2_pb2`: tritonclient registers the same protocol
messages (package `inference`) in the process-wide protobuf pool, and one process can hold one of them.
"""

import shutil

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from serving.vision import load_vision, write_example
from tests.conftest import Running


@pytest.fixture(scope="module")
def served(trained_models, features_job, tmp_path_factory):
    """A repository with the example vision model and a CTR model, served."""
    out, _ = features_job
    root = tmp_path_factory.mktemp("oip") / "models"
    vision = write_example(root)
    shutil.copytree(trained_models[1]["dnn"], root / "dnn" / "1")
    running = Running(root, out / "feast")
    yield running, vision
    code, err = running.stop()
    assert code == 0, err


def test_triton_client_reaches_liveness_readiness_and_metadata(served):
    running, _ = served
    client = triton.InferenceServerClient(url=running.addr)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("small_cnn") and client.is_model_ready("small_cnn", "1")
    assert client.is_model_ready("dnn")  # CTR models are models of the same repository
    assert not client.is_model_ready("nope") and not client.is_model_ready("small_cnn", "7")
    assert client.get_server_metadata().name == "fin-ads"
    meta = client.get_model_metadata("small_cnn")
    assert list(meta.versions) == ["1"] and meta.platform == "pytorch_safetensors"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 3, 32, 32])]
    assert [t.name for t in meta.outputs] == ["logits", "probabilities"]
    assert client.get_model_metadata("dnn").platform == "fin_ctr"


def test_triton_client_infers_what_the_model_computes(served):
    running, folder = served
    client = triton.InferenceServerClient(url=running.addr)
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    image = triton.InferInput("image", list(images.shape), "FP32")
    image.set_data_from_numpy(images)
    result = client.infer("small_cnn", [image])
    expected = load_vision(folder).infer({"image": torch.from_numpy(images)})
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"].numpy(), rtol=1e-5, atol=1e-6)
    probabilities = client.infer("small_cnn", [image], outputs=[triton.InferRequestedOutput("probabilities")])
    assert probabilities.as_numpy("logits") is None
    np.testing.assert_allclose(probabilities.as_numpy("probabilities").sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape, datatype, model, message", [
    ([2, 3, 16, 16], "FP32", "small_cnn", "shape"),
    ([2, 3, 32], "FP32", "small_cnn", "shape"),
    ([1, 3, 32, 32], "FP64", "small_cnn", "FP64"),
    ([1, 3, 32, 32], "FP32", "dnn", "CtrScoring/Score"),
    ([1, 3, 32, 32], "FP32", "nope", "not loaded"),
])
def test_bad_inference_requests_are_refused_clearly(served, shape, datatype, model, message):
    running, _ = served
    client = triton.InferenceServerClient(url=running.addr)
    tensor = triton.InferInput("image", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, [tensor])
    assert message in e.value.message()
    assert e.value.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")


METHODS = ["/fin_ads.v1.CtrScoring/Score", *(f"/inference.GRPCInferenceService/{m}" for m in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")),
    "/grpc.health.v1.Health/Check"]


# what a garbled call may get: a clear refusal (never UNKNOWN, an unhandled error, nor a timeout)
ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def test_fuzzed_messages_never_break_the_server(served):
    """Random and truncated messages at every method: each call is answered or clearly refused within its
    deadline, and the server keeps serving."""
    running, _ = served
    rng = np.random.default_rng(7)
    valid = triton.InferInput("image", [1, 3, 32, 32], "FP32")
    valid.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    seeds = [b"", bytes(range(256)), b"\x08\x01\x12\x00" * 8]
    with grpc.insecure_channel(running.addr) as channel:
        for method in METHODS:
            call = channel.unary_unary(method)
            for i in range(60):
                if i < len(seeds):
                    payload = seeds[i]
                elif i % 2:
                    payload = rng.bytes(int(rng.integers(1, 200)))
                else:  # a valid-looking prefix with random bytes after it
                    payload = b"\x08" + rng.bytes(int(rng.integers(0, 40)))
                try:
                    call(payload, timeout=5)
                except grpc.RpcError as e:
                    assert e.code() in ANSWERS, (method, payload, e.code(), e.details())
    assert running.status() == 1  # SERVING
    client = triton.InferenceServerClient(url=running.addr)
    assert client.infer("small_cnn", [valid]).as_numpy("logits").shape == (1, 10)
