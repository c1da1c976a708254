"""Handing committed QUEUED jobs to whatever runs them, and stopping them again.

Python calls and command lines go to the executor as `Task`s; fetch jobs are
network work the broker does itself (transfer.fetches); an install job waits
for its upload (packages.installs), not for a runner. The dispatcher is the
ledger's `release`: it only ever sees jobs whose QUEUED state is committed.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from park._proto import jobs_pb2 as jpb
from park_broker.core.admission import DEFAULT_OUTPUT
from park_broker.core.ledger import Ledger
from park_broker.errors import BrokerError
from park_broker.execution.base import Executor, Outcome, Task
from park_broker.packages.store import PackageStore
from park_broker.site import SiteInfo


class Fetcher(Protocol):
    def start(self, job: jpb.Job) -> None: ...
    def cancel(self, job_id: str) -> None: ...


class Dispatcher:
    def __init__(self, site: SiteInfo, ledger: Ledger, executor: Executor, packages: PackageStore,
                 report_token: Callable[[str, int], str]):
        self.site = site
        self.ledger = ledger
        self.executor = executor
        self.packages = packages
        self.fetcher: Fetcher | None = None   # set when the site has peers to fetch from
        self._report_token = report_token
        # Fails a job that cannot start after all; set by the lifecycle to the state machine's settle.
        self.refuse: Callable[[str, Outcome], None] = lambda job_id, outcome: None

    def release(self, queued: list[str]) -> None:
        """Start each committed QUEUED job (unless it was cancelled meanwhile)."""
        for job_id in queued:
            job = self.ledger.record(job_id)
            if job is None or job.state != jpb.JOB_STATE_QUEUED or job.spec.WhichOneof("work") == "install":
                continue
            if job.spec.WhichOneof("work") == "fetch":
                assert self.fetcher is not None   # admission refuses fetches from sites that are not peers
                self.fetcher.start(job)
                continue
            try:
                task = self._task(job)
            except BrokerError as exc:   # a package it requires was not installed after all
                self.refuse(job.id, Outcome(ok=False, error=exc.message))
                continue
            self.executor.submit(task)

    def stop(self, job_id: str) -> None:
        """End a queued or running job's attempt, wherever it runs."""
        self.executor.cancel(job_id)
        if self.fetcher is not None:
            self.fetcher.cancel(job_id)

    def _task(self, job: jpb.Job) -> Task:
        spec = job.spec
        final = Path(job.directory)
        attempt = job.attempts + 1
        work = final.parent / f".{job.id}.attempt-{attempt}"
        output = spec.output_name or DEFAULT_OUTPUT
        env = {"PARK_JOB_ID": job.id, "PARK_SITE": self.site.name, "PARK_JOB_DIR": str(work),
               "PARK_JOB_FILENAME": str(work / output), "PARK_JOB_URL": job.url,
               "PARK_BROKER_ADDRESS": self.site.address, "PARK_BROKER_CERT": self.site.cert_path,
               "PARK_REPORT_TOKEN": self._report_token(job.id, attempt)}
        python_path = tuple(str(d) for d in self.packages.resolve(list(spec.requires)))
        common = dict(job_id=job.id, attempt=attempt, work_dir=work, final_dir=final, output_name=output, env=env,
                      python_path=python_path)
        if spec.WhichOneof("work") == "call":
            return Task(kind="call", target=spec.call.target, args_json=spec.call.args_json,
                        kwargs_json=spec.call.kwargs_json, **common)  # type: ignore[arg-type]
        return Task(kind="command", argv=tuple(spec.command.argv), **common)  # type: ignore[arg-type]
