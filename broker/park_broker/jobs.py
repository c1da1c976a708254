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
import functools
import hashlib
import hmac
import json
import logging
import math
import operator
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from park._proto import jobs_pb2 as jpb
from park._wire import (STATE_NAMES, TERMINAL_STATES, InvalidInput, atom_to_proto, check_job_id, check_json,
                        check_name, check_target, condition_from_proto)
from park.conditions import Atom, AtomKey, Condition, State
from park.expressions import Expression, ExpressionError, improved_state
from park_broker.errors import BrokerError, Code, fail
from park_broker.events import EventHub
from park_broker.executor import Executor, Outcome, Task
from park_broker.scheduler import Decision, Scheduler, Verdict, job_atom_states
from park_broker.store import Change, Store
from park_broker.worker import RESERVED_NAMES

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
MAX_ARGV = 4096
MAX_CONTESTANTS = 64
MAX_REPORT_VALUES = 64
MAX_HISTORY = 10_000
DEFAULT_OUTPUT = "output"
_VALUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(slots=True)
class SiteInfo:
    name: str
    files_root: Path
    address: str = ""        # where jobs reach the broker to report progress; set once bound
    cert_path: str = ""


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
        self._expressions: dict[str, Expression] = {}
        # Progress reports of active jobs, for improved(...) atoms that arrive after the report.
        self._reports: dict[str, list[dict[str, float]]] = {}
        self._report_key = secrets.token_bytes(32)   # job tokens die with the process, as attempts do
        self.failed = asyncio.Event()   # set when the store refused a commit: the broker must stop

    # -- start-up ----------------------------------------------------------------

    async def recover(self) -> None:
        """Reload active jobs: re-run interrupted ones, re-evaluate waiting ones."""
        jobs = await self.store.active()
        for job in jobs:
            self._active[job.id] = job
        self._reports.update(await self.store.reports(j.id for j in jobs))
        conditions = {j.id: self._condition_of_spec(j.spec) for j in jobs if j.state == jpb.JOB_STATE_WAITING}
        keys = {a.key for c in conditions.values() if c is not None for a in c.depends}
        stored = await self.store.get_many({k.job_id for k in keys} - set(self._active))
        histories = await self.store.reports({k.job_id for k in keys if k.kind == "improved" and k.job_id in stored})
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
            if job.id in conditions and job.state == jpb.JOB_STATE_WAITING:
                states = self._states_now(conditions[job.id], stored, histories)
                decision = self.scheduler.add(job.id, conditions[job.id], states)
                if decision is not None:
                    self._apply(decision, changes, queued, stored)
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
        # Reports of finished jobs that improved(...) atoms name; immutable, so reading them here is safe.
        histories = await self.store.reports({
            a.key.job_id for c in parsed if isinstance(c, Condition) for a in c.depends
            if a.key.kind == "improved" and a.key.job_id in stored})
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
                states = self._states_now(cond, stored, histories)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            job = self._new_job(owner, spec, now)
            self._active[job.id] = job
            changes.append(self._change(job, jpb.Event(submitted=jpb.Submitted(spec=spec, owner=owner)),
                                        insert=True))
            decision = self.scheduler.add(job.id, cond, states)
            if decision is not None:
                self._apply(decision, changes, queued, stored)
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
            elif which == "race":
                self._check_race(spec)
            else:
                raise InvalidInput("a job needs a Python call, a command line or a race")
            name = spec.output_name or DEFAULT_OUTPUT
            check_name(name)
            if name in RESERVED_NAMES:
                raise InvalidInput(f"output name {name!r} is reserved for the job's logs and result")
            if spec.requires:
                fail(Code.UNIMPLEMENTED, "requires= needs package support, which this broker does not have yet")
            cond = self._condition_of_spec(spec)
            for atom in cond.depends if cond is not None else ():
                if atom.key.kind == "improved":
                    self._expression(atom.key.expr)
        except (InvalidInput, ExpressionError) as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, f"job {spec.id[:40]!r}: {exc}") from None
        for atom in cond.depends if cond is not None else ():
            if atom.key.site != self.site.name:
                fail(Code.UNIMPLEMENTED, f"job {spec.id}: condition names a job at site {atom.key.site!r}; "
                                         f"this broker ({self.site.name!r}) has no federation peers yet")
        return cond

    @staticmethod
    def _check_race(spec: jpb.JobSpec) -> None:
        race = spec.race
        if not 1 <= len(race.contestants) <= MAX_CONTESTANTS:
            raise InvalidInput(f"a race needs 1 to {MAX_CONTESTANTS} contestants")
        if len(set(race.contestants)) != len(race.contestants):
            raise InvalidInput("a race names the same contestant twice")
        for job_id in race.contestants:
            check_job_id(job_id, "contestant")
        if spec.when.postfix:
            raise InvalidInput("a race has no when=; it starts judging at once")

    def _condition_of_spec(self, spec: jpb.JobSpec) -> Condition | None:
        """The condition a job waits on; a race waits on any contestant's success."""
        if spec.WhichOneof("work") != "race":
            return condition_from_proto(spec.when)
        kind, expr = ("improved", spec.race.until) if spec.race.until else ("completed", "")
        atoms = [Atom(AtomKey(self.site.name, j, kind, expr)) for j in spec.race.contestants]
        return functools.reduce(operator.or_, atoms)

    def _expression(self, source: str) -> Expression:
        expr = self._expressions.get(source)
        if expr is None:
            expr = self._expressions[source] = Expression(source)
        return expr

    def _states_now(self, cond: Condition | None, stored: dict[str, jpb.Job],
                    histories: dict[str, list[dict[str, float]]]) -> dict[AtomKey, State]:
        states: dict[AtomKey, State] = {}
        if cond is None:
            return states
        for atom in cond.depends:
            key: AtomKey = atom.key  # type: ignore[assignment]
            job = self._active.get(key.job_id) or stored.get(key.job_id)
            if job is None:
                fail(Code.NOT_FOUND, f"condition names job {key.job_id}, which site {self.site.name!r} "
                                     "does not have; submit it first (earlier in the same batch is fine)")
            states[key] = self._atom_state(job, key, histories)
        return states

    def _atom_state(self, job: jpb.Job, key: AtomKey, histories: dict[str, list[dict[str, float]]]) -> State:
        if key.kind != "improved":
            return job_atom_states(STATE_NAMES[job.state])[key.kind]
        return self._improved_state(job, key, self._reports.get(job.id) or histories.get(job.id, []))

    def _improved_state(self, job: jpb.Job, key: AtomKey, reports: list[dict[str, float]]) -> State:
        completed = job.state == jpb.JOB_STATE_COMPLETED
        return improved_state(self._expression(key.expr), reports, finished=job.state in TERMINAL_STATES,
                              result=_result_values(job) if completed else None)

    def _new_job(self, owner: str, spec: jpb.JobSpec, now: float) -> jpb.Job:
        directory = self.site.files_root / owner / spec.id
        return jpb.Job(id=spec.id, site=self.site.name, owner=owner, spec=spec, state=jpb.JOB_STATE_WAITING,
                       url=f"park://{self.site.name}/files/{owner}/{spec.id}/{spec.output_name or DEFAULT_OUTPUT}",
                       filename=str(directory / (spec.output_name or DEFAULT_OUTPUT)),
                       directory=str(directory), submitted_at=now)

    # -- transitions ---------------------------------------------------------------

    def _apply(self, decision: Decision, changes: list[Change], queued: list[str],
               stored: dict[str, jpb.Job] | None = None) -> None:
        """Carry out a verdict and everything it cascades to (`stored`: finished jobs read for this batch)."""
        pending = [decision]
        while pending:
            d = pending.pop()
            job = self._active[d.job_id]
            if d.verdict is Verdict.START and job.spec.WhichOneof("work") == "race":
                pending += self._settle_race(job, d.atoms, changes, stored)
            elif d.verdict is Verdict.START:
                job.state = jpb.JOB_STATE_QUEUED
                changes.append(self._change(job, jpb.Event(queued=jpb.Queued(reason="condition holds"))))
                queued.append(job.id)
            else:
                kind = jpb.Cause.KIND_CONDITION if d.verdict is Verdict.CANCEL else jpb.Cause.KIND_NEVER_HOLDS
                what = ", ".join(str(a) for a in d.atoms)
                message = (f"its condition was cancelled by {what}" if d.verdict is Verdict.CANCEL
                           else f"its condition can never hold, given {what}")
                pending += self._finish(job, jpb.JOB_STATE_CANCELLED, jpb.Event(cancelled=jpb.Cancelled(
                    cause=jpb.Cause(kind=kind, message=message, atoms=[atom_to_proto(a) for a in d.atoms]))),
                    changes)

    def _settle_race(self, race: jpb.Job, winners: tuple[AtomKey, ...], changes: list[Change],
                     stored: dict[str, jpb.Job] | None) -> list[Decision]:
        """A contestant succeeded: cancel the others, complete the race with the winner's values."""
        ready = {k.job_id for k in winners}
        winner_id = next(j for j in race.spec.race.contestants if j in ready)
        winner = self._active.get(winner_id)
        decisions: list[Decision] = []
        for loser_id in race.spec.race.contestants:
            loser = self._active.get(loser_id)
            if loser_id != winner_id and loser is not None and loser.state not in TERMINAL_STATES:
                decisions += self._cancel_job(loser, jpb.Cause(
                    kind=jpb.Cause.KIND_RACE_LOST, by=race.id,
                    message=f"lost race {race.id} to {winner_id}"), changes)
        if winner is not None and winner.progress:
            values: dict[str, object] = dict(winner.progress)
        else:   # the winner is done: its result is what it won with
            record = winner or (stored or {}).get(winner_id)
            values = _result_values(record) if record is not None else {}
        race.result_json = json.dumps({"winner": winner_id, "values": values})
        return decisions + self._finish(race, jpb.JOB_STATE_COMPLETED, jpb.Event(
            completed=jpb.Completed(result_json=race.result_json)), changes)

    def _cancel_job(self, job: jpb.Job, cause: jpb.Cause, changes: list[Change]) -> list[Decision]:
        """Cancel a job that is not terminal: unindex it, stop its process, record the cause."""
        self.scheduler.remove(job.id)
        if job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
            self.executor.cancel(job.id)
        return self._finish(job, jpb.JOB_STATE_CANCELLED, jpb.Event(cancelled=jpb.Cancelled(cause=cause)), changes)

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
        # Pending improved(...) atoms were not satisfied by any report: only the final result can still do it.
        for key in self.scheduler.improved_atoms(job.id):
            decisions += self.scheduler.resolve(key, self._improved_state(job, key, [dict(job.progress)]))
        return decisions

    def _change(self, job: jpb.Job, event: jpb.Event, insert: bool = False, record: bool = True) -> Change:
        """An event and, unless `record` is False, a snapshot of the job's record to write with it."""
        event.job_id = job.id
        event.time = time.time()
        # Snapshot: later in-memory changes to the job must not be written under this event.
        snapshot = jpb.Job.FromString(job.SerializeToString()) if record else jpb.Job(id=job.id, owner=job.owner)
        return Change(job=snapshot, event=event, insert=insert, record=record)

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
                self._reports.pop(job.id, None)

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
               "PARK_JOB_FILENAME": str(work / output), "PARK_JOB_URL": job.url,
               "PARK_BROKER_ADDRESS": self.site.address, "PARK_BROKER_CERT": self.site.cert_path,
               "PARK_REPORT_TOKEN": self.report_token(job.id, attempt)}
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
        cause = jpb.Cause(kind=jpb.Cause.KIND_REQUESTED, by=caller,
                          message=f"cancelled by {caller}" + (f": {reason[:500]}" if reason else ""))
        for decision in self._cancel_job(active, cause, changes):
            self._apply(decision, changes, queued)
        snapshot = changes[0].job
        await self._commit(changes, queued)
        return snapshot

    # -- progress reports -----------------------------------------------------------

    def report_token(self, job_id: str, attempt: int) -> str:
        subject = f"{job_id}.{attempt}"
        return f"{subject}.{hmac.new(self._report_key, subject.encode(), hashlib.sha256).hexdigest()}"

    def check_report_token(self, token: str) -> tuple[str, int]:
        """The (job id, attempt) a job-scoped token was issued for; UNAUTHENTICATED if it is not ours."""
        job_id, _, rest = token.partition(".")
        attempt, _, _mac = rest.partition(".")
        if not attempt.isdigit() or not hmac.compare_digest(self.report_token(job_id, int(attempt)), token):
            fail(Code.UNAUTHENTICATED, "the report token is not valid for any job attempt of this broker")
        return job_id, int(attempt)

    async def report(self, job_id: str, attempt: int, reports: list[dict[str, float]]) -> None:
        """Record progress reports of a running attempt and resolve the improved(...) atoms they satisfy."""
        job = self._active.get(job_id)
        if job is None or job.state != jpb.JOB_STATE_RUNNING or job.attempts != attempt:
            fail(Code.FAILED_PRECONDITION, f"job {job_id} attempt {attempt} is not running; its reports are ignored")
        for values in reports:
            if len(values) > MAX_REPORT_VALUES:
                fail(Code.INVALID_ARGUMENT, f"a report holds at most {MAX_REPORT_VALUES} values")
            for name, value in values.items():
                if not _VALUE_NAME.fullmatch(name) or not math.isfinite(value):
                    fail(Code.INVALID_ARGUMENT, f"report value {name[:70]!r}={value} needs an identifier name "
                                                "and a finite number")
        changes: list[Change] = []
        queued: list[str] = []
        history = self._reports.setdefault(job_id, [])
        for i, values in enumerate(reports):
            history.append(values)
            job.progress.clear()
            job.progress.update(values)
            # The job's row is rewritten once per batch, with the last report's values.
            changes.append(self._change(job, jpb.Event(improved=jpb.Improved(values=values)),
                                        record=i == len(reports) - 1))
            for key in self.scheduler.improved_atoms(job_id):
                if self._expression(key.expr).evaluate(values):
                    for decision in self.scheduler.resolve(key, State.READY):
                        self._apply(decision, changes, queued)
        del history[:-MAX_HISTORY]
        await self._commit(changes, queued)

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


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background commit failed", exc_info=task.exception())




def _result_values(job: jpb.Job) -> dict[str, object]:
    """A job's JSON result when it is an object, else nothing."""
    try:
        value = json.loads(job.result_json) if job.result_json else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
