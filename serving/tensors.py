"""The tensors a model served through the Open Inference Protocol declares: name, KServe v2 datatype and
shape. Shared by the vision models (`serving.vision`), the ONNX models (`serving.onnx_model`) and the
protocol's checks (`serving.inference_protocol`); imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the KServe v2 datatypes served, as numpy types
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # a key of DATATYPES
    shape: tuple[int, ...]  # as served: the batch dimension first (-1) when the model batches; -1 any size
