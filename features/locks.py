"""An exclusive lock on a file beside what one process at a time may work on (a scheduler's state database, a
training run's checkpoints). The system drops it with its process, so a killed holder leaves none behind."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


def hold(path: str | Path) -> IO | None:
    """The lock at `path` (created with its folder), held until the returned file is closed or the process ends;
    None when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock
