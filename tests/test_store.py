"""The SQLite store on its own: durability settings, group commit, ordering, versioning."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from park._proto import jobs_pb2 as jpb
from park_broker.core.store import SCHEMA_VERSION, WAL_AUTOCHECKPOINT, WRITER_AUTOCHECKPOINT, Change, Store, StoreError


def _job(i: int) -> jpb.Job:
    return jpb.Job(id=f"{i:026d}", owner="alice", state=jpb.JOB_STATE_WAITING)


def test_concurrent_commits_share_transactions_and_seqs_increase(tmp_path: Path) -> None:
    published: list[list[int]] = []
    store = Store(tmp_path / "park.db", on_commit=lambda cs: published.append([c.event.seq for c in cs]))
    store.open()

    async def main() -> None:
        await asyncio.gather(*(store.commit([Change(_job(i), jpb.Event(job_id=f"{i:026d}"), insert=True)])
                               for i in range(200)))

    asyncio.run(main())
    seqs = [s for batch in published for s in batch]
    assert seqs == list(range(1, 201))
    assert len(published) < 200, "concurrent commits should have been grouped"
    events = asyncio.run(store.events(0, job_id=None, owner="alice", limit=1000))
    assert [e.seq for e in events] == seqs
    store.close()


def test_durability_settings(tmp_path: Path) -> None:
    store = Store(tmp_path / "park.db")
    store.open()
    assert store._writer is not None
    assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WRITER_AUTOCHECKPOINT > WAL_AUTOCHECKPOINT > 1000
    store.close()


def test_failed_transaction_keeps_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "park.db")
    store.open()

    async def main() -> None:
        await store.commit([Change(_job(1), jpb.Event(), insert=True)])
        with pytest.raises(sqlite3.IntegrityError):
            # The second insert of the same id fails: the first change of the batch must roll back too.
            await store.commit([Change(_job(2), jpb.Event(), insert=True), Change(_job(1), jpb.Event(), insert=True)])
        assert await store.get(f"{2:026d}") is None
        assert await store.head_seq() == 1

    asyncio.run(main())
    store.close()


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "park.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(path).open()


def test_a_job_changed_several_times_in_one_transaction_is_written_once_as_it_was_last(tmp_path: Path) -> None:
    store = Store(tmp_path / "park.db")
    store.open()
    assert store._writer is not None
    old, new = _job(1), _job(2)

    def moved(job: jpb.Job, state: int) -> jpb.Job:
        snapshot = jpb.Job()
        snapshot.CopyFrom(job)
        snapshot.state = state   # type: ignore[assignment]
        return snapshot

    async def main() -> None:
        await store.commit([Change(old, jpb.Event(job_id=old.id), insert=True)])
        before = store._writer.total_changes   # type: ignore[union-attr]
        await store.commit([
            Change(new, jpb.Event(job_id=new.id), insert=True),
            Change(moved(old, jpb.JOB_STATE_QUEUED), jpb.Event(job_id=old.id)),
            Change(moved(new, jpb.JOB_STATE_QUEUED), jpb.Event(job_id=new.id)),
            Change(moved(old, jpb.JOB_STATE_RUNNING), jpb.Event(job_id=old.id)),
            Change(moved(new, jpb.JOB_STATE_RUNNING), jpb.Event(job_id=new.id)),
            Change(moved(old, jpb.JOB_STATE_COMPLETED), jpb.Event(job_id=old.id)),
        ])
        assert store._writer.total_changes - before == 6 + 2, "six events, and each job's row once"   # type: ignore[union-attr]
        stored = await store.get_many([old.id, new.id])
        assert (stored[old.id].state, stored[old.id].last_seq) == (jpb.JOB_STATE_COMPLETED, 7)
        assert (stored[new.id].state, stored[new.id].last_seq) == (jpb.JOB_STATE_RUNNING, 6)
        assert [e.seq for e in await store.events(0, job_id=None, owner="alice", limit=100)] == list(range(1, 8))

    asyncio.run(main())
    store.close()


def test_a_job_inserted_and_changed_in_one_transaction_is_stored_as_last_changed(tmp_path: Path) -> None:
    """The writer puts rows in by table (inserts before updates): a job's changes still land in their order."""
    store = Store(tmp_path / "park.db")
    store.open()

    async def main() -> None:
        first = _job(1)
        queued, running = jpb.Job(), jpb.Job()
        queued.CopyFrom(first)
        queued.state = jpb.JOB_STATE_QUEUED
        running.CopyFrom(first)
        running.state = jpb.JOB_STATE_RUNNING
        changes = [Change(first, jpb.Event(), insert=True), Change(queued, jpb.Event()), Change(running, jpb.Event())]
        await store.commit(changes)
        assert [c.event.seq for c in changes] == [1, 2, 3]
        stored = await store.get(first.id)
        assert stored is not None and stored.state == jpb.JOB_STATE_RUNNING and stored.last_seq == 3
        later = Change(_job(2), jpb.Event(), insert=True)
        await store.commit([later])
        assert later.event.seq == 4 and await store.head_seq() == 4

    asyncio.run(main())
    store.close()


def test_a_version_3_database_is_migrated_to_index_owners_jobs_in_submission_order(tmp_path: Path) -> None:
    """Version 4 replaces the index on (owner, id), where each new job went to a random place, with one on
    (owner): a database of version 3 is migrated, and listing an owner's jobs still pages in submission order."""
    path = tmp_path / "park.db"
    current = Store(path)
    current.open()   # the current version, taken back to version 3's indexes below
    current.close()
    old = sqlite3.connect(path)
    old.executescript("BEGIN; DROP INDEX jobs_by_owner; CREATE INDEX jobs_owner ON jobs(owner, id); "
                      "DROP INDEX jobs_memo_finished; "
                      "CREATE INDEX jobs_memo ON jobs(memo_key) WHERE memo_key IS NOT NULL; "
                      "PRAGMA user_version = 3; COMMIT;")
    for i in (3, 1, 2):
        old.execute("INSERT INTO jobs (id, owner, state, record) VALUES (?, 'alice', 1, ?)",
                    (f"{i:026d}", _job(i).SerializeToString()))
    old.commit()
    old.close()
    store = Store(path)
    store.open()
    assert store._writer is not None
    indexes = {row[0] for row in store._writer.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_by_owner" in indexes and "jobs_owner" not in indexes
    assert store._writer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    first = asyncio.run(store.list("alice", [], "", 2))
    rest = asyncio.run(store.list("alice", [], first[-1].id, 2))
    assert [j.id for j in first + rest] == [f"{i:026d}" for i in (3, 1, 2)]
    store.close()


def test_a_transaction_writes_each_table_in_one_statement_not_one_per_row(tmp_path: Path) -> None:
    """The sqlite3 module lets go of the GIL around each statement step: a step per row made the writer wait
    for the event loop thousands of times per transaction. 300 jobs, their events and updates of 300 more
    go in as a handful of statements, and read back as written."""
    store = Store(tmp_path / "park.db")
    store.open()
    assert store._writer is not None
    statements: list[str] = []
    earlier = [_job(i) for i in range(300)]

    async def main() -> None:
        await store.commit([Change(job, jpb.Event(job_id=job.id), insert=True) for job in earlier])
        store._writer.set_trace_callback(statements.append)   # type: ignore[union-attr]
        queued = []
        for job in earlier:
            changed = jpb.Job()
            changed.CopyFrom(job)
            changed.state = jpb.JOB_STATE_QUEUED
            queued.append(Change(changed, jpb.Event(job_id=job.id, queued=jpb.Queued())))
        later = [Change(_job(i), jpb.Event(job_id=f"{i:026d}"), insert=True) for i in range(300, 600)]
        await store.commit(queued + later)
        store._writer.set_trace_callback(None)   # type: ignore[union-attr]

    asyncio.run(main())
    assert len(statements) <= 8, statements[:10]
    stored = asyncio.run(store.get_many([f"{i:026d}" for i in range(600)]))
    assert [stored[f"{i:026d}"].state for i in range(600)] == [jpb.JOB_STATE_QUEUED] * 300 + [jpb.JOB_STATE_WAITING] * 300
    assert stored[f"{599:026d}"].last_seq == 900
    events = asyncio.run(store.events(300, job_id=None, owner="alice", limit=1000))
    assert [e.seq for e in events] == list(range(301, 901)) and all(e.HasField("queued") for e in events[:300])
    store.close()


def test_rows_whose_blobs_exceed_a_statement_are_split_and_keep_their_order(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("park_broker.core.store._BLOBS_PER_STATEMENT", 200)
    store = Store(tmp_path / "park.db")
    store.open()
    order = [7, 3, 9, 1, 5, 0, 8, 2, 6, 4] * 5
    jobs = [jpb.Job(id=f"{i:02d}{n:024d}", owner="alice", state=jpb.JOB_STATE_WAITING,
                    spec=jpb.JobSpec(label="x" * 60))
            for n, i in enumerate(order)]
    asyncio.run(store.commit([Change(job, jpb.Event(job_id=job.id), insert=True) for job in jobs]))
    listed = asyncio.run(store.list("alice", [], "", 1000))
    assert listed == [jpb.Job.FromString(job.SerializeToString()) for job in jobs]   # as written, in submission order
    store.close()


def test_a_version_4_database_is_migrated_to_index_only_finished_jobs_memo_keys(tmp_path: Path) -> None:
    """Version 5 indexes a job's memo key once it has finished (an active job's key is in the ledger's memory):
    a submitted job no longer writes a page of the memo index. A version 4 database is migrated, and its
    completed job is still reused and its failed one still named by `park why`."""
    path = tmp_path / "park.db"
    current = Store(path)
    current.open()
    current.close()
    old = sqlite3.connect(path)
    old.executescript("BEGIN; DROP INDEX jobs_memo_finished; "
                      "CREATE INDEX jobs_memo ON jobs(memo_key) WHERE memo_key IS NOT NULL; "
                      "PRAGMA user_version = 4; COMMIT;")
    done, failed, again = "a" * 64, "b" * 64, jpb.Job(id=f"{3:026d}", owner="alice", memo_key="b" * 64)
    for i, (state, key) in enumerate([(jpb.JOB_STATE_COMPLETED, done), (jpb.JOB_STATE_FAILED, failed),
                                      (jpb.JOB_STATE_WAITING, failed)], start=1):
        job = jpb.Job(id=f"{i:026d}", owner="alice", state=state, memo_key=key)
        old.execute("INSERT INTO jobs (id, owner, state, record, memo_key) VALUES (?, 'alice', ?, ?, ?)",
                    (job.id, state, job.SerializeToString(), key))
    old.commit()
    old.close()
    store = Store(path)
    store.open()
    assert store._writer is not None
    assert store._writer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    [definition] = store._writer.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND sql LIKE '%memo_key%'")
    assert "jobs_memo_finished" in definition[0] and "state IN (4, 5, 6)" in definition[0]
    assert {k: j.id for k, j in asyncio.run(store.by_memo_keys([done, failed])).items()} == {done: f"{1:026d}"}
    same = asyncio.run(store.same_key_before(again))
    assert same is not None and same.id == f"{2:026d}" and same.state == jpb.JOB_STATE_FAILED
    for query, args in [(store._by_memo_keys, [done]), (store._same_key_before, again)]:
        plan: list[str] = []
        reader = store._reader()
        reader.set_trace_callback(plan.append)
        query(args)   # type: ignore[operator]
        reader.set_trace_callback(None)
        detail = " ".join(str(row) for row in reader.execute(f"EXPLAIN QUERY PLAN {plan[-1]}"))
        assert "jobs_memo_finished" in detail, detail
    store.close()


def test_the_wal_is_checkpointed_by_a_thread_of_its_own_not_by_a_commit(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that copied the WAL into the database took 60-110 ms instead of 10, and held up the next one
    (the release of waiting jobs, say). Once enough changes are written, a checkpointer does it on its own
    connection while the writer goes on; the writer's own checkpoint is only a backstop."""
    import threading

    monkeypatch.setattr("park_broker.core.store.CHANGES_PER_CHECKPOINT", 100)
    store = Store(tmp_path / "park.db")
    store.open()
    ran: list[tuple[str, tuple[int, int, int]]] = []

    def checkpoint() -> None:
        conn = store._reader()
        ran.append((threading.current_thread().name, conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()))

    store._checkpoint = checkpoint  # type: ignore[method-assign]

    async def main() -> None:
        for start in (0, 60, 120):
            await store.commit([Change(_job(i), jpb.Event(job_id=f"{i:026d}"), insert=True)
                                for i in range(start, start + 60)])
        for _ in range(500):
            if ran:
                break
            await asyncio.sleep(0.01)
        assert len(await store.get_many([f"{i:026d}" for i in range(180)])) == 180

    asyncio.run(main())
    store.close()
    [(thread, (busy, frames, copied))] = ran   # after the second commit (120 changes), not after the third
    assert thread.startswith("park-store-checkpoint") and busy == 0 and frames == copied > 0
