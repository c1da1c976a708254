"""The job lifecycle: submission, transitions, cancellation, recovery, watching.

`JobManager` is the broker's transport-free core. Every decision is made
synchronously on the event loop against the in-memory records of active jobs,
then written to the store, and only after the commit are its effects released:
events are published to watchers and queued jobs handed to the executor. So a
dependent never starts on a completion that could still roll back, and the
order of decisions is the order of sequence numbers.

Invariants:
- `self._active` holds the record of every job that is not terminal, and of
  terminal jobs until the commit that made them terminal has finished; any job
  not there is read from the store, where it is committed and terminal.
- A job reaches a terminal state once; later outcomes for it are ignored.
- Recovery re-derives every decision from the store, so a crash between a
  commit and its consequences loses nothing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from park._proto import jobs_pb2 as jpb
from park._wire import (STATE_NAMES, TERMINAL_STATES, InvalidInput, atom_to_proto, check_job_id, check_json,
                        check_name, check_target, condition_from_proto)
from park.conditions import AtomKey, Condition, State
from park_broker.errors import BrokerError, Code, fail
from park_broker.events import EventHub
from park_broker.executor import Executor, Outcome, Task
from park_broker.scheduler import Decision, Scheduler, Verdict, job_atom_states
from park_broker.store import Change, Store
from park_broker.worker import RESERVED_NAMES

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
MAX_ARGV = 4096
DEFAULT_OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class SiteInfo:
    name: str
    files_root: Path


@dataclass(slots=True)
class Submission:
    """The outcome of one spec of a batch: a job record, or a refusal."""

    job: jpb.Job | None = None
    error: BrokerError | None = None


class JobManager:
    def __init__(self, site: SiteInfo, store: Store, executor: Executor, hub: EventHub):
        self.site = site
        self.store = store
        self.executor = executor
        self.hub = hub
        self.scheduler = Scheduler()
        self._active: dict[str, jpb.Job] = {}
        self._conditions: dict[str, Condition | None] = {}
        self.failed = asyncio.Event()   # set when the store refused a commit: the broker must stop

    # -- start-up ----------------------------------------------------------------

    async def recover(self) -> None:
        """Reload active jobs: re-run interrupted ones, re-evaluate waiting ones."""
        jobs = await self.store.active()
        for job in jobs:
            self._active[job.id] = job
        states = await self._atom_states(self._referenced(jobs))
        changes: list[Change] = []
        queued: list[str] = []
        for job in jobs:
            if job.state == jpb.JOB_STATE_RUNNING:
                job.state = jpb.JOB_STATE_QUEUED
                reason = "the broker restarted while the job was running; it runs again"
                changes.append(self._change(job, jpb.Event(queued=jpb.Queued(reason=reason))))
            if job.state == jpb.JOB_STATE_QUEUED:
                queued.append(job.id)
        for job in jobs:
            if job.state == jpb.JOB_STATE_WAITING:
                cond = self._condition_of(job)
                decision = self.scheduler.add(job.id, cond, states)
                if decision is not None:
                    self._apply(decision, changes, queued)
        if changes:
            await self._commit(changes, queued)
        else:
            self._release(queued)
        log.info("recovered %d active jobs, %d to run", len(jobs), len(queued))

    # -- submission --------------------------------------------------------------

    async def submit_many(self, owner: str, specs: list[jpb.JobSpec]) -> list[Submission]:
        """Validate and store a batch; each spec is accepted or refused on its own.

        Later specs may name earlier ones of the same batch in their conditions.
        Re-submitting an id with the same spec returns the existing job (a safe retry).
        """
        if len(specs) > MAX_BATCH:
            fail(Code.INVALID_ARGUMENT, f"a batch holds at most {MAX_BATCH} jobs; got {len(specs)}")
        parsed: list[Condition | None | BrokerError] = []
        for spec in specs:
            try:
                parsed.append(self._validate(spec))
            except BrokerError as exc:
                parsed.append(exc)
        wanted = {s.id for s in specs} | {
            a.key.job_id for c in parsed if isinstance(c, Condition) for a in c.depends}
        stored = await self._lookup(wanted)
        # From here to the commit nothing awaits: the batch is decided atomically.
        results: list[Submission] = []
        changes: list[Change] = []
        queued: list[str] = []
        now = time.time()
        for spec, cond in zip(specs, parsed):
            if isinstance(cond, BrokerError):
                results.append(Submission(error=cond))
                continue
            existing = self._active.get(spec.id) or stored.get(spec.id)
            if existing is not None:
                if existing.owner == owner and existing.spec == spec:
                    results.append(Submission(job=existing))
                else:
                    results.append(Submission(error=BrokerError(
                        Code.ALREADY_EXISTS, f"job id {spec.id} is already taken; submit with a fresh id")))
                continue
            try:
                states = self._states_now(cond, stored)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            job = self._new_job(owner, spec, now)
            self._active[job.id] = job
            self._conditions[job.id] = cond
            changes.append(self._change(job, jpb.Event(submitted=jpb.Submitted(spec=spec, owner=owner)),
                                        insert=True))
            decision = self.scheduler.add(job.id, cond, states)
            if decision is not None:
                self._apply(decision, changes, queued)
            results.append(Submission(job=job))
        await self._commit(changes, queued)
        return results

    async def _lookup(self, job_ids: set[str]) -> dict[str, jpb.Job]:
        """Stored records of the ids not in memory, consistent with memory when this returns.

        A job can leave `_active` while the store is read (its terminal commit
        finished meanwhile); such jobs are read again, now committed."""
        stored: dict[str, jpb.Job] = {}
        in_memory = {j for j in job_ids if j in self._active}
        ask = job_ids - in_memory
        while ask:
            stored.update(await self.store.get_many(ask))
            ask = {j for j in in_memory if j not in self._active}
            in_memory -= ask
        return stored

    def _validate(self, spec: jpb.JobSpec) -> Condition | None:
        try:
            check_job_id(spec.id)
            which = spec.WhichOneof("work")
            if which == "call":
                check_target(spec.call.target)
                check_json(spec.call.args_json, list, "args")
                check_json(spec.call.kwargs_json, dict, "kwargs")
            elif which == "command":
                argv = spec.command.argv
                if not argv or not argv[0]:
                    raise InvalidInput("a command needs at least a program name")
                if len(argv) > MAX_ARGV or any("\0" in a for a in argv):
                    raise InvalidInput(f"a command has at most {MAX_ARGV} arguments and no NUL characters")
            else:
                raise InvalidInput("a job needs a Python call or a command line")
            name = spec.output_name or DEFAULT_OUTPUT
            check_name(name)
            if name in RESERVED_NAMES:
                raise InvalidInput(f"output name {name!r} is reserved for the job's logs and result")
            if spec.requires:
                fail(Code.UNIMPLEMENTED, "requires= needs package support, which this broker does not have yet")
            cond = condition_from_proto(spec.when)
        except InvalidInput as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, f"job {spec.id[:40]!r}: {exc}") from None
        if cond is not None:
            for atom in cond.depends:
                key: AtomKey = atom.key  # type: ignore[assignment]
                if key.site != self.site.name:
                    fail(Code.UNIMPLEMENTED, f"job {spec.id}: condition names a job at site {key.site!r}; "
                                             f"this broker ({self.site.name!r}) has no federation peers yet")
                if key.kind == "improved":
                    fail(Code.UNIMPLEMENTED, f"job {spec.id}: improved(...) conditions are not supported yet")
        return cond

    def _states_now(self, cond: Condition | None, stored: dict[str, jpb.Job]) -> dict[AtomKey, State]:
        states: dict[AtomKey, State] = {}
        if cond is None:
            return states
        for atom in cond.depends:
            key: AtomKey = atom.key  # type: ignore[assignment]
            job = self._active.get(key.job_id) or stored.get(key.job_id)
            if job is None:
                fail(Code.NOT_FOUND, f"condition names job {key.job_id}, which site {self.site.name!r} "
                                     "does not have; submit it first (earlier in the same batch is fine)")
            states[key] = job_atom_states(STATE_NAMES[job.state])[key.kind]
        return states

    def _new_job(self, owner: str, spec: jpb.JobSpec, now: float) -> jpb.Job:
        directory = self.site.files_root / owner / spec.id
        return jpb.Job(id=spec.id, site=self.site.name, owner=owner, spec=spec, state=jpb.JOB_STATE_WAITING,
                       url=f"park://{self.site.name}/files/{owner}/{spec.id}/{spec.output_name or DEFAULT_OUTPUT}",
                       filename=str(directory / (spec.output_name or DEFAULT_OUTPUT)),
                       directory=str(directory), submitted_at=now)

    # -- transitions ---------------------------------------------------------------

    def _apply(self, decision: Decision, changes: list[Change], queued: list[str]) -> None:
        """Carry out a verdict and, for cancellations, everything it cascades to."""
        pending = [decision]
        while pending:
            d = pending.pop()
            job = self._active[d.job_id]
            if d.verdict is Verdict.START:
                job.state = jpb.JOB_STATE_QUEUED
                changes.append(self._change(job, jpb.Event(queued=jpb.Queued(reason="condition holds"))))
                queued.append(job.id)
                continue
            kind = jpb.Cause.KIND_CONDITION if d.verdict is Verdict.CANCEL else jpb.Cause.KIND_NEVER_HOLDS
            what = ", ".join(str(a) for a in d.atoms)
            message = (f"its condition was cancelled by {what}" if d.verdict is Verdict.CANCEL
                       else f"its condition can never hold, given {what}")
            cause = jpb.Cause(kind=kind, message=message, atoms=[atom_to_proto(a) for a in d.atoms])
            pending += self._finish(job, jpb.JOB_STATE_CANCELLED, jpb.Event(cancelled=jpb.Cancelled(cause=cause)),
                                    changes)

    def _finish(self, job: jpb.Job, state: int, event: jpb.Event, changes: list[Change]) -> list[Decision]:
        """Make a job terminal; returns the verdicts its resolved atoms imply."""
        job.state = state
        job.finished_at = time.time()
        if event.HasField("cancelled"):
            job.cause.CopyFrom(event.cancelled.cause)
        changes.append(self._change(job, event))
        decisions = []
        for kind, atom_state in job_atom_states(STATE_NAMES[state]).items():
            if kind != "improved":
                decisions += self.scheduler.resolve(AtomKey(self.site.name, job.id, kind), atom_state)
        return decisions

    def _change(self, job: jpb.Job, event: jpb.Event, insert: bool = False) -> Change:
        event.job_id = job.id
        event.time = time.time()
        # The record is serialized at commit time; snapshot it so later in-memory
        # changes to the same job are not written under this event.
        return Change(job=jpb.Job.FromString(job.SerializeToString()), event=event, insert=insert)

    async def _commit(self, changes: list[Change], queued: list[str]) -> None:
        if not changes:
            return
        try:
            await self.store.commit(changes)
        except Exception:
            # Memory has run ahead of a commit that did not happen; the only safe
            # course is to stop and let recovery rebuild memory from the store.
            log.critical("commit failed; the broker stops so that recovery can restore a consistent state",
                         exc_info=True)
            self.failed.set()
            raise
        for change in changes:
            active = self._active.get(change.job.id)
            if active is not None:
                active.last_seq = max(active.last_seq, change.event.seq)
        self._release(queued)
        for change in changes:
            job = self._active.get(change.job.id)
            if job is not None and job.state in TERMINAL_STATES and change.job.state in TERMINAL_STATES:
                del self._active[job.id]
                self._conditions.pop(job.id, None)

    def _release(self, queued: list[str]) -> None:
        """Hand committed QUEUED jobs to the executor (unless cancelled meanwhile)."""
        for job_id in queued:
            job = self._active.get(job_id)
            if job is not None and job.state == jpb.JOB_STATE_QUEUED:
                self.executor.submit(self._task(job))

    def _task(self, job: jpb.Job) -> Task:
        spec = job.spec
        final = Path(job.directory)
        attempt = job.attempts + 1
        work = final.parent / f".{job.id}.attempt-{attempt}"
        output = spec.output_name or DEFAULT_OUTPUT
        env = {"PARK_JOB_ID": job.id, "PARK_SITE": self.site.name, "PARK_JOB_DIR": str(work),
               "PARK_JOB_FILENAME": str(work / output), "PARK_JOB_URL": job.url}
        common = dict(job_id=job.id, attempt=attempt, work_dir=work, final_dir=final, output_name=output, env=env)
        if spec.WhichOneof("work") == "call":
            return Task(kind="call", target=spec.call.target, args_json=spec.call.args_json,
                        kwargs_json=spec.call.kwargs_json, **common)  # type: ignore[arg-type]
        return Task(kind="command", argv=tuple(spec.command.argv), **common)  # type: ignore[arg-type]

    # -- executor callbacks ------------------------------------------------------

    def on_started(self, job_id: str, attempt: int) -> None:
        job = self._active.get(job_id)
        if job is None or job.state != jpb.JOB_STATE_QUEUED:
            return
        job.state = jpb.JOB_STATE_RUNNING
        job.attempts = attempt
        job.started_at = time.time()
        self._spawn(self._commit([self._change(job, jpb.Event(started=jpb.Started(attempt=attempt)))], []))

    def on_finished(self, job_id: str, attempt: int, outcome: Outcome) -> None:
        job = self._active.get(job_id)
        if job is None or job.state in TERMINAL_STATES or job.attempts != attempt:
            return
        changes: list[Change] = []
        queued: list[str] = []
        if outcome.ok:
            completed = jpb.Completed(result_json=outcome.result_json, outputs=[
                jpb.Output(name=n, path=p, size=s, sha256=h) for n, p, s, h in outcome.outputs])
            if outcome.result_file:
                completed.result_file.CopyFrom(jpb.ResultFile(path=outcome.result_file, format=outcome.result_format))
                job.result_file.CopyFrom(completed.result_file)
            job.result_json = completed.result_json
            job.outputs.extend(completed.outputs)
            decisions = self._finish(job, jpb.JOB_STATE_COMPLETED, jpb.Event(completed=completed), changes)
        else:
            job.error, job.traceback = outcome.error, outcome.traceback
            decisions = self._finish(job, jpb.JOB_STATE_FAILED, jpb.Event(
                failed=jpb.Failed(error=outcome.error, traceback=outcome.traceback)), changes)
        for decision in decisions:
            self._apply(decision, changes, queued)
        self._spawn(self._commit(changes, queued))

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_log_failure)

    # -- requests ----------------------------------------------------------------

    async def cancel(self, caller: str, job_id: str, reason: str, *, admin: bool = False) -> jpb.Job:
        """Cancel a waiting, queued or running job; a terminal job is returned unchanged."""
        job = await self.get(caller, job_id, admin=admin)
        active = self._active.get(job.id)
        if active is None or active.state in TERMINAL_STATES:
            return job
        changes: list[Change] = []
        queued: list[str] = []
        self.scheduler.remove(job_id)
        if active.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
            self.executor.cancel(job_id)
        cause = jpb.Cause(kind=jpb.Cause.KIND_REQUESTED, by=caller,
                          message=f"cancelled by {caller}" + (f": {reason[:500]}" if reason else ""))
        for decision in self._finish(active, jpb.JOB_STATE_CANCELLED,
                                     jpb.Event(cancelled=jpb.Cancelled(cause=cause)), changes):
            self._apply(decision, changes, queued)
        snapshot = jpb.Job.FromString(active.SerializeToString())
        await self._commit(changes, queued)
        snapshot.last_seq = changes[0].event.seq
        return snapshot

    async def get(self, caller: str, job_id: str, *, admin: bool = False) -> jpb.Job:
        try:
            check_job_id(job_id)
        except InvalidInput as exc:
            fail(Code.INVALID_ARGUMENT, str(exc))
        job = self._active.get(job_id)
        if job is not None:
            job = jpb.Job.FromString(job.SerializeToString())
        else:
            job = await self.store.get(job_id)
        if job is None or (job.owner != caller and not admin):
            fail(Code.NOT_FOUND, f"site {self.site.name!r} has no job {job_id} of yours")
        return job

    async def list(self, caller: str, states: Iterable[int], after_id: str, limit: int,
                   *, admin: bool = False) -> list[jpb.Job]:
        limit = min(max(limit or 100, 1), 1000)
        bad = [s for s in states if s not in STATE_NAMES]
        if bad:
            fail(Code.INVALID_ARGUMENT, f"unknown job state {bad[0]} in the filter")
        return await self.store.list(None if admin else caller, list(states), after_id, limit)

    async def watch(self, caller: str, job_id: str, from_seq: int, *, admin: bool = False,
                    idle: float = 15.0) -> AsyncIterator[jpb.WatchResponse]:
        """Replay committed events after `from_seq`, then follow live; see events.EventHub."""
        if job_id:
            await self.get(caller, job_id, admin=admin)
        if from_seq < 0:
            fail(Code.INVALID_ARGUMENT, "from_seq must be 0 or a sequence number already seen")
        owner = None if admin else caller
        async for item in self.hub.follow(self.store, from_seq, job_id=job_id or None, owner=owner, idle=idle):
            yield item

    # -- helpers -----------------------------------------------------------------

    def _condition_of(self, job: jpb.Job) -> Condition | None:
        if job.id not in self._conditions:
            self._conditions[job.id] = condition_from_proto(job.spec.when)
        return self._conditions[job.id]

    def _referenced(self, jobs: Iterable[jpb.Job]) -> set[str]:
        return {node.atom.job_id for job in jobs for node in job.spec.when.postfix if node.HasField("atom")}

    async def _atom_states(self, job_ids: set[str]) -> dict[AtomKey, State]:
        stored = await self.store.get_many(j for j in job_ids if j not in self._active)
        states: dict[AtomKey, State] = {}
        for job_id in job_ids:
            job = self._active.get(job_id) or stored.get(job_id)
            if job is not None:
                for kind, state in job_atom_states(STATE_NAMES[job.state]).items():
                    states[AtomKey(self.site.name, job_id, kind)] = state
        return states


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background commit failed", exc_info=task.exception())


