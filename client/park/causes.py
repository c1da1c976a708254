"""Why a job was cancelled, all the way down: the failure at the bottom of a chain of cancellations.

A job cancelled because its condition was cancelled names the atoms that
decided it (`Cause.atoms`); each names a job, here or at another site, which
may itself have been cancelled for the same reason (a group's counting atom
names the group, whose record names its first member that did not complete).
`root_cause` follows that
chain across sites (park.sites) to the job where it began: one that failed
(its error and traceback), one a user cancelled, or one that lost a race.
"""
from __future__ import annotations

from dataclasses import dataclass

from park._proto import jobs_pb2 as jpb
from park.sites import RecordsBySite
from park.wire import STATE_NAMES

MAX_CHAIN = 100   # links followed before giving up (a chain is acyclic; this only bounds the work)


@dataclass(frozen=True, slots=True)
class RootCause:
    """The job a chain of cancellations began with, and what happened to it."""

    site: str
    job_id: str
    label: str
    state: str            # "failed", "cancelled" (by a user, or a race lost), or "unknown" (unreachable)
    error: str = ""       # the failure's one line; for a cancellation, its cause
    traceback: str = ""   # the remote Python traceback of a failure

    def __str__(self) -> str:
        who = f"{self.site}/{self.label or self.job_id}"
        if self.state == "failed":
            return f"{who} failed: {self.error}"
        if self.state == "unknown":
            return f"{who} could not be read ({self.error})"
        return f"{who} was {self.state}: {self.error}"


def _label(job: jpb.Job) -> str:
    return job.spec.label or job.spec.call.target or " ".join(job.spec.command.argv)[:80]


def root_cause(job: jpb.Job, records: RecordsBySite) -> RootCause | None:
    """Where the cancellation of `job` began; None unless `job` was cancelled for its condition."""
    if job.state != jpb.JOB_STATE_CANCELLED or job.cause.kind not in (jpb.Cause.KIND_CONDITION,
                                                                     jpb.Cause.KIND_NEVER_HOLDS):
        return None
    current = job
    for _ in range(MAX_CHAIN):
        cause = current.cause
        if cause.kind not in (jpb.Cause.KIND_CONDITION, jpb.Cause.KIND_NEVER_HOLDS) or not cause.atoms:
            if current is job:
                return None
            return RootCause(current.site, current.id, _label(current), STATE_NAMES[current.state], cause.message)
        atom = cause.atoms[0]
        upstream, trouble = records.record(atom.site, atom.job_id)
        if upstream is not None and upstream.spec.HasField("group") and upstream.group.first_unfinished:
            # A group's counting atom is decided by its members: the first one that did not complete.
            upstream, trouble = records.record(upstream.site, upstream.group.first_unfinished)
        if upstream is None:
            return RootCause(atom.site, atom.job_id, "", "unknown", trouble)
        if upstream.state == jpb.JOB_STATE_FAILED:
            return RootCause(upstream.site, upstream.id, _label(upstream), "failed", upstream.error,
                             upstream.traceback)
        if upstream.state != jpb.JOB_STATE_CANCELLED:   # e.g. completed, and the atom was ~completed
            return RootCause(upstream.site, upstream.id, _label(upstream), STATE_NAMES[upstream.state],
                             cause.message)
        current = upstream
    return None
