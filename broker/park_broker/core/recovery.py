"""Start-up: rebuild memory from the store, so a crash between a commit and its consequences loses nothing.

Every decision is re-derived from committed state: jobs that were RUNNING are
queued again (their half-run attempt left no trace under the final name),
QUEUED jobs are handed to their runner, WAITING jobs are re-evaluated
against what their atoms are now and re-subscribe to their peers, and the
active members of active groups are indexed again (their counts are in the
groups' records, written with the changes that moved them).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from park._proto import jobs_pb2 as jpb
from park_broker.core.admission import Admission
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.remote import RemoteAtoms
from park_broker.core.scheduler import Scheduler
from park_broker.core.store import Store
from park_broker.core.transitions import Transitions

log = logging.getLogger(__name__)


async def recover(site: str, store: Store, ledger: Ledger, scheduler: Scheduler, admission: Admission,
                  transitions: Transitions, remote: RemoteAtoms) -> None:
    """Reload active jobs: re-run interrupted ones, re-evaluate waiting ones."""
    jobs = await store.active()
    ledger.add_recovered(jobs, await store.reports(j.id for j in jobs))
    active = {j.id for j in jobs}
    groups = {j.id for j in jobs if j.spec.HasField("group")}
    for job in jobs:
        if job.spec.member_of in groups:
            transitions.groups.join(job.id, job.spec.member_of)
    for member, group in await store.memberships(active):
        if group in groups:
            transitions.groups.join(member, group)
    conditions = {j.id: admission.condition_of(j.spec) for j in jobs
                  if j.state == jpb.JOB_STATE_WAITING and j.id not in groups}
    keys = {a.key for c in conditions.values() if c is not None for a in c.depends}
    stored = await store.get_many({k.job_id for k in keys if k.site == site} - active)
    histories = await store.reports({k.job_id for k in keys if k.kind == "improved" and k.job_id in stored})
    batch = Batch()
    for job in jobs:
        if job.state == jpb.JOB_STATE_RUNNING:
            job.state = jpb.JOB_STATE_QUEUED
            reason = "the broker restarted while the job was running; it runs again"
            batch.changes.append(ledger.change(job, jpb.Event(queued=jpb.Queued(reason=reason))))
        if job.state == jpb.JOB_STATE_QUEUED:
            batch.queued.append(job.id)
    for job in jobs:
        if job.id in conditions and job.state == jpb.JOB_STATE_WAITING:
            states = transitions.states_now(job.owner, conditions[job.id], stored, histories)
            decision = scheduler.add(job.id, conditions[job.id], states)
            if decision is not None:
                transitions.apply(decision, batch, stored)
            else:
                remote.watch(job.spec, conditions[job.id])
    # What interrupted attempts left behind goes before anything runs again; their processes died
    # with the broker (execution.worker), and no attempt directory is ever adopted but the current one's.
    await asyncio.to_thread(_clear_attempts, [j for j in jobs if j.state == jpb.JOB_STATE_QUEUED])
    await ledger.commit(batch)
    log.info("recovered %d active jobs, %d to run", len(jobs), len(batch.queued))


def _clear_attempts(jobs: list[jpb.Job]) -> None:
    for job in jobs:
        directory = Path(job.directory)
        for attempt in directory.parent.glob(f".{job.id}.attempt-[0-9]*"):   # a fetch resumes from its own
            shutil.rmtree(attempt, ignore_errors=True)
