"""Creatives end to end: the encoder trained on a features run's creatives and served by ModelInfer, every
creative embedded by the Ray job into Feast, FIN trained with the image modality, the cold-start report, and
a server that embeds the creative of an ad the store does not know (and says so)."""

import shutil

import grpc
import numpy as np
import polars as pl
import pytest
import torch
from conftest import TRAIN_CONFIG, Running

from features.creatives import CREATIVE_SIZE, encode_png
from features.dataset import Dataset
from features.item_embeddings import CREATIVE_VIEW, EMBEDDING, ItemEmbeddings, embeddings_source
from fin.artifact import load_artifact
from fin.evaluate import COLD, WARM, evaluate
from fin.train import load_train_config, train
from fin.vision import EMBEDDING as ENCODER_OUTPUT
from fin.vision import CreativeEncoderConfig, EncoderTrainConfig, images_tensor, train_encoder
from jobs.creatives_job import EmbedConfig, embed_creatives
from serving.pb import ctr_scoring_pb2 as pb
from serving.vision import load_vision

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(features_job, tmp_path_factory):
    """A copy of the shared features run (this module adds its embeddings), an encoder and FIN with creatives."""
    source, _ = features_job
    root = tmp_path_factory.mktemp("creatives")
    out = root / "out"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(".ray"))
    models = root / "models"
    encoder = train_encoder(out, models, EncoderTrainConfig(epochs=2, encoder=CreativeEncoderConfig(embedding_dim=8)),
                            log=lambda m: None)
    result = embed_creatives(out, encoder, EmbedConfig(chunk=100, num_cpus=2))
    fin = train(out / "data", models, load_train_config(None, **{**TRAIN_CONFIG, "model": "fin"}), log=lambda m: None)
    return out, models, encoder, result, fin


def test_encoder_embeds_every_creative_into_feast(run):
    out, _, encoder, result, _ = run
    data = Dataset.at(out)
    creatives = pl.read_parquet(data.creatives)
    stored = ItemEmbeddings.read(embeddings_source(data))
    assert result["creatives"] == creatives.height == len(stored.ids) and result["dim"] == stored.dim == 8
    assert np.array_equal(stored.ids, np.sort(creatives["item_id"].to_numpy()))
    # the stored vectors are the encoder's output for those images, and the online store serves them
    model = load_vision(encoder)
    some = creatives.head(5)
    from features.creatives import decode_pngs

    direct = model.infer({"image": images_tensor(decode_pngs(some["image_png"].to_list()))})[ENCODER_OUTPUT].numpy()
    np.testing.assert_allclose(stored.vectors[stored.rows(some["item_id"].to_numpy())], direct, rtol=1e-4, atol=1e-5)
    from feast import FeatureStore

    online = FeatureStore(repo_path=str(out / "feast")).get_online_features(
        features=[f"{CREATIVE_VIEW}:{EMBEDDING}"], entity_rows=[{"item_id": int(i)} for i in some["item_id"]]).to_dict()
    np.testing.assert_allclose(np.array(online[EMBEDDING], np.float32), direct, rtol=1e-4, atol=1e-5)


def test_fin_reads_creatives_and_the_report_splits_cold_and_warm_ads(run):
    out, _, _, _, fin = run
    artifact = load_artifact(fin)
    assert artifact.model.config.image_dim == 8 and artifact.model.not_exportable
    report = evaluate(out / "data", [artifact], "test")
    cold = report["cold_start"]
    assert cold is not None and cold["new_items"] > 0 and cold["cold_examples"] > 0 and cold["warm_examples"] > 0
    row = cold["models"][f"{artifact.name}/{artifact.version}"]
    assert set(row) == {COLD, WARM} and "auc" in row[COLD] and "rpm" in row[WARM]
    # hiding the creatives changes the scores: the model reads them
    data = Dataset.at(out)
    from fin.loader import ExampleStream

    batch = next(iter(ExampleStream(data.root, "test", artifact.loader.__class__(**{
        **artifact.loader.__dict__, "shuffle": False}), images=True)))
    with torch.no_grad():
        with_images = artifact.model(batch)
        batch.images.table.zero_()
        assert not torch.allclose(with_images, artifact.model(batch))


def test_server_embeds_a_new_ads_creative_and_says_so(run):
    out, models, _, _, _ = run
    server = Running(models, out / "feast")
    try:
        known = pl.read_parquet(Dataset.at(out).creatives).row(0, named=True)
        image = np.random.default_rng(0).integers(0, 255, (1, CREATIVE_SIZE, CREATIVE_SIZE, 3), dtype=np.uint8)
        request = pb.ScoreRequest(user_id=1, context=pb.Context(ts_ms=1_780_000_000_000, geohash="wtw3sj"))
        request.candidates.add(item_id=known["item_id"], shop_id=1, price=20, bid=1)
        request.candidates.add(item_id=10**9, shop_id=10**8, price=20, bid=1, creative_png=encode_png(image)[0])
        request.candidates.add(item_id=10**9 + 1, shop_id=10**8, price=20, bid=1)
        response = server.stub.Score(request, timeout=30)
        assert len(response.scores) == 3 and all(0 < s.pctr < 1 for s in response.scores)
        assert list(response.creatives_embedded) == [1] and list(response.creatives_missing) == [2]
        again = server.stub.Score(request, timeout=30)  # the embedded creative is cached like a stored row
        assert list(again.creatives_embedded) == [] and list(again.creatives_missing) == [2]
        assert again.scores[1].pctr == pytest.approx(response.scores[1].pctr, rel=1e-5)
        request.candidates[2].creative_png = b"not a png"
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Score(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "creative_png" in e.value.details()
    finally:
        server.stop()
