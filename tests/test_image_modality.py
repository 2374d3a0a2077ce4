"""The image modality without a features run: embedding lookups, batches of requests with creatives, the
confidence-aware fusion, and every model reading creatives."""

import dataclasses

import numpy as np
import pytest
import torch
from test_batching import _requests

from features.item_embeddings import ItemEmbeddings, write_embeddings
from fin.fusion import ConfidenceFusion, ModalityConfidence, UnimodalHeads
from fin.inputs import LoaderConfig, requests_batch, scoring_requests
from fin.models import MODELS, ModelConfig

DIM = 6


def _embeddings(items: int = 300, seed: int = 0) -> ItemEmbeddings:
    rng = np.random.default_rng(seed)
    return ItemEmbeddings.of(np.arange(1, items), rng.normal(size=(items - 1, DIM)).astype(np.float32))


def test_lookup_rows_last_write_wins_and_file_round_trip(tmp_path):
    e = ItemEmbeddings.of(np.array([30, 10, 20, 10]), np.arange(8, dtype=np.float32).reshape(4, 2))
    assert e.ids.tolist() == [10, 20, 30] and e.vectors[0].tolist() == [0, 0]
    assert e.rows(np.array([10, 99, 30, -1])).tolist() == [1, 0, 3, 0]
    assert e.vectors[e.rows(np.array([10]))][0].tolist() == [6, 7]  # the last row of id 10
    write_embeddings(tmp_path / "v.parquet", e.ids, e.vectors[1:], 1_780_000_000_000)
    back = ItemEmbeddings.read(tmp_path / "v.parquet")
    assert np.array_equal(back.ids, e.ids) and np.array_equal(back.vectors, e.vectors)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_read_creatives_and_score_requests_together_as_alone(name):
    requests = [dataclasses.replace(r, images=_embeddings()) for r in _requests(3, 5)]
    none = ItemEmbeddings.of(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    requests[1] = dataclasses.replace(requests[1], images=none)  # a request whose items have none
    loader = LoaderConfig()
    torch.manual_seed(0)
    model = MODELS[name](ModelConfig(image_dim=DIM)).eval()
    together = requests_batch(requests, loader)
    assert together.images.table.shape[1] == DIM and not together.images.table[0].any()
    with torch.no_grad():
        scores = model(together)
        torch.testing.assert_close(scores, torch.cat([model(requests_batch([r], loader)) for r in requests]))
        # the requests as a server receives them again (their items' embeddings) score the same
        torch.testing.assert_close(model(requests_batch(scoring_requests(together), loader)), scores)
        # the model reads the creatives
        other = [dataclasses.replace(r, images=_embeddings(seed=1)) if len(r.images.ids) else r for r in requests]
        assert not torch.allclose(model(requests_batch(other, loader)), scores)
    with pytest.raises(ValueError, match="creative embeddings"):
        model(dataclasses.replace(together, images=None))


def test_confidence_fusion_weights_follow_the_predicted_confidence():
    torch.manual_seed(0)
    confidence = ModalityConfidence(4, 3)
    fusion = ConfidenceFusion(4, 3, 5, confidence)
    ids, table = torch.randn(8, 4), torch.cat([torch.zeros(1, 3), torch.randn(4, 3)])
    rows = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0])
    known = rows > 0
    w = confidence.weights(confidence(ids, table, rows), known)
    torch.testing.assert_close(w.sum(1), torch.ones(8))
    assert torch.all(w[4:, 0] == 1)  # no creative: the ids alone
    h_id, h_image = fusion.projections(ids, table, rows)
    torch.testing.assert_close(fusion(ids, table, rows), h_id + w[:, 1:] * h_image)
    torch.testing.assert_close(fusion(ids, table, rows)[4:], h_id[4:])
    # the click loss moves no confidence network (the weights are detached), only the temperature
    fusion(ids, table, rows).sum().backward()
    assert all(p.grad is None for p in confidence.nets.parameters()) and confidence.log_temperature.grad is not None


def test_confidences_learn_which_modality_predicts():
    """Labels that only the image predicts: the image's confidence grows above the ids', and the fusion then
    puts its weight on the image."""
    torch.manual_seed(0)
    n = 512
    ids, table, rows = torch.randn(n, 4), torch.randn(n + 1, 3), torch.arange(1, n + 1)
    label = (table[1:, 0] > 0).float()
    confidence = ModalityConfidence(4, 3)
    fusion, heads = ConfidenceFusion(4, 3, 5, confidence), UnimodalHeads(5, 2)
    context = torch.zeros(n, 2)
    optimizer = torch.optim.Adam([*fusion.parameters(), *heads.parameters()], lr=0.02)
    for _ in range(300):
        loss = heads.auxiliary_loss(fusion, ids, table, rows, context, label).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        c = confidence(ids, table, rows)
        w = confidence.weights(c, rows > 0)
    assert c[:, 1].mean() > c[:, 0].mean() and w[:, 1].mean() > 0.5
