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
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES, TERMINAL_STATES, InvalidInput, atom_to_proto, check_job_id
from park.conditions import AtomKey, Condition, State
from park.expressions import improved_state
from park_broker.core import memo
from park_broker.transfer import download
from park_broker.core.admission import DEFAULT_OUTPUT, Admission
from park_broker.errors import BrokerError, Code, fail
from park_broker.core.events import EventHub
from park_broker.execution.base import Executor, Outcome, Task
from park_broker.federation.links import PeerLinks
from park_broker.packages.store import PackageStore
from park_broker.core.scheduler import Decision, Scheduler, Verdict, job_atom_states
from park_broker.core.store import Change, Store

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
MAX_REPORT_VALUES = 64
MAX_HISTORY = 10_000
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
    memo_hit: bool = False


@dataclass(slots=True)
class _Prepared:
    """A spec on its way in: its condition, packages and memo key, or why it is refused."""

    spec: jpb.JobSpec
    cond: Condition | None
    dirs: list[Path] = field(default_factory=list)
    coming: dict[str, str] = field(default_factory=dict)   # pins an install job has yet to receive
    inputs: dict[str, Any] | None = None
    key: str = ""
    error: BrokerError | None = None


class JobManager:
    def __init__(self, site: SiteInfo, store: Store, executor: Executor, hub: EventHub, packages: PackageStore,
                 peers: frozenset[str] = frozenset()):
        self.site = site
        self.store = store
        self.executor = executor
        self.hub = hub
        self.packages = packages
        self.admission = Admission(site.name, site.files_root, packages, peers)
        # Set by the server when the site has peers: where remote atoms are asked for.
        self.federation: PeerLinks | None = None
        # Set by the server: makes a progress callback that counts one fetch's bytes for the metrics.
        self.transfer_meter: Callable[[], download.Progress] | None = None
        self.scheduler = Scheduler()
        self._active: dict[str, jpb.Job] = {}
        self._memo: dict[str, str] = {}             # memo key -> id, for active jobs
        self._aliases: dict[str, str] = {}          # alias id -> job id, for active jobs' aliases
        self._aliased: dict[str, set[str]] = {}     # job id -> its alias ids (to forget them with it)
        self._installing: dict[tuple[str, str], str] = {}   # (package, version) -> active install job
        self._fetches: dict[str, asyncio.Task[None]] = {}   # running fetch jobs
        self._submitting = 0                     # submissions between their first read and their decisions
        self._retiring: list[str] = []           # terminal jobs to forget once none is
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
        conditions = {j.id: self.admission.condition_of(j.spec) for j in jobs if j.state == jpb.JOB_STATE_WAITING}
        keys = {a.key for c in conditions.values() if c is not None for a in c.depends}
        stored = await self.store.get_many({k.job_id for k in keys if k.site == self.site.name} - set(self._active))
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
                else:
                    self._watch_remote(job.spec, conditions[job.id])
        if changes:
            await self._commit(changes, queued)
        else:
            self._release(queued)
        log.info("recovered %d active jobs, %d to run", len(jobs), len(queued))

    # -- submission --------------------------------------------------------------

    async def submit_many(self, owner: str, specs: list[jpb.JobSpec]) -> list[Submission]:
        """Validate and store a batch; each spec is accepted or refused on its own.

        Later specs may name earlier ones of the same batch in their conditions and
        arguments. Re-submitting an id with the same spec returns the existing job (a
        safe retry). A spec whose memo key matches a completed or still active job
        becomes another name (an alias) of that job: a memo hit.
        """
        if len(specs) > MAX_BATCH:
            fail(Code.INVALID_ARGUMENT, f"a batch holds at most {MAX_BATCH} jobs; got {len(specs)}")
        self._submitting += 1
        try:
            return await self._submit_many(owner, specs)
        finally:
            self._submitting -= 1
            self._retire()

    async def _submit_many(self, owner: str, specs: list[jpb.JobSpec]) -> list[Submission]:
        prepared: list[_Prepared | BrokerError] = []
        for spec in specs:
            try:
                prepared.append(_Prepared(spec, self.admission.validate(spec)))
            except BrokerError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if isinstance(p, _Prepared)]
        installing = set(self._installing)
        for p in ok:
            try:
                p.dirs, p.coming = await self.admission.packages_for(p.spec, installing)
            except BrokerError as exc:
                p.error = exc
            pin = self.admission.installs(p.spec)
            if pin is not None and p.error is None:
                installing.add(pin)    # later jobs of the batch may require what it installs
        wanted = {p.spec.id for p in ok} | {a.key.job_id for p in ok if p.cond is not None for a in p.cond.depends} | {
            j for p in ok for j in (*p.spec.race.contestants, *self.admission.referenced(p.spec))}
        stored = await self._lookup(wanted)
        digests = await self.admission.file_digests([p.spec for p in ok])
        self._memo_keys(owner, ok, stored, digests)
        hits = await self.store.by_memo_keys(p.key for p in ok if p.key)
        # Reports of finished jobs that improved(...) atoms name; immutable, so reading them here is safe.
        histories = await self.store.reports({a.key.job_id for p in ok if p.cond is not None for a in p.cond.depends
                                              if a.key.kind == "improved" and a.key.job_id in stored})
        # From here to the commit nothing awaits: the batch is decided atomically.
        results: list[Submission] = []
        links: list[tuple[Path, str]] = []
        changes: list[Change] = []
        queued: list[str] = []
        now = time.time()
        for p in prepared:
            if isinstance(p, BrokerError) or p.error is not None:
                results.append(Submission(error=p if isinstance(p, BrokerError) else p.error))
                continue
            try:
                spec, cond = self._canonical(p.spec, p.cond, stored)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            existing = self._active.get(self._aliases.get(spec.id, spec.id)) or stored.get(spec.id)
            if existing is not None:
                if existing.owner == owner and (existing.spec == spec or existing.memo_key == p.key):
                    results.append(Submission(job=existing, memo_hit=existing.id != spec.id))
                else:
                    results.append(Submission(error=BrokerError(
                        Code.ALREADY_EXISTS, f"job id {spec.id} is already taken; submit with a fresh id")))
                continue
            twin = self._active.get(self._memo.get(p.key, "")) if p.key else None
            twin = twin or hits.get(p.key or "")
            if twin is not None:
                self._alias(owner, spec, twin, changes, links)
                stored[twin.id] = stored[spec.id] = twin   # later jobs of the batch may name either
                results.append(Submission(job=twin, memo_hit=True))
                continue
            try:
                states = self._states_now(cond, stored, histories)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            job = self._new_job(owner, spec, now)
            if p.key:
                job.memo_key, job.memo_inputs = p.key, memo.canonical(p.inputs)
                self._memo[p.key] = job.id
            self._active[job.id] = job
            pin = self.admission.installs(spec)
            if pin is not None:
                self._installing[pin] = job.id
            changes.append(self._change(job, jpb.Event(submitted=jpb.Submitted(spec=spec, owner=owner)),
                                        insert=True))
            decision = self.scheduler.add(job.id, cond, states)
            if decision is not None:
                self._apply(decision, changes, queued, stored)
            else:
                self._watch_remote(job.spec, cond)
            results.append(Submission(job=job))
        if not links:
            await self._commit(changes, queued)
            return results
        # Memo hits' directories are symlinks made off the event loop (file creation can be slow);
        # the batch's jobs start only once they exist, since their arguments may name them.
        await self._commit(changes, [])
        await asyncio.to_thread(_make_links, links)
        self._release(queued)
        return results

    def _canonical(self, spec: jpb.JobSpec, cond: Condition | None, stored: dict[str, jpb.Job]
                   ) -> tuple[jpb.JobSpec, Condition | None]:
        """The spec with every job it names by an alias (a memo hit) named by the job itself."""
        def resolve(job_id: str) -> str:
            return self._aliases.get(job_id) or (stored[job_id].id if job_id in stored else job_id)

        names = [n.atom.job_id for n in spec.when.postfix if n.HasField("atom")] + list(spec.race.contestants)
        if all(resolve(j) == j for j in names):
            return spec, cond
        canonical = jpb.JobSpec()
        canonical.CopyFrom(spec)
        for node in canonical.when.postfix:
            if node.HasField("atom"):
                node.atom.job_id = resolve(node.atom.job_id)
        if spec.HasField("race"):   # touching race on another kind of job would switch its oneof
            canonical.race.contestants[:] = [resolve(j) for j in spec.race.contestants]
        if canonical.HasField("race") and len(set(canonical.race.contestants)) != len(canonical.race.contestants):
            fail(Code.INVALID_ARGUMENT, f"job {spec.id}: two contestants of the race are the same job (memo hits "
                                        "of identical work); vary them, or submit them with memo=False")
        return canonical, self.admission.condition_of(canonical)

    def _memo_keys(self, owner: str, batch: list[_Prepared], stored: dict[str, jpb.Job],
                   digests: dict[str, str]) -> None:
        """Fill in each spec's memo key, in batch order (an upstream job may be earlier in the batch)."""
        in_batch: dict[str, str] = {}

        def key_of_job(job_id: str) -> str | None:
            job = self._active.get(self._aliases.get(job_id, job_id)) or stored.get(job_id)
            return in_batch.get(job_id) or (job.memo_key if job is not None else None)

        for p in batch:
            if p.error is not None:
                continue
            try:
                p.inputs = self.admission.memo_inputs(owner, p.spec, p.dirs, p.coming, digests, key_of_job)
            except BrokerError as exc:
                p.error = exc
                continue
            if p.inputs is not None:
                p.key = in_batch[p.spec.id] = memo.key_of(p.inputs)

    def _alias(self, owner: str, spec: jpb.JobSpec, twin: jpb.Job, changes: list[Change],
               links: list[tuple[Path, str]]) -> None:
        """Make `spec.id` another name of `twin`; its directory becomes a relative symlink (`links`)."""
        self._aliases[spec.id] = twin.id
        self._aliased.setdefault(twin.id, set()).add(spec.id)
        changes.append(Change(job=jpb.Job(id=spec.id, owner=owner), event=jpb.Event(), alias_of=twin.id))
        links.append((self.site.files_root / owner / spec.id, twin.id))

    async def _lookup(self, job_ids: set[str]) -> dict[str, jpb.Job]:
        """Stored records of the ids not in memory. No job leaves memory while a submission is
        in progress (`_retire`), so these and memory stay consistent until its decisions."""
        job_ids = {self._aliases.get(j, j) for j in job_ids} | job_ids
        return await self.store.get_many(j for j in job_ids if j not in self._active)

    def _states_now(self, cond: Condition | None, stored: dict[str, jpb.Job],
                    histories: dict[str, list[dict[str, float]]]) -> dict[AtomKey, State]:
        states: dict[AtomKey, State] = {}
        if cond is None:
            return states
        for atom in cond.depends:
            key: AtomKey = atom.key  # type: ignore[assignment]
            if key.site != self.site.name:
                states[key] = State.PENDING   # until its site says otherwise (federation)
                continue
            job = self._active.get(self._aliases.get(key.job_id, key.job_id)) or stored.get(key.job_id)
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
        return improved_state(self.admission.expression(key.expr), reports, finished=job.state in TERMINAL_STATES,
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
            fetching = self._fetches.pop(job.id, None)
            if fetching is not None:
                fetching.cancel()
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
                self._retiring.append(job.id)
        self._retire()

    def _retire(self) -> None:
        """Forget committed terminal jobs, unless a submission is between its reads and its decisions:
        while one is, `_active` only grows, so what it read stays consistent with memory."""
        if self._submitting:
            return
        for job_id in self._retiring:
            job = self._active.pop(job_id, None)
            if job is None:
                continue
            self._reports.pop(job.id, None)
            if self._memo.get(job.memo_key) == job.id:
                del self._memo[job.memo_key]
            for alias in self._aliased.pop(job.id, ()):
                self._aliases.pop(alias, None)
            pin = self.admission.installs(job.spec)
            if pin is not None and self._installing.get(pin) == job.id:
                del self._installing[pin]
        self._retiring.clear()

    def _release(self, queued: list[str]) -> None:
        """Hand committed QUEUED jobs to the executor (unless cancelled meanwhile)."""
        for job_id in queued:
            job = self._active.get(job_id)
            # An install job waits for its upload (Packages.Upload), not for a worker.
            if job is None or job.state != jpb.JOB_STATE_QUEUED or job.spec.WhichOneof("work") == "install":
                continue
            if job.spec.WhichOneof("work") == "fetch":   # network work: done here, not by a worker
                self._start_fetch(job)
                continue
            try:
                task = self._task(job)
            except BrokerError as exc:   # a package it requires was not installed after all
                self._settle(job.id, Outcome(ok=False, error=exc.message))
                continue
            self.executor.submit(task)

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
        common["python_path"] = tuple(str(d) for d in self.packages.resolve(list(spec.requires)))
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
        self._settle(job_id, outcome)

    def _settle(self, job_id: str, outcome: Outcome) -> None:
        """Complete or fail an active job with `outcome`, and everything that follows from it."""
        job = self._active[job_id]
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

    # -- fetches ------------------------------------------------------------------------

    def _start_fetch(self, job: jpb.Job) -> None:
        attempt = job.attempts + 1
        self.on_started(job.id, attempt)
        self._fetches[job.id] = asyncio.get_running_loop().create_task(self._fetch(job.id, attempt))

    async def _fetch(self, job_id: str, attempt: int) -> None:
        """Pull a fetch job's file from its site; the job's directory appears only when it is complete."""
        job = self._active[job_id]
        site, path = self.admission.fetch_source(job.spec)
        final_dir = Path(job.directory)
        work = final_dir.parent / f".{job.id}.attempt-fetch"   # the same name on every attempt: it resumes
        name = job.spec.output_name
        assert self.federation is not None
        channel = self.federation.channel(site)
        metadata = (("authorization", f"Bearer {job.spec.fetch.token}"),)

        def open_stream(offset: int) -> AsyncIterator[fipb.Chunk]:
            return files_pb2_grpc.FilesStub(channel).Read(fipb.ReadRequest(path=path, offset=offset),
                                                        metadata=metadata)
        try:
            work.mkdir(parents=True, exist_ok=True)
            meter = self.transfer_meter() if self.transfer_meter is not None else None
            size, sha = await download.fetch(open_stream, work / f".{name}.part", work / name, on_progress=meter)
            await asyncio.to_thread(_replace_dir, work, final_dir)
            outcome = Outcome(ok=True, outputs=((name, str(final_dir / name), size, sha),))
        except BrokerError as exc:
            outcome = Outcome(ok=False, error=f"fetching {job.spec.fetch.url}: {exc.message}")
        finally:
            self._fetches.pop(job_id, None)
        self.on_finished(job_id, attempt, outcome)

    # -- federation ----------------------------------------------------------------------

    def _watch_remote(self, spec: jpb.JobSpec, cond: Condition | None) -> None:
        """Ask the peers for the remote atoms a newly waiting job needs."""
        if cond is None or self.federation is None:
            return
        for atom in cond.depends:
            if atom.key.site != self.site.name:
                self.federation.watch(atom.key, spec.grants[atom.key.site])

    def on_remote_resolved(self, key: AtomKey, state: State, reason: str) -> None:
        """A peer reported a remote atom's resolution (or refused to: `reason`)."""
        if reason:
            log.warning("%s", reason)
        changes: list[Change] = []
        queued: list[str] = []
        for decision in self.scheduler.resolve(key, state):
            self._apply(decision, changes, queued)
        self._spawn(self._commit(changes, queued))

    async def atom_state(self, key: AtomKey) -> tuple[State, int, str]:
        """(state, sequence number of the event that resolved it or 0, owner) of a local atom, for peers.

        Read from the store, never from memory: a peer must only ever see what is
        committed, since what it sees must not roll back if this broker crashes."""
        job = (await self.store.get_many([key.job_id])).get(key.job_id)
        if job is None:
            fail(Code.NOT_FOUND, f"site {self.site.name!r} has no job {key.job_id}")
        if key.kind == "improved":
            state = self._improved_state(job, key, (await self.store.reports([job.id])).get(job.id, []))
        else:
            state = job_atom_states(STATE_NAMES[job.state])[key.kind]
        return state, (job.last_seq if state is not State.PENDING else 0), job.owner

    # -- installs and memo reports -------------------------------------------------------

    async def install(self, caller: str, job_id: str, sha256: str, wheel: Path, filename: str) -> jpb.Job:
        """Install an uploaded wheel for install job `job_id` and finish the job with the outcome.

        The upload must match the job's declared file name and digest. A refused
        wheel fails the job and raises the refusal for the uploader."""
        job = await self.get(caller, job_id)
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
            ref = await asyncio.to_thread(self.packages.install_wheel, wheel, sha256, filename)
        except BrokerError as exc:
            self._settle(job.id, Outcome(ok=False, error=exc.message))
            raise
        self._settle(job.id, Outcome(ok=True, result_json=json.dumps(
            {"name": ref.name, "version": ref.version, "sha256": ref.sha256})))
        return await self.get(caller, job_id)

    async def why(self, caller: str, job_id: str) -> jpb.MemoReport:
        """Was `job_id` reused, and if not, which component of its key differs from the nearest earlier run."""
        job = await self.get(caller, job_id)
        if job.id != job_id:
            return jpb.MemoReport(hit=True, job_id=job.id)
        report = jpb.MemoReport(hit=False, job_id=job.id)
        if not job.memo_key:
            report.differences.append("memoization was off for this job (memo=False, or a race)")
            return report
        nearest = await self.store.nearest(job)
        if nearest is None:
            report.differences.append("no earlier job of yours ran the same callable at this site")
            return report
        report.nearest_id = nearest.id
        report.differences.extend(memo.differences(json.loads(nearest.memo_inputs), json.loads(job.memo_inputs)))
        return report

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
                if self.admission.expression(key.expr).evaluate(values):
                    for decision in self.scheduler.resolve(key, State.READY):
                        self._apply(decision, changes, queued)
        del history[:-MAX_HISTORY]
        await self._commit(changes, queued)

    async def get(self, caller: str, job_id: str, *, admin: bool = False) -> jpb.Job:
        try:
            check_job_id(job_id)
        except InvalidInput as exc:
            fail(Code.INVALID_ARGUMENT, str(exc))
        job = self._active.get(self._aliases.get(job_id, job_id))
        if job is not None:
            job = jpb.Job.FromString(job.SerializeToString())
        else:
            job = (await self.store.get_many([job_id])).get(job_id)
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
            job_id = (await self.get(caller, job_id, admin=admin)).id
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


def _make_links(links: list[tuple[Path, str]]) -> None:
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)


def _replace_dir(work: Path, final: Path) -> None:
    """Move a finished attempt's directory into place (a stale one from an unrecorded attempt goes)."""
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    os.rename(work, final)
