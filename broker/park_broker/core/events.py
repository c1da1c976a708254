"""Live fan-out of committed events to Watch streams.

The store calls `EventHub.publish` with each transaction's events after they
are durable, in sequence order. `follow` gives a watcher the events it asks
for with no gap and no repeat across the switch from replay to live:

1. subscribe first, so nothing committed from now on is missed;
2. replay from the store everything after the caller's `from_seq`;
3. deliver live events, skipping any the replay already sent.

A watcher that falls more than `QUEUE_LIMIT` events behind is not allowed to
hold memory: its queue is dropped and it goes back to replaying from the store.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from park._proto import jobs_pb2 as jpb
from park_broker.core.store import Change, Store

QUEUE_LIMIT = 10_000
PAGE = 1000


@dataclass(eq=False)
class Subscription:
    """Durable changes for one follower; `overflowed` when it fell too far behind to be fed."""

    job_id: str | None
    owner: str | None
    queue: asyncio.Queue[Change] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    overflowed: bool = False

    def wants(self, change: Change) -> bool:
        return (self.job_id is None or change.event.job_id == self.job_id) and \
            (self.owner is None or change.job.owner == self.owner)


class EventHub:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self.head = 0

    def publish(self, changes: list[Change]) -> None:
        """Deliver the events of durable changes, in sequence order."""
        for change in changes:
            self.head = max(self.head, change.event.seq)
            for sub in self._subscribers:
                if sub.overflowed or not sub.wants(change):
                    continue
                try:
                    sub.queue.put_nowait(change)
                except asyncio.QueueFull:
                    sub.overflowed = True

    def subscribe(self, job_id: str | None = None, owner: str | None = None) -> Subscription:
        sub = Subscription(job_id, owner)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    async def follow(self, store: Store, from_seq: int, *, job_id: str | None, owner: str | None,
                     idle: float) -> AsyncIterator[jpb.WatchResponse]:
        last = from_seq
        while True:
            sub = self.subscribe(job_id, owner)
            try:
                while True:
                    page = await store.events(last, job_id=job_id, owner=owner, limit=PAGE)
                    for event in page:
                        last = event.seq
                        yield jpb.WatchResponse(event=event)
                    if len(page) < PAGE:
                        break
                # Caught up: tells the watcher that what follows is live.
                yield jpb.WatchResponse(progress=jpb.Progress(seq=last))
                while not sub.overflowed:
                    try:
                        event = (await asyncio.wait_for(sub.queue.get(), idle)).event
                    except TimeoutError:
                        yield jpb.WatchResponse(progress=jpb.Progress(seq=last))
                        continue
                    if event.seq > last:
                        last = event.seq
                        yield jpb.WatchResponse(event=event)
            finally:
                self.unsubscribe(sub)
