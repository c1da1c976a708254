"""Admitting a batch of submissions: each spec becomes a job, a memo hit, or a refusal.

`Submissions.submit_many` checks every spec (core.admission), reads what the
batch needs from the store, computes memo keys in batch order, and then, with
no await until the commit, decides the whole batch against the ledger: new
jobs, aliases of identical work (memo hits), safe retries of ids already held,
and the first verdicts of the scheduler. One bad spec never sinks its batch.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from park import tokens
from park._proto import jobs_pb2 as jpb
from park.conditions import Condition
from park_broker.core import memo
from park_broker.core.admission import DEFAULT_OUTPUT, Admission, Checked
from park_broker.core.arrivals import Arrivals, Turn
from park_broker.core.fairness import NO_LIMITS, Limits
from park_broker.core.jobgroups import check_joinable
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.remote import RemoteAtoms
from park_broker.core.scheduler import Scheduler
from park_broker.core.store import Store
from park_broker.core.transitions import Transitions
from park_broker.errors import BrokerError, Code, fail
from park_broker.site import SiteInfo

log = logging.getLogger(__name__)

MAX_BATCH = 10_000


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
    checked: Checked
    dirs: list[Path] = field(default_factory=list)
    coming: dict[str, str] = field(default_factory=dict)   # pins an install job has yet to receive
    inputs: str = ""    # the canonical document its memo key hashes (memo.canonical), if it has one
    key: str = ""
    error: BrokerError | None = None
    # Groups whose memo key the key depends on, as foreseen from members earlier in the batch: checked
    # against the groups' records when the job is decided (a member may be refused after all).
    foreseen: dict[str, str] = field(default_factory=dict)

    @property
    def cond(self) -> Condition | None:
        return self.checked.cond


class Submissions:
    def __init__(self, site: SiteInfo, store: Store, ledger: Ledger, scheduler: Scheduler, admission: Admission,
                 transitions: Transitions, remote: RemoteAtoms,
                 limits: Callable[[str], Limits] = lambda owner: NO_LIMITS):
        self.site = site
        self.limits = limits
        self.store = store
        self.ledger = ledger
        self.scheduler = scheduler
        self.admission = admission
        self.transitions = transitions
        self.remote = remote
        self.arrivals = Arrivals()
        self.files_root = os.fspath(site.files_root)

    async def submit_many(self, owner: str, specs: list[jpb.JobSpec],
                          may: frozenset[str] = frozenset({"submit", "upload"}), *,
                          stream: bytes = b"", number: int = 0, after: int = 0) -> list[Submission]:
        """Validate and store a batch; each spec is accepted or refused on its own.

        `may` is what the submitter is allowed: an install job (`install_service`) needs `upload`,
        every other job `submit`. `stream`, `number` and `after` place the batch among the submitter's
        batches in flight (core.arrivals): it is decided only after the batch it follows.

        Later specs may name earlier ones of the same batch (or of the batch it follows) in their
        conditions and arguments. Re-submitting an id with the same spec returns the existing job (a
        safe retry). A spec whose memo key matches a completed or still active job
        becomes another name (an alias) of that job: a memo hit.
        """
        turn = self.arrivals.arrive(owner, stream, number, after)
        try:
            if len(specs) > MAX_BATCH:
                fail(Code.INVALID_ARGUMENT, f"a batch holds at most {MAX_BATCH} jobs; got {len(specs)}")
            # Each spec is checked on its own, before the batch's turn: while the batch it follows is still
            # being decided (or reads the store), this one's checks use the event loop.
            prepared = self._check(owner, specs, may)
            await turn.wait()
            with self.ledger.submitting():
                return await self._submit_many(owner, prepared, turn)
        finally:
            turn.decided()   # also when the batch failed as a whole: the next one goes on

    def _check(self, owner: str, specs: list[jpb.JobSpec], may: frozenset[str]) -> list[_Prepared | BrokerError]:
        """Each spec checked on its own (its shape, and whether `owner` may submit it), reading nothing of
        other jobs."""
        prepared: list[_Prepared | BrokerError] = []
        for spec in specs:
            try:
                needed = "upload" if spec.WhichOneof("work") == "install" else "submit"
                if needed == "upload" and spec.install.site_wide:
                    needed = "admin"   # what every user's requires= may run is the operators' to publish
                if needed not in may:
                    fail(Code.PERMISSION_DENIED, f"job {spec.id[:40]}: user {owner!r} may not {needed} at site "
                                                 f"{self.site.name!r} (allowed: {', '.join(sorted(may)) or 'nothing'})")
                _check_delegation(owner, spec)
                prepared.append(_Prepared(spec, self.admission.validate(spec)))
            except BrokerError as exc:
                prepared.append(exc)
            except Exception as exc:  # noqa: BLE001 - a check that broke refuses its spec, not the batch
                prepared.append(_unexpected(spec, exc))
        return prepared

    async def _submit_many(self, owner: str, prepared: list[_Prepared | BrokerError], turn: Turn
                           ) -> list[Submission]:
        ok = [p for p in prepared if isinstance(p, _Prepared)]
        installing = self.ledger.installing()
        for p in ok:
            try:
                p.dirs, p.coming = await self.admission.packages_for(owner, p.spec, installing)
            except BrokerError as exc:
                p.error = exc
            except Exception as exc:  # noqa: BLE001 - as above
                p.error = _unexpected(p.spec, exc)
            pin = self.admission.installs(owner, p.spec)
            if pin is not None and p.error is None:
                installing.add(pin)    # later jobs of the batch may require what it installs
        wanted = {p.spec.id for p in ok} | {a.key.job_id for p in ok if p.cond is not None for a in p.cond.depends} | {
            j for p in ok for j in (*p.spec.race.contestants, *self.admission.referenced(p.checked))} | {
            p.spec.member_of for p in ok if p.spec.member_of}
        stored = await self.ledger.lookup(wanted)
        digests = await self.admission.file_digests(p.checked for p in ok)
        self._memo_keys(owner, ok, stored, digests)
        hits = await self.store.by_memo_keys(p.key for p in ok if p.key)
        # Reports of finished jobs that improved(...) atoms name; immutable, so reading them here is safe.
        histories = await self.store.reports({a.key.job_id for p in ok if p.cond is not None for a in p.cond.depends
                                              if a.key.kind == "improved" and a.key.job_id in stored})
        # From here to the commit nothing awaits: the batch is decided atomically.
        results: list[Submission] = []
        links: list[tuple[Path, str]] = []
        batch = Batch()
        now = time.time()
        joined: dict[str, tuple[jpb.Job, str]] = {}   # group -> (its record, the last member to join it)
        quota = self.limits(owner).max_waiting
        waiting = self.ledger.not_started(owner) if quota else 0
        for p in prepared:
            if isinstance(p, BrokerError) or p.error is not None:
                results.append(Submission(error=p if isinstance(p, BrokerError) else p.error))
                continue
            try:
                spec, cond = self._canonical(p.spec, p.cond, stored)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            existing = self.ledger.peek(spec.id) or stored.get(spec.id)
            if existing is not None:
                if existing.owner == owner and (existing.spec == spec or existing.memo_key == p.key):
                    results.append(Submission(job=existing, memo_hit=existing.id != spec.id))
                else:
                    results.append(Submission(error=BrokerError(
                        Code.ALREADY_EXISTS, f"job id {spec.id} is already taken; submit with a fresh id")))
                continue
            try:
                group = self._group_of(owner, spec, stored)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            if any(self._memo_key_now(g, stored) != key for g, key in p.foreseen.items()):
                p.key = p.inputs = ""   # a member foreseen was refused after all: no key, no memo hit
            twin = self.ledger.memo_twin(p.key) or hits.get(p.key or "")
            if twin is not None:
                self.ledger.alias(spec.id, owner, twin, batch, member_of=spec.member_of)
                links.append((self.site.files_root / owner / spec.id, twin.id))
                stored[twin.id] = stored[spec.id] = twin   # later jobs of the batch may name either
                if group is not None:
                    joined[group.id] = (group, twin.id)
                    for decision in self.transitions.join(twin, group, batch):
                        self.transitions.apply(decision, batch, stored)
                results.append(Submission(job=twin, memo_hit=True))
                continue
            try:
                states = self.transitions.states_now(owner, cond, stored, histories)
            except BrokerError as exc:
                results.append(Submission(error=exc))
                continue
            if spec.HasField("group"):
                self._add_group(owner, spec, now, batch)
                results.append(Submission(job=self.ledger.peek(spec.id)))
                continue
            if quota and waiting >= quota:
                results.append(Submission(error=BrokerError(Code.RESOURCE_EXHAUSTED, (
                    f"job {spec.id}: user {owner!r} may have {quota} jobs waiting or queued at site "
                    f"{self.site.name!r} and has {waiting}: submit it once some have started"))))
                continue
            waiting += 1
            job = self._new_job(owner, spec, now)
            if p.key:
                job.memo_key, job.memo_inputs = p.key, p.inputs
            self.ledger.add(job, self.admission.installs(owner, spec))
            batch.changes.append(self.ledger.change(job, _submitted(spec, owner), insert=True))
            if group is not None:   # before its condition is judged: a job cancelled at once still counts
                joined[group.id] = (group, job.id)
                for decision in self.transitions.join(job, group, batch):
                    self.transitions.apply(decision, batch, stored)
            decision = self.scheduler.add(job.id, cond, states)
            if decision is not None:
                self.transitions.apply(decision, batch, stored)
            else:
                self.remote.watch(job.spec, cond)
            results.append(Submission(job=job))
        for group, last in joined.values():   # one change of each group for the batch's joins
            self.transitions.announce(group, last, batch)
        # The next batch of the stream may be decided as soon as this one's changes are in the store's line,
        # which the commit below does before it first waits: so its admission overlaps this commit.
        turn.decided()
        if not links:
            await self.ledger.commit(batch)
            return results
        # Memo hits' directories are symlinks made off the event loop (file creation can be slow);
        # the batch's jobs start only once they exist, since their arguments may name them.
        await self.ledger.commit(Batch(batch.changes))
        await asyncio.to_thread(_make_links, links)
        self.ledger.release(batch.queued)
        return results

    def _memo_key_now(self, job_id: str, stored: dict[str, jpb.Job]) -> str:
        job = self.ledger.glance(job_id) or stored.get(job_id)
        return job.memo_key if job is not None else ""

    def _group_of(self, owner: str, spec: jpb.JobSpec, stored: dict[str, jpb.Job]) -> jpb.Job | None:
        """The active group a new member joins (None for a job of no group); BrokerError if it may not."""
        if not spec.member_of:
            return None
        group = check_joinable(self.ledger.peek(spec.member_of) or stored.get(spec.member_of), owner, spec.id,
                               self.site.name)
        live = self.ledger.record(group.id)   # joining changes its counts; a joinable group is active
        assert live is not None, group.id
        return live

    def _add_group(self, owner: str, spec: jpb.JobSpec, now: float, batch: Batch) -> None:
        """A group job: it waits for its members, counting them (core.jobgroups); the scheduler never holds it."""
        job = self._new_job(owner, spec, now)
        job.group.size = spec.group.size
        self.ledger.add(job)
        batch.changes.append(self.ledger.change(job, _submitted(spec, owner), insert=True))

    def _canonical(self, spec: jpb.JobSpec, cond: Condition | None, stored: dict[str, jpb.Job]
                   ) -> tuple[jpb.JobSpec, Condition | None]:
        """The spec with every job it names by an alias (a memo hit) named by the job itself."""
        def resolve(job_id: str) -> str:
            canonical = self.ledger.canonical(job_id)
            if canonical != job_id:
                return canonical
            return stored[job_id].id if job_id in stored else job_id

        # The condition's atoms name every job a spec names: those of its `when`, or a race's contestants.
        if cond is None or all(resolve(a.key.job_id) == a.key.job_id for a in cond.depends):
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
        """Fill in each spec's memo key, in batch order (an upstream job may be earlier in the batch). A
        group's key is known once its last member has joined, which may be earlier in this same batch: the
        members' keys are folded in here as they will be when they join (jobgroups.note_joined)."""
        in_batch: dict[str, str] = {}
        groups: dict[str, tuple[int, int, str]] = {}   # group -> (size, joined, digest) as foreseen
        sizes = {p.spec.id: p.spec.group.size for p in batch if p.spec.HasField("group")}
        foreseen: dict[str, str] = {}

        def key_of_job(used: dict[str, str], job_id: str) -> str | None:
            """An upstream job's key; `used` notes the foreseen group keys it gave."""
            if job_id in foreseen:
                used[job_id] = foreseen[job_id]
            if job_id in in_batch:
                return in_batch[job_id]
            job = self.ledger.glance(job_id) or stored.get(job_id)
            return job.memo_key if job is not None else None

        for p in batch:
            if p.error is not None:
                continue
            try:
                inputs = self.admission.memo_inputs(owner, p.spec, p.checked, p.dirs, p.coming, digests,
                                                    functools.partial(key_of_job, p.foreseen))
            except BrokerError as exc:
                p.error = exc
                continue
            except Exception as exc:  # noqa: BLE001 - as above
                p.error = _unexpected(p.spec, exc)
                continue
            if inputs is not None:
                p.inputs = memo.canonical(inputs)
                p.key = in_batch[p.spec.id] = memo.digest(p.inputs)
            group_id = p.spec.member_of
            if not group_id:
                continue
            if group_id not in groups:
                record = self.ledger.peek(group_id) or stored.get(group_id)
                counts = record.group if record is not None else jpb.GroupCounts(size=sizes.get(group_id, 0))
                groups[group_id] = (counts.size, counts.joined, counts.members_key)
            size, joined, digest = groups[group_id]
            groups[group_id] = size, joined + 1, (digest := memo.fold(digest, p.key))
            if joined + 1 == size and (key := memo.group_key(owner, size, digest)):
                in_batch[group_id] = foreseen[group_id] = key

    def _new_job(self, owner: str, spec: jpb.JobSpec, now: float) -> jpb.Job:
        # Strings rather than Path objects or os.path.join: this runs for every job submitted, and the owner,
        # id and output name are checked plain names.
        directory = f"{self.files_root}/{owner}/{spec.id}"
        output = spec.output_name or DEFAULT_OUTPUT
        return jpb.Job(id=spec.id, site=self.site.name, owner=owner, spec=spec, state=jpb.JOB_STATE_WAITING,
                       url=f"park://{self.site.name}/files/{owner}/{spec.id}/{output}",
                       filename=f"{directory}/{output}", directory=directory, submitted_at=now)


def _submitted(spec: jpb.JobSpec, owner: str) -> jpb.Event:
    """A new job's first event. Filled in place: `Event(submitted=Submitted(spec=spec))` copies the spec twice."""
    event = jpb.Event()
    event.submitted.owner = owner
    event.submitted.spec.CopyFrom(spec)
    return event


def _check_delegation(owner: str, spec: jpb.JobSpec) -> None:
    """A delegated token inside a submission (a fetch's, a watch grant) must speak for the submitter: else
    this site would present another user's token on the submitter's behalf (a confused deputy)."""
    if not spec.grants and spec.WhichOneof("work") != "fetch":
        return   # carries no token
    carried = [("the fetch's token", spec.fetch.token)] if spec.HasField("fetch") else []
    carried += [(f"the grant for site {site}", token) for site, token in sorted(spec.grants.items())]
    for what, token in carried:
        subject = tokens.subject_of(token)
        if subject is not None and subject != owner:
            fail(Code.PERMISSION_DENIED, f"job {spec.id[:40]}: {what} speaks for {subject!r}, not for you "
                                         f"({owner!r}); a job may carry only your own delegated tokens")


def _unexpected(spec: jpb.JobSpec, exc: Exception) -> BrokerError:
    """A spec a check could not handle: refused on its own, and logged in one line for the operator."""
    log.error("job %s: a check of its spec failed with %s: %s", spec.id[:40], type(exc).__name__, str(exc)[:200])
    return BrokerError(Code.INVALID_ARGUMENT, f"job {spec.id[:40]}: the spec could not be checked "
                                              f"({type(exc).__name__}); it was refused, the rest of its batch was not")


def _make_links(links: list[tuple[Path, str]]) -> None:
    for link, target in links:
        link.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)
