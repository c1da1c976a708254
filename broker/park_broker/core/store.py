"""The durable job store: one SQLite file per broker, and all of Park's SQL.

Constraints this module guarantees:
- WAL mode with `synchronous=FULL`: once `commit()` returns, its changes survive
  `kill -9` and power loss, so an event a peer has seen never rolls back.
- One writer connection, used only by one thread, in `BEGIN IMMEDIATE`
  transactions. A job's new record and its event are written in the same
  transaction, and every change that is waiting when the writer becomes free
  shares one transaction (group commit): throughput scales with batch size,
  not with fsync latency.
- Event sequence numbers are the event table's primary key, assigned in commit
  order, so they are strictly increasing and never reused.
- Readers use their own connections on other threads and see only committed data.
- The WAL is copied into the database (checkpointed) on a connection of its own, PASSIVE, off the
  commit path; a checkpoint only copies, and losing one loses nothing.

Jobs are kept as a serialized `park.v1.Job` record beside the columns that
queries filter on; the schema version is `PRAGMA user_version`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from park._proto import jobs_pb2 as jpb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE jobs (
    id      TEXT PRIMARY KEY,
    owner   TEXT NOT NULL,
    state   INTEGER NOT NULL,
    record  BLOB NOT NULL
);
CREATE INDEX jobs_owner ON jobs(owner, id);
CREATE INDEX jobs_active ON jobs(state) WHERE state IN (1, 2, 3);
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    owner   TEXT NOT NULL,
    body    BLOB NOT NULL
);
CREATE INDEX events_job ON events(job_id, seq);
CREATE INDEX events_owner ON events(owner, seq);
"""
# Each entry takes the schema from version i + 1 to i + 2.
_MIGRATIONS = [
    """
    ALTER TABLE jobs ADD COLUMN memo_key TEXT;
    ALTER TABLE jobs ADD COLUMN work TEXT;
    CREATE INDEX jobs_memo ON jobs(memo_key) WHERE memo_key IS NOT NULL;
    CREATE INDEX jobs_work ON jobs(owner, work);
    CREATE TABLE aliases (
        id      TEXT PRIMARY KEY,
        target  TEXT NOT NULL,
        owner   TEXT NOT NULL
    );
    """,
    # A memo hit submitted as a member of a group (park.map): the job it names counts for that group.
    """
    ALTER TABLE aliases ADD COLUMN member_of TEXT;
    CREATE INDEX aliases_members ON aliases(target) WHERE member_of IS NOT NULL;
    """,
    # An owner's jobs indexed in the order they came (owner, rowid), which is the order listing pages in: an
    # index on (owner, id) put each new job at a random place (ids are random), a page written per job.
    """
    DROP INDEX jobs_owner;
    CREATE INDEX jobs_by_owner ON jobs(owner);
    """,
    # Memo keys indexed once a job has finished: an active job's key is found in memory (the ledger's), and
    # an index of random keys cost each submitted job a page of its own (about a third of its write).
    """
    DROP INDEX jobs_memo;
    CREATE INDEX jobs_memo_finished ON jobs(memo_key) WHERE memo_key IS NOT NULL AND state IN (4, 5, 6);
    """,
]
# Spelled as in the index jobs_memo_finished's definition: SQLite uses a partial index only for a query that
# names its condition.
_FINISHED = "state IN (4, 5, 6)"
# Pages the WAL may hold before they are copied into the database (SQLite's default is 1,000). A batch of a
# thousand submissions changes a few thousand index pages, so the default checkpointed at every commit;
# checkpointing less often writes each page once for many commits. Durability is the WAL's (its fsync at
# every commit), not the checkpoint's.
WAL_AUTOCHECKPOINT = 16_384
# The copying is done by a checkpointer thread on a connection of its own, PASSIVE (it never holds up the
# writer), once about that many pages are written: a submitted job's change writes about four (its row, its
# event, two index entries at random places). A commit that checkpointed itself took 60-110 ms instead of 10,
# and the release of waiting jobs could be that commit. The writer checkpoints only as a backstop, should the
# checkpointer fall far behind.
CHANGES_PER_CHECKPOINT = WAL_AUTOCHECKPOINT // 4
WRITER_AUTOCHECKPOINT = 2 * WAL_AUTOCHECKPOINT


def _work(spec: jpb.JobSpec) -> str:
    """What a job runs, for finding earlier runs of the same thing."""
    which = spec.WhichOneof("work")
    if which == "call":
        return spec.call.target
    if which == "command":
        return spec.command.argv[0] if spec.command.argv else ""
    return which or ""


# Rows go in as one JSON array (`json_each(:rows)`), with the row's blob, if the table takes one, as its
# [start, length] in one concatenated blob (:blobs): see `_write_rows`.
def _column(i: int) -> str:
    return f"json_extract(r.value, '$[{i}]')"


def _blob(i: int) -> str:
    # substr() of an empty blob (every blob of the statement empty) is NULL, not an empty blob
    return f"ifnull(substr(:blobs, {_column(i)}, {_column(i + 1)}), x'')"


def _next_rowid(table: str) -> str:
    """The rowid of a row: the next free one plus its place in the array, so rows keep their order (the order
    an owner's jobs are listed in, and a job's group joins are read in) without sorting them."""
    return f"(SELECT ifnull(max(rowid), 0) FROM {table}) + 1 + r.key"


_ROWS = "FROM json_each(:rows) AS r"
_INSERT_ALIASES = f"INSERT INTO aliases (rowid, id, target, owner, member_of) SELECT {_next_rowid('aliases')}, " \
                  f"{', '.join(map(_column, range(4)))} {_ROWS}"
_INSERT_EVENTS = f"INSERT INTO events (seq, job_id, owner, body) SELECT {_column(0)}, {_column(1)}, {_column(2)}, " \
                 f"{_blob(3)} {_ROWS}"
_INSERT_JOBS = f"INSERT INTO jobs (rowid, id, owner, state, memo_key, work, record) SELECT {_next_rowid('jobs')}, " \
               f"{', '.join(map(_column, range(5)))}, {_blob(5)} {_ROWS}"
_UPDATE_JOBS = f"UPDATE jobs SET state = {_column(1)}, record = {_blob(2)} {_ROWS} WHERE jobs.id = {_column(0)}"
_BLOBS_PER_STATEMENT = 64 * 2**20   # bytes: far under SQLite's limit of 1e9 for one value


def _write_rows(conn: sqlite3.Connection, statement: str, rows: list[tuple[Any, ...]],
                blobs: list[bytes] | None = None) -> None:
    """Run `statement` (one of the above) over `rows` of text, integers and None, with `blobs[i]` the blob of
    row i if the table takes one, in a statement or a few rather than one per row. A statement is one step of
    SQLite's, and the sqlite3 module lets go of the GIL around each step and must take it back after: a step
    per row (`executemany`) meant thousands of hand-offs per transaction, each waiting up to the interpreter's
    switch interval (5 ms) while the event loop computed, so the writer advanced only when the loop was idle."""
    if not rows:
        return
    if blobs is None:
        conn.execute(statement, {"rows": json.dumps(rows, separators=(",", ":"), ensure_ascii=False)})
        return
    lengths = [len(blob) for blob in blobs]
    if len(rows) > 1 and sum(lengths) > _BLOBS_PER_STATEMENT:
        half = len(rows) // 2
        _write_rows(conn, statement, rows[:half], blobs[:half])
        _write_rows(conn, statement, rows[half:], blobs[half:])
        return
    document = [(*row, start, length) for row, start, length in zip(rows, accumulate(lengths, initial=1), lengths)]
    conn.execute(statement, {"rows": json.dumps(document, separators=(",", ":"), ensure_ascii=False),
                             "blobs": b"".join(blobs)})


class StoreError(RuntimeError):
    """The database cannot be used (wrong schema version, corrupt file)."""


@dataclass(slots=True)
class Change:
    """A job's new record and the event that explains it, written together."""

    job: jpb.Job
    event: jpb.Event
    insert: bool = False
    record: bool = True     # False: only the event is written; the job's row is left as it is
    alias_of: str = ""      # set: `job.id` becomes another name of this job (with record False, event `reused`)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Store:
    """Asynchronous front of the SQLite store; safe to use from one event loop."""

    def __init__(self, path: Path, on_commit: Callable[[list[Change]], None] | None = None):
        """`on_commit` receives each transaction's changes, in sequence order, once they are durable."""
        self.path = path
        self._on_commit = on_commit
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="park-store-writer")
        self._reader_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="park-store-reader")
        self._checkpoint_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="park-store-checkpoint")
        self._unchecked = 0          # changes committed since the last checkpoint began
        self._checkpointing = False
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._pending: list[tuple[list[Change], asyncio.Future[None]]] = []
        self._flushing = False

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Create or check the schema. Raises StoreError for an unknown version."""
        self._writer = self._writer_pool.submit(_connect, self.path).result()
        self._writer.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT}")
        version = self._writer.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}; this broker knows {SCHEMA_VERSION}")
        steps = ([_SCHEMA] if version == 0 else []) + _MIGRATIONS[max(version, 1) - 1:]
        if steps:
            self._writer.executescript(f"BEGIN IMMEDIATE; {''.join(steps)} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        self._checkpoint_pool.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()

    # -- writes ----------------------------------------------------------------

    async def commit(self, changes: list[Change]) -> None:
        """Write `changes` durably; fills in each event's `seq` and the job's `last_seq`.

        Concurrent callers are grouped into one transaction. If the transaction
        fails, every caller in it gets the exception and nothing of it is kept.
        """
        if changes:
            await self.enqueue(changes)

    def enqueue(self, changes: list[Change]) -> asyncio.Future[None]:
        """Queue `changes` for writing now, in call order (the order of sequence numbers), and return
        the future of their commit: a caller that cannot await yet still fixes its place in line."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((changes, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(self._writer_pool, self._write, [c for cs, _ in batch for c in cs])
                except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                if self._on_commit is not None:
                    self._on_commit([c for cs, _ in batch for c in cs])
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
                self._unchecked += sum(len(cs) for cs, _ in batch)
                if self._unchecked >= CHANGES_PER_CHECKPOINT and not self._checkpointing:
                    self._unchecked, self._checkpointing = 0, True
                    checkpoint = loop.run_in_executor(self._checkpoint_pool, self._checkpoint)
                    checkpoint.add_done_callback(self._checkpointed)
        finally:
            self._flushing = False

    def _checkpoint(self) -> None:
        self._reader().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _checkpointed(self, checkpoint: asyncio.Future[None]) -> None:
        self._checkpointing = False
        if not checkpoint.cancelled() and checkpoint.exception() is not None:
            # Nothing is lost: the pages stay in the WAL for the next checkpoint (or the writer's backstop).
            log.warning("checkpoint failed: %s", checkpoint.exception())

    def _write(self, changes: Sequence[Change]) -> None:
        """One transaction: every change's event, in order, and each job's row once, as its last change left
        it. A job often changes several times in one transaction (queued, started and completed while the
        previous one was being synced): its earlier records would only be overwritten."""
        conn = self._writer
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Sequence numbers are given here, in order, from where AUTOINCREMENT would start: the writer holds
            # the database's write lock, and rows go in with one statement per table (`_write_rows`).
            seq = conn.execute("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), "
                               "COALESCE((SELECT MAX(seq) FROM events), 0))").fetchone()[0]
            aliases, events, bodies = [], [], []
            rows: dict[str, tuple[jpb.Job, bool]] = {}   # job id -> (its last record, whether its row is new)
            for change in changes:
                job, event = change.job, change.event
                if change.alias_of:
                    aliases.append((job.id, change.alias_of, job.owner, job.spec.member_of or None))
                seq += 1
                event.ClearField("seq")
                events.append((seq, job.id, job.owner))
                bodies.append(event.SerializeToString())
                event.seq = job.last_seq = seq
                if change.record:
                    earlier = rows.get(job.id)
                    rows[job.id] = (job, change.insert or (earlier is not None and earlier[1]))
            new = [job for job, inserted in rows.values() if inserted]
            changed = [job for job, inserted in rows.values() if not inserted]
            _write_rows(conn, _INSERT_ALIASES, aliases)
            _write_rows(conn, _INSERT_EVENTS, events, bodies)
            _write_rows(conn, _INSERT_JOBS, [(job.id, job.owner, job.state, job.memo_key or None, _work(job.spec))
                                             for job in new], [job.SerializeToString() for job in new])
            _write_rows(conn, _UPDATE_JOBS, [(job.id, job.state) for job in changed],
                        [job.SerializeToString() for job in changed])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            for change in changes:
                change.event.seq = 0
            raise

    # -- reads -----------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Callers with nothing to ask skip this: a submission asks several questions per batch, and a hop
        # to a reader thread waits for the GIL behind the writer and the event loop.
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)

    async def get(self, job_id: str) -> jpb.Job | None:
        return await self._read(self._get, job_id)

    def _get(self, job_id: str) -> jpb.Job | None:
        row = self._reader().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return jpb.Job.FromString(row[0]) if row else None

    async def get_many(self, job_ids: Iterable[str]) -> dict[str, jpb.Job]:
        wanted = list(job_ids)
        return await self._read(self._get_many, wanted) if wanted else {}

    def _get_many(self, job_ids: list[str]) -> dict[str, jpb.Job]:
        """Records by id; an alias id maps to the record of the job it names."""
        found = self._query_in("SELECT id, record FROM jobs WHERE id IN ({})", job_ids)
        missing = [j for j in job_ids if j not in found]
        aliases = {a: t for a, t in self._rows("SELECT id, target FROM aliases WHERE id IN ({})", missing)}
        targets = self._query_in("SELECT id, record FROM jobs WHERE id IN ({})", sorted(set(aliases.values())))
        found.update({a: targets[t] for a, t in aliases.items() if t in targets})
        return found

    def _rows(self, sql: str, values: list[str]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = []
        for start in range(0, len(values), 500):
            chunk = values[start:start + 500]
            rows += self._reader().execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def _query_in(self, sql: str, values: list[str]) -> dict[str, jpb.Job]:
        return {key: jpb.Job.FromString(record) for key, record in self._rows(sql, values)}

    async def by_memo_keys(self, keys: Iterable[str]) -> dict[str, jpb.Job]:
        """The completed job of each memo key that has one (the earliest, if several)."""
        wanted = sorted(set(keys))
        return await self._read(self._by_memo_keys, wanted) if wanted else {}

    def _by_memo_keys(self, keys: list[str]) -> dict[str, jpb.Job]:
        rows = self._rows(f"SELECT memo_key, record FROM jobs WHERE memo_key IN ({{}}) AND {_FINISHED} AND state = "
                          f"{jpb.JOB_STATE_COMPLETED} ORDER BY rowid DESC", keys)
        return {key: jpb.Job.FromString(record) for key, record in rows}

    async def same_key_before(self, job: jpb.Job) -> jpb.Job | None:
        """The latest finished job before `job` of the same owner and memo key (one that did not complete: an
        earlier one still active, or completed, when `job` came would have been reused)."""
        return await self._read(self._same_key_before, job)

    def _same_key_before(self, job: jpb.Job) -> jpb.Job | None:
        row = self._reader().execute(
            f"SELECT record FROM jobs WHERE owner = ? AND memo_key = ? AND {_FINISHED} "
            "AND rowid < (SELECT rowid FROM jobs WHERE id = ?) ORDER BY rowid DESC LIMIT 1",
            (job.owner, job.memo_key, job.id)).fetchone()
        return jpb.Job.FromString(row[0]) if row else None

    async def nearest(self, job: jpb.Job) -> jpb.Job | None:
        """The latest job before `job` of the same owner and callable, with another memo key."""
        return await self._read(self._nearest, job)

    def _nearest(self, job: jpb.Job) -> jpb.Job | None:
        row = self._reader().execute(
            "SELECT record FROM jobs WHERE owner = ? AND work = ? AND memo_key IS NOT NULL AND memo_key != ? "
            "AND rowid < (SELECT rowid FROM jobs WHERE id = ?) ORDER BY rowid DESC LIMIT 1",
            (job.owner, _work(job.spec), job.memo_key, job.id)).fetchone()
        return jpb.Job.FromString(row[0]) if row else None


    async def list(self, owner: str | None, states: Sequence[int], after_id: str, limit: int) -> list[jpb.Job]:
        return await self._read(self._list, owner, list(states), after_id, limit)

    def _list(self, owner: str | None, states: list[int], after_id: str, limit: int) -> list[jpb.Job]:
        # rowid order is submission order; paging resumes after the row of `after_id`.
        sql, args = "SELECT record FROM jobs WHERE rowid > COALESCE((SELECT rowid FROM jobs WHERE id = ?), 0)", \
            [after_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY rowid LIMIT ?"
        args.append(limit)
        return [jpb.Job.FromString(r[0]) for r in self._reader().execute(sql, args)]

    async def active(self) -> list[bytes]:
        """The serialized record of every job that is not in a terminal state, in submission order (for
        recovery, which keeps most of them serialized)."""
        return await self._read(self._active)

    def _active(self) -> list[bytes]:
        rows = self._reader().execute("SELECT record FROM jobs WHERE state IN (1, 2, 3) ORDER BY rowid")
        return [r[0] for r in rows]

    async def memberships(self, job_ids: Iterable[str]) -> list[tuple[str, str]]:
        """(job, group) for each time one of the jobs joined a group as a memo hit."""
        return await self._read(lambda ids: self._rows(
            "SELECT target, member_of FROM aliases WHERE member_of IS NOT NULL AND target IN ({}) ORDER BY rowid",
            ids), list(job_ids))

    async def events(self, after_seq: int, *, job_id: str | None, owner: str | None,
                     limit: int = 1000) -> list[jpb.Event]:
        """Committed events with seq > after_seq, oldest first, filtered by job or owner."""
        return await self._read(self._events, after_seq, job_id, owner, limit)

    def _events(self, after_seq: int, job_id: str | None, owner: str | None, limit: int) -> list[jpb.Event]:
        sql, args = "SELECT seq, body FROM events WHERE seq > ?", [after_seq]
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        out = []
        for seq, body in self._reader().execute(sql, args):
            event = jpb.Event.FromString(body)
            event.seq = seq
            out.append(event)
        return out

    async def reports(self, job_ids: Iterable[str]) -> dict[str, list[dict[str, float]]]:
        """The progress reports of each job, oldest first."""
        wanted = list(job_ids)
        return await self._read(self._reports, wanted) if wanted else {}

    def _reports(self, job_ids: list[str]) -> dict[str, list[dict[str, float]]]:
        out: dict[str, list[dict[str, float]]] = {}
        for job_id in job_ids:
            for event in self._events(0, job_id, None, 1 << 62):
                if event.HasField("improved"):
                    out.setdefault(job_id, []).append(dict(event.improved.values))
        return out

    async def head_seq(self) -> int:
        return await self._read(lambda: self._reader().execute("SELECT COALESCE(MAX(seq), 0) FROM events")
                                .fetchone()[0])

    async def count_by_state(self) -> dict[int, int]:
        """How many jobs are in each state (states with none are absent); one query, for metrics."""
        return await self._read(lambda: dict(self._reader().execute(
            "SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()))
