"""Bring-your-own models: a two-input PyTorch model (an infrared-visible image fusion network) exported with
`torch.onnx.export`, added with `fin add-onnx` and its declared config, served by `fin serve` and called
with Triton's own client (`tritonclient`), against onnxruntime run directly on the same file.

Like tests/test_inference_protocol.py, this module must not import `serving.pb.inference_v2_pb2`
(tritonclient registers the same protocol messages in the process-wide protobuf pool)."""

import json

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
