"""The job functions bench/throughput.py runs: importable by Park's workers (via --python-path) and Dask's."""
from __future__ import annotations

from typing import Any


def noop(*args: Any) -> None:
    """Do nothing: the benchmark measures the scheduler, not the work."""
    return None
