"""The in-memory records of active jobs, and the one place that commits their changes.

Every decision about a job is made synchronously on the event loop against the
records held here, collected into a `Batch` (the events and record snapshots to
write, the jobs to hand to an executor), then committed with `commit`, and only
after the commit are its effects released: events are published to watchers
(by the store's commit hook) and queued jobs handed to `release`. So a
dependent never starts on a completion that could still roll back, and the
order of decisions is the order of sequence numbers.

Invariants this module guarantees:
- The ledger holds every job that is not terminal, and terminal jobs until
  the commit that made them terminal has finished; any job not here is read
  from the store, where it is committed and terminal.
- A waiting job's record is kept packed, serialized and compressed, once its
  change is committed (`_Packer`: ~200 bytes, where a parsed `jpb.Job` takes
  ~3 KB, and a million jobs may wait), while the ledger holds more than
  `pack_above` active jobs: a smaller backlog (a few MB live) is not worth
  compressing a record that waits a few milliseconds and unpacking it again
  to start it. The compression runs in a thread, so a
  record stays live for a moment after its commit, and a record changed
  meanwhile stays live until the commit of that change. `record(id)` gives the live record to
  change, unpacking a packed one and keeping it live (a promotion); `peek(id)`
  gives one only to read, without promoting it, so that reading a waiting job
  (its owner, state or memo key, for a submission that names it) never makes
  its record live again. A promoted record that is still waiting is packed
  again, from memory (not from the snapshot written), when its next change is
  committed.
- While a submission is between its first store read and its decisions
  (`submitting()`), no job leaves memory, so what it read stays consistent
  with memory.
- A commit the store refuses sets `failed`: memory has run ahead of the disk,
  and the broker must stop so that recovery rebuilds memory from the store.

Other modules ask the ledger; none of them holds or mutates its dictionaries,
or changes a record it got from `peek`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from park._proto import jobs_pb2 as jpb
from park.wire import TERMINAL_STATES, InvalidInput, check_job_id
from park_broker.core.store import Change, Store
from park_broker.errors import Code, fail

log = logging.getLogger(__name__)

MAX_HISTORY = 10_000      # progress reports kept in memory per active job
PACK_ABOVE = 4096         # active jobs held before waiting records are packed (4,096 live: about 12 MB)

Pin = tuple[str, str, str]     # (owner or "" for site-wide, package, version) an install job provides
_NOT_STARTED = (jpb.JOB_STATE_WAITING, jpb.JOB_STATE_QUEUED)


@dataclass(slots=True)
class _Packed:
    """A waiting job's record, serialized and compressed (`_Packer`), beside its owner, which per-owner
    questions ask without unpacking the record. `data` starts with the digest of the job's memo key
    (`_digest`; 32 zero bytes for a job without one), so that a submission naming the job reads its key
    without unpacking it either."""

    owner: str
    data: bytes

    @classmethod
    def of(cls, job: jpb.Job, packed: bytes) -> _Packed:
        return cls(sys.intern(job.owner), (_digest(job.memo_key) if job.memo_key else _NO_DIGEST) + packed)

    @property
    def memo_key(self) -> str:
        digest = self.data[:_DIGEST_SIZE]
        return "" if digest == _NO_DIGEST else digest.hex()

    @property
    def record(self) -> bytes:
        return self.data[_DIGEST_SIZE:]


class Glance(NamedTuple):
    """What a submission reads of a job it names (its owner, state and memo key), without its record."""

    owner: str
    state: int
    memo_key: str


class _Packer:
    """Compresses serialized records for memory: DEFLATE against a preset dictionary, the first record
    packed. A site's records are much alike (its name, paths and callables; ids repeated in the url,
    filename and directory), so a 650-byte record packs into under 200; a 1 KiB window and a primed
    compressor, copied for each record, keep it to a few microseconds. The packed form never leaves
    this process (the store keeps plain records), so the dictionary can be any record at all."""

    _WBITS = -10        # raw DEFLATE, 1 KiB window: records are small

    def __init__(self) -> None:
        self._compress: Any = None
        self._decompress: Any = None
        self._priming = threading.Lock()   # packing runs on the event loop (recovery) and in threads

    def pack(self, record: bytes) -> bytes:
        if self._compress is None:
            with self._priming:
                if self._compress is None:
                    self._decompress = zlib.decompressobj(self._WBITS, record)
                    self._compress = zlib.compressobj(1, zlib.DEFLATED, self._WBITS, 2, zlib.Z_DEFAULT_STRATEGY,
                                                      record)
        compress = self._compress.copy()
        return compress.compress(record) + compress.flush()

    def pack_many(self, records: list[bytes]) -> list[bytes]:
        return [self.pack(record) for record in records]

    def unpack(self, data: bytes) -> bytes:
        decompress = self._decompress.copy()
        return decompress.decompress(data) + decompress.flush()


def _digest(memo_key: str) -> bytes:
    """A memo key (a sha256 in hex, core.memo) as the memo index holds it: 32 bytes, not 64 characters."""
    return bytes.fromhex(memo_key)


_DIGEST_SIZE = 32
_NO_DIGEST = bytes(_DIGEST_SIZE)


def _packable(job: jpb.Job) -> bool:
    """Whether a record is kept packed: a waiting job's, except a group's (its members' changes move it)."""
    return job.state == jpb.JOB_STATE_WAITING and not job.spec.HasField("group")


@dataclass(slots=True)
class Batch:
    """What one decision writes (`changes`, in order) and releases after its commit (`queued`), at once or
    `release_after` seconds later (a retry's backoff)."""

    changes: list[Change] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    release_after: float = 0.0


class Ledger:
    def __init__(self, site: str, store: Store):
        self.site = site
        self.store = store
        self.failed = asyncio.Event()   # set when the store refused a commit: the broker must stop
        # Called with the committed QUEUED jobs of each batch (set by the lifecycle: the dispatcher).
        self.release: Callable[[list[str]], None] = lambda queued: None
        self._active: dict[str, jpb.Job | _Packed] = {}
        # The live records among them (those not packed), and how many packed ones each owner has: what the
        # waiting quota counts, without a look at each of a million packed jobs per batch (`_hold`).
        self._live: dict[str, jpb.Job] = {}
        self._packed_by_owner: dict[str, int] = {}
        self._packer = _Packer()
        self.pack_above = PACK_ABOVE
        self._memo: dict[bytes, str] = {}           # memo key (its digest: `_digest`) -> id, for active jobs
        self._aliases: dict[str, str] = {}          # alias id -> job id, for active jobs' aliases
        self._aliased: dict[str, set[str]] = {}     # job id -> its alias ids (to forget them with it)
        self._installing: dict[Pin, str] = {}       # (package, version) -> active install job
        self._install_pin: dict[str, Pin] = {}      # install job -> its pin
        self._reports: dict[str, list[dict[str, float]]] = {}   # progress reports of active jobs
        # owner -> its active jobs whose specs carry delegated tokens, in the order they came (as keys)
        self._carrying: dict[str, dict[str, None]] = {}
        self._submitting = 0
        self._retiring: list[str] = []

    # -- reading ---------------------------------------------------------------------------

    def record(self, job_id: str) -> jpb.Job | None:
        """The live record of an active job, named by its id or one of its aliases, to change (a packed
        one is unpacked and kept live: promoted)."""
        job_id = self._aliases.get(job_id, job_id)
        entry = self._active.get(job_id)
        if isinstance(entry, _Packed):
            entry = self._parse(entry)
            self._hold(job_id, entry)
        return entry

    def peek(self, job_id: str) -> jpb.Job | None:
        """An active job's record, named by its id or one of its aliases, only to read: the live record,
        or an unpacked copy of a packed one, not kept (so changing it would change nothing)."""
        entry = self._active.get(self._aliases.get(job_id, job_id))
        return None if entry is None else self._parse(entry)

    def glance(self, job_id: str) -> Glance | None:
        """An active job's owner, state and memo key, named by its id or one of its aliases: what `peek`
        would say of them, without unpacking a packed record (a packed job is waiting)."""
        entry = self._active.get(self._aliases.get(job_id, job_id))
        if entry is None:
            return None
        if isinstance(entry, _Packed):
            return Glance(entry.owner, jpb.JOB_STATE_WAITING, entry.memo_key)
        return Glance(entry.owner, entry.state, entry.memo_key)

    def carrying_tokens(self, owner: str) -> Iterator[jpb.Job]:
        """The records of `owner`'s active jobs whose specs carry delegated tokens (a fetch's, or grants for
        other sites), only to read (as `peek`): a handful, where the owner may have a million jobs waiting."""
        return (job for job_id in list(self._carrying.get(owner, ())) if (job := self.peek(job_id)) is not None)

    def not_started(self, owner: str) -> int:
        """How many of `owner`'s active jobs wait or are queued, groups aside (what the waiting quota counts):
        each packed job waits."""
        return self._packed_by_owner.get(owner, 0) + sum(1 for job in self._live.values() if job.owner == owner and (
            job.state in _NOT_STARTED and not job.spec.HasField("group")))

    def canonical(self, job_id: str) -> str:
        """The job an alias (a memo hit) names, for active jobs; any other id unchanged."""
        return self._aliases.get(job_id, job_id)

    def memo_twin(self, key: str) -> jpb.Job | None:
        """The active job with memo key `key`, if any, only to read (as `peek`)."""
        return self.peek(self._memo.get(_digest(key), "")) if key else None

    def installing(self) -> set[Pin]:
        """The packages that active install jobs will provide."""
        return set(self._installing)

    def history(self, job_id: str) -> list[dict[str, float]]:
        """The progress reports an active job has made (empty for any other)."""
        return self._reports.get(job_id, [])

    async def lookup(self, job_ids: Iterable[str]) -> dict[str, jpb.Job]:
        """Stored records of the ids (and the jobs their aliases name) that are not in memory. An alias made
        in memory names its job's record here even before the alias is committed (a batch decided while the
        one that made it is being written)."""
        wanted = set(job_ids)
        aliased = {j: self._aliases[j] for j in wanted if j in self._aliases}
        found = await self.store.get_many(j for j in wanted | set(aliased.values()) if j not in self._active)
        for alias, target in aliased.items():
            if target in found:
                found.setdefault(alias, found[target])
        return found

    async def get(self, caller: str, job_id: str, *, admin: bool = False) -> jpb.Job:
        """A copy of a job's record, from memory or the store; NOT_FOUND unless the caller owns it."""
        try:
            check_job_id(job_id)
        except InvalidInput as exc:
            fail(Code.INVALID_ARGUMENT, str(exc))
        entry = self._active.get(self._aliases.get(job_id, job_id))
        if entry is not None:
            job = jpb.Job.FromString(entry.SerializeToString()) if isinstance(entry, jpb.Job) else self._parse(entry)
        else:
            job = (await self.store.get_many([job_id])).get(job_id)
        if job is None or (job.owner != caller and not admin):
            fail(Code.NOT_FOUND, f"site {self.site!r} has no job {job_id} of yours")
        return job

    # -- changing --------------------------------------------------------------------------

    def add(self, job: jpb.Job, install_pin: Pin | None = None) -> None:
        """Hold a new job's record (with its memo key and what it installs) until it is terminal."""
        job_id = sys.intern(job.id)   # one string for every index that names it (the scheduler's interns it too)
        self._hold(job_id, job)
        self._index(job_id, job, install_pin)

    def _hold(self, job_id: str, entry: jpb.Job | _Packed) -> None:
        """Keep an active job's record, live or packed, in place of what was kept of it."""
        was = self._active.get(job_id)
        if isinstance(was, _Packed):
            self._packed_by_owner[was.owner] -= 1
        self._active[job_id] = entry
        if isinstance(entry, _Packed):
            self._packed_by_owner[entry.owner] = self._packed_by_owner.get(entry.owner, 0) + 1
            self._live.pop(job_id, None)
        else:
            self._live[job_id] = entry

    def _index(self, job_id: str, job: jpb.Job, install_pin: Pin | None) -> None:
        if job.memo_key:
            self._memo[_digest(job.memo_key)] = job_id
        spec = job.spec
        if spec.grants or spec.HasField("fetch"):   # a token is replaced when renewed, never added
            self._carrying.setdefault(job.owner, {})[job_id] = None
        if install_pin is not None:
            self._installing[install_pin] = job_id
            self._install_pin[job_id] = install_pin

    def add_recovered(self, records: Iterable[bytes], install_pin: Callable[[str, jpb.JobSpec], Pin | None]
                      ) -> list[str]:
        """Hold the active jobs read back from the store at start-up (their serialized records); returns
        their ids, in order. Each is parsed once and a waiting one packed at once, so that a million of
        them are never live together. They are indexed as `add` indexes new ones: identical work submitted
        again is the same job, and a package an install job (`install_pin(owner, spec)`) will provide is
        still coming, as before the restart."""
        ids = []
        for record in records:
            job = jpb.Job.FromString(record)
            job_id = sys.intern(job.id)
            self._hold(job_id, _Packed.of(job, self._packer.pack(record)) if (
                _packable(job) and len(self._active) >= self.pack_above) else job)
            self._index(job_id, job, install_pin(job.owner, job.spec))
            ids.append(job_id)
        return ids

    def alias(self, alias_id: str, owner: str, twin: jpb.Job, batch: Batch, member_of: str = "") -> None:
        """Make `alias_id` another name of `twin` (a memo hit), recorded with the batch with a `reused` event
        under `alias_id`; `member_of`: the group the alias was submitted to join, which `twin` now counts for."""
        self._aliases[alias_id] = twin.id
        self._aliased.setdefault(twin.id, set()).add(alias_id)
        alias = jpb.Job(id=alias_id, owner=owner, spec=jpb.JobSpec(member_of=member_of))
        event = jpb.Event(job_id=alias_id, time=time.time(), reused=jpb.Reused(job_id=twin.id))
        batch.changes.append(Change(job=alias, event=event, record=False, alias_of=twin.id))

    def add_reports(self, job_id: str, reports: list[dict[str, float]]) -> None:
        history = self._reports.setdefault(job_id, [])
        history.extend(reports)
        del history[:-MAX_HISTORY]

    @staticmethod
    def change(job: jpb.Job, event: jpb.Event, insert: bool = False, record: bool = True) -> Change:
        """An event and, unless `record` is False, a snapshot of the job's record to write with it."""
        event.job_id = job.id
        event.time = time.time()
        # Snapshot: later in-memory changes to the job must not be written under this event.
        snapshot = jpb.Job(id=job.id, owner=job.owner)
        if record:
            snapshot.CopyFrom(job)   # half the cost of a serialize and a parse
        return Change(job=snapshot, event=event, insert=insert, record=record)

    # -- committing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def submitting(self) -> Iterator[None]:
        """Hold every job in memory for the duration (see the module docstring)."""
        self._submitting += 1
        try:
            yield
        finally:
            self._submitting -= 1
            self._retire()

    async def commit(self, batch: Batch) -> None:
        """Write the batch durably, then release its queued jobs; on a refused commit, stop the broker.
        What follows the commit happens even if the caller is cancelled while it waits (a client that
        hangs up): the batch is already in the store's line, and its jobs must still be released."""
        written = self._enqueue(batch)
        if written is not None:
            await asyncio.shield(written)

    def commit_soon(self, batch: Batch) -> None:
        """Commit from a synchronous callback (an executor's). The batch takes its place in the store's
        line at once, so it is written before any decision made after it; a failure is logged and stops
        the broker."""
        if batch.changes or batch.queued:
            self._enqueue(batch)

    def _enqueue(self, batch: Batch) -> asyncio.Future[None] | None:
        if not batch.changes:
            self._release(batch)
            return None
        written = self.store.enqueue(batch.changes)
        # Registered before anyone awaits it, so it runs before a waiting caller resumes.
        written.add_done_callback(functools.partial(self._committed, batch))
        return written

    def _committed(self, batch: Batch, written: asyncio.Future[None]) -> None:
        if written.cancelled() or written.exception() is not None:
            log.critical("commit failed; the broker stops so that recovery can restore a consistent state",
                         exc_info=None if written.cancelled() else written.exception())
            self.failed.set()
            return
        for change in batch.changes:
            # Not by alias: an alias's event (`reused`) is not the job's own. A record packed since the
            # change was made (by an earlier commit) is promoted here, and packed again below.
            if change.job.id in self._active and (active := self.record(change.job.id)) is not None:
                active.last_seq = max(active.last_seq, change.event.seq)
        self._release(batch)
        waiting: dict[str, jpb.Job] = {}
        packing = len(self._active) > self.pack_above
        for change in batch.changes:
            job = self._active.get(change.job.id)
            if not isinstance(job, jpb.Job):
                continue
            if job.state in TERMINAL_STATES and change.job.state in TERMINAL_STATES:
                self._retiring.append(job.id)
            elif packing and _packable(job):
                waiting[job.id] = job
        if waiting:
            self._pack_soon(list(waiting.values()))
        self._retire()

    def _pack_soon(self, jobs: list[jpb.Job]) -> None:
        """Keep committed waiting jobs' live records packed. Compressing is done in a thread (zlib lets go of
        the GIL): it cost the event loop more than any other step of a submission after its commit. A
        record changed in the meantime is left live, and packed after the commit of that change."""
        records = [job.SerializeToString() for job in jobs]
        packing = asyncio.get_running_loop().run_in_executor(None, self._packer.pack_many, records)
        packing.add_done_callback(functools.partial(self._packed, jobs, records))

    def _packed(self, jobs: list[jpb.Job], records: list[bytes], packing: asyncio.Future[list[bytes]]) -> None:
        if packing.cancelled() or packing.exception() is not None:
            return   # the records stay live: correct, only larger (a loop closing, or no memory)
        for job, record, packed in zip(jobs, records, packing.result()):
            if self._active.get(job.id) is job and _packable(job) and job.SerializeToString() == record:
                self._hold(job.id, _Packed.of(job, packed))

    def _release(self, batch: Batch) -> None:
        if batch.release_after > 0 and batch.queued:
            asyncio.get_running_loop().call_later(batch.release_after, self.release, batch.queued)
        else:
            self.release(batch.queued)

    def _parse(self, entry: jpb.Job | _Packed) -> jpb.Job:
        return entry if isinstance(entry, jpb.Job) else jpb.Job.FromString(self._packer.unpack(entry.record))

    def _retire(self) -> None:
        """Forget committed terminal jobs, unless a submission is between its reads and its decisions."""
        if self._submitting:
            return
        for job_id in self._retiring:
            entry = self._active.pop(job_id, None)
            if entry is None:
                continue
            self._live.pop(job_id, None)
            job = self._parse(entry)   # retiring jobs are terminal, so live: this parses nothing
            self._reports.pop(job.id, None)
            if job.memo_key and self._memo.get(key := _digest(job.memo_key)) == job.id:
                del self._memo[key]
            for alias in self._aliased.pop(job.id, ()):
                self._aliases.pop(alias, None)
            carrying = self._carrying.get(job.owner)
            if carrying is not None:
                carrying.pop(job.id, None)
                if not carrying:
                    del self._carrying[job.owner]
            pin = self._install_pin.pop(job.id, None)
            if pin is not None and self._installing.get(pin) == job.id:
                del self._installing[pin]
        self._retiring.clear()

