"""The Open Inference Protocol (KServe v2 gRPC) over the same model repository as CTR scoring.

Liveness, readiness and metadata cover every loaded model. ModelInfer runs vision models and ONNX models
(`serving.onnx_model`, onnxruntime): the request's
tensors are checked against the model's declared inputs (name, datatype, shape, element count; raw
little-endian contents or typed contents) and answered with raw little-endian outputs, as Triton does.
CTR models answer ModelReady and ModelMetadata; they score through `fin_ads.v1.CtrScoring/Score`.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np

from fin.versions import is_version
from serving.batching import ForwardBatcher
from serving.metrics import ServingMetrics
from serving.onnx_model import OnnxModel, RefusedInput
from serving.pb import inference_v2_pb2 as pb
from serving.pb import inference_v2_pb2_grpc as pb_grpc
from serving.repository import ModelNotFound, ModelRepository
from serving.tensors import DATATYPES
from serving.vision import VisionModel

SERVER_NAME, SERVER_VERSION = "fin-ads", "0.1.0"
# the typed-contents field of each datatype served (`serving.tensors.DATATYPES`)
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "UINT8": "uint_contents"}
MAX_ELEMENTS = 1 << 24  # per input tensor: 64 MiB of FP32


class BadInfer(ValueError):
    pass


def _version(text: str) -> int | None:
    if not text:
        return None
    # (int() refuses over 4,300 digits; no version has 19)
    if not is_version(text) or len(text) > 18:
        raise BadInfer(f"model version {text[:40]!r} is not a version number")
    return int(text)


def _input_array(request: pb.ModelInferRequest, index: int, spec) -> np.ndarray:
    tensor = request.inputs[index]
    if tensor.datatype != spec.datatype:
        raise BadInfer(f"input {tensor.name!r} is {tensor.datatype}, the model takes {spec.datatype}")
    shape = tuple(tensor.shape)
    if len(shape) != len(spec.shape) or any(s < 1 for s in shape) or \
            any(want >= 0 and got != want for got, want in zip(shape, spec.shape)):
        raise BadInfer(f"input {tensor.name!r} has shape {list(shape)}, the model takes {list(spec.shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise BadInfer(f"input {tensor.name!r} has {count} elements, more than {MAX_ELEMENTS}")
    dtype = np.dtype(DATATYPES[spec.datatype]).newbyteorder("<")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise BadInfer("raw_input_contents must have one entry per input")
        raw = request.raw_input_contents[index]
        if len(raw) != count * dtype.itemsize:
            raise BadInfer(f"input {tensor.name!r}: {len(raw)} bytes for {count} {spec.datatype} elements")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        sent = getattr(tensor.contents, CONTENTS[spec.datatype])  # the wire's 32- or 64-bit field
        values = np.asarray(sent, dtype=dtype)
        if dtype.kind in "iu" and len(sent) and (min(sent) < np.iinfo(dtype).min or max(sent) > np.iinfo(dtype).max):
            raise BadInfer(f"input {tensor.name!r} holds values outside {spec.datatype}'s range")  # (not wrapped)
        if values.size != count:
            raise BadInfer(f"input {tensor.name!r}: {values.size} values for shape {list(shape)}")
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise BadInfer(f"input {tensor.name!r} holds NaN or infinite values")
    return values.astype(DATATYPES[spec.datatype]).reshape(shape)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, batcher: ForwardBatcher, metrics: ServingMetrics):
        self.repository, self.batcher, self.metrics = repository, batcher, metrics

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.repository.names()))

    async def ModelReady(self, request, context):
        if not request.name:
            return pb.ModelReadyResponse(ready=False)
        try:
            self.repository.get(request.name, _version(request.version))
        except (ModelNotFound, BadInfer):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request, context):
        model = await self._model(request.name, request.version, context)
        versions = [str(v) for v in self.repository.versions(model.name)]
        if isinstance(model, (VisionModel, OnnxModel)):
            tensors = {side: [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                              for s in specs] for side, specs in (("inputs", model.inputs), ("outputs", model.outputs))}
            return pb.ModelMetadataResponse(name=model.name, versions=versions, platform=model.platform, **tensors)
        return pb.ModelMetadataResponse(name=model.name, versions=versions, platform="fin_ctr")

    async def ModelInfer(self, request, context):
        model = await self._model(request.model_name, request.model_version, context)
        if not isinstance(model, (VisionModel, OnnxModel)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{model.name} is a CTR model: score it through fin_ads.v1.CtrScoring/Score")
        try:
            names = [t.name for t in request.inputs]
            missing = [s.name for s in model.inputs if s.name not in names]
            if missing or len(names) != len(model.inputs):
                raise BadInfer(f"the model takes inputs {[s.name for s in model.inputs]}, got {names}")
            arrays = {s.name: _input_array(request, names.index(s.name), s) for s in model.inputs}
            declared = [s.name for s in model.outputs]
            wanted = [o.name for o in request.outputs] or declared
            unknown = [n for n in wanted if n not in declared]
            if unknown:
                raise BadInfer(f"unknown outputs {unknown}; the model returns {declared}")
            if isinstance(model, OnnxModel) and model.max_batch_size:
                sizes = {a.shape[0] for a in arrays.values()}
                if len(sizes) != 1 or not 1 <= sizes.pop() <= model.max_batch_size:
                    raise BadInfer(f"the inputs' batch sizes are {[a.shape[0] for a in arrays.values()]}; the model "
                                   f"takes one batch of 1 to {model.max_batch_size}")
        except BadInfer as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        try:
            outputs = await asyncio.wrap_future(self.batcher.submit(model, arrays))
        except RefusedInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        specs = {s.name: s for s in model.outputs}
        for name in wanted:
            datatype = specs[name].datatype
            value = np.asarray(outputs[name]).astype(np.dtype(DATATYPES[datatype]).newbyteorder("<"))
            response.outputs.add(name=name, datatype=datatype, shape=value.shape)
            response.raw_output_contents.append(value.tobytes())
        return response

    async def _model(self, name: str, version: str, context):
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
        try:
            return self.repository.get(name, _version(version))
        except BadInfer as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
