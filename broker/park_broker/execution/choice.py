"""Choosing the executor: `--executor local` or `--executor dask://HOST:PORT`.

Owns the spelling of executor specifications and the construction of the one
the broker serves with. The Dask executor is imported only when asked for, so a
broker without the `[dask]` extra never imports `distributed`.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from park_broker.execution.base import Executor
from park_broker.site import SiteError

DASK_PREFIX = "dask://"


def executor_spec(text: str) -> str:
    """Validate an `--executor` value (for argparse): `local`, or `dask://HOST:PORT` with a numeric port."""
    if text == "local":
        return text
    if text.startswith(DASK_PREFIX):
        host, _, port = text[len(DASK_PREFIX):].rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host:
            return text
    raise argparse.ArgumentTypeError(f"{text!r} is not an executor: use local or dask://HOST:PORT "
                                     "(the address of a running dask.distributed scheduler)")


def executor_kind(spec: str) -> str:
    """What Site.Info reports: "local" or "dask" (never the scheduler's address)."""
    return "dask" if spec.startswith(DASK_PREFIX) else "local"


def make_executor(executor: str, *, state: Path, workers: int | None, python_path: list[str],
                  grace: float, nice: int = 10, warm: bool = True) -> Executor:
    """The executor `executor` (an `--executor` value) names, keeping what it must remember across restarts
    under `state`; SiteError if it cannot be built here."""
    try:
        spec = executor_spec(executor)
    except argparse.ArgumentTypeError as exc:
        raise SiteError(str(exc)) from exc
    if executor_kind(spec) == "local":
        from park_broker.execution.groups import ProcessGroups
        from park_broker.execution.local import LocalExecutor

        return LocalExecutor(ProcessGroups(state / "groups"), workers=workers, python_path=python_path, grace=grace,
                             nice=nice, warm=warm)
    try:
        from park_broker.execution.dask_executor import DaskExecutor
    except ImportError as exc:
        raise SiteError(f"--executor {spec} needs dask.distributed on the broker: "
                        f"pip install 'park[dask]' ({exc})") from exc
    site = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12]
    return DaskExecutor("tcp://" + spec[len(DASK_PREFIX):], site, python_path=python_path, grace=grace)
