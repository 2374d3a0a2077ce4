"""Forwards shared by waiting Score requests, and by waiting ModelInfer calls of a vision model: the same results
as one by one, order kept, budgets respected."""

import threading

import numpy as np
import pytest
import torch

from features.sequences import TIMELINE_FIELDS
from fin.artifact import load_artifact
from fin.inputs import CANDIDATE_NUMBERS, TARGET_FEATURES, ScoringRequest
from serving.batching import Forward, ForwardBatcher, model_forward, score_forward
from serving.scoring import score_requests
from serving.vision import load_vision, write_example

CONTEXT = {"ts": 1_780_000_000_000, "user_id": 7, "geohash6": 123, "aoi_id": -1, "city_id": 1, "time_type": 2, "weekdays": 3,
           "hours": 12}


def _requests(count: int, candidates: int, seed: int = 0) -> list[ScoringRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        events = int(rng.integers(0, 80))
        timeline = {f: rng.integers(1, 50, events) for f in TIMELINE_FIELDS}
        timeline["ts"] = np.sort(rng.integers(CONTEXT["ts"] - 10**9, CONTEXT["ts"], events))
        candidate = {c: rng.integers(1, 500, candidates) for c in TARGET_FEATURES}
        candidate |= {c: rng.random(candidates) * 100 for c in CANDIDATE_NUMBERS}
        out.append(ScoringRequest(timeline, CONTEXT, candidate, rng.random((candidates, 8)).astype(np.float32)))
    return out


def test_waiting_requests_share_forwards_and_score_as_alone(trained_models):
    _, paths = trained_models
    fin, dnn = load_artifact(paths["fin"]), load_artifact(paths["dnn"])
    batches: list[int] = []
    batcher = ForwardBatcher(threads=1, forward=score_forward(12), observe_batch=batches.append)
    requests = _requests(6, candidates=4)
    models = [fin, fin, dnn, fin, fin, fin]  # a request for another model never joins a forward
    futures = [batcher.submit(m, r) for m, r in zip(models, requests)]  # all waiting before the thread starts
    futures[4].cancel()  # its caller went away
    batcher.start()
    scores = [f.result(timeout=60) if not f.cancelled() else None for f in futures]
    batcher.close()
    for model, request, got in zip(models, requests, scores):
        if got is not None:
            np.testing.assert_allclose(got, score_requests(model, [request])[0], rtol=1e-5, atol=1e-6)
    # fin: requests 0, 1, 3 (12 candidates: the budget), then 5 alone; dnn alone; the cancelled one skipped
    assert sorted(batches) == [1, 1, 3] and futures[4].cancelled()


def test_a_failing_forward_fails_only_its_requests(trained_models):
    _, paths = trained_models
    fin = load_artifact(paths["fin"])
    batcher = ForwardBatcher(threads=1, forward=score_forward(100))
    bad = _requests(1, candidates=2)[0]
    bad.stats = np.zeros((2, 3), np.float32)  # wrong width: the forward raises
    failing = batcher.submit(fin, bad)
    batcher.start()
    with pytest.raises(RuntimeError):  # torch: the statistics do not fit the tower
        failing.result(timeout=60)
    good = _requests(1, candidates=2, seed=1)[0]
    np.testing.assert_allclose(batcher.submit(fin, good).result(timeout=60), score_requests(fin, [good])[0], rtol=1e-5)
    batcher.close()


def test_waiting_infer_calls_share_a_vision_forward_and_get_what_each_would_alone(tmp_path):
    model = load_vision(write_example(tmp_path))
    rng = np.random.default_rng(0)
    calls = [{"image": rng.random((rows, 3, 32, 32), dtype=np.float32)} for rows in (1, 3, 2, 4)]
    batches: list[int] = []
    batcher = ForwardBatcher(threads=1, forward=model_forward(6), observe_batch=batches.append)
    futures = [batcher.submit(model, call) for call in calls]  # all waiting before the thread starts
    batcher.start()
    outputs = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert sorted(batches) == [1, 3]  # rows 1 + 3 + 2 = 6 (the budget), then the call of 4 alone
    for call, got in zip(calls, outputs):
        alone = model.infer({"image": torch.from_numpy(call["image"])})
        assert set(got) == {"logits", "probabilities"} and got["logits"].shape == (len(call["image"]), 10)
        np.testing.assert_allclose(got["logits"], alone["logits"].numpy(), rtol=1e-5, atol=1e-6)


def test_a_request_that_fails_a_joined_forward_fails_alone():
    """Requests waiting together share a forward; when one request's values make the forward fail (an id outside
    an ONNX model's table), each request is run again alone: the others get their results, it gets the error
    (before, every request of the forward got it: other clients' valid calls failed)."""
    running, release, sizes = threading.Event(), threading.Event(), []

    def run(model, requests):
        if model == "slow":
            running.set()
            release.wait(10)
        sizes.append(len(requests))
        if "bad" in requests:
            raise ValueError("index out of range")
        return [r.upper() for r in requests]

    batcher = ForwardBatcher(threads=1, forward=Forward(run=run, size=lambda request: 1, budget=lambda model: 8))
    batcher.start()
    slow = batcher.submit("slow", "s")
    assert running.wait(10)
    waiting = [batcher.submit("m", r) for r in ("a", "bad", "c")]
    release.set()
    assert slow.result(timeout=10) == "S" and [waiting[i].result(timeout=10) for i in (0, 2)] == ["A", "C"]
    with pytest.raises(ValueError, match="out of range"):
        waiting[1].result(timeout=10)
    assert sizes == [1, 3, 1, 1, 1]  # joined once, then each alone
    batcher.close()


def test_close_answers_every_call_submitted_before_it():
    """Calls of two models wait behind a running forward when the batcher is closed: the forward that takes the
    first call meets the other model's call and then the stop; both are still answered before the thread ends
    (before, the skipped call went back behind the stop and was never answered)."""
    running, release = threading.Event(), threading.Event()

    def run(model, requests):
        if model == "slow":
            running.set()
            release.wait(10)
        return [model] * len(requests)

    batcher = ForwardBatcher(threads=1, forward=Forward(run=run, size=lambda request: 1, budget=lambda model: 8))
    batcher.start()
    slow = batcher.submit("slow", 0)
    assert running.wait(10)
    first, other = batcher.submit("a", 1), batcher.submit("b", 2)
    closing = threading.Thread(target=batcher.close)
    closing.start()
    release.set()
    closing.join(10)
    assert not closing.is_alive()
    assert [f.result(timeout=0) for f in (slow, first, other)] == ["slow", "a", "b"]
