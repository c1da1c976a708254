"""The job lifecycle in-process, with a real store and a recording executor: the orderings that
real brokers hit only under load, made to happen on purpose."""
from __future__ import annotations

import asyncio
from pathlib import Path

from core_harness import in_process_core  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park.conditions import Atom, AtomKey
from park.wire import condition_to_proto
from park_broker.execution.base import Outcome


def _spec(job_id: str, after: str | None = None) -> jpb.JobSpec:
    spec = jpb.JobSpec(id=job_id, call=jpb.PythonCall(target="m:f"), no_memo=True)
    if after:
        spec.when.CopyFrom(condition_to_proto(Atom(AtomKey("sns", after, "completed"))))
    return spec


def test_a_dependency_that_finishes_during_a_submission_is_still_found(tmp_path: Path) -> None:
    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        a = "a" * 26
        await core.submissions.submit_many("alice", [_spec(a)])
        # Hold the next submission in one of its reads, and finish `a` meanwhile.
        held, release = asyncio.Event(), asyncio.Event()
        reports = store.reports

        async def slow_reports(job_ids):  # type: ignore[no-untyped-def]
            held.set()
            await release.wait()
            return await reports(job_ids)

        store.reports = slow_reports  # type: ignore[method-assign]
        submission = asyncio.create_task(core.submissions.submit_many("alice", [_spec("b" * 26, after=a)]))
        await held.wait()
        core.transitions.on_started(a, 1)
        core.transitions.on_finished(a, 1, Outcome(ok=True, result_json="1"))
        await asyncio.sleep(0.2)     # the completion is committed while the submission waits
        release.set()
        [result] = await submission
        assert result.error is None, result.error and result.error.message
        assert result.job is not None and result.job.state == jpb.JOB_STATE_QUEUED
        assert [t.job_id for t in executor.tasks] == [a, "b" * 26]
        store.close()

    asyncio.run(main())


def test_a_commit_whose_caller_hangs_up_still_releases_its_queued_jobs(tmp_path: Path) -> None:
    """A client that cancels its call while the batch is being written must not strand the batch's jobs:
    they are committed QUEUED, so they must still be handed over once the commit is durable."""
    from park_broker.core.ledger import Batch, Ledger
    from park_broker.core.store import Store

    async def main() -> tuple[list[str], jpb.Job | None]:
        store = Store(tmp_path / "park.db")
        store.open()
        ledger = Ledger("sns", store)
        released: list[str] = []
        ledger.release = released.extend
        job = jpb.Job(id="a" * 26, owner="alice", state=jpb.JOB_STATE_QUEUED)
        ledger.add(job)
        caller = asyncio.create_task(ledger.commit(Batch([ledger.change(job, jpb.Event(queued=jpb.Queued()),
                                                                        insert=True)], [job.id])))
        await asyncio.sleep(0)   # the caller now waits for the writer thread
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            pass
        for _ in range(500):
            if released:
                break
            await asyncio.sleep(0.01)
        stored = await store.get(job.id)
        store.close()
        return released, stored

    released, stored = asyncio.run(main())
    assert stored is not None and stored.state == jpb.JOB_STATE_QUEUED
    assert released == ["a" * 26]


def test_batches_of_a_stream_are_decided_in_the_order_they_were_sent(tmp_path: Path) -> None:
    """A client keeps two batches in flight, and the second (whose job waits on a job of the first) reaches
    the broker first: it waits for the first, instead of being refused for naming a job not yet there."""
    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        a, b = "a" * 26, "b" * 26
        second = asyncio.create_task(core.submissions.submit_many(
            "alice", [_spec(b, after=a)], stream=b"s" * 16, number=2, after=1))
        await asyncio.wait({second}, timeout=0.5)   # let it go as far as it can on its own
        first = await core.submissions.submit_many("alice", [_spec(a)], stream=b"s" * 16, number=1)
        [later] = await second
        assert first[0].error is None and first[0].job is not None
        assert later.error is None, later.error.message
        assert later.job is not None and later.job.state == jpb.JOB_STATE_WAITING
        store.close()

    asyncio.run(main())


def test_a_batch_whose_predecessor_never_arrives_goes_on_without_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The batch a later one follows was lost (with a broker that restarted, or given up by its client): the
    later one is decided anyway once ARRIVAL_WAIT has passed, and a job naming the lost batch's job is
    refused as it would be without ordering."""
    from park_broker.core import arrivals

    monkeypatch.setattr(arrivals, "ARRIVAL_WAIT", 0.05)

    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        results = await core.submissions.submit_many(
            "alice", [_spec("c" * 26), _spec("d" * 26, after="a" * 26)], stream=b"s" * 16, number=7, after=6)
        assert results[0].error is None
        assert results[1].error is not None and results[1].error.code.name == "NOT_FOUND"
        store.close()

    asyncio.run(main())


def test_a_batch_decided_while_the_memo_hit_it_names_is_written_finds_the_job_the_hit_names(
        tmp_path: Path) -> None:
    """Batch 1 is a memo hit of a finished job (an alias, kept in memory until its commit); batch 2 waits on the
    alias and is decided while batch 1 is still being written: the alias names the finished job already, and
    batch 2's memo key chains that job's key, as it would once batch 1 is committed."""
    import threading

    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        a, hit, c = "a" * 26, "h" * 26, "c" * 26
        work = jpb.JobSpec(id=a, call=jpb.PythonCall(target="m:f", args_json="[1]"))
        await core.submissions.submit_many("alice", [work])
        core.transitions.on_started(a, 1)
        core.transitions.on_finished(a, 1, Outcome(ok=True, result_json="1"))
        for _ in range(500):
            if (await store.get(a) or jpb.Job()).state == jpb.JOB_STATE_COMPLETED:
                break
            await asyncio.sleep(0.01)
        held, write = threading.Event(), store._write

        def slow_write(changes):  # type: ignore[no-untyped-def]
            held.wait()
            write(changes)

        store._write = slow_write  # type: ignore[method-assign]
        again = jpb.JobSpec()
        again.CopyFrom(work)
        again.id = hit
        first = asyncio.create_task(core.submissions.submit_many("alice", [again], stream=b"s" * 16, number=1))
        def downstream(job_id: str) -> jpb.JobSpec:
            spec = _spec(job_id, after=hit)
            spec.no_memo = False
            return spec

        second = asyncio.create_task(core.submissions.submit_many("alice", [downstream(c)], stream=b"s" * 16,
                                                                  number=2, after=1))
        await asyncio.wait({second}, timeout=0.5)   # decided while the first is held in its commit
        held.set()
        [reused], [waiting] = await first, await second
        assert reused.memo_hit and reused.job is not None and reused.job.id == a
        assert waiting.error is None, waiting.error.message
        assert waiting.job is not None and waiting.job.state == jpb.JOB_STATE_QUEUED
        [rerun] = await core.submissions.submit_many("alice", [downstream("d" * 26)])
        assert rerun.memo_hit and rerun.job is not None and rerun.job.id == c
        store.close()

    asyncio.run(main())


def test_a_batch_is_checked_while_the_batch_it_follows_is_still_to_be_decided(tmp_path: Path) -> None:
    """Checking a spec reads nothing of other jobs, so a batch's checks use the event loop while the batch
    before it is being decided (here: has not even arrived); its decisions still wait for that batch."""
    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        checked: list[str] = []
        validate = core.admission.validate

        def spy(spec: jpb.JobSpec):  # type: ignore[no-untyped-def]
            checked.append(spec.id)
            return validate(spec)

        core.admission.validate = spy  # type: ignore[method-assign]
        a, b = "a" * 26, "b" * 26
        second = asyncio.create_task(core.submissions.submit_many(
            "alice", [_spec(b, after=a), _spec("bad id")], stream=b"s" * 16, number=2, after=1))
        await asyncio.wait({second}, timeout=0.2)
        assert checked == [b, "bad id"] and not second.done()
        await core.submissions.submit_many("alice", [_spec(a)], stream=b"s" * 16, number=1)
        later, bad = await second
        assert later.error is None and later.job is not None and later.job.state == jpb.JOB_STATE_WAITING
        assert bad.error is not None and bad.error.code.name == "INVALID_ARGUMENT"
        store.close()

    asyncio.run(main())


def test_a_batch_naming_jobs_in_memory_asks_the_store_only_what_memory_cannot_answer(tmp_path: Path) -> None:
    """A read from the store is a hop to a reader thread, which waits for the GIL behind the writer and the
    event loop: a batch whose jobs wait on active jobs asks only whether its ids are taken by finished jobs
    and whether its work was done before, not for the reports or records of jobs memory holds."""
    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        a = "a" * 26
        await core.submissions.submit_many("alice", [_spec(a)])
        asked: list[str] = []
        read = store._read

        async def spy(fn, *args):  # type: ignore[no-untyped-def]
            asked.append(fn.__name__)
            return await read(fn, *args)

        store._read = spy  # type: ignore[method-assign]
        specs = [_spec(c * 26, after=a) for c in "bcd"]
        for spec in specs:
            spec.no_memo = False
        results = await core.submissions.submit_many("alice", specs)
        assert [r.error.message for r in results if r.error is not None] == []
        assert asked == ["_get_many", "_by_memo_keys"]
        store.close()

    asyncio.run(main())
