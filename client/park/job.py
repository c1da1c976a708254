"""Job proxies: the client's handle on a job at a broker.

A `Job` is usable as soon as `submit` returns: its id, url and filename are
known, and its atoms (`iscompleted`, `iscancelled`, `isfinished`) can gate
later submissions. Anything that needs the broker's answer (state, result,
events) first waits for the submission to be acknowledged and raises
`SubmitError` if it was refused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.protobuf import json_format

from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES, TERMINAL_STATES
from park.conditions import Atom, AtomKey, State
from park.connection import Connection
from park.downloads import Progress, fetch, file_path, read_from
from park.causes import RootCause, root_cause
from park.config import load_services
from park.errors import ConfigError, JobCancelled, JobFailed, ServiceError, SubmitError
from park.sites import RecordsBySite
from park.counting import count_state
from park.expressions import Expression, improved_state


__all__ = ["Job", "JobEvent", "MemoReport", "Race", "ResultFile"]

_RECONNECT_FOR = 60.0


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's event stream (`kind` is submitted, queued, started, completed, ...)."""

    seq: int
    job_id: str
    time: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, event: jpb.Event) -> JobEvent:
        kind = event.WhichOneof("kind") or "unknown"
        detail = json_format.MessageToDict(getattr(event, kind)) if kind != "unknown" else {}
        return cls(event.seq, event.job_id, event.time, kind, detail)

    @property
    def terminal(self) -> bool:
        return self.kind in ("completed", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class MemoReport:
    """`hit`: the submission was answered with an earlier job (`job_id`). Otherwise
    `differences` says what changed since `nearest_id`, the last run of the same callable."""

    hit: bool
    job_id: str
    nearest_id: str
    differences: tuple[str, ...]


@dataclass(slots=True)
class Pending:
    """A submission on its way to the broker, acknowledged (`ref`) or refused (`error`) once its batch is
    answered. `answered` is its service's condition, notified once per batch answered (an Event per job
    would cost more than the rest of its way through the client)."""

    spec: jpb.JobSpec
    answered: threading.Condition
    ref: jpb.JobRef | None = None
    error: SubmitError | None = None

    def wait(self, timeout: float | None) -> bool:
        """Whether the submission was acknowledged or refused within `timeout` seconds."""
        with self.answered:
            return self.answered.wait_for(lambda: self.ref is not None or self.error is not None, timeout)


@dataclass(frozen=True, slots=True)
class ResultFile:
    """A result kept as a file on the broker's site (too large, or not JSON)."""

    path: str
    format: str


class Job:
    """A job at a broker. Cheap to create; talks to the broker only when asked."""

    def __init__(self, service: Connection, job_id: str, url: str, filename: str, pending: Pending | None = None):
        self.service = service
        self.id = job_id
        self.url = url
        self.filename = filename
        self._pending = pending

    def __repr__(self) -> str:
        return f"<park.Job {self.url.split('/files/')[0]}/jobs/{self.id}>"

    # -- conditions ------------------------------------------------------------------

    def _atom(self, kind: str, expr: str = "") -> Atom:
        return Atom(AtomKey(self.site, self.id, kind, expr), source=self._atom_state, origin=self)

    @property
    def site(self) -> str:
        return self.url.split("/")[2]

    @property
    def iscompleted(self) -> Atom:
        """Ready when the job completed; cancelled when it failed or was cancelled."""
        return self._atom("completed")

    @property
    def iscancelled(self) -> Atom:
        """Ready when the job failed or was cancelled; cancelled when it completed."""
        return self._atom("cancelled")

    @property
    def isfinished(self) -> Atom:
        """Ready when the job reached any terminal state; never cancelled."""
        return self._atom("finished")

    @property
    def isfetched(self) -> Atom:
        """Ready when a fetch job (park.fetch_url) has its file, checked; `iscompleted` by another name."""
        return self._atom("completed")

    def improved(self, expr: str) -> Atom:
        """Ready on the first progress report (`park.report`) or final result satisfying `expr`,
        e.g. "chisq < 1.2 and step > 10"; cancelled if the job ends without that.

        `expr` is checked here (ExpressionError, a ValueError, says what is wrong)."""
        Expression(expr)
        return self._atom("improved", expr)

    def _atom_state(self, key: AtomKey) -> State:
        if key.kind == "count":
            record = self.record()
            return count_state(key.expr, record.group, ended=record.state in TERMINAL_STATES)
        if key.kind == "improved":
            events = self.history()
            record = self.record()
            completed = record.state == jpb.JOB_STATE_COMPLETED
            return improved_state(Expression(key.expr), (e.detail.get("values", {}) for e in events
                                                         if e.kind == "improved"),
                                  finished=record.state in TERMINAL_STATES,
                                  result=json.loads(record.result_json) if completed and record.result_json else None)
        state = self.state
        if state not in ("completed", "failed", "cancelled"):
            return State.PENDING
        ok = state == "completed"
        return {"completed": State.READY if ok else State.CANCELLED,
                "cancelled": State.CANCELLED if ok else State.READY,
                "finished": State.READY}[key.kind]

    # -- broker state -------------------------------------------------------------------

    def acknowledged(self, timeout: float | None = None) -> jpb.JobRef:
        """Wait for the broker to accept the submission; raises SubmitError if it refused."""
        pending = self._pending
        if pending is None:
            return jpb.JobRef(id=self.id, url=self.url, filename=self.filename)
        if not pending.wait(timeout):
            raise TimeoutError(f"the submission of {self.id} was not acknowledged within {timeout} s")
        if pending.error is not None:
            raise pending.error
        assert pending.ref is not None
        return pending.ref

    @property
    def memo_hit(self) -> bool:
        """True if the broker answered with an earlier identical job (memoization, issue 6)."""
        return self.acknowledged().memo_hit

    def memo_report(self) -> MemoReport:
        """Why this job was reused, or, if it was not, what differs from the nearest earlier run."""
        self.acknowledged()
        reply = self.service.call(self.service.jobs_stub.Why, jpb.GetRequest(job_id=self.id), f"explaining {self.id}")
        return MemoReport(reply.hit, reply.job_id, reply.nearest_id, tuple(reply.differences))

    def record(self) -> jpb.Job:
        """The broker's full record of the job."""
        self.acknowledged()
        return self.service.call(self.service.jobs_stub.Get, jpb.GetRequest(job_id=self.id), f"reading job {self.id}")

    def root_cause(self, record: jpb.Job | None = None) -> RootCause | None:
        """Where this job's cancellation began (following its cause across sites, through the configured
        services), or None unless it was cancelled for its condition."""
        record = record or self.record()
        try:
            entries = list(load_services().values())
        except ConfigError:
            entries = []
        records = RecordsBySite(self.service, record.site, entries)
        try:
            return root_cause(record, records)
        finally:
            records.close()

    # -- files ----------------------------------------------------------------------

    def download(self, dest: str | os.PathLike[str] | None = None, name: str | None = None,
                 progress: Progress | None = None) -> Path:
        """Download the job's outputs (or just `name`) into directory `dest` (default: `./<job id>`),
        resuming what an earlier call left and checking each against the size and sha256 the job
        recorded; returns the directory, or the file when `name` is given."""
        job = self.record()
        directory = Path(dest) if dest is not None else Path.cwd() / self.id
        outputs = [o for o in job.outputs if name is None or o.name == name]
        if name is not None and not outputs:
            if job.state not in TERMINAL_STATES:
                raise ServiceError("FAILED_PRECONDITION", f"job {self.id} has not finished; its outputs come after")
            have = ", ".join(o.name for o in job.outputs) or "none"
            raise ServiceError("NOT_FOUND", f"job {self.id} recorded no output {name!r} (it has: {have})")
        for output in outputs:
            fetch(self.service, file_path(job.owner, job.id, output.name), directory / output.name,
                  sha256=output.sha256, size=output.size, progress=progress)
        return directory / name if name is not None else directory

    def open(self, name: str = "output") -> BinaryIO:
        """One of the job's outputs as a readable binary file (downloaded and verified first)."""
        spool = Path(tempfile.mkdtemp(prefix="park-open-"))
        path = self.download(spool, name)
        f = open(path, "rb")
        shutil.rmtree(spool)   # the open file stays readable
        return f

    def logs(self, stream: str = "stdout") -> str:
        """What the job wrote to its standard output ("stdout") or error ("stderr") so far."""
        return self.log_from(stream, 0).decode(errors="replace")

    def log_from(self, stream: str, offset: int) -> bytes:
        """The bytes of the job's "stdout" or "stderr" log from byte `offset` on, as it is now (a running
        job's grows; each attempt of a retried job writes a log of its own, see `park logs --follow`)."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        job = self.record()
        try:
            return read_from(self.service, file_path(job.owner, job.id, f"{stream}.log"), offset)
        except ServiceError as exc:
            if exc.code == "NOT_FOUND" and job.state in (jpb.JOB_STATE_WAITING, jpb.JOB_STATE_QUEUED):
                return b""   # it has not run yet
            raise

    @property
    def state(self) -> str:
        """'waiting', 'queued', 'running', 'completed', 'failed' or 'cancelled'."""
        return STATE_NAMES[self.record().state]

    def cancel(self, reason: str = "") -> str:
        """Cancel the job if it has not finished; returns its state afterwards."""
        self.acknowledged()
        job = self.service.call(self.service.jobs_stub.Cancel, jpb.CancelRequest(job_id=self.id, reason=reason),
                                f"cancelling job {self.id}")
        return STATE_NAMES[job.state]

    def events(self, from_seq: int = 0, timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's events after `from_seq`, replayed then followed live, ending with the terminal one.

        Reconnects after a broken stream from the last event seen, so no event is
        missed or repeated; so too when the stream outlived its session token."""
        self.acknowledged(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        last = from_seq
        broken_since: float | None = None
        refused = False     # the last stream ended for its token: one more try, with a fresh one
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
            stream = self.service.jobs_stub.Watch(jpb.WatchRequest(job_id=self.id, from_seq=last), timeout=left)
            try:
                for item in stream:
                    broken_since, refused = None, False
                    for message in item.events:
                        last = message.seq
                        event = JobEvent.from_proto(message)
                        yield event
                        if event.terminal:
                            return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"job {self.id} did not finish within {timeout} s") from None
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and not refused and "expired" in (exc.details() or ""):
                    # A long watch outlives its session token; the broker ends it, and it resumes from the
                    # last event with a fresh one. Refused again (revoked, removed) is final.
                    refused = True
                    continue
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self.service.error(exc, f"watching job {self.id}") from None
                broken_since = broken_since or time.monotonic()
                if time.monotonic() - broken_since > _RECONNECT_FOR:
                    raise self.service.error(exc, f"watching job {self.id}") from None
                time.sleep(0.2)
            finally:
                stream.cancel()

    def history(self) -> list[JobEvent]:
        """The job's events so far, without waiting for more."""
        self.acknowledged()
        stream = self.service.jobs_stub.Watch(jpb.WatchRequest(job_id=self.id), timeout=60)
        events = []
        try:
            for item in stream:
                if item.HasField("progress"):   # the broker has caught up: the rest would be live
                    break
                events.extend(JobEvent.from_proto(event) for event in item.events)
        except grpc.RpcError as exc:
            raise self.service.error(exc, f"reading the events of job {self.id}") from None
        finally:
            stream.cancel()
        return events

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job is completed, failed or cancelled; returns that state."""
        record = self.record()
        if record.state in TERMINAL_STATES:
            return STATE_NAMES[record.state]
        # Only what happens from now on matters: a job with many progress reports is not replayed.
        for event in self.events(from_seq=record.last_seq, timeout=timeout):
            if event.terminal:
                return event.kind
        raise AssertionError("event stream ended without a terminal event")

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value; raises JobFailed or JobCancelled."""
        self.wait(timeout)
        return self.outcome(self.record())

    def outcome(self, job: jpb.Job) -> Any:
        """The return value a terminal record of this job holds; raises JobFailed or JobCancelled."""
        if job.state == jpb.JOB_STATE_FAILED:
            raise JobFailed(self, job.error, job.traceback)
        if job.state == jpb.JOB_STATE_CANCELLED:
            raise JobCancelled(self, job.cause.message, self.root_cause(job))
        assert job.state in TERMINAL_STATES
        if job.HasField("result_file"):
            return ResultFile(job.result_file.path, job.result_file.format)
        return json.loads(job.result_json) if job.result_json else None


class Race(Job):
    """A race between jobs (`park.race`): completes with the winner's values; see DESIGN §3."""

    def __init__(self, service: Connection, job_id: str, url: str, filename: str, pending: Pending | None,
                 contestants: list[Job]):
        super().__init__(service, job_id, url, filename, pending)
        self.contestants = contestants

    def result(self, timeout: float | None = None) -> dict[str, float]:
        """The winner's values (its satisfying report, or its result when `until` was None)."""
        return super().result(timeout)["values"]

    @property
    def winner(self) -> Job:
        """The winning contestant; waits for the race to be decided, raises JobCancelled if none won."""
        winner_id = super().result()["winner"]
        # A contestant that was a memo hit is known to the broker by the earlier job's id.
        return next(j for j in self.contestants if winner_id in (j.id, j.acknowledged().id))
