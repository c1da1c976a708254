"""The job function bench/federation.py runs, at both Park brokers (via --python-path) and on Dask's workers."""
from __future__ import annotations

import os
import time
from typing import Any


def link(i: int, prev: Any = None, delay: float = 0.0, gate: str = "", poll: float = 0.0005) -> dict[str, float]:
    """One job of a pair or chain: `start` is stamped first thing, `end` last thing.

    `prev` is the upstream result (Dask passes it; Park waits on a condition
    instead). With `gate`, first wait until that file exists (polled every
    `poll` s): a run is released at once, after everything has been submitted.
    `delay` seconds of sleep spread the completions of one wave."""
    start = time.time()
    if gate:
        deadline = time.monotonic() + 300
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gate} never appeared")
            time.sleep(poll)
    if delay:
        time.sleep(delay)
    return {"i": i, "start": start, "end": time.time()}
