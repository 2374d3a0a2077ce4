"""The compiled scoring path (`fin.compiled`): the exported graph, its package, and the checks around it."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from features.configfile import load_config
from features.sequences import TIMELINE_FIELDS
from fin.artifact import load_artifact
from fin.compiled import (
    PACKAGE,
    TOLERANCE,
    CompiledScorer,
    GraphInputs,
    ScoringGraph,
    build_package,
    eager_pctr,
    load_package,
)
from fin.inputs import LoaderConfig, ScoringRequest, requests_batch, scoring_requests
from fin.loader import ExampleStream
from fin.models import MODELS, ModelConfig
from fin.versions import sha256
from tests.conftest import TRAIN_CONFIG

LOADER = load_config(LoaderConfig, {**TRAIN_CONFIG["loader"], "shuffle": False})
MODEL_CONFIG = load_config(ModelConfig, TRAIN_CONFIG["model_config"])


def _validation_requests(features_job, loader=LOADER, count=24, split="validation") -> list[ScoringRequest]:
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", split, dataclasses.replace(loader, shuffle=False))))
    return scoring_requests(batch, count)


def _edge_requests(request: ScoringRequest) -> list[ScoringRequest]:
    """A cold-start user, one candidate, and a request before all of its user's events."""
    one = {c: v[:1] for c, v in request.candidates.items()}
    empty = {f: np.zeros(0, np.int64) for f in TIMELINE_FIELDS}
    early = {**request.context, "ts": int(request.timeline["ts"][0]) if len(request.timeline["ts"]) else 1}
    return [ScoringRequest(empty, request.context, request.candidates, request.stats),
            ScoringRequest(request.timeline, request.context, one, request.stats[:1]),
            ScoringRequest(request.timeline, early, request.candidates, None)]


def test_scoring_requests_are_the_batch_s_requests(features_job):
    """`scoring_requests` gives the server's view of a batch's requests: scored as requests, they score as the
    batch did (the checks of a package run on them)."""
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "validation", LOADER)))
    requests = scoring_requests(batch)
    assert sum(len(r) for r in requests) == len(batch) and len(requests) == int(batch.histories.start.numel())
    torch.manual_seed(0)
    model = MODELS["fin"](MODEL_CONFIG).eval()
    with torch.inference_mode():
        together = model(batch).numpy()[np.argsort(batch.candidate_requests().numpy(), kind="stable")]
        np.testing.assert_allclose(model(requests_batch(requests, LOADER)).numpy(), together, atol=1e-5)


@pytest.mark.parametrize("kind", ["fin", "dnn"])
def test_the_trained_package_scores_as_the_eager_model(trained_models, features_job, kind):
    """The package `fin train` built: checked at publish time (its entry says by how much it differed), and
    it gives the eager model's pCTRs on the logged test requests and on the edge cases the graph pads."""
    artifact = load_artifact(trained_models[1][kind], package=True)
    entry = artifact.meta["compiled"]
    assert entry["package"] == PACKAGE and entry["max_abs_pctr_difference"] <= TOLERANCE and entry["requests_checked"]
    assert artifact.package is not None and artifact.package_note == "compiled"
    requests = _validation_requests(features_job, artifact.loader, count=64, split="test")
    requests += _edge_requests(requests[0])
    for request in requests:
        eager = eager_pctr(artifact.model, artifact.loader, artifact.calibration, request)
        compiled = artifact.package.pctr(request)
        assert compiled.shape == eager.shape == (len(request),)
        np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-6)
    assert load_artifact(trained_models[1][kind]).package is None  # only loaded when asked (the server)


def test_din_exports_and_sim_is_written_without_a_package(features_job, tmp_path):
    """Every model but SIM exports whole (its search keeps a data-dependent number of events); SIM's artifact
    says why it has no package, and nothing is left behind."""
    requests = _validation_requests(features_job, count=8)
    torch.manual_seed(0)
    din = MODELS["din"](MODEL_CONFIG).eval()
    entry = build_package(tmp_path, din, LOADER, None, requests)
    assert entry["max_abs_pctr_difference"] <= TOLERANCE, entry
    package = CompiledScorer(load_package(tmp_path / PACKAGE), LOADER.max_seq_len)
    for request in _edge_requests(requests[1]):
        np.testing.assert_allclose(package.pctr(request), eager_pctr(din, LOADER, None, request), atol=1e-6)

    (tmp_path / "sim").mkdir()
    entry = build_package(tmp_path / "sim", MODELS["sim"](MODEL_CONFIG).eval(), LOADER, None, requests)
    assert "does not export" in entry["error"] and "package" not in entry
    assert not (tmp_path / "sim" / PACKAGE).exists()


def test_graph_inputs_hold_the_events_the_eager_batch_reads(features_job):
    """The graph is given the last max_seq_len events strictly before the request (as `requests_batch`
    reads them); a user without any gets one placeholder event at the request time."""
    request = _validation_requests(features_job, count=1)[0]
    inputs = GraphInputs.of(request, max_len=5)
    ts = request.timeline["ts"]
    expected = ts[ts < request.context["ts"]][-5:]
    assert inputs.timeline[TIMELINE_FIELDS.index("ts")].tolist() == expected.tolist()
    cold = GraphInputs.of(_edge_requests(request)[0], max_len=5)
    assert cold.timeline.shape == (len(TIMELINE_FIELDS), 1)
    assert int(cold.timeline[TIMELINE_FIELDS.index("ts"), 0]) == request.context["ts"]


def test_a_broken_package_leaves_the_artifact_eager(trained_models, tmp_path):
    """A package whose bytes changed (checksum) or that does not load is reported and not used; the artifact
    itself still loads and scores (a package never refuses a version)."""
    folder = tmp_path / "fin" / "1"
    shutil.copytree(trained_models[1]["fin"], folder)
    with open(folder / PACKAGE, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    artifact = load_artifact(folder, package=True)
    assert artifact.package is None and "checksum" in artifact.package_note

    (folder / PACKAGE).write_bytes(b"not a package")
    meta = json.loads((folder / "artifact.json").read_text())
    meta["compiled"]["sha256"] = sha256(folder / PACKAGE)
    (folder / "artifact.json").write_text(json.dumps(meta))
    artifact = load_artifact(folder, package=True)
    assert artifact.package is None and "does not load" in artifact.package_note

    del meta["compiled"]
    (folder / "artifact.json").write_text(json.dumps(meta))
    artifact = load_artifact(folder, package=True)
    assert artifact.package is None and artifact.package_note.startswith("no package")


def test_graph_module_runs_eagerly_as_the_model(trained_models, features_job):
    """`ScoringGraph` (what is exported) run eagerly gives the model's pCTRs: its fixed-width fragments and
    masks change nothing but the order of sums."""
    artifact = load_artifact(trained_models[1]["fin"])
    graph = ScoringGraph(artifact.model, artifact.loader, artifact.calibration)
    for request in _validation_requests(features_job, artifact.loader, 6):
        with torch.inference_mode():
            got = graph(*GraphInputs.of(request, artifact.loader.max_seq_len).args()).numpy()
        np.testing.assert_allclose(got, eager_pctr(artifact.model, artifact.loader, artifact.calibration, request),
                                   atol=1e-6)


def test_a_request_beyond_the_package_s_shapes_is_scored_eagerly(trained_models, features_job):
    """More candidates than the package's dynamic range (`MAX_CANDIDATES`): the eager model scores them."""
    from fin.compiled import MAX_CANDIDATES
    from serving.scoring import score_requests

    artifact = load_artifact(trained_models[1]["fin"], package=True)
    request = _validation_requests(features_job, artifact.loader, 1)[0]
    many = MAX_CANDIDATES + 1
    big = ScoringRequest(request.timeline, request.context,
                         {c: np.resize(v, many) for c, v in request.candidates.items()},
                         np.resize(request.stats, (many, request.stats.shape[1])))
    assert not artifact.package.takes(big) and artifact.package.takes(request)
    (scores,) = score_requests(artifact, [big])
    np.testing.assert_allclose(scores, eager_pctr(artifact.model, artifact.loader, artifact.calibration, big),
                               atol=1e-7)
