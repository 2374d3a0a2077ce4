"""Behaviours that arrive one call at a time, written into a log folder in the contract's layout, so the next
features run reads them with everything else.

`append` makes rows durable before it returns: each process appends them to its open segment under
`behaviours/_pending/` (`<stem>.arrows.open`, an Arrow IPC stream, one record batch per append, fdatasynced:
one disk flush per append, no file created), so an acknowledged event survives a crash of the process right
after the answer. `flush` closes the segment (renamed `<stem>.arrows`; the next append opens a new one) and
moves every closed segment into the contract's layout, one parquet file per local date
(`behaviours/date=YYYY-MM-DD/part-<first>-<last>.parquet`, each written to a temporary name, fsynced and
renamed, its metadata naming the segments it holds), then removes those segments. Every flush, and the next
start (`recover`), takes over what a killed process left (`_take_over`): a segment left open by a process
that is gone (it no longer holds the segment's lock) is closed with the batches it has whole (a torn last
batch was never acknowledged) and flushed; a flush that died after writing part files (it leaves a mark) is
finished from its segments, which it removes only once all its dates' part files are written (the dates
still missing are written, then the segments go); so every event lands in exactly one part file, also
while other processes sharing the folder stay up. A background thread
flushes every `flush_s` seconds and as soon as `flush_rows` rows are pending (an append waits at most for the
close of its segment, never for a flush's parquet writing); `close` flushes the rest. Server processes
sharing a folder each append to their own segment and flush one at a time (a lock file).

The features job reads the `.parquet` files under `behaviours/` (the pending segments are not).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from features import contract

TABLE = contract.BEHAVIOURS.name
PENDING = "_pending"
HOLDS = b"fin.pending_files"  # part file metadata: the pending files it was made of
FLUSHING = ".flushing"  # in the pending folder while a flush writes part files of segments it has not removed


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write(path: Path, write) -> None:
    """Write a file under a temporary name, fsync it, rename it into place and fsync its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _whole_batches(path: Path) -> pa.Table | None:
    """The record batches of a segment that were written whole (None: not even its schema was)."""
    try:
        reader = pa.ipc.open_stream(path.read_bytes())
    except (pa.ArrowInvalid, OSError):
        return None
    batches = []
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError):  # torn by a crash mid-append: that append was never acknowledged
            break
    return pa.Table.from_batches(batches, reader.schema)


def _names(path: Path, f) -> bool:
    """Whether `path` still names the open file `f`."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


class _Segment:
    """This process's open segment: an Arrow IPC stream it appends record batches to, holding an exclusive
    lock on the file for as long as it is open (so `_take_over` can tell a live writer's segment from a dead
    one's)."""

    def __init__(self, folder: Path, stem: str, schema: pa.Schema):
        self.path = folder / f"{stem}.arrows.open"
        new = folder / f".{stem}.arrows.new"  # locked before it carries the name `_take_over` looks for
        self.file = open(new, "xb")
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.writer = pa.ipc.new_stream(self.file, schema)
        self._sync()
        os.replace(new, self.path)
        _fsync_folder(folder)

    def _sync(self) -> None:
        self.file.flush()
        os.fdatasync(self.file.fileno())

    def append(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            self.writer.write_batch(batch)
        self._sync()

    def close(self) -> Path:
        """End the stream, rename it closed (`<stem>.arrows`) and only then release the file: a segment
        unlocked under its open name is a dead process's to another process's flush (`_take_over`)."""
        self.writer.close()
        self._sync()
        closed = self.path.with_suffix("")
        os.replace(self.path, closed)
        _fsync_folder(closed.parent)
        self.file.close()
        return closed


def _write_stream(f, table: pa.Table) -> None:
    with pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


class BehaviourLog:
    def __init__(self, folder: str | Path, utc_offset_hours: float, flush_rows: int = 50_000,
                 flush_s: float = 10.0):
        self.folder, self.utc_offset_hours = Path(folder), utc_offset_hours
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.pending = self.folder / TABLE / PENDING
        self.pending.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the pending row count
        self._flushing = threading.Lock()  # one flush (or recovery) at a time in this process
        self._sequence = itertools.count()
        self._pending_rows = 0
        self._closed = threading.Event()
        self._wake = threading.Event()  # set when `flush_rows` rows are pending
        self._segment: _Segment | None = None  # opened by the first append after a flush
        self._appending = threading.Lock()  # the segment: appends, and its close
        self.recover()
        self._flusher = threading.Thread(target=self._flush_every, name="behaviour-log", daemon=True)
        self._flusher.start()

    def append(self, rows: pl.DataFrame | pa.Table) -> None:
        """Rows of the contract's behaviours table, on disk when this returns."""
        if (rows.num_rows if isinstance(rows, pa.Table) else rows.height) == 0:
            return
        table = rows if isinstance(rows, pa.Table) else rows.select(contract.BEHAVIOURS.schema.names).to_arrow()
        if table.schema != contract.BEHAVIOURS.schema:
            table = table.select(contract.BEHAVIOURS.schema.names).cast(contract.BEHAVIOURS.schema)
        with self._appending:
            if self._segment is None:
                stem = f"{time.time_ns():020d}-{os.getpid():08d}-{next(self._sequence):08d}"  # sorts by time
                self._segment = _Segment(self.pending, stem, contract.BEHAVIOURS.schema)
            self._segment.append(table)
        with self._lock:
            self._pending_rows += table.num_rows
            if self._pending_rows >= self.flush_rows:
                self._wake.set()  # the flusher thread moves them: appends never wait for a flush

    def _close_segment(self) -> None:
        with self._appending:
            if self._segment is not None:
                self._segment.close()
                self._segment = None

    def flush(self) -> int:
        """Move every pending row into the date partitions; returns how many. Server processes sharing the
        folder flush one at a time (a lock file); each flush first takes over what a process that is gone
        left (`_take_over`)."""
        return self._flush(all_parts=False)

    def recover(self) -> int:
        """At a start, after a crash: a flush that finishes every flush that died (of any flush: also of a log
        written before flushes left a mark)."""
        return self._flush(all_parts=True)

    def _flush(self, all_parts: bool) -> int:
        self._close_segment()  # appends go on meanwhile, into a new segment this flush does not list
        with self._flushing, open(self.pending / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._take_over(all_parts)
            files = sorted(self.pending.glob("*.arrows"))
            if not files:
                return 0
            _durable_write(self.pending / FLUSHING, lambda f: None)  # until the segments are gone
            rows = self._write_parts(files)
            for f in files:
                f.unlink()
            (self.pending / FLUSHING).unlink()
            with self._lock:
                self._pending_rows = max(0, self._pending_rows - rows)
            return rows

    def _write_parts(self, files: list[Path], missing_only: bool = False) -> int:
        """The rows of closed segments `files` as one part file per local date, named by the first and last
        segment and naming every one of them (what `_take_over` reads back); with `missing_only`, only the
        dates whose part file is not there yet (the rest of a flush that died among its dates)."""
        table = pa.concat_tables(pa.ipc.open_stream(f.read_bytes()).read_all() for f in files)
        day = (table["ts"].to_numpy() + int(self.utc_offset_hours * 3_600_000)) // 86_400_000
        name = f"part-{files[0].stem}-{files[-1].stem}.parquet"
        holds = {HOLDS: ",".join(f.stem for f in files).encode()}
        for d in np.unique(day):
            path = self.folder / TABLE / f"date={np.datetime64(int(d), 'D').astype(str)}" / name
            if not (missing_only and path.exists()):
                part = table.filter(pa.array(day == d)).replace_schema_metadata(holds)
                _durable_write(path, lambda f, part=part: pq.write_table(part, f))
        return table.num_rows

    def _take_over(self, all_parts: bool) -> None:
        """Under the folder's lock: close the open segments of processes that are gone (they no longer hold
        their lock) with the batches they have whole; and where a flush died after writing part files (its
        mark is left; or with `all_parts`), finish it: a flush removes its segments only after all its dates'
        part files are written, so while every segment a part file names is still here, some dates may be
        missing and are written from them, then the segments go. Every event lands in one part file, however
        long the other processes sharing the folder have been up."""
        for path in [*self.pending.glob("*.arrows.open"), *self.pending.glob(".*.arrows.new")]:
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # closed by its live writer meanwhile
                continue
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's segment
                if not _names(path, f):
                    continue  # renamed closed by its writer between the listing and the lock: not left open
                whole = None if path.name.startswith(".") else _whole_batches(path)
                if whole is not None and whole.num_rows:
                    stem = path.name.removesuffix(".arrows.open")
                    _durable_write(self.pending / f"{stem}.arrows", lambda out, t=whole: _write_stream(out, t))
                path.unlink()
        mark = self.pending / FLUSHING
        if (all_parts or mark.exists()) and any(self.pending.glob("*.arrows")):
            flushes = {(pq.read_schema(part).metadata or {}).get(HOLDS, b"")
                       for part in (self.folder / TABLE).glob("date=*/part-*.parquet")}
            for held in flushes:
                segments = [self.pending / f"{stem}.arrows" for stem in filter(None, held.decode().split(","))]
                present = [s for s in segments if s.exists()]
                if present and len(present) == len(segments):
                    self._write_parts(segments, missing_only=True)
                for s in present:
                    s.unlink()
        mark.unlink(missing_ok=True)

    def _flush_every(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if not self._closed.is_set():
                self.flush()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._flusher.join()
        self.flush()
