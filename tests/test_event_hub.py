"""The event hub over a real store: Watch messages carry events together, in order, within a size bound."""
from __future__ import annotations

import asyncio
from pathlib import Path

from park._proto import jobs_pb2 as jpb
from park_broker.core.events import MAX_BATCH_BYTES, EventHub
from park_broker.core.store import Change, Store


def _change(i: int, traceback: str = "") -> Change:
    job = jpb.Job(id=f"{i:026d}", owner="alice", state=jpb.JOB_STATE_WAITING)
    return Change(job, jpb.Event(job_id=job.id, failed=jpb.Failed(error="x", traceback=traceback)), insert=True)


def test_replay_and_live_events_go_out_together_in_order_and_within_the_size_bound(tmp_path: Path) -> None:
    hub = EventHub()
    store = Store(tmp_path / "park.db", on_commit=hub.publish)
    store.open()
    big = "t" * (MAX_BATCH_BYTES // 3)   # three of these do not fit in one message

    async def main() -> list[jpb.WatchResponse]:
        await store.commit([_change(i) for i in range(300)] + [_change(300 + i, big) for i in range(4)])
        responses: list[jpb.WatchResponse] = []
        live = asyncio.Event()

        async def watch() -> None:
            async for response in hub.follow(store, 0, job_id=None, owner="alice", idle=30):
                responses.append(response)
                if response.HasField("progress"):
                    live.set()
                if sum(len(r.events) for r in responses) == 404:
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(live.wait(), 10)
        await store.commit([_change(400 + i) for i in range(100)])   # one commit while the watcher is live
        await asyncio.wait_for(watcher, 10)
        return responses

    responses = asyncio.run(main())
    store.close()
    seqs = [e.seq for r in responses for e in r.events]
    assert seqs == list(range(1, 405)), "every event once, in sequence order"
    replay, mark, live = responses[:-2], responses[-2], responses[-1]
    assert mark.HasField("progress") and not mark.events and mark.progress.seq == 304
    # The stored page: 300 small events and two big ones fit in one message, the other two big ones not.
    assert [len(r.events) for r in replay] == [302, 2]
    assert all(r.ByteSize() <= MAX_BATCH_BYTES + 1024 for r in replay)
    assert len(live.events) == 100, "a live commit's events go out as one message"
