"""Behaviours that arrive one call at a time, written into a log folder in the contract's layout, so the next
features run reads them with everything else.

`append` makes rows durable before it returns: they go to a pending file (Arrow IPC, written, fsynced and
renamed into `behaviours/_pending/`), so an acknowledged event survives a crash of the process right after
the answer. `flush` moves what is pending into the contract's layout, one parquet file per local date
(`behaviours/date=YYYY-MM-DD/part-<first>-<last>.parquet`, each written to a temporary name, fsynced and
renamed, its metadata naming the pending files it holds), then removes those pending files. A crash
between the two is undone at the next start (`recover`): pending files that a part file names are
removed, the rest flushed, so every event lands in exactly one part file. A background thread flushes
every `flush_s` seconds and as soon as `flush_rows` rows are pending (appends never wait for a flush:
they add files a running flush has not listed); `close` flushes the rest. Server processes sharing a
folder flush one at a time (a lock file).

The features job reads the `.parquet` files under `behaviours/` (the pending `.arrows` files are not).
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


def _durable_write(path: Path, write) -> None:
    """Write a file under a temporary name, fsync it, rename it into place and fsync its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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
        self.recover()
        self._flusher = threading.Thread(target=self._flush_every, name="behaviour-log", daemon=True)
        self._flusher.start()

    def append(self, rows: pl.DataFrame) -> None:
        """Rows of the contract's behaviours table, on disk when this returns."""
        if rows.height == 0:
            return
        table = rows.select(contract.BEHAVIOURS.schema.names).to_arrow().cast(contract.BEHAVIOURS.schema)
        name = f"{time.time_ns():020d}-{os.getpid():08d}-{next(self._sequence):08d}.arrows"  # sorts by time

        def write(f):
            with pa.ipc.new_stream(f, table.schema) as writer:
                writer.write_table(table)

        _durable_write(self.pending / name, write)
        with self._lock:
            self._pending_rows += rows.height
            if self._pending_rows >= self.flush_rows:
                self._wake.set()  # the flusher thread moves them: appends never wait for a flush

    def flush(self) -> int:
        """Move every pending row into the date partitions; returns how many. Server processes sharing the
        folder flush one at a time (a lock file)."""
        # appends go on meanwhile: they add files this flush has not listed
        with self._flushing, open(self.pending / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            files = sorted(self.pending.glob("*.arrows"))
            if not files:
                return 0
            table = pa.concat_tables(pa.ipc.open_stream(f.read_bytes()).read_all() for f in files)
            day = (table["ts"].to_numpy() + int(self.utc_offset_hours * 3_600_000)) // 86_400_000
            name = f"part-{files[0].stem}-{files[-1].stem}.parquet"
            holds = {HOLDS: ",".join(f.stem for f in files).encode()}  # what `recover` reads back
            for d in np.unique(day):
                date = np.datetime64(int(d), "D").astype(str)
                part = table.filter(pa.array(day == d)).replace_schema_metadata(holds)
                _durable_write(self.folder / TABLE / f"date={date}" / name,
                               lambda f, part=part: pq.write_table(part, f))
            for f in files:
                f.unlink()
            with self._lock:
                self._pending_rows = max(0, self._pending_rows - table.num_rows)
            return table.num_rows

    def recover(self) -> int:
        """After a crash: drop pending files a part file already holds, flush the others."""
        with self._flushing, open(self.pending / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if any(self.pending.glob("*.arrows")):
                for part in (self.folder / TABLE).glob("date=*/part-*.parquet"):
                    held = (pq.read_schema(part).metadata or {}).get(HOLDS, b"")
                    for stem in filter(None, held.decode().split(",")):
                        (self.pending / f"{stem}.arrows").unlink(missing_ok=True)
        return self.flush()

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
