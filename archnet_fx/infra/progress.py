"""One-line stage summaries for long runs (logger ``archnet_fx.progress``).

The library never prints. Stages that take more than a moment log one INFO line on the
``archnet_fx.progress`` logger when they end (``capture: torch.export, 412 nodes (2.3 s)``);
the command line shows these lines by default (``-q`` hides them), and a Python caller sees
them with ``logging.getLogger("archnet_fx.progress").setLevel(logging.INFO)`` and a handler.
Long loops inside a stage show tqdm bars (``progress=True``).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

PROGRESS = logging.getLogger("archnet_fx.progress")


class Stage:
    """What a :func:`stage` block reports: set ``detail`` to say what it did."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.detail = ""
        self.seconds = 0.0


@contextlib.contextmanager
def stage(name: str) -> Iterator[Stage]:
    """Time a stage and log ``name: detail (N.N s)`` when it ends without an error."""
    st = Stage(name)
    PROGRESS.debug("%s ...", name)
    t0 = time.perf_counter()
    yield st
    st.seconds = time.perf_counter() - t0
    PROGRESS.info("%s%s (%.1f s)", name, f": {st.detail}" if st.detail else "", st.seconds)
