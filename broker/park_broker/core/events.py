"""Live fan-out of committed events to Watch streams.

The store calls `EventHub.publish` with each transaction's events after they
are durable, in sequence order. `follow` gives a watcher the events it asks
for with no gap and no repeat across the switch from replay to live:

1. subscribe first, so nothing committed from now on is missed;
2. replay from the store everything after the caller's `from_seq`;
3. deliver live events, skipping any the replay already sent.

Events go out together, as many as are ready (a page of the replay, or all
that the live queue holds), up to `MAX_BATCH_BYTES` per message: a busy site
commits many events at once, and a message per event would cost more than the
events themselves.

A watcher that falls more than `QUEUE_LIMIT` events behind is not allowed to
hold memory: its queue is dropped and it goes back to replaying from the store.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from park._proto import jobs_pb2 as jpb
from park_broker.core.store import Change, Store

QUEUE_LIMIT = 10_000
PAGE = 1000
MAX_BATCH_BYTES = 1 << 20   # per Watch message (a single larger event goes alone; gRPC allows 16 MiB)


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
                    for response in batches(page):
                        yield response
                    if page:
                        last = page[-1].seq
                    if len(page) < PAGE:
                        break
                # Caught up: tells the watcher that what follows is live.
                yield jpb.WatchResponse(progress=jpb.Progress(seq=last))
                while not sub.overflowed:
                    try:
                        ready = [await asyncio.wait_for(sub.queue.get(), idle)]
                    except TimeoutError:
                        yield jpb.WatchResponse(progress=jpb.Progress(seq=last))
                        continue
                    while len(ready) < PAGE and not sub.queue.empty():
                        ready.append(sub.queue.get_nowait())
                    events = [change.event for change in ready if change.event.seq > last]
                    if events:
                        last = events[-1].seq
                        for response in batches(events):
                            yield response
            finally:
                self.unsubscribe(sub)


def batches(events: list[jpb.Event]) -> Iterator[jpb.WatchResponse]:
    """`events` in order, in as few Watch messages as MAX_BATCH_BYTES allows."""
    batch: list[jpb.Event] = []
    size = 0
    for event in events:
        size += event.ByteSize()
        if batch and size > MAX_BATCH_BYTES:
            yield jpb.WatchResponse(events=batch)
            batch, size = [], event.ByteSize()
        batch.append(event)
    if batch:
        yield jpb.WatchResponse(events=batch)
