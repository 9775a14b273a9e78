"""What the commands print: library messages go through `logging` (each module's logger under ``ldm``), and a
command decides how much of it a user sees. Training shows the run's messages (the latent scale it measured, the
cache, the vocabulary, where a stopped run was saved: its console is the run's log); the sampling commands show
warnings only, and everything with ``--verbose``. Python users get logging's default: warnings only.
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO


class _Source(logging.Filter):
    """``[ldm]`` for the toolkit's own modules, the logger's name for anything else (Lightning, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.source = "ldm" if record.name.split(".")[0] == "ldm" else record.name
        return True


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record comes (a redirected console, a test's capture), not to
    the stream there was when logging was set up."""

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: int = logging.WARNING) -> None:
    """Print log records of `level` and above on stdout, one line each: ``[ldm] message``."""
    handler = _Stdout()
    handler.addFilter(_Source())
    handler.setFormatter(logging.Formatter("[%(source)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
