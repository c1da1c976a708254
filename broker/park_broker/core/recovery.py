"""Start-up: rebuild memory from the store, so a crash between a commit and its consequences loses nothing.

Every decision is re-derived from committed state: jobs that were RUNNING are
queued again (their half-run attempt left no trace under the final name),
QUEUED jobs are handed to their runner, WAITING jobs are re-evaluated
against what their atoms are now and re-subscribe to their peers, and the
active members of active groups are indexed again (their counts are in the
groups' records, written with the changes that moved them).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from park._proto import jobs_pb2 as jpb
from park.conditions import Condition
from park_broker.core.admission import Admission
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.remote import RemoteAtoms
from park_broker.core.scheduler import Scheduler
from park_broker.core.store import Store
from park_broker.core.transitions import Transitions

log = logging.getLogger(__name__)


async def recover(site: str, store: Store, ledger: Ledger, scheduler: Scheduler, admission: Admission,
                  transitions: Transitions, remote: RemoteAtoms, interrupted: Callable[[list[str]], None]) -> None:
    """Reload active jobs: re-run interrupted ones, re-evaluate waiting ones. Records are read through the
    ledger one at a time (`peek`), and changed through it (`record`), since it keeps waiting ones serialized.
    `interrupted` is told the jobs an earlier broker had queued or started, before they are handed over again."""
    ids = ledger.add_recovered(await store.active(), admission.installs)
    for job_id, history in (await store.reports(ids)).items():
        ledger.add_reports(job_id, history)
    batch = Batch()
    groups: set[str] = set()
    joins: list[tuple[str, str]] = []      # (member, group)
    conditions: dict[str, Condition | None] = {}
    for job_id in ids:
        job = _peek(ledger, job_id)
        if job.spec.HasField("group"):
            groups.add(job_id)
        elif job.state == jpb.JOB_STATE_WAITING:
            conditions[job_id] = admission.condition_of(job.spec)
        if job.spec.member_of:
            joins.append((job_id, job.spec.member_of))
        if job.state == jpb.JOB_STATE_RUNNING:
            job = _record(ledger, job_id)
            job.state = jpb.JOB_STATE_QUEUED
            reason = "the broker restarted while the job was running; it runs again"
            batch.changes.append(ledger.change(job, jpb.Event(queued=jpb.Queued(reason=reason))))
        if job.state == jpb.JOB_STATE_QUEUED:
            batch.queued.append(job_id)
    for member, group in joins + await store.memberships(ids):
        if group in groups:
            transitions.groups.join(member, group)
    keys = {a.key for c in conditions.values() if c is not None for a in c.depends}
    stored = await store.get_many({k.job_id for k in keys if k.site == site} - set(ids))
    histories = await store.reports({k.job_id for k in keys if k.kind == "improved" and k.job_id in stored})
    for job_id, condition in conditions.items():
        job = _peek(ledger, job_id)
        if job.state != jpb.JOB_STATE_WAITING:   # decided meanwhile (cancelled with its group, or a race)
            continue
        decision = scheduler.add(job_id, condition, transitions.states_now(job.owner, condition, stored, histories))
        if decision is not None:
            transitions.apply(decision, batch, stored)
        else:
            remote.watch(job.spec, condition)
    # What interrupted attempts left in the attempt folders went before this (core.attempts: `clear`), and their
    # processes died with the broker (execution.worker); one may have been moved into place already.
    interrupted(batch.queued)
    await ledger.commit(batch)
    log.info("recovered %d active jobs, %d to run", len(ids), len(batch.queued))


def _peek(ledger: Ledger, job_id: str) -> jpb.Job:
    job = ledger.peek(job_id)
    assert job is not None, job_id   # nothing leaves the ledger before the recovery's commit
    return job


def _record(ledger: Ledger, job_id: str) -> jpb.Job:
    job = ledger.record(job_id)
    assert job is not None, job_id
    return job
