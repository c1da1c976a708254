"""Reading jobs: listings, event streams (`Watch`), and why a job was or was not reused (`Why`).

Nothing here changes a job. A caller sees only their own jobs unless they are
an admin; single records come from the ledger (`Ledger.get`), which holds the
owner check in one place. No answer carries a token, whoever asks: the
delegated tokens a spec holds (a fetch's, its grants) are blanked by
`without_tokens`, which the servicer applies to every job and event it sends.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES
from park_broker.core import memo
from park_broker.core.events import EventHub
from park_broker.core.ledger import Ledger
from park_broker.core.store import Store
from park_broker.errors import Code, fail


class Queries:
    def __init__(self, store: Store, ledger: Ledger, hub: EventHub):
        self.store = store
        self.ledger = ledger
        self.hub = hub

    async def get(self, caller: str, job_id: str, *, admin: bool = False) -> jpb.Job:
        return await self.ledger.get(caller, job_id, admin=admin)

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
            job_id = (await self.ledger.get(caller, job_id, admin=admin)).id
        if from_seq < 0:
            fail(Code.INVALID_ARGUMENT, "from_seq must be 0 or a sequence number already seen")
        owner = None if admin else caller
        async for item in self.hub.follow(self.store, from_seq, job_id=job_id or None, owner=owner, idle=idle):
            yield item

    async def why(self, caller: str, job_id: str) -> jpb.MemoReport:
        """Was `job_id` reused, and if not, which component of its key differs from the nearest earlier run."""
        job = await self.ledger.get(caller, job_id)
        if job.id != job_id:
            return jpb.MemoReport(hit=True, job_id=job.id)
        report = jpb.MemoReport(hit=False, job_id=job.id)
        if not job.memo_key:
            report.differences.append("memoization was off for this job (memo=False, or a race)")
            return report
        same = await self.store.same_key_before(job)
        if same is not None:   # the same inputs ran before, and it was not reused: it did not complete
            report.nearest_id = same.id
            how = f"failed ({same.error})" if same.state == jpb.JOB_STATE_FAILED else STATE_NAMES[same.state]
            report.differences.append(f"job {same.id} ({same.spec.label or 'the same work'}) had the same inputs "
                                      f"but {how}: only completed jobs are reused")
            return report
        nearest = await self.store.nearest(job)
        if nearest is None:
            report.differences.append("no earlier job of yours ran the same callable at this site")
            return report
        report.nearest_id = nearest.id
        report.differences.extend(memo.differences(json.loads(nearest.memo_inputs), json.loads(job.memo_inputs)))
        return report


def without_tokens(job: jpb.Job) -> jpb.Job:
    """`job` as it may be shown: the same record, with the delegated tokens of its spec blanked in place
    (so never a live record of the ledger's: give it a copy)."""
    _blank(job.spec)
    return job


def event_without_tokens(event: jpb.Event) -> jpb.Event:
    """`event` as it may be shown: itself if it carries no delegated token, else a copy with them blanked
    (live events are shared by every watcher and the store's line, so never blanked in place)."""
    if not event.HasField("submitted") or not _carries_tokens(event.submitted.spec):
        return event
    shown = jpb.Event.FromString(event.SerializeToString())
    _blank(shown.submitted.spec)
    return shown


def _carries_tokens(spec: jpb.JobSpec) -> bool:
    return bool(spec.grants) or (spec.HasField("fetch") and bool(spec.fetch.token))


def _blank(spec: jpb.JobSpec) -> None:
    if spec.HasField("fetch"):
        spec.fetch.token = ""
    for site in spec.grants:
        spec.grants[site] = ""
