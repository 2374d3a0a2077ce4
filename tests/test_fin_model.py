"""FIN end to end on CPU: loader -> TorchRec embeddings -> fragments -> attentions -> tower; it learns."""

import pytest
import torch

from features.fragments import FragmentConfig
from features.simulator import load_sim_config, simulate
from fin.data import ExampleStream, LoaderConfig
from fin.embeddings import EmbeddingSizes
from fin.metrics import auc
from fin.models.fin import FIN, FINConfig
from jobs.features_job import FeaturesConfig, run_features

LOADER = LoaderConfig(batch_size=256, max_seq_len=50,
                      fragments=FragmentConfig(full_len=50, location_len=20, meal_len=20, recent_len=10, integrated_len=20))


def _model():
    torch.manual_seed(0)
    return FIN(FINConfig(dim=16, embeddings=EmbeddingSizes(dim=8)))


def test_forward_and_backward(features_job):
    out, _ = features_job
    model = _model()
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    logits = model(batch)
    assert logits.shape == (len(batch),) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    assert model.simplified["location"].key.weight.grad.abs().sum() > 0
    assert model.multi_head["integrated"].key.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def month(tmp_path_factory):
    """A month of 300 users: enough clicks to learn from and to measure AUC on."""
    root = tmp_path_factory.mktemp("month")
    simulate(load_sim_config(days=30, **{"users.users": 300}), root / "logs")
    run_features(root / "logs", root / "features", FeaturesConfig(max_seq_len=50, partitions=2, num_cpus=2,
                                                                  validation_days=3, test_days=4, materialize=False))
    return root / "features"


def test_fin_learns_the_simulated_clicks(month):
    out = month
    model = _model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):  # epochs
        for batch in ExampleStream(out / "data", "train", LOADER):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        scored = [(torch.sigmoid(model(b)), b.label)
                  for b in ExampleStream(out / "data", "test", LoaderConfig(**{**LOADER.__dict__, "shuffle": False}))]
    preds, labels = (torch.cat(x).numpy() for x in zip(*scored))
    assert auc(labels, preds) > 0.65
