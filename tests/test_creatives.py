"""Creatives end to end: the encoder trained on a features run's creatives and served by ModelInfer, every
creative embedded by the Ray job into Feast, FIN trained with the image modality, the cold-start report, and
a server that embeds the creative of an ad the store does not know (and says so)."""

import dataclasses
import shutil

import grpc
import numpy as np
import polars as pl
import pytest
import torch

from features.creatives import CREATIVE_SIZE, encode_png
from features.dataset import Dataset
from features.item_embeddings import CREATIVE_VIEW, EMBEDDING, ItemEmbeddings, embeddings_source
from fin.artifact import load_artifact
from fin.compiled import TOLERANCE, eager_pctr
from fin.evaluate import COLD, WARM, evaluate
from fin.inputs import scoring_requests
from fin.train import load_train_config, train
from fin.vision import EMBEDDING as ENCODER_OUTPUT
from fin.vision import CreativeEncoderConfig, EncoderTrainConfig, images_tensor, train_encoder
from jobs.creatives_job import EmbedConfig, embed_creatives
from serving.pb import ctr_scoring_pb2 as pb
from serving.vision import load_vision
from tests.conftest import TRAIN_CONFIG, Clock, Running, errors, outcomes

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
    fin = train(out / "data", models, load_train_config(None, **{**TRAIN_CONFIG, "model": "fin", "compile": True}),
                log=lambda m: None)
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
    assert artifact.model.config.image_dim == 8
    report = evaluate(out / "data", [artifact], "test")
    cold = report["cold_start"]
    assert cold is not None and cold["new_items"] > 0 and cold["cold_examples"] > 0 and cold["warm_examples"] > 0
    row = cold["models"][f"{artifact.name}/{artifact.version}"]
    assert set(row) == {COLD, WARM} and "auc" in row[COLD] and "rpm" in row[WARM]
    # calibration is sum of pCTR / clicks: the two kinds' sums of pCTR add up to the whole split's
    whole = report["models"][f"{artifact.name}/{artifact.version}"]["calibration"]
    parts = row[COLD]["calibration"] * cold["cold_clicks"] + row[WARM]["calibration"] * cold["warm_clicks"]
    assert parts == pytest.approx(whole * (cold["cold_clicks"] + cold["warm_clicks"]), rel=1e-9)
    # hiding the creatives changes the scores: the model reads them
    data = Dataset.at(out)
    from fin.loader import ExampleStream

    batch = next(iter(ExampleStream(data.root, "test", artifact.loader.__class__(**{
        **artifact.loader.__dict__, "shuffle": False}), images=True)))
    with torch.no_grad():
        with_images = artifact.model(batch)
        batch.images.table.zero_()
        assert not torch.allclose(with_images, artifact.model(batch))


def test_the_compiled_package_reads_creatives_as_the_eager_model(run):
    """FIN with creatives compiles whole: the package takes the request's embeddings as inputs and gives the
    eager model's pCTRs, with every creative known, with none known, and without the candidates' ones."""
    out, _, _, _, fin = run
    artifact = load_artifact(fin, package=True)
    assert artifact.package is not None and artifact.package_note == "compiled", artifact.package_note
    assert artifact.meta["compiled"]["max_abs_pctr_difference"] <= TOLERANCE
    from fin.loader import ExampleStream

    loader = dataclasses.replace(artifact.loader, shuffle=False)
    requests = scoring_requests(next(iter(ExampleStream(out / "data", "test", loader, images=True))), 24)
    assert all(r.images is not None and len(r.images.ids) for r in requests)
    first = requests[0]
    shown = np.isin(first.images.ids, np.asarray(first.candidates["item_id"]))
    none = ItemEmbeddings.of(np.zeros(0, np.int64), np.zeros((0, first.images.dim), np.float32))
    requests += [dataclasses.replace(first, images=none),
                 dataclasses.replace(first, images=ItemEmbeddings.of(first.images.ids[~shown],
                                                                     first.images.vectors[1:][~shown]))]
    for request in requests:
        np.testing.assert_allclose(artifact.package.pctr(request),
                                   eager_pctr(artifact.model, artifact.loader, artifact.calibration, request),
                                   rtol=0, atol=1e-6)
    # the creatives move the package's scores as they move the eager model's
    assert not np.allclose(artifact.package.pctr(requests[0]), artifact.package.pctr(requests[-2]))


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


def test_the_daily_chain_embeds_the_new_runs_creatives_before_training(run, tmp_path):
    """A features run replaces the dataset (its embeddings with it): the scheduler's embed job puts its
    creatives through the repository's encoder before training, so the serving default (which reads
    creatives) warm-starts on them; a run whose model would read other inputs starts afresh and says why."""
    import json
    from datetime import datetime

    from fin.versions import promote
    from jobs.schedule import JobSpec, ScheduleConfig, Scheduler

    out, models, _, _, fin = run
    features, repo = tmp_path / "features", tmp_path / "models"
    shutil.copytree(out, features, ignore=shutil.ignore_patterns(".ray"))
    shutil.copytree(models, repo)
    source = embeddings_source(Dataset.at(features))
    source.unlink()  # as after the day's features run
    promote(repo, "fin", int(fin.name))
    train_config = tmp_path / "train.json"
    train_config.write_text(json.dumps({k: v for k, v in TRAIN_CONFIG.items() if k != "compile"}))
    config = ScheduleConfig(
        state=tmp_path / "schedule" / "runs.sqlite", logs=tmp_path / "logs", features=features, models=repo,
        reports=tmp_path / "reports", embed_args=("--num-cpus", "2", "--no-materialize"),
        train_args=("--config", str(train_config), "--no-compile"),
        jobs={"embed": JobSpec(cron="30 2 * * *"), "train": JobSpec(after="embed")})
    clock = Clock(datetime(2026, 3, 26, 3, 0))
    scheduler = Scheduler(config, clock)
    runs = scheduler.tick()
    assert outcomes(runs) == [("embed", "done"), ("train", "done")], errors(runs)
    embedded = json.loads(runs[0]["outputs"])
    assert embedded["creatives"] == pl.read_parquet(Dataset.at(features).creatives).height and embedded["dim"] == 8
    assert source.exists()
    trained = json.loads(runs[1]["outputs"])
    assert trained["init_from"] == int(fin.name) and "init_skipped" not in trained
    assert load_artifact(trained["artifact"]).model.config.image_dim == 8
    scheduler.close()

    # the next day's training reads no creatives: the promoted model's weights do not fit it
    scheduler = Scheduler(dataclasses.replace(config, train_args=(*config.train_args, "--no-images")), clock)
    clock.advance(days=1)
    runs = scheduler.tick()
    assert outcomes(runs) == [("embed", "done"), ("train", "done")], errors(runs)
    trained = json.loads(runs[1]["outputs"])
    assert trained["init_from"] is None and "width 8, this run 0" in trained["init_skipped"]
    assert load_artifact(trained["artifact"]).model.config.image_dim == 0
    scheduler.close()


def test_no_creatives_write_an_empty_view_source(tmp_path):
    """A features run without creatives gives the embedding job no rows: it writes an empty source of width 0,
    which training reads as no image modality (before, pyarrow refused a list width of 0 and the job failed)."""
    from features.item_embeddings import write_embeddings

    write_embeddings(tmp_path / "item_creative.parquet", np.zeros(0, np.int64), np.zeros((0, 0), np.float32), 0)
    empty = ItemEmbeddings.read(tmp_path / "item_creative.parquet")
    assert empty.dim == 0 and empty.rows(np.array([5, 6])).tolist() == [0, 0]


def test_models_of_two_embedding_widths_each_read_their_own_cached_rows():
    """Two creative models of different widths served at once (a retrained encoder's beside the last one's): each
    width keeps its own cache (before, one cache was replaced whenever the width changed, so a request's rows
    went into the other width's cache and valid requests were refused as bad creatives). While the store is
    down, rows come from the cache alone (the store is not asked: here it is None)."""
    from serving.creatives import CreativeEmbeddings

    creatives = CreativeEmbeddings(store=None)
    items = np.array([3, 5])
    creatives._cache(16).put(items, np.full((2, 16), 1.0, np.float32))
    creatives._cache(32).put(items[:1], np.full((1, 32), 2.0, np.float32))
    rows, found = creatives.read(items, 16, store=False)
    assert found.all() and rows.shape == (2, 16) and (rows == 1.0).all()
    rows, found = creatives.read(items, 32, store=False)
    assert found.tolist() == [True, False] and (rows[0] == 2.0).all()
