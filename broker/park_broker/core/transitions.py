"""The job state machine: WAITING → QUEUED → RUNNING → COMPLETED | FAILED | CANCELLED.

`Transitions` carries out the scheduler's verdicts (start, cancel, "can never
hold") and everything they cascade to, records an executor's `started` and
`finished`, and cancels on request. Each change is appended to a `Batch` and
written by the ledger's commit; nothing here awaits between a decision and the
batch it lands in, so a cascade is decided atomically.

A job reaches a terminal state once; later outcomes for it are ignored, and an
outcome of an attempt other than the current one is ignored too.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

from park._proto import jobs_pb2 as jpb
from park.conditions import EXPR_KINDS, AtomKey, Condition, State
from park.counting import count_state
from park.expressions import improved_state
from park.wire import STATE_NAMES, TERMINAL_STATES, atom_to_proto
from park_broker.core import races
from park_broker.core.admission import Admission
from park_broker.core.jobgroups import Groups, count_member, note_joined
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.scheduler import Decision, Scheduler, Verdict, job_atom_states
from park_broker.errors import Code, fail
from park_broker.execution.base import Outcome

Histories = dict[str, list[dict[str, float]]]


class Transitions:
    def __init__(self, site: str, ledger: Ledger, scheduler: Scheduler, admission: Admission,
                 stop: Callable[[str], None]):
        self.site = site
        self.ledger = ledger
        self.scheduler = scheduler
        self.groups = Groups()   # which active jobs count for which groups (park.map)
        self.admission = admission
        self._stop = stop      # ends a queued or running job's attempt, wherever it runs

    # -- atom states ---------------------------------------------------------------------

    def states_now(self, owner: str, cond: Condition | None, stored: dict[str, jpb.Job],
                   histories: Histories) -> dict[AtomKey, State]:
        """The state of each atom of `cond` (a condition of `owner`'s): local ones from memory or `stored`,
        remote ones pending. A local atom may name only `owner`'s own jobs: anyone else's is NOT_FOUND, in
        the words used for a job that does not exist, so a condition is no oracle on other users' jobs."""
        states: dict[AtomKey, State] = {}
        if cond is None:
            return states
        for atom in cond.depends:
            key: AtomKey = atom.key  # type: ignore[assignment]
            if key.site != self.site:
                states[key] = State.PENDING   # until its site says otherwise (federation)
                continue
            seen = self.ledger.glance(key.job_id) or stored.get(key.job_id)
            if seen is None or seen.owner != owner:
                fail(Code.NOT_FOUND, f"condition names job {key.job_id}, which site {self.site!r} "
                                     "does not have; submit it first (earlier in the same batch is fine)")
            if key.kind not in EXPR_KINDS:   # its state is all it takes: the record stays packed
                states[key] = job_atom_states(STATE_NAMES[seen.state])[key.kind]
                continue
            job = self.ledger.peek(key.job_id) or stored[key.job_id]
            if key.kind == "improved":
                states[key] = self.improved_state(job, key, self.ledger.history(job.id) or histories.get(job.id, []))
            elif key.kind == "count":
                if job.spec.WhichOneof("work") != "group":
                    fail(Code.INVALID_ARGUMENT, f"condition counts the members of job {key.job_id}, which is not "
                                                "a group (park.map makes one)")
                states[key] = count_state(key.expr, job.group, ended=job.state in TERMINAL_STATES)
        return states

    def improved_state(self, job: jpb.Job, key: AtomKey, reports: list[dict[str, float]]) -> State:
        completed = job.state == jpb.JOB_STATE_COMPLETED
        return improved_state(self.admission.expression(key.expr), reports, finished=job.state in TERMINAL_STATES,
                              result=races.result_values(job) if completed else None)

    # -- verdicts ------------------------------------------------------------------------

    def resolve_all(self, resolved: Mapping[AtomKey, State], batch: Batch) -> None:
        """Atoms resolved together: carry out the verdicts on the jobs waiting on them."""
        for decision in self.scheduler.resolve_all(resolved):
            self.apply(decision, batch)

    def apply(self, decision: Decision, batch: Batch, stored: dict[str, jpb.Job] | None = None) -> None:
        """Carry out a verdict and everything it cascades to (`stored`: finished jobs read for this batch)."""
        pending = [decision]
        while pending:
            d = pending.pop()
            job = self.ledger.record(d.job_id)
            assert job is not None, d.job_id   # the scheduler only holds active jobs
            if d.verdict is Verdict.START and job.spec.WhichOneof("work") == "race":
                pending += self._settle_race(job, d.atoms, batch, stored)
            elif d.verdict is Verdict.START:
                job.state = jpb.JOB_STATE_QUEUED
                batch.changes.append(self.ledger.change(job, jpb.Event(queued=jpb.Queued(reason="condition holds"))))
                batch.queued.append(job.id)
            else:
                kind = jpb.Cause.KIND_CONDITION if d.verdict is Verdict.CANCEL else jpb.Cause.KIND_NEVER_HOLDS
                what = ", ".join(str(a) for a in d.atoms)
                message = (f"its condition was cancelled by {what}" if d.verdict is Verdict.CANCEL
                           else f"its condition can never hold, given {what}")
                pending += self._finish(job, jpb.JOB_STATE_CANCELLED, jpb.Event(cancelled=jpb.Cancelled(
                    cause=jpb.Cause(kind=kind, message=message, atoms=[atom_to_proto(a) for a in d.atoms]))),
                    batch)

    def _settle_race(self, race: jpb.Job, winners: tuple[AtomKey, ...], batch: Batch,
                     stored: dict[str, jpb.Job] | None) -> list[Decision]:
        """A contestant succeeded: cancel the others, complete the race with the winner's values."""
        outcome = races.settle(race, winners, self.ledger.record, (stored or {}).get)
        decisions: list[Decision] = []
        for loser in outcome.losers:
            decisions += self.cancel_job(loser, jpb.Cause(kind=jpb.Cause.KIND_RACE_LOST, by=race.id,
                                                          message=f"lost race {race.id} to {outcome.winner}"), batch)
        race.result_json = outcome.result_json
        return decisions + self._finish(race, jpb.JOB_STATE_COMPLETED, jpb.Event(
            completed=jpb.Completed(result_json=race.result_json)), batch)

    def cancel_job(self, job: jpb.Job, cause: jpb.Cause, batch: Batch) -> list[Decision]:
        """Cancel a job that is not terminal: unindex it, stop its attempt, record the cause. A group's
        members that have not ended are cancelled with it."""
        self.scheduler.remove(job.id)
        if job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
            self._stop(job.id)
        members = self.groups.members(job.id)
        decisions = self._finish(job, jpb.JOB_STATE_CANCELLED, jpb.Event(cancelled=jpb.Cancelled(cause=cause)), batch)
        with_group = jpb.Cause(kind=cause.kind, by=cause.by, message=f"its group {job.id} was {cause.message}")
        for member_id in sorted(members):
            member = self.ledger.record(member_id)
            if member is not None and member.state not in TERMINAL_STATES:
                decisions += self.cancel_job(member, with_group, batch)
        return decisions

    def join(self, member: jpb.Job, group: jpb.Job, batch: Batch) -> list[Decision]:
        """`member` (a new job, or the job a memo hit names) joins active `group`; returns the verdicts.
        The group's change is left to the caller (`announce`), once for a whole batch of joins."""
        note_joined(group, member.memo_key)
        if member.state in TERMINAL_STATES:
            count_member(group, member)
        else:
            self.groups.join(member.id, group.id)
        return self.scheduler.resolve_all(self._group_moved(group, member.id, batch, announce=False))

    def announce(self, group: jpb.Job, member_id: str, batch: Batch) -> None:
        """Record the group's counts as a batch of joins left them (unless the last one ended it)."""
        if group.state not in TERMINAL_STATES:
            batch.changes.append(self.ledger.change(group, jpb.Event(group_progress=jpb.GroupProgress(
                counts=group.group, member=member_id))))

    def _finish(self, job: jpb.Job, state: int, event: jpb.Event, batch: Batch) -> list[Decision]:
        """Make a job terminal; returns the verdicts its resolved atoms imply."""
        # All the atoms the transition resolves (the job's own, and those of the groups it ends in) resolve
        # together (DESIGN §2), then the conditions that read them are judged.
        return self.scheduler.resolve_all(self._end(job, state, event, batch))

    def _end(self, job: jpb.Job, state: int, event: jpb.Event, batch: Batch) -> dict[AtomKey, State]:
        job.state = state
        job.finished_at = time.time()
        if event.HasField("cancelled"):
            job.cause.CopyFrom(event.cancelled.cause)
        batch.changes.append(self.ledger.change(job, event))
        updates = {AtomKey(self.site, job.id, kind): atom_state
                   for kind, atom_state in job_atom_states(STATE_NAMES[state]).items() if kind != "improved"}
        # Pending improved(...) atoms were not satisfied by any report: only the final result can still do it;
        # counting atoms still pending are decided by the final counts.
        for key in self.scheduler.expr_atoms(job.id):
            updates[key] = (count_state(key.expr, job.group, ended=True) if key.kind == "count"
                            else self.improved_state(job, key, [dict(job.progress)]))
        self.groups.drop(job.id)
        for group_id in self.groups.leave(job.id):
            group = self.ledger.record(group_id)
            if group is not None and group.state not in TERMINAL_STATES:
                count_member(group, job)
                updates.update(self._group_moved(group, job.id, batch))
        return updates

    def _group_moved(self, group: jpb.Job, member_id: str, batch: Batch, announce: bool = True
                     ) -> dict[AtomKey, State]:
        """A member joined or ended: the group's change (unless not to `announce` it yet), and the counting
        atoms it resolves (all of them, and the group's own, once its last member has ended)."""
        counts = group.group
        ended = counts.completed + counts.failed + counts.cancelled
        if counts.joined == counts.size == ended:
            summary = {"completed": counts.completed, "failed": counts.failed, "cancelled": counts.cancelled}
            if counts.completed == counts.size:
                group.result_json = json.dumps(summary)
                return self._end(group, jpb.JOB_STATE_COMPLETED, jpb.Event(completed=jpb.Completed(
                    result_json=group.result_json)), batch)
            group.error = (f"{counts.size - counts.completed} of {counts.size} members did not complete "
                           f"({counts.failed} failed, {counts.cancelled} cancelled); the first was "
                           f"{counts.first_unfinished}")
            return self._end(group, jpb.JOB_STATE_FAILED, jpb.Event(failed=jpb.Failed(error=group.error)), batch)
        if announce:
            self.announce(group, member_id, batch)
        moved = {}
        for key in self.scheduler.expr_atoms(group.id):
            if key.kind == "count" and (state := count_state(key.expr, counts)) is not State.PENDING:
                moved[key] = state
        return moved

    # -- attempts --------------------------------------------------------------------------

    def on_started(self, job_id: str, attempt: int) -> None:
        """An executor began attempt `attempt` of a queued job."""
        job = self.ledger.record(job_id)
        if job is None or job.state != jpb.JOB_STATE_QUEUED:
            return
        job.state = jpb.JOB_STATE_RUNNING
        job.attempts = attempt
        job.started_at = time.time()
        self.ledger.commit_soon(Batch([self.ledger.change(job, jpb.Event(started=jpb.Started(attempt=attempt)))]))

    def on_finished(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        """An executor's outcome of attempt `attempt`; ignored unless it is the job's current attempt. A
        failed attempt of a job with retries left runs again, after its backoff; its dependents see only
        the job's final outcome."""
        job = self.ledger.record(job_id)
        if job is None or job.state in TERMINAL_STATES or job.attempts != attempt:
            return
        if not outcome.ok and attempt <= job.spec.retries:
            delay = job.spec.retry_delay * 2 ** (attempt - 1)
            job.state = jpb.JOB_STATE_QUEUED
            reason = (f"attempt {attempt} failed: {outcome.error}; attempt {attempt + 1} of {job.spec.retries + 1} "
                      f"in {delay:g} s")
            self.ledger.commit_soon(Batch([self.ledger.change(job, jpb.Event(queued=jpb.Queued(reason=reason)))],
                                          [job.id], release_after=delay))
            return
        self.settle(job_id, outcome)

    def settle(self, job_id: str, outcome: Outcome) -> None:
        """Complete or fail an active job with `outcome`, and everything that follows from it."""
        job = self.ledger.record(job_id)
        assert job is not None, job_id
        batch = Batch()
        job.left_nothing = outcome.left_nothing
        if outcome.ok:
            completed = jpb.Completed(result_json=outcome.result_json, outputs=[
                jpb.Output(name=n, path=p, size=s, sha256=h) for n, p, s, h in outcome.outputs])
            if outcome.result_file:
                completed.result_file.CopyFrom(jpb.ResultFile(path=outcome.result_file, format=outcome.result_format))
                job.result_file.CopyFrom(completed.result_file)
            job.result_json = completed.result_json
            job.outputs.extend(completed.outputs)
            decisions = self._finish(job, jpb.JOB_STATE_COMPLETED, jpb.Event(completed=completed), batch)
        else:
            job.error, job.traceback = outcome.error, outcome.traceback
            decisions = self._finish(job, jpb.JOB_STATE_FAILED, jpb.Event(
                failed=jpb.Failed(error=outcome.error, traceback=outcome.traceback)), batch)
        for decision in decisions:
            self.apply(decision, batch)
        self.ledger.commit_soon(batch)

    # -- requests --------------------------------------------------------------------------

    async def cancel(self, caller: str, job_id: str, reason: str, *, admin: bool = False) -> jpb.Job:
        """Cancel a waiting, queued or running job; a terminal job is returned unchanged."""
        job = await self.ledger.get(caller, job_id, admin=admin)
        active = self.ledger.record(job.id)
        if active is None or active.state in TERMINAL_STATES:
            return job
        batch = Batch()
        cause = jpb.Cause(kind=jpb.Cause.KIND_REQUESTED, by=caller,
                          message=f"cancelled by {caller}" + (f": {reason[:500]}" if reason else ""))
        for decision in self.cancel_job(active, cause, batch):
            self.apply(decision, batch)
        snapshot = batch.changes[0].job
        await self.ledger.commit(batch)
        return snapshot
