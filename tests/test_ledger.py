"""The ledger keeps waiting jobs' records serialized: reading one (a peek) never makes it live again, a record
changed through `record` is written and serialized again at its next commit, and a restart rebuilds it all.

Whether a record is held live is seen through the public interface: a live record's peeks are one object, a
serialized one's are a fresh parse each time. Records are packed only above `PACK_ABOVE` active jobs: most tests
here set it to 0, so that a few jobs show what a million would do."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from core_harness import in_process_core  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park.conditions import Atom, AtomKey
from park.wire import condition_to_proto
from park_broker.core import ledger as ledger_module
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.lifecycle import Lifecycle
from park_broker.core.store import Store
from park_broker.execution.base import Outcome


@pytest.fixture(autouse=True)
def pack_every_waiting_record(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "keeps_small_backlogs_live" not in request.node.name:
        monkeypatch.setattr(ledger_module, "PACK_ABOVE", 0)


def _spec(job_id: str, after: str | None = None, arg: str = "") -> jpb.JobSpec:
    spec = jpb.JobSpec(id=job_id, call=jpb.PythonCall(target="m:f", args_json=f'["{arg or job_id}"]'))
    if after:
        spec.when.CopyFrom(condition_to_proto(Atom(AtomKey("sns", after, "completed"))))
    return spec


def _id(i: int) -> str:
    return f"{i:026d}".translate(str.maketrans("0123456789", "abcdefghij"))


def _live(ledger: Ledger, job_id: str) -> bool:
    return ledger.peek(job_id) is ledger.peek(job_id)


async def _packed(ledger: Ledger, *job_ids: str) -> None:
    """Once the jobs' records are packed: that is done in a thread after their commit."""
    for _ in range(1000):
        if not any(_live(ledger, j) for j in job_ids):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still live: {[j for j in job_ids if _live(ledger, j)]}")


async def _queued(ledger: Ledger, job_id: str) -> jpb.Job:
    """The job's record once it is queued (its release is committed, with an fsync, first)."""
    for _ in range(1000):
        job = ledger.peek(job_id)
        if job is not None and job.state == jpb.JOB_STATE_QUEUED:
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} was not queued: {ledger.peek(job_id)}")


def test_a_chain_of_waiting_jobs_naming_each_other_stays_serialized(tmp_path: Path) -> None:
    """Each job's condition and memo key name the one before it: a submission reads its upstream job,
    and must not make its record live again."""
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        ids = [_id(i) for i in range(60)]
        hold = jpb.JobSpec(id=_id(999), command=jpb.CommandLine(argv=["sleep", "1"]),
                           when=condition_to_proto(Atom(AtomKey("sns", _id(998), "completed"))))
        first = jpb.JobSpec(id=_id(998), command=jpb.CommandLine(argv=["true"]))
        await core.submissions.submit_many("alice", [first])   # queued: its record stays live
        await core.submissions.submit_many("alice", [hold])
        for start in range(0, len(ids), 20):   # batches, each naming the last job of the one before
            results = await core.submissions.submit_many("alice", [
                _spec(ids[i], after=ids[i - 1] if i else hold.id) for i in range(start, start + 20)])
            assert all(r.error is None for r in results), [r.error.message for r in results if r.error]
        ledger = core.ledger
        await _packed(ledger, hold.id, *ids)
        assert _live(ledger, first.id)
        for job_id in ids:
            job = ledger.peek(job_id)
            assert job is not None and job.state == jpb.JOB_STATE_WAITING and job.memo_key
            stored = await store.get(job_id)
            assert stored is not None and stored.last_seq == job.last_seq > 0
            assert await ledger.get("alice", job_id) == job
        # A memo hit of a waiting job reads it too, and leaves it serialized.
        [hit] = await core.submissions.submit_many("alice", [_spec(_id(500), after=ids[4], arg=ids[5])])
        assert hit.memo_hit and hit.job is not None and hit.job.id == ids[5]
        await _packed(ledger, ids[4], ids[5])
        store.close()

    asyncio.run(main())


async def _one_packed_waiting_job(tmp_path: Path) -> tuple[Lifecycle, Store, str, str]:
    """A core whose job b waits on job a, which has not run, once b's record is packed."""
    core, _, store = in_process_core(tmp_path)
    a, b = _id(1), _id(2)
    await core.submissions.submit_many("alice", [jpb.JobSpec(id=a, command=jpb.CommandLine(argv=["true"])),
                                                 _spec(b, after=a)])
    await _packed(core.ledger, b)
    return core, store, a, b


def test_a_promoted_record_is_written_at_its_next_commit_and_serialized_again(tmp_path: Path) -> None:
    async def main() -> None:
        core, store, a, b = await _one_packed_waiting_job(tmp_path)
        ledger = core.ledger
        job = ledger.record(b)
        assert job is not None and _live(ledger, b) and ledger.record(b) is job
        job.attention = "changed while it waits"
        first = ledger.change(job, jpb.Event(renewed=jpb.Renewed(site="x")))
        committing = asyncio.ensure_future(ledger.commit(Batch([first])))
        await asyncio.sleep(0)
        # Changed again while the first change is being written: the second must not be lost when the
        # first commit serializes the record.
        job.attention = "changed twice"
        second = ledger.change(job, jpb.Event(renewed=jpb.Renewed(site="y")))
        await committing
        between = ledger.peek(b)   # what later decisions read while the second change is still to be written
        assert between is not None and between.attention == "changed twice"
        await ledger.commit(Batch([second]))
        await _packed(ledger, b)
        seen = ledger.peek(b)
        stored = await store.get(b)
        assert seen is not None and stored is not None
        assert seen.attention == stored.attention == "changed twice"
        assert seen.last_seq == stored.last_seq == second.event.seq > first.event.seq
        # Released: promoted, queued, and never serialized again.
        core.transitions.on_started(a, 1)
        core.transitions.on_finished(a, 1, Outcome(ok=True, result_json="1"))
        queued = await _queued(ledger, b)
        assert _live(ledger, b) and queued.attention == "changed twice"
        store.close()

    asyncio.run(main())


def test_a_restart_rebuilds_serialized_waiting_jobs_that_still_run_when_released(tmp_path: Path) -> None:
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        gate, ids = _id(0), [_id(i) for i in range(1, 31)]
        await core.submissions.submit_many("alice", [jpb.JobSpec(id=gate, command=jpb.CommandLine(argv=["true"]))])
        await core.submissions.submit_many("alice", [_spec(j, after=ids[i - 1] if i else gate)
                                                     for i, j in enumerate(ids)])
        before = {j: core.ledger.peek(j) for j in ids}
        store.close()

        core, executor, store = in_process_core(tmp_path)
        await core.start()
        ledger = core.ledger
        assert [t.job_id for t in executor.tasks] == [gate]
        assert not any(_live(ledger, j) for j in ids) and _live(ledger, gate)
        assert {j: ledger.peek(j) for j in ids} == before
        assert len(core.scheduler) == len(ids)
        for job_id in ids:   # each is released by the one before it, in turn
            task = executor.tasks[-1]
            core.transitions.on_started(task.job_id, task.attempt)
            core.transitions.on_finished(task.job_id, task.attempt, Outcome(ok=True, result_json="1"))
            for _ in range(1000):   # handed over once its release is committed
                if executor.tasks[-1].job_id == job_id:
                    break
                await asyncio.sleep(0.01)
        assert [t.job_id for t in executor.tasks] == [gate, *ids]
        store.close()

    asyncio.run(main())


def test_identical_work_submitted_after_a_restart_is_the_waiting_job(tmp_path: Path) -> None:
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        gate, job = _id(0), _id(1)
        await core.submissions.submit_many("alice", [jpb.JobSpec(id=gate, command=jpb.CommandLine(argv=["true"])),
                                                     _spec(job, after=gate)])
        store.close()
        core, _, store = in_process_core(tmp_path)
        await core.start()
        [again] = await core.submissions.submit_many("alice", [_spec(_id(2), after=gate, arg=job)])
        assert again.memo_hit and again.job is not None and again.job.id == job
        assert not _live(core.ledger, job)
        store.close()

    asyncio.run(main())


def test_serialized_records_of_any_size_and_shape_read_back_as_written(tmp_path: Path) -> None:
    """Records are compressed against the first one kept: others, far larger or unlike it, come back whole."""
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        gate = _id(0)
        await core.submissions.submit_many("alice", [jpb.JobSpec(id=gate, command=jpb.CommandLine(argv=["true"]))])
        specs = [_spec(_id(1), after=gate),
                 _spec(_id(2), after=gate, arg="x" * 50_000),
                 jpb.JobSpec(id=_id(3), command=jpb.CommandLine(argv=["echo", "ü" * 3000, bytes(range(256)).hex()]),
                             when=condition_to_proto(Atom(AtomKey("sns", gate, "completed"))), label="≠ the first"),
                 _spec(_id(4), after=_id(3))]
        results = await core.submissions.submit_many("alice", specs)
        assert all(r.error is None for r in results), [r.error.message for r in results if r.error]
        await _packed(core.ledger, *(spec.id for spec in specs))
        for spec in specs:
            assert core.ledger.peek(spec.id) == await store.get(spec.id)
        store.close()

    asyncio.run(main())


def test_a_submission_naming_waiting_jobs_reads_their_owner_state_and_memo_key_without_unpacking(
        tmp_path: Path) -> None:
    """A job that waits on a packed waiting job, and whose memo key chains its key, needs only its owner,
    state and memo key: no record is unpacked for it (a million waiting jobs named one by one)."""
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        gate, ids = _id(0), [_id(i) for i in range(1, 21)]
        await core.submissions.submit_many("alice", [jpb.JobSpec(id=gate, command=jpb.CommandLine(argv=["true"]))])
        await core.submissions.submit_many("alice", [_spec(j, after=gate) for j in ids[:10]])
        ledger = core.ledger
        await _packed(ledger, *ids[:10])
        glance = ledger.glance(ids[0])
        packed = ledger.peek(ids[0])
        assert glance is not None and packed is not None and not _live(ledger, ids[0])
        assert glance == (packed.owner, jpb.JOB_STATE_WAITING, packed.memo_key) and packed.memo_key
        unpacked: list[bytes] = []
        unpack = ledger._packer.unpack
        ledger._packer.unpack = lambda data: unpacked.append(data) or unpack(data)  # type: ignore[method-assign]
        results = await core.submissions.submit_many("alice", [_spec(ids[10 + k], after=ids[k], arg=ids[k])
                                                               for k in range(10)])
        assert all(r.error is None for r in results)
        assert unpacked == []
        ledger._packer.unpack = unpack  # type: ignore[method-assign]
        # The key chained through the glance is the one the record holds.
        [again] = await core.submissions.submit_many("alice", [_spec(_id(99), after=ids[0], arg=ids[0])])
        assert again.memo_hit and again.job is not None and again.job.id == ids[10]
        store.close()

    asyncio.run(main())


def test_a_record_changed_while_it_is_being_packed_stays_as_changed(tmp_path: Path) -> None:
    """Records are packed in a thread after their commit: a record changed before its packing is done keeps the
    change (the stale packing is dropped), and is packed after the commit of that change."""
    import threading

    async def main() -> None:
        core, store, a, b = await _one_packed_waiting_job(tmp_path)
        ledger = core.ledger
        go, done = threading.Event(), threading.Event()
        pack_many = ledger._packer.pack_many

        def held(records):  # type: ignore[no-untyped-def]
            go.wait()
            try:
                return pack_many(records)
            finally:
                done.set()

        ledger._packer.pack_many = held  # type: ignore[method-assign]
        job = ledger.record(b)
        assert job is not None
        job.attention = "committed"
        await ledger.commit(Batch([ledger.change(job, jpb.Event(renewed=jpb.Renewed(site="x")))]))
        job.attention = "changed since"   # while its packing waits in the thread
        go.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        for _ in range(10):
            await asyncio.sleep(0)   # the packing's callback runs
        seen = ledger.peek(b)
        assert seen is not None and seen.attention == "changed since" and _live(ledger, b)
        ledger._packer.pack_many = pack_many  # type: ignore[method-assign]
        await ledger.commit(Batch([ledger.change(job, jpb.Event(renewed=jpb.Renewed(site="y")))]))
        await _packed(ledger, b)
        seen = ledger.peek(b)
        assert seen is not None and seen.attention == "changed since"
        store.close()

    asyncio.run(main())


def test_a_ledger_keeps_small_backlogs_live_and_packs_waiting_records_above_pack_above(tmp_path: Path) -> None:
    """A few thousand waiting jobs are not worth compressing (each would be unpacked again to start): records
    are packed only while the ledger holds more than `pack_above` active jobs, after a restart too."""
    async def main() -> None:
        core, _, store = in_process_core(tmp_path)
        assert core.ledger.pack_above == ledger_module.PACK_ABOVE >= 1000
        core.ledger.pack_above = 10
        gate, ids = _id(0), [_id(i) for i in range(1, 21)]
        await core.submissions.submit_many("alice", [jpb.JobSpec(id=gate, command=jpb.CommandLine(argv=["true"]))])
        for job_id in ids:   # one batch each: the ledger holds 2, 3, ... 21 active jobs at their commits
            await core.submissions.submit_many("alice", [_spec(job_id, after=gate)])
        await _packed(core.ledger, *ids[9:])   # committed while more than 10 jobs were active
        assert all(_live(core.ledger, j) for j in ids[:9])
        store.close()

        core, _, store = in_process_core(tmp_path)
        core.ledger.pack_above = 10
        await core.start()   # read back in order: the gate and 9 waiting jobs live, the rest packed
        assert all(_live(core.ledger, j) for j in (gate, *ids[:9]))
        assert not any(_live(core.ledger, j) for j in ids[10:])
        store.close()

    asyncio.run(main())


def test_the_credentials_an_owner_holds_are_read_from_the_jobs_that_carry_tokens_alone(tmp_path: Path) -> None:
    """`park renew` lists the delegated tokens of a user's active jobs: reading them unpacks the jobs that carry
    tokens, not each of the user's waiting jobs (a million of them took seconds), and a job that finished
    carries none any more."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from park import tokens

    async def main() -> None:
        core, store, _, _ = await _one_packed_waiting_job(tmp_path)
        ledger = core.ledger
        plain = [_id(i) for i in range(10, 60)]
        await core.submissions.submit_many("alice", [_spec(j, after=_id(1), arg=j) for j in plain])
        carrier = _id(99)
        grant = tokens.encode(tokens.issue(Ed25519PrivateKey.generate(), subject="alice", audience="cluster",
                                           scopes=[f"jobs.read:/{_id(98)}"], confirm="c" * 64, lifetime=3600))
        job = jpb.Job(id=carrier, owner="alice", state=jpb.JOB_STATE_WAITING,
                      spec=jpb.JobSpec(id=carrier, grants={"cluster": grant}, command=jpb.CommandLine(argv=["true"])))
        ledger.add(job)
        await ledger.commit(Batch([ledger.change(job, jpb.Event(), insert=True)]))
        await _packed(ledger, carrier, *plain)
        unpacked: list[bytes] = []
        unpack = ledger._packer.unpack

        def counting(data: bytes) -> bytes:
            unpacked.append(data)
            return unpack(data)

        ledger._packer.unpack = counting  # type: ignore[method-assign]
        [held] = core.credentials.held("alice", 0)
        assert (held.job_id, held.site, held.use) == (carrier, "cluster", "grant") and len(unpacked) == 1
        assert core.credentials.held("bob", 0) == []
        await core.transitions.cancel("alice", carrier, "done with it")
        assert core.credentials.held("alice", 0) == []
        store.close()

    asyncio.run(main())


def test_the_waiting_quota_counts_packed_jobs_without_looking_at_each(tmp_path: Path) -> None:
    """A quota is checked once per batch: it counts an owner's packed (waiting) jobs by a number kept as they
    are packed and promoted, and looks only at the live records, as a scan of every active job counted."""
    async def main() -> None:
        core, store, a, b = await _one_packed_waiting_job(tmp_path)
        ledger = core.ledger
        plain = [_id(i) for i in range(10, 40)]
        await core.submissions.submit_many("alice", [_spec(j, after=a, arg=j) for j in plain])
        await core.submissions.submit_many("bob", [_spec(_id(50), arg="bob's")])
        await _packed(ledger, b, *plain)
        promoted = ledger.record(plain[0])   # live again, still waiting
        assert promoted is not None

        def scanned(owner: str) -> int:
            return sum(1 for j in ledger._active if (job := ledger.peek(j)) is not None and job.owner == owner
                       and job.state in (jpb.JOB_STATE_WAITING, jpb.JOB_STATE_QUEUED))

        active = ledger._active
        ledger._active = {}   # type: ignore[assignment]   # counting must not look at each active job
        try:
            counted = ledger.not_started("alice"), ledger.not_started("bob"), ledger.not_started("carol")
        finally:
            ledger._active = active
        assert counted == (scanned("alice"), scanned("bob"), 0) == (32, 1, 0)   # a queued, b and 30 waiting
        core.transitions.on_started(a, 1)
        core.transitions.on_finished(a, 1, Outcome(ok=True, result_json="1"))
        await _queued(ledger, plain[-1])
        assert ledger.not_started("alice") == scanned("alice") == 31   # a is gone; the others were released
        store.close()

    asyncio.run(main())
