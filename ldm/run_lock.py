"""One training process per run directory: `main.py -r RUN` twice at once would interleave two trainings'
checkpoints and metrics in one place.

The lock is an advisory `fcntl.flock` on ``RUN/.lock``, held for the life of the process that trains: the
operating system releases it when that process ends in any way (SIGKILL included), so a killed run never
leaves a stale lock behind. The file keeps the holder's process id and start time for the message a second
process prints. On systems without `fcntl` (Windows) runs are not locked.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import IO, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
_held: list[IO[str]] = []  # open lock files of this process: closing one would release its lock


class RunLocked(RuntimeError):
    """Another process is training in the run directory."""


def lock_run(logdir: Path) -> Optional[Path]:
    """Lock `logdir` for this process (until it exits), or raise `RunLocked` naming the process that holds it."""
    if fcntl is None:
        return None
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLocked(f"{logdir} is being trained by {holder}; wait for it to finish or stop it, then run "
                        "this command again (two processes in one run would mix their checkpoints and metrics)")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} (started {datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n")
    handle.flush()
    _held.append(handle)
    return path
