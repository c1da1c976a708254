"""Handing committed QUEUED jobs to whatever runs them, stopping them, and taking in what they made.

Python calls and command lines go to the executor as `Task`s; fetch jobs are
network work the broker does itself (transfer.fetches); an install job waits
for its upload (packages.installs), not for a runner. The dispatcher is the
ledger's `release`: it only ever sees jobs whose QUEUED state is committed.

Each attempt runs in a directory of its own (core.attempts), chosen when the
fair queue hands the attempt to its executor. When an executor reports an
attempt's end, `finished` adopts that directory only if the attempt is the job's
current one; a stale attempt's directory (one that outlived a crash or a
cancellation) is removed instead, so it can never replace a recorded result.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from park._proto import jobs_pb2 as jpb
from park.wire import TERMINAL_STATES
from park_broker.core.admission import DEFAULT_OUTPUT
from park_broker.core.attempts import AttemptDirs
from park_broker.core.fairness import NO_LIMITS, FairQueue, Limits
from park_broker.core.ledger import Ledger
from park_broker.errors import BrokerError
from park_broker.execution.accounts import AccountError, Accounts
from park_broker.execution.base import Executor, Outcome, Task
from park_broker.packages.store import PackageStore
from park_broker.site import SiteInfo


class Fetcher(Protocol):
    def start(self, job: jpb.Job) -> None: ...
    def cancel(self, job_id: str) -> None: ...


class Dispatcher:
    def __init__(self, site: SiteInfo, ledger: Ledger, executor: Executor, packages: PackageStore,
                 report_token: Callable[[str, int], str], accounts: Accounts,
                 limits: Callable[[str], Limits] = lambda owner: NO_LIMITS):
        self.site = site
        self.accounts = accounts
        # The site's resources count for the executor that has slots of its own (the local one).
        capacity = executor.capacity()
        self.queue = FairQueue(self._hand_over, capacity, site.resources if capacity is not None else None, limits)
        self.ledger = ledger
        self.executor = executor
        self.packages = packages
        self.fetcher: Fetcher | None = None   # set when the site has peers to fetch from
        self._attempts: dict[str, Task] = {}   # job id -> its attempt queued or running, not yet ended
        self.attempts = AttemptDirs(str(site.files_root), accounts)
        self._report_token = report_token
        # Set by the lifecycle to the state machine's: failing a job that cannot start after all, and
        # an adopted outcome of a current attempt.
        self.refuse: Callable[[str, Outcome], None] = lambda job_id, outcome: None
        self.on_finished: Callable[[str, int, Outcome], None] = lambda job_id, attempt, outcome: None
        # Whether a queued fetch's token is good enough to start with (core.credentials).
        self.may_fetch: Callable[[jpb.Job], bool] = lambda job: True

    def release(self, queued: list[str]) -> None:
        """Start each committed QUEUED job (unless it was cancelled meanwhile)."""
        for job_id in queued:
            job = self.ledger.record(job_id)
            if job is None or job.state != jpb.JOB_STATE_QUEUED or job.spec.WhichOneof("work") == "install":
                continue
            if job.spec.WhichOneof("work") == "fetch":
                assert self.fetcher is not None   # admission refuses fetches from sites that are not peers
                if self.may_fetch(job):           # else it waits, queued, for its owner to renew the token
                    self.fetcher.start(job)
                continue
            try:
                task = self._task(job)
            except BrokerError as exc:   # a package it requires was not installed after all
                self.refuse(job.id, Outcome(ok=False, error=exc.message))
                continue
            except AccountError as exc:   # its user has no account (any more) to run as
                self.refuse(job.id, Outcome(ok=False, error=f"the job cannot start at site {self.site.name}: {exc}"))
                continue
            self._attempts[task.job_id] = task
            self.queue.add(task, job.spec.priority)

    def finished(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """An executor's outcome: adopted for the job's current attempt, discarded for any other."""
        task = self._attempts.get(job_id)
        if task is None or task.attempt != attempt:   # not one this broker started, or one already ended
            return
        del self._attempts[job_id]
        self.queue.ended(job_id)
        work = task.work_dir
        job = self.ledger.record(job_id)
        if job is None or job.state in TERMINAL_STATES or job.attempts != attempt:
            self.attempts.discard(work)
            return
        self.on_finished(job_id, attempt,
                         self.attempts.adopt(job_id, attempt, work, job.directory, outcome, task.account))

    def stop(self, job_id: str) -> None:
        """End a queued or running job's attempt, wherever it runs; the executor removes what it left,
        and nothing it reports later is adopted."""
        task = self._attempts.pop(job_id, None)
        if task is not None and not self.queue.drop(job_id):   # it had been handed over: its slot is free now
            self.queue.ended(job_id)
        self.executor.cancel(job_id)
        if self.fetcher is not None:
            self.fetcher.cancel(job_id)

    def running_dir(self, job_id: str, owner: str) -> str | None:
        """The directory of `owner`'s job's current attempt, if it has one here: "" while the attempt waits its
        turn (it has no directory yet)."""
        task = self._attempts.get(job_id)
        return task.work_dir if task is not None and task.owner == owner else None

    def hand_over(self, owner: str, directory: Path) -> None:
        """Give a directory the broker itself filled (a fetch's) to the account `owner`'s jobs run as."""
        self.accounts.hand_over(directory, self.accounts.of(owner))

    def _hand_over(self, task: Task) -> None:
        """The fair queue's turn for `task`: its directory is chosen now (not while it waited), then it runs."""
        try:
            task = task.placed(self.attempts.make(task.owner, task.account))
        except OSError as exc:
            # After the queue's pump returns: ending the slot pumps again.
            asyncio.get_running_loop().call_soon(self._cannot_start, task, exc)
            return
        self._attempts[task.job_id] = task
        self.executor.submit(task)

    def _cannot_start(self, task: Task, exc: OSError) -> None:
        current = self._attempts.get(task.job_id)
        if current is None or current.attempt != task.attempt:   # stopped meanwhile
            return
        del self._attempts[task.job_id]
        self.queue.ended(task.job_id)
        self.refuse(task.job_id, Outcome(ok=False, error=f"the job cannot start at site {self.site.name}: {exc}"))

    def _task(self, job: jpb.Job) -> Task:
        spec = job.spec
        attempt = job.attempts + 1
        account = self.accounts.of(job.owner)
        output = spec.output_name or DEFAULT_OUTPUT
        env = {"PARK_JOB_ID": job.id, "PARK_SITE": self.site.name, "PARK_JOB_URL": job.url,
               "PARK_BROKER_ADDRESS": self.site.address, "PARK_BROKER_CERT": self.site.cert_path,
               "PARK_REPORT_TOKEN": self._report_token(job.id, attempt)}   # and its directory's, once placed
        python_path = tuple(str(d) for d in self.packages.resolve(list(spec.requires), job.owner))
        common = dict(job_id=job.id, attempt=attempt, owner=job.owner, account=account, output_name=output,
                      env=env, python_path=python_path,
                      timeout=spec.timeout or self.site.max_walltime, cpus=spec.resources.cpus or 1.0,
                      memory_limit=spec.resources.memory_bytes, gpus=spec.resources.gpus)
        if spec.WhichOneof("work") == "call":
            return Task(kind="call", target=spec.call.target, args_json=spec.call.args_json,
                        kwargs_json=spec.call.kwargs_json, **common)  # type: ignore[arg-type]
        return Task(kind="command", argv=tuple(spec.command.argv), **common)  # type: ignore[arg-type]

