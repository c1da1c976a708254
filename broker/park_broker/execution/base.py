"""The executor interface: how the job lifecycle hands work to something that runs it.

An executor receives `Task`s, reports `started` and exactly one `finished` per
task it started, and can be asked to cancel. It knows nothing about conditions,
the store or the network; the job manager does not know which executor runs.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from park_broker.execution.accounts import Account


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    job_id: str
    attempt: int
    owner: str                     # a warm process serves one user: it never takes another's job
    account: Account | None = None  # the Unix account it runs as; None: the broker's (execution.accounts)
    kind: str                      # "call" or "command"
    target: str = ""               # "package.module:function" for calls
    args_json: str = ""
    kwargs_json: str = ""
    argv: tuple[str, ...] = ()
    work_dir: str = ""             # where the attempt runs and leaves what it made (chosen when it is handed
                                   # to the executor: `placed`); the broker moves it into place
    output_name: str
    env: dict[str, str] = field(default_factory=dict)
    python_path: tuple[str, ...] = ()   # package directories the job requires, first on sys.path
    timeout: float = 0.0           # seconds the attempt may run before it is terminated and fails; 0: no limit
    cpus: float = 1.0              # what it asked of the site (core.fairness); its GPUs are in env
    memory_limit: int = 0          # bytes it may allocate; 0: no limit
    gpus: int = 0

    def placed(self, work_dir: str) -> Task:
        """This attempt, to run in `work_dir`, which the job finds in PARK_JOB_DIR."""
        return dataclasses.replace(self, work_dir=work_dir, env={
            **self.env, "PARK_JOB_DIR": work_dir, "PARK_JOB_FILENAME": os.path.join(work_dir, self.output_name)})

    def message(self) -> dict[str, object]:
        """What a worker process reads to run the attempt (`execution.worker.run_task`), JSON-ready."""
        return {"kind": self.kind, "target": self.target, "args_json": self.args_json, "kwargs_json": self.kwargs_json,
                "argv": self.argv, "work_dir": self.work_dir, "output_name": self.output_name, "env": self.env,
                "memory_limit": self.memory_limit}


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    ok: bool
    result_json: str = ""
    result_file: str = ""          # path, when the result was kept as a file
    result_format: str = ""        # "json" or "pickle"
    error: str = ""
    traceback: str = ""
    outputs: tuple[tuple[str, str, int, str], ...] = ()   # (name, path, size, sha256)
    # The attempt wrote no log line and no file and left no process: the job keeps no directory (core.attempts).
    left_nothing: bool = False


StartedCallback = Callable[[str, int], None]             # (job_id, attempt)
FinishedCallback = Callable[[str, int, Outcome], None]   # (job_id, attempt, outcome)
# (job_id, attempt, reports): progress an executor received from the attempt itself (the local one does);
# raises BrokerError for reports it cannot take, which the executor logs and drops.
ReportsCallback = Callable[[str, int, list[dict[str, float]]], Awaitable[None]]


class Executor(Protocol):
    async def start(self, on_started: StartedCallback, on_finished: FinishedCallback) -> None: ...

    def submit(self, task: Task) -> None:
        """Queue a task; returns at once."""

    def cancel(self, job_id: str) -> None:
        """Drop a queued task, or terminate a running one (then kill it after a grace period).

        A cancelled task is not reported as finished."""

    def capacity(self) -> int | None:
        """How many tasks it runs at once (the broker holds the rest, core.fairness); None: give it every
        task, it queues them itself."""

    async def close(self) -> None: ...
