"""Ingestion in a process of its own, so that checking and writing behaviours never holds the interpreter lock
that the server's Score calls need.

The server process takes an Ingest call (gRPC, size and precondition checks) and hands its message bytes to
its ingest worker over a local socket pair; the worker checks and writes every call waiting as one group
(`serving.ingest.ingest_calls`: one check, one fdatasynced log append, one store transaction) and answers
each with its IngestResponse, after which the server answers the client. By default the worker runs at
idle CPU priority (`OnlineConfig.ingest_priority`, SCHED_IDLE): any other work preempts it, so on a busy
machine a Score call goes first and an ingest call waits for the CPU time Score leaves.

Frames on the socket, both ways: call id (u64), status (u8: 0 a message, 1 an error text), payload length
(u32), payload. The worker's first frame says it is ready (or why it could not start). When the server
closes its end, the worker answers what it holds, flushes the log and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import socket
import struct
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct("<QBI")
_MESSAGE, _ERROR = 0, 1
_READY = 0  # the call id of the worker's first frame


class IngestUnavailable(RuntimeError):
    """The worker has exited: no call can be ingested until the server restarts."""


@dataclass(frozen=True)
class IngestSettings:
    """What the worker needs: where behaviours go and how to read their times."""

    log_folder: Path
    realtime: str  # `features.realtime.realtime_location`
    realtime_max_events: int
    utc_offset_hours: float
    priority: str  # `OnlineConfig.ingest_priority`


class IngestWorker:
    """The server's handle on its ingest worker process: `await start()`, `await ingest(request)` from the
    event loop, `await close()`."""

    def __init__(self, settings: IngestSettings):
        self.settings = settings
        self._ids = itertools.count(_READY + 1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._gone: IngestUnavailable | None = None  # set once the worker has exited: calls fail at once
        self.process = None

    async def start(self, timeout_s: float = 600.0) -> None:
        import multiprocessing

        ours, theirs = socket.socketpair()
        # a fresh interpreter: no inherited threads, event loop or model
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=_work, args=(theirs, self.settings), name="fin-ingest", daemon=True)
        self.process.start()
        theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            _, status, payload = await asyncio.wait_for(_read_frame(self._reader), timeout_s)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            self.process.kill()
            raise RuntimeError("the ingest worker did not start (see its log above)") from e
        if status == _ERROR:
            raise RuntimeError(f"the ingest worker could not start: {payload.decode()}")
        self._replies = asyncio.create_task(self._read_replies())

    async def ingest(self, request: bytes) -> bytes:
        """An IngestRequest's bytes -> its IngestResponse's bytes, once its events are durable and stored."""
        if self._gone is not None:
            raise self._gone
        call = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[call] = answer
        try:
            try:
                self._writer.write(_HEADER.pack(call, _MESSAGE, len(request)) + request)
                await self._writer.drain()
            except ConnectionError as e:
                raise IngestUnavailable("the ingest worker exited: restart the server") from e
            return await answer
        finally:
            self._waiting.pop(call, None)

    async def _read_replies(self) -> None:
        try:
            while True:
                call, status, payload = await _read_frame(self._reader)
                answer = self._waiting.get(call)
                if answer is not None and not answer.done():
                    if status == _MESSAGE:
                        answer.set_result(payload)
                    else:
                        answer.set_exception(RuntimeError(f"ingestion failed: {payload.decode()}"))
        except (asyncio.IncompleteReadError, ConnectionError):
            self._gone = IngestUnavailable("the ingest worker exited: restart the server")
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(self._gone)

    async def close(self, timeout_s: float = 60.0) -> None:
        """Close the worker's socket: it answers what it holds, flushes the behaviour log and exits."""
        if self.process is None:
            return
        self._writer.close()
        await asyncio.to_thread(self.process.join, timeout_s)
        if self.process.is_alive():
            self.process.kill()
        self._replies.cancel()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    call, status, size = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return call, status, await reader.readexactly(size)


def _receive(sock: socket.socket, calls: queue.SimpleQueue) -> None:
    """The worker's reader thread: frames into `calls`; None once the server has closed its end."""
    stream = sock.makefile("rb")
    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            calls.put(None)
            return
        call, _, size = _HEADER.unpack(header)
        calls.put((call, stream.read(size)))


def _work(sock: socket.socket, settings: IngestSettings) -> None:
    """The worker process: set up, say ready, then handle every call waiting as one group until the end."""
    from fin.quiet import quiet_library_notices

    quiet_library_notices()
    try:
        if settings.priority == "idle":  # threads started from here on inherit it
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif settings.priority != "normal":
            raise ValueError(f"unknown ingest priority {settings.priority!r}: idle or normal")
        from features.behaviour_log import BehaviourLog
        from features.realtime import open_realtime_at
        from serving.ingest import ingest_calls
        from serving.pb import ctr_scoring_pb2 as pb

        log = BehaviourLog(settings.log_folder, settings.utc_offset_hours)
        realtime = open_realtime_at(settings.realtime, settings.realtime_max_events)
    except Exception:  # noqa: BLE001 - the server reports it and does not start
        message = traceback.format_exc().encode()
        sock.sendall(_HEADER.pack(_READY, _ERROR, len(message)) + message)
        return
    sock.sendall(_HEADER.pack(_READY, _MESSAGE, 0))
    calls: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(sock, calls), name="ingest-receive", daemon=True).start()
    ended = False
    try:
        while not ended:
            group = [calls.get()]
            while not calls.empty():  # calls that arrived meanwhile share this group's costs
                group.append(calls.get())
            ended = group[-1] is None
            group = [c for c in group if c is not None]
            if not group:
                continue
            try:
                requests = [pb.IngestRequest.FromString(payload) for _, payload in group]
                results = ingest_calls([r.events for r in requests], settings.utc_offset_hours, log, realtime)
                replies = [(_MESSAGE, pb.IngestResponse(
                    accepted=r.accepted, duplicates=r.duplicates,
                    refused=[pb.RefusedEvent(index=i, reason=reason) for i, reason in r.refused]).SerializeToString())
                    for r in results]
            except Exception as e:  # noqa: BLE001 - every call of the group fails with it (nothing is acknowledged)
                replies = [(_ERROR, f"{type(e).__name__}: {e}".encode())] * len(group)
            try:
                sock.sendall(b"".join(_HEADER.pack(call, status, len(payload)) + payload
                                      for (call, _), (status, payload) in zip(group, replies)))
            except OSError:  # the server is gone: what it sent is written all the same
                ended = True
    finally:
        realtime.close()
        log.close()  # what is pending goes into the date partitions
