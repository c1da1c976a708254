"""Progress reports of running jobs (`park.report`), and the job-scoped tokens they are sent with.

A running attempt reaches its broker with a token that names the job and the
attempt and is an HMAC under a key that lives only in this process, so tokens
die with the broker, as attempts do. Each report becomes an `Improved` event,
and the `improved(...)` atoms it satisfies resolve in the same batch.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets

from park._proto import jobs_pb2 as jpb
from park.conditions import State
from park_broker.core.admission import Admission
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.scheduler import Scheduler
from park_broker.core.transitions import Transitions
from park_broker.errors import Code, fail

MAX_REPORT_VALUES = 64
_VALUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TOKEN = re.compile(r"(?P<job>[a-z2-7]{26})\.(?P<attempt>[0-9]{1,9})\.[0-9a-f]{64}", re.ASCII)


class ReportTokens:
    """Job-scoped tokens: `issue` for an attempt, `check` a presented one."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def issue(self, job_id: str, attempt: int) -> str:
        subject = f"{job_id}.{attempt}"
        return f"{subject}.{hmac.new(self._key, subject.encode(), hashlib.sha256).hexdigest()}"

    def check(self, token: str) -> tuple[str, int]:
        """The (job id, attempt) a job-scoped token was issued for; UNAUTHENTICATED if it is not ours."""
        match = _TOKEN.fullmatch(token)
        if match is None or not hmac.compare_digest(self.issue(match["job"], int(match["attempt"])).encode(),
                                                    token.encode()):
            fail(Code.UNAUTHENTICATED, "the report token is not valid for any job attempt of this broker")
        return match["job"], int(match["attempt"])


class ProgressReports:
    def __init__(self, ledger: Ledger, scheduler: Scheduler, admission: Admission, transitions: Transitions):
        self.ledger = ledger
        self.scheduler = scheduler
        self.admission = admission
        self.transitions = transitions

    async def report(self, job_id: str, attempt: int, reports: list[dict[str, float]]) -> None:
        """Record progress reports of a running attempt and resolve the improved(...) atoms they satisfy."""
        job = self.ledger.record(job_id)
        if job is None or job.state != jpb.JOB_STATE_RUNNING or job.attempts != attempt:
            fail(Code.FAILED_PRECONDITION, f"job {job_id} attempt {attempt} is not running; its reports are ignored")
        for values in reports:
            if len(values) > MAX_REPORT_VALUES:
                fail(Code.INVALID_ARGUMENT, f"a report holds at most {MAX_REPORT_VALUES} values")
            for name, value in values.items():
                if not _VALUE_NAME.fullmatch(name) or not math.isfinite(value):
                    fail(Code.INVALID_ARGUMENT, f"report value {name[:70]!r}={value} needs an identifier name "
                                                "and a finite number")
        batch = Batch()
        self.ledger.add_reports(job_id, reports)
        for i, values in enumerate(reports):
            job.progress.clear()
            job.progress.update(values)
            # The job's row is rewritten once per batch, with the last report's values.
            batch.changes.append(self.ledger.change(job, jpb.Event(improved=jpb.Improved(values=values)),
                                                    record=i == len(reports) - 1))
            self.transitions.resolve_all({key: State.READY for key in self.scheduler.improved_atoms(job_id)
                                          if self.admission.expression(key.expr).evaluate(values)}, batch)
        await self.ledger.commit(batch)
