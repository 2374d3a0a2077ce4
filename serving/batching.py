"""Forwards shared by the Score requests that wait together (opportunistic batching).

A fixed number of forward threads take requests from one queue. A thread takes the oldest waiting
request and, with it, every other request for the same model version that is already waiting, up to a
candidate budget, and scores them in one forward (`serving.scoring.score_requests`). Nothing is held
back to fill a batch: alone, a request is scored at once; under load, the requests that queue while a
forward runs share the next one, which costs far less than one forward each (the per-operation
overhead of a forward is paid once). Scores are the same either way.

The same queue serves the inference protocol's models (`model_forward`): the images (or other inputs) of
ModelInfer calls waiting together for the same model, with the same shapes past the batch dimension, are
joined along it and run as one batch, up to the model's batch limit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from serving.onnx_model import OnnxModel
from serving.scoring import score_requests
from serving.vision import VisionModel


@dataclass
class _Waiting:
    artifact: object  # the model
    request: object
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Forward:
    """What one kind of model's batched forward is: `run(model, requests)` -> a result per request, a
    request's `size` against the `budget(model)` of one forward, and whether two requests may `share` one."""

    run: Callable[[Any, list], list]
    size: Callable[[Any], int]
    budget: Callable[[Any], int]
    share: Callable[[Any, Any], bool] = lambda a, b: True


def score_forward(max_candidates: int) -> Forward:
    """Score requests of a CTR model: up to `max_candidates` candidates per forward."""
    return Forward(run=score_requests, size=len, budget=lambda artifact: max_candidates)


class ForwardBatcher:
    def __init__(self, threads: int, forward: Forward, observe_batch=None):
        """`observe_batch(requests)`, when given, is called with the number of requests of each forward."""
        self.forward, self.observe_batch = forward, observe_batch
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"forward-{i}", daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, artifact, request) -> Future:
        """A future of the request's result (a Score request's pCTR [B]); cancelling it before its forward starts
        skips the request."""
        waiting = _Waiting(artifact, request)
        self._queue.put(waiting)
        return waiting.future

    def close(self) -> None:
        """Finish what was submitted, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join()

    def _take(self, first: _Waiting) -> list[_Waiting]:
        """`first` and the waiting requests that may share its forward. A stop signal met here goes back behind
        the requests skipped here, so that they are still answered before the thread ends."""
        batch, others, stopping = [first], [], False
        size, budget = self._size(first), self.forward.budget(first.artifact)
        while size < budget:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stopping = True
                break
            item_size = self._size(item)
            if (item.artifact is not first.artifact or size + item_size > budget
                    or not self.forward.share(first.request, item.request)):
                others.append(item)  # for the next forward
                continue
            batch.append(item)
            size += item_size
        for item in others:
            self._queue.put(item)
        if stopping:
            self._queue.put(None)
        return batch

    def _size(self, waiting: _Waiting) -> int:
        """A request's size, or where it has none, the budget's worth: it goes alone, and the forward says why
        (an error here would end the thread and leave every later call unanswered)."""
        try:
            return self.forward.size(waiting.request)
        except Exception:  # noqa: BLE001
            return 1 << 62

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [w for w in self._take(first) if w.future.set_running_or_notify_cancel()]  # the caller may be gone
            if batch:
                self._forward(batch)

    def _forward(self, batch: list[_Waiting]) -> None:
        try:
            scores = self.forward.run(batch[0].artifact, [w.request for w in batch])
        except Exception as e:  # noqa: BLE001 - the thread lives on
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # one request's values may have failed them all: each alone, to get its own answer
                for w in batch:
                    self._forward([w])
            return
        if self.observe_batch is not None:
            self.observe_batch(len(batch))
        for w, pctr in zip(batch, scores):
            w.future.set_result(pctr)


def _run(model: VisionModel | OnnxModel, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(model, OnnxModel):
        return model.infer(arrays)
    return {k: v.numpy() for k, v in model.infer({k: torch.from_numpy(v) for k, v in arrays.items()}).items()}


def _rows(arrays: dict[str, np.ndarray]) -> int:
    first = next(iter(arrays.values()))
    return first.shape[0] if first.ndim else 1  # (a model without a batch dimension may take a scalar)


def _infer_together(model: VisionModel | OnnxModel, requests: list[dict[str, np.ndarray]]) -> list[dict]:
    """Several calls' inputs joined along the batch dimension, run once, and the outputs cut back apart."""
    if len(requests) == 1:
        return [_run(model, requests[0])]
    out = _run(model, {name: np.concatenate([r[name] for r in requests]) for name in requests[0]})
    cuts = np.cumsum([_rows(r) for r in requests])[:-1]
    parts = {name: np.split(value, cuts) for name, value in out.items()}
    return [{name: parts[name][i] for name in out} for i in range(len(requests))]


def model_forward(max_rows: int) -> Forward:
    """ModelInfer calls of one model that wait together share a forward: up to `max_rows` rows (images) for a
    vision model, up to its `max_batch_size` for an ONNX model (none for one without a batch dimension)."""
    def budget(model) -> int:
        return (model.max_batch_size or 1) if isinstance(model, OnnxModel) else max_rows

    return Forward(run=_infer_together, size=_rows, budget=budget,
                   share=lambda a, b: all(a[name].shape[1:] == b[name].shape[1:] for name in a))
