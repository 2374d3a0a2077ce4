"""Bring-your-own models: a two-input PyTorch model (an infrared-visible image fusion network) exported with
`torch.onnx.export`, added with `fin add-onnx` and its declared config, served by `fin serve` and called
with Triton's own client (`tritonclient`), against onnxruntime run directly on the same file.

Like tests/test_inference_protocol.py, this module must not import `serving.pb.inference_v2_pb2`
(tritonclient registers the same protocol messages in the process-wide protobuf pool)."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
import yaml
from torch import nn
from tritonclient.utils import InferenceServerException

from tests.conftest import Running, run_fin

SIZE, MAX_BATCH = 32, 8


class InfraredVisibleFusion(nn.Module):
    """A one-channel infrared and a three-channel visible image -> one fused image: a stem per modality, their
    features joined, a per-pixel weight that mixes the two (the shape of the field's fusion networks)."""

    def __init__(self):
        super().__init__()
        self.infrared = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.visible = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.weight = nn.Conv2d(16, 1, 1)

    def forward(self, infrared: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.weight(torch.cat([self.infrared(infrared), self.visible(visible)], 1)))
        return w * infrared + (1 - w) * visible.mean(1, keepdim=True)


CONFIG = {"max_batch_size": MAX_BATCH,
          "inputs": [{"name": "infrared", "datatype": "FP32", "dims": [1, SIZE, SIZE]},
                     {"name": "visible", "datatype": "FP32", "dims": [3, SIZE, SIZE]}],
          "outputs": [{"name": "fused", "datatype": "FP32", "dims": [1, SIZE, SIZE]}]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(InfraredVisibleFusion().eval(), (torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)),
                      str(folder / "fusion.onnx"), input_names=["infrared", "visible"], output_names=["fused"],
                      dynamic_shapes={"infrared": {0: batch}, "visible": {0: batch}}, dynamo=True, external_data=False,
                      verbose=False)
    (folder / "fusion.yaml").write_text(yaml.safe_dump(CONFIG))
    return folder


def test_a_model_whose_config_does_not_fit_its_graph_is_not_added(exported, tmp_path):
    wrong = {**CONFIG, "inputs": [{**CONFIG["inputs"][0], "name": "thermal"}, CONFIG["inputs"][1]]}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    out = run_fin("add-onnx", "--models", str(tmp_path / "models"), "--name", "fusion",
                  "--onnx", str(exported / "fusion.onnx"), "--config", str(tmp_path / "wrong.yaml"))
    assert out.returncode != 0 and "the graph's inputs are ['infrared', 'visible']" in out.stderr
    (tmp_path / "typed.yaml").write_text(yaml.safe_dump({**CONFIG, "outputs": [{**CONFIG["outputs"][0],
                                                                                "datatype": "INT64"}]}))
    out = run_fin("add-onnx", "--models", str(tmp_path / "models"), "--name", "fusion",
                  "--onnx", str(exported / "fusion.onnx"), "--config", str(tmp_path / "typed.yaml"))
    assert out.returncode != 0 and "'fused' is tensor(float) in the graph, declared INT64" in out.stderr
    assert not any((tmp_path / "models" / "fusion").glob("[0-9]*"))  # nothing half-added
    (tmp_path / "right.yaml").write_text(yaml.safe_dump(CONFIG))
    # what the server's scan would never load is not added (before, it was "added")
    for name, version, message in (("team/fusion", "1", "not one folder name"), (".fusion", "1", "not one folder name"),
                                   ("fusion", "-1", "versions are 1 and up")):
        out = run_fin("add-onnx", "--models", str(tmp_path / "models"), "--name", name, "--version", version,
                      "--onnx", str(exported / "fusion.onnx"), "--config", str(tmp_path / "right.yaml"))
        assert out.returncode != 0 and message in out.stderr, out.stderr


def test_server_settings_out_of_range_are_refused():
    """gRPC listens on a port modulo 65536 (`fin serve --port 70000` listened on 4464); a UTC offset of NaN
    started a server whose every Score failed."""
    from serving.config import ScoringConfig, ServerConfig

    with pytest.raises(ValueError, match="port 70000: a port is 0"):
        ServerConfig(models=Path(), feast_repo=Path(), port=70000)
    with pytest.raises(ValueError, match="is not a UTC offset"):
        ScoringConfig(utc_offset_hours=float("nan"))


def test_triton_client_infers_what_onnxruntime_computes(exported, features_job, tmp_path):
    models = tmp_path / "models"
    added = run_fin("add-onnx", "--models", str(models), "--name", "fusion", "--onnx", str(exported / "fusion.onnx"),
                    "--config", str(exported / "fusion.yaml"), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 1
    running = Running(models, features_job[0] / "feast")
    try:
        client = triton.InferenceServerClient(url=running.addr)
        assert client.is_model_ready("fusion", "1")
        meta = client.get_model_metadata("fusion")
        assert meta.platform == "onnxruntime_onnx"
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("infrared", [-1, 1, SIZE, SIZE]),
                                                                 ("visible", [-1, 3, SIZE, SIZE])]
        rng = np.random.default_rng(0)
        images = {"infrared": rng.random((3, 1, SIZE, SIZE), dtype=np.float32),
                  "visible": rng.random((3, 3, SIZE, SIZE), dtype=np.float32)}
        inputs = []
        for name, value in images.items():
            inputs.append(triton.InferInput(name, list(value.shape), "FP32"))
            inputs[-1].set_data_from_numpy(value)
        served = client.infer("fusion", inputs).as_numpy("fused")
        (direct,) = ort.InferenceSession(str(exported / "fusion.onnx"), providers=["CPUExecutionProvider"]).run(
            ["fused"], images)
        assert served.shape == (3, 1, SIZE, SIZE)
        np.testing.assert_allclose(served, direct, rtol=1e-6, atol=1e-6)

        too_many = [triton.InferInput(n, [MAX_BATCH + 1, *v.shape[1:]], "FP32") for n, v in images.items()]
        for t, v in zip(too_many, images.values()):
            t.set_data_from_numpy(np.repeat(v[:1], MAX_BATCH + 1, axis=0))
        with pytest.raises(InferenceServerException) as e:
            client.infer("fusion", too_many)
        assert "INVALID_ARGUMENT" in str(e.value.status()) and f"1 to {MAX_BATCH}" in e.value.message()
    finally:
        code, err = running.stop()
    assert code == 0, err


def _graph(path, node: str, inputs: list, output: list, constant: float | None = None, to: int | None = None):
    """A one-node graph (onnx.helper): input "x" [type, shape], output "y"."""
    import onnx
    from onnx import TensorProto, helper

    x, y = helper.make_tensor_value_info("x", *inputs), helper.make_tensor_value_info("y", *output)
    constants = [] if constant is None else [helper.make_tensor("c", TensorProto.FLOAT, [], [constant])]
    node = helper.make_node(node, ["x", *(["c"] if constants else [])], ["y"], **({} if to is None else {"to": to}))
    graph = helper.make_graph([node], "g", [x], [y], constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _table(path):
    """A graph that looks ids "x" [n] up in a table of 10 rows of 2: "y" [n, 2]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Gather", ["table", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                              [numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(10, 2), "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_models_at_the_edges_of_a_config(features_job, tmp_path):
    """A graph with a fixed batch is not added with batching (joined calls failed in onnxruntime), nor one whose
    fixed size is declared as any (calls of another size failed in onnxruntime); a model with a
    scalar input is served (it ended the forward threads: no ModelInfer of any model was answered after it); a
    UINT8 input is served, and a version that is no number is INVALID_ARGUMENT (a version like "²" was an
    internal error)."""
    from onnx import TensorProto

    models = tmp_path / "models"
    _graph(tmp_path / "fixed.onnx", "Add", [TensorProto.FLOAT, [1, 4]], [TensorProto.FLOAT, [1, 4]], constant=1.0)
    _graph(tmp_path / "scalar.onnx", "Mul", [TensorProto.FLOAT, []], [TensorProto.FLOAT, []], constant=2.0)
    _graph(tmp_path / "bytes.onnx", "Cast", [TensorProto.UINT8, ["n", 4]], [TensorProto.FLOAT, ["n", 4]],
           to=TensorProto.FLOAT)
    _table(tmp_path / "table.onnx")
    _graph(tmp_path / "narrow.onnx", "Relu", [TensorProto.FLOAT, ["n", 1]], [TensorProto.FLOAT, ["n", 1]])
    configs = {"narrow": (4, "FP32", [-1], "FP32", [-1]),  # declared any size where the graph fixes 1
               "fixed": (4, "FP32", [4], "FP32", [4]), "scalar": (0, "FP32", [], "FP32", []),
               "bytes": (4, "UINT8", [4], "FP32", [4]), "table": (8, "INT64", [], "FP32", [2])}
    for name, (batch, in_type, in_dims, out_type, out_dims) in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "max_batch_size": batch, "inputs": [{"name": "x", "datatype": in_type, "dims": in_dims}],
            "outputs": [{"name": "y", "datatype": out_type, "dims": out_dims}]}))
        added = run_fin("add-onnx", "--models", str(models), "--name", name, "--onnx", str(tmp_path / f"{name}.onnx"),
                        "--config", str(tmp_path / f"{name}.yaml"))
        assert (added.returncode != 0) == (name in ("fixed", "narrow")), added.stderr
    assert "has a fixed batch of 1 in the graph" in run_fin(
        "add-onnx", "--models", str(models), "--name", "fixed", "--onnx", str(tmp_path / "fixed.onnx"),
        "--config", str(tmp_path / "fixed.yaml")).stderr
    running = Running(models, features_job[0] / "feast")
    try:
        client = triton.InferenceServerClient(url=running.addr)
        for value in (3.0, 4.0):  # the second call: the threads lived on
            scalar = triton.InferInput("x", [], "FP32")
            scalar.set_data_from_numpy(np.array(value, np.float32))
            assert float(client.infer("scalar", [scalar]).as_numpy("y")) == 2 * value
        sent = triton.InferInput("x", [1, 4], "UINT8")
        sent.set_data_from_numpy(np.array([[1, 255, 0, 7]], np.uint8))
        assert client.infer("bytes", [sent]).as_numpy("y").tolist() == [[1.0, 255.0, 0.0, 7.0]]
        # a version that is no number, or too long for one (int() refuses over 4,300 digits: it was UNKNOWN), an
        # empty dimension (a reshape failed: UNKNOWN), values the graph refuses (an index past a table: UNKNOWN)
        empty = triton.InferInput("x", [0, 4], "UINT8")
        empty.set_data_from_numpy(np.zeros((0, 4), np.uint8))
        index = triton.InferInput("x", [1], "INT64")
        index.set_data_from_numpy(np.array([100], np.int64))
        for model, sent_input, version, message in (("bytes", sent, "²", "not a version number"),
                                                    ("bytes", sent, "1" * 5000, "not a version number"),
                                                    ("bytes", empty, "", "has shape [0, 4]"),
                                                    ("table", index, "", "the model refused the inputs")):
            with pytest.raises(InferenceServerException) as e:
                client.infer(model, [sent_input], model_version=version)
            assert "StatusCode.INVALID_ARGUMENT" == e.value.status() and message in e.value.message(), e.value.message()
    finally:
        code, err = running.stop()
    assert code == 0, err
