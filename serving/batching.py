"""Forwards shared by the Score requests that wait together (opportunistic batching).

A fixed number of forward threads take requests from one queue. A thread takes the oldest waiting
request and, with it, every other request for the same model version that is already waiting, up to a
candidate budget, and scores them in one forward (`serving.scoring.score_requests`). Nothing is held
back to fill a batch: alone, a request is scored at once; under load, the requests that queue while a
forward runs share the next one, which costs far less than one forward each (the per-operation
overhead of a forward is paid once). Scores are the same either way.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from fin.artifact import Artifact
from fin.inputs import ScoringRequest
from serving.scoring import score_requests


@dataclass
class _Waiting:
    artifact: Artifact
    request: ScoringRequest
    future: Future = field(default_factory=Future)


class ForwardBatcher:
    def __init__(self, threads: int, max_candidates: int, observe_batch=None):
        """`observe_batch(requests)`, when given, is called with the number of requests of each forward."""
        self.max_candidates, self.observe_batch = max_candidates, observe_batch
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"forward-{i}", daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, artifact: Artifact, request: ScoringRequest) -> Future:
        """A future of the request's pCTR [B]; cancelling it before its forward starts skips the request."""
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

    def _take(self, first: _Waiting) -> tuple[list[_Waiting], bool]:
        """`first` and the waiting requests that may share its forward; whether a stop signal was taken."""
        batch, others, stop = [first], [], False
        size = len(first.request)
        while size < self.max_candidates:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if item.artifact is not first.artifact or size + len(item.request) > self.max_candidates:
                others.append(item)  # for the next forward
                continue
            batch.append(item)
            size += len(item.request)
        for item in others:
            self._queue.put(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._take(first)
            batch = [w for w in batch if w.future.set_running_or_notify_cancel()]  # the caller may be gone
            if batch:
                self._forward(batch)
            if stop:
                return

    def _forward(self, batch: list[_Waiting]) -> None:
        try:
            scores = score_requests(batch[0].artifact, [w.request for w in batch])
        except Exception as e:  # noqa: BLE001 - every request of the forward gets the error, the thread lives on
            for w in batch:
                w.future.set_exception(e)
            return
        if self.observe_batch is not None:
            self.observe_batch(len(batch))
        for w, pctr in zip(batch, scores):
            w.future.set_result(pctr)
