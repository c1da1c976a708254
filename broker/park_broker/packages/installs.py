"""Install jobs: an uploaded wheel, checked against what its install job declared, installed, and the job settled.

`install_service` submits an install job (name, version, wheel file name and
sha256) and then uploads the wheel (`Packages.Upload`). The job completes with
the installed package's reference, or fails with the refusal, which the
uploader also receives.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES
from park_broker.core.ledger import Ledger
from park_broker.core.transitions import Transitions
from park_broker.errors import BrokerError, Code, fail
from park_broker.execution.base import Outcome
from park_broker.packages.store import PackageStore


class Installs:
    def __init__(self, ledger: Ledger, transitions: Transitions, packages: PackageStore):
        self.ledger = ledger
        self.transitions = transitions
        self.packages = packages

    async def install(self, caller: str, job_id: str, sha256: str, wheel: Path, filename: str) -> jpb.Job:
        """Install an uploaded wheel for install job `job_id` and finish the job with the outcome.

        The upload must match the job's declared file name and digest. A refused
        wheel fails the job and raises the refusal for the uploader."""
        job = await self.ledger.get(caller, job_id)
        if job.spec.WhichOneof("work") != "install":
            fail(Code.INVALID_ARGUMENT, f"job {job_id} is not an install job")
        if (job.spec.install.sha256, job.spec.install.filename) != (sha256, filename):
            fail(Code.INVALID_ARGUMENT, f"the upload is not the wheel job {job_id} was submitted for")
        if job.state == jpb.JOB_STATE_COMPLETED:
            return job
        if job.state != jpb.JOB_STATE_QUEUED:
            fail(Code.FAILED_PRECONDITION, f"install job {job_id} is {STATE_NAMES[job.state]}, not waiting for "
                                           "its upload")
        try:
            owner = "" if job.spec.install.site_wide else job.owner
            ref = await asyncio.to_thread(self.packages.install_wheel, wheel, sha256, filename, owner=owner)
        except BrokerError as exc:
            self.transitions.settle(job.id, Outcome(ok=False, error=exc.message))
            raise
        self.transitions.settle(job.id, Outcome(ok=True, result_json=json.dumps(
            {"name": ref.name, "version": ref.version, "sha256": ref.sha256})))
        return await self.ledger.get(caller, job_id)
