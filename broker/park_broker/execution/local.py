"""The local executor: a pool of long-lived worker processes on the broker's host.

Each worker (`park_broker.execution.worker`) runs in its own session, takes one
task at a time over a socket pair, and dies with the broker (its process group
with it); each worker's process group is recorded durably
(`execution.groups`) before it runs anything, so a broker that starts after a
crash kills whatever its predecessor's workers left before it runs a job again.
Workers are kept warm between one user's jobs (no process start per
job), never between users' (a job of another user gets a fresh process), and
each runs as the Unix account of the user whose jobs it takes when the broker
switches accounts (execution.accounts), with a clean environment. Cancelling a
running job signals the worker's process group with SIGTERM, then SIGKILL after
the grace period, and a fresh worker takes its place. A worker that dies on its
own fails the task it was running, and is replaced.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
from collections import deque

from park_broker.execution.accounts import Account, job_environment
from park_broker.errors import BrokerError
from park_broker.execution.base import FinishedCallback, Outcome, ReportsCallback, StartedCallback, Task
from park_broker.execution.groups import ProcessGroups

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
REPORT_WINDOW = 0.005   # seconds: progress reports of one worker reach the broker at most this often, together
MAX_REPORTS = 1000      # reports per delivery, as park.progress batches them over gRPC


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, executor: LocalExecutor, index: int):
        self.executor = executor
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: Task | None = None
        self.cancelled = False
        self.timed_out = False
        self.packages: tuple[str, ...] = ()   # the package directories this process was started with
        self.owner = ""                       # the user whose jobs it runs; none yet
        self.account: Account | None = None   # the Unix account it runs as; None: the broker's
        self._reports: list[dict[str, float]] = []   # read from `_reporting`'s worker, not yet delivered
        self._reporting: Task | None = None
        self._delivery: asyncio.Handle | None = None   # the next delivery of `_reports`, when one is due
        self._delivered_at = float("-inf")               # loop time of the last delivery
        self._committing: list[asyncio.Task[None]] = []  # deliveries not yet recorded, in order

    async def spawn(self, packages: tuple[str, ...] = (), account: Account | None = None) -> None:
        parent, child = socket.socketpair()
        self.packages, self.account = packages, account
        env = job_environment(account, [*packages, *self.executor.python_path])
        who = [] if account is None else [f"{account.uid}:{account.gid}:{','.join(map(str, account.groups))}"]
        watch = self.executor.watch_fd
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "park_broker.execution.worker", str(child.fileno()), str(watch),
                str(self.executor.nice), *who,
                pass_fds=[child.fileno(), watch], start_new_session=True, stdin=asyncio.subprocess.DEVNULL,
                env=env, cwd="/")
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        self.executor.groups.record(self.proc.pid)
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent)

    async def run(self, task: Task) -> Outcome | None:
        """Run `task`; None if it was cancelled or the worker could not be reached."""
        # Set first: a cancel that comes while a fresh process starts for the task must find it.
        self.task, self.cancelled, self.timed_out = task, False, False
        if (self.proc is None or task.python_path != self.packages or task.account != self.account
                or (self.owner and task.owner != self.owner)):
            # Modules (and whatever a job left behind) stay in a worker: another set of package versions,
            # or another user's job, needs a fresh process, started as that user's account.
            await self.stop()
            try:
                await self.spawn(task.python_path, task.account)
            except OSError as exc:
                self.proc, self.task = None, None
                who = f" as Unix account {task.account.name}" if task.account else ""
                log.error("cannot start a worker process%s: %s", who, exc)
                return Outcome(ok=False, error=f"the site could not start a process for the job{who}: {exc}")
        if self.cancelled:   # while its process started
            self.task = None
            return None
        self.owner = task.owner
        assert self.writer is not None and self.reader is not None and self.proc is not None
        body = json.dumps(task.message()).encode()
        limit = asyncio.get_running_loop().call_later(task.timeout, self._time_out) if task.timeout > 0 else None
        try:
            self.writer.write(_HEADER.pack(len(body)) + body)
            await self.writer.drain()
            while "report" in (reply := await self._receive()):   # a Python call's park.report, then the outcome
                self._take_report(task, reply["report"])
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self.proc.wait()
            self._end_group()
            await self.respawn()
            if self.cancelled:
                shutil.rmtree(task.work_dir, ignore_errors=True)
                return None
            if self.timed_out:
                return Outcome(ok=False, error=f"timed out after {task.timeout:g} s")
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            return Outcome(ok=False, error=f"the worker process running the job {how}")
        finally:
            self._deliver_reports()
            if self._committing:   # every report recorded before the outcome: none may follow it
                await asyncio.gather(*self._committing)
                self._committing.clear()
            self.task = None
            if limit is not None:
                limit.cancel()
        if self.cancelled:
            return None
        reply["outputs"] = tuple(tuple(o) for o in reply.get("outputs", ()))
        return Outcome(**reply)

    def _take_report(self, task: Task, values: object) -> None:
        """Hold a report for the next delivery. A report after a quiet spell of REPORT_WINDOW goes at once
        (with whatever messages are already buffered: readexactly returns without yielding while bytes
        are there); a stream of them goes together, at most once per REPORT_WINDOW, one batch of the
        broker's each, which a job reporting every few microseconds would otherwise swamp it with."""
        if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                   for k, v in values.items()):
            log.warning("dropped a malformed progress report", extra={"job_id": task.job_id})
            return
        self._reports.append({k: float(v) for k, v in values.items()})
        self._reporting = task
        if self._delivery is None:
            loop = asyncio.get_running_loop()
            wait = self._delivered_at + REPORT_WINDOW - loop.time()
            self._delivery = loop.call_later(wait, self._deliver_reports) if wait > 0 else \
                loop.call_soon(self._deliver_reports)

    def _deliver_reports(self) -> None:
        if self._delivery is not None:
            self._delivery.cancel()
            self._delivery = None
        reports, self._reports = self._reports, []
        if reports and self._reporting is not None:
            self._delivered_at = asyncio.get_running_loop().time()
            for start in range(0, len(reports), MAX_REPORTS):   # one broker batch (and commit) each
                self._committing.append(self.executor.take_reports(self._reporting,
                                                                   reports[start:start + MAX_REPORTS]))

    async def _receive(self) -> dict[str, object]:
        assert self.reader is not None
        header = await self.reader.readexactly(_HEADER.size)
        reply = json.loads(await self.reader.readexactly(_HEADER.unpack(header)[0]))
        if not isinstance(reply, dict):
            raise ConnectionError("the worker sent something other than a message")   # treated as a dead worker
        return reply

    async def respawn(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.proc, self.owner = None, ""
        try:
            await self.spawn(self.packages, self.account)
        except OSError as exc:   # the next task tries again, and fails with the reason if it still cannot
            self.proc = None
            log.error("cannot start a worker process: %s", exc)

    def _time_out(self) -> None:
        """The running attempt reached its time limit: it ends as a failure (then maybe a retry)."""
        self.timed_out = True
        self._stop_group(self.executor.grace)

    def terminate(self, grace: float) -> None:
        """Cancel the running attempt: SIGTERM its process group now, SIGKILL after `grace` seconds."""
        self.cancelled = True
        self._stop_group(grace)

    def _stop_group(self, grace: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace, _kill_if_alive, proc)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self.proc is not None:
            self._end_group()
        if self.writer is not None:
            self.writer.close()

    def _end_group(self) -> None:
        """The worker has exited: nothing its attempt started may outlive it, then forget its group."""
        assert self.proc is not None
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.executor.groups.forget(self.proc.pid)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _kill_if_alive(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGKILL)


class LocalExecutor:
    """Runs tasks on `workers` local processes; see the module docstring."""

    def __init__(self, groups: ProcessGroups, *, workers: int | None = None, python_path: list[str] | None = None,
                 grace: float = 5.0, nice: int = 10, warm: bool = True):
        self.groups = groups
        self.warm = warm   # start the workers at once (no use when each job's account needs a process of its own)
        self.size = workers or os.cpu_count() or 1
        self.python_path = list(python_path or [])
        self.grace = grace
        # Jobs yield the CPU to the broker: a woken worker would otherwise preempt it on every task
        # handed over, and a site whose jobs use every core still answers its users and peers.
        self.nice = nice
        self._queue: deque[Task] = deque()
        self._ready = asyncio.Event()
        self._workers: list[_Worker] = []
        self._loops: list[asyncio.Task[None]] = []
        self._on_started: StartedCallback | None = None
        self._on_finished: FinishedCallback | None = None
        self._on_reports: ReportsCallback | None = None
        # Workers die with the broker: they watch the read end of this pipe, whose one write end
        # (not inherited by anything) closes when this process ends, however it ends.
        self.watch_fd, self._alive_fd = os.pipe()

    async def start(self, on_started: StartedCallback, on_finished: FinishedCallback) -> None:
        self._on_started, self._on_finished = on_started, on_finished
        if killed := await asyncio.to_thread(self.groups.reap):
            log.warning("killed %d process groups left by the broker that served this site before", killed)
        self._workers = [_Worker(self, i) for i in range(self.size)]
        if self.warm:
            await asyncio.gather(*(w.spawn() for w in self._workers))
        self._loops = [asyncio.create_task(self._serve(w), name=f"park-worker-{w.index}") for w in self._workers]

    def accept_reports(self, on_reports: ReportsCallback) -> None:
        """Take progress reports from the workers' Python calls (park.progress writes them to the socket)."""
        self._on_reports = on_reports

    def take_reports(self, task: Task, reports: list[dict[str, float]]) -> asyncio.Task[None]:
        """Reports a worker sent while running `task`, credited to that attempt whatever they say; the task
        records them. Tasks start in the order they are made, so reports are decided in order."""
        return asyncio.get_running_loop().create_task(self._record_reports(task, reports))

    async def _record_reports(self, task: Task, reports: list[dict[str, float]]) -> None:
        if self._on_reports is None:
            return
        try:
            await self._on_reports(task.job_id, task.attempt, reports)
        except BrokerError as exc:   # not running any more, or values the broker refuses: the job goes on
            log.info("dropped a progress report: %s", exc.message, extra={"job_id": task.job_id})
        except Exception:  # noqa: BLE001 - the broker's own failure: logged, and the worker goes on serving
            log.exception("recording progress reports failed", extra={"job_id": task.job_id})

    def submit(self, task: Task) -> None:
        self._queue.append(task)
        self._ready.set()

    def capacity(self) -> int | None:
        return self.size

    def cancel(self, job_id: str) -> None:
        for task in self._queue:
            if task.job_id == job_id:
                self._queue.remove(task)
                return
        for worker in self._workers:
            if worker.task is not None and worker.task.job_id == job_id:
                log.info("terminating job", extra={"job_id": job_id, "worker": worker.index})
                worker.terminate(self.grace)
                return

    async def _serve(self, worker: _Worker) -> None:
        assert self._on_started is not None and self._on_finished is not None
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            task = self._queue.popleft()
            self._on_started(task.job_id, task.attempt)
            outcome = await worker.run(task)
            if outcome is not None:
                self._on_finished(task.job_id, task.attempt, outcome)

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._workers))
        for fd in (self.watch_fd, self._alive_fd):
            os.close(fd)
