"""Logging and progress bars for every long step: `ebr` logs to stderr (--verbose / --quiet), and
bars show only on a terminal, so CI logs hold lines, not thousands of bar refreshes."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("ebr")


def setup(level: int = logging.INFO) -> None:
    """Messages to stderr as plain lines (the CLI calls this; a library user configures logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def bars_enabled(progress: bool = True) -> bool:
    """Bars only when asked for, on a terminal, and not under --quiet."""
    return progress and sys.stderr.isatty() and log.getEffectiveLevel() <= logging.INFO


def bar(total: int | None = None, desc: str = "", progress: bool = True, **kw: Any):
    """A tqdm bar on stderr, disabled unless `bars_enabled(progress)`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not bars_enabled(progress), file=sys.stderr, mininterval=2.0, **kw)
