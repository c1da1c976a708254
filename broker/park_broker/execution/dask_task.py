"""What runs on a Dask worker for the Dask executor: each job attempt in a child process.

`run(payload)` is the function the broker submits to Dask: a coroutine, which
Dask runs on the worker's event loop (it still takes one of the worker's
threads' slots while it runs, so a worker runs as many jobs at once as it has
threads). It hands the task to a child process (`python -m
park_broker.execution.dask_task FD`, in its own session) over a socket pair,
waits for the answer without blocking that loop (no thread, no selector of its
own per job), and returns the child's outcome dict, which it also sends to the
broker with its finished event: the child calls
`park_broker.execution.worker.serve`, so the attempt directory, output capture,
result storage and the report of an attempt that left nothing (whose directory
the broker keeps for the next attempt) are exactly those of the local executor
(and, as there, the broker alone moves a current attempt's directory into
place). Children
are kept warm between tasks (at most one idle child per worker thread), and a
child only takes tasks with the import path it was started with, as local
workers do; so, as there, modules a job imported stay imported for the next.

Why a child process: a job must not run in the worker's own process (nor on
its event loop), where it could neither be stopped nor kept from another
user's jobs. A child process can be stopped: the
broker asks the worker that runs it (`Client.run(terminate, ...)`) to SIGTERM
the child's process group and SIGKILL it after the grace period; a terminated
child is not reused.

Failure guarantees:
- the child dies with the worker: it notices it was re-parented (within half a
  second) and kills its own process group, command-line children included; a
  worker that closes (its async tasks are cancelled) kills the children of the
  tasks it was running;
- a task the scheduler no longer wants (its broker cancelled it, or the broker
  died and its client was dropped) is noticed within `POLL` seconds and its
  child terminated, so an orphaned attempt does not race the re-run that the
  restarted broker starts; and a broker that starts kills, on every worker,
  whatever attempts an earlier broker of its site left (`kill_stale`) before
  it runs anything, in case the scheduler has not dropped them yet. This one check reads the worker's task state, which
  is not a public Dask API; should it change, `_released` returns False and only
  explicit cancellation stops running jobs.

This module must import nothing heavy at module level: it is also the child's
entry point. `distributed` is imported inside `run`, which only runs on a worker.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from park_broker.execution.worker import adopt_orphans, serve

log = logging.getLogger(__name__)
POLL = 0.25   # seconds between checks that the scheduler still wants a running task
_HEADER = struct.Struct(">I")   # the length prefix of `worker.send`/`recv`, which the child speaks


class _Child:
    """The child process of one running task, as the worker-side registry holds it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.cancelled = False

    def terminate(self, grace: float) -> None:
        """SIGTERM the child's process group now and SIGKILL it after `grace` seconds (idempotent)."""
        with _lock:
            first = not self.cancelled
            self.cancelled = True
            proc = self.proc
        if proc is None or not first or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        timer = threading.Timer(grace, _kill_if_alive, (proc,))
        timer.daemon = True
        timer.start()


_lock = threading.Lock()
_children: dict[str, _Child] = {}   # Dask key -> the child running it, in this worker process


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _kill_if_alive(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)


def terminate(keys: list[str], grace: float) -> int:
    """Run by the broker on a worker (`Client.run`): stop the children of `keys`; returns how many
    were found. A key that is not running here is ignored."""
    found = 0
    for key in keys:
        with _lock:
            child = _children.get(key)
        if child is not None:
            child.terminate(grace)
            found += 1
    return found


def kill_stale(prefix: str, current: str, timeout: float = 10.0) -> int:
    """Run by a broker that starts (`Client.run`, on every worker): SIGKILL the children of tasks whose
    key starts with `prefix` (the broker's site) but not of its own run `current`, that is, attempts an
    earlier broker of the site started, and wait until they exited; returns how many."""
    with _lock:
        stale = [c for k, c in _children.items() if k.startswith(prefix) and not k.endswith(current)]
        for child in stale:
            child.cancelled = True
    for child in stale:
        if child.proc is not None and child.proc.poll() is None:
            _signal_group(child.proc.pid, signal.SIGKILL)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("stale attempt's process %d survived SIGKILL for %.0f s", child.proc.pid, timeout)
    return len(stale)


def dask_key(name: str) -> tuple[str]:
    """The Dask key of the task of run `name` (park-SITE-JOB-ATTEMPT-RUN, which names it everywhere else)."""
    return (name,)


def _released(worker: Any, key: str) -> bool:
    """Whether the scheduler has released `key` while it runs here (worker state `cancelled`)."""
    tasks = getattr(getattr(worker, "state", None), "tasks", None)
    state = tasks.get(dask_key(key)) if isinstance(tasks, dict) else None
    return getattr(state, "state", None) == "cancelled"


async def run(payload: dict[str, Any]) -> dict[str, Any]:
    """The function Dask runs: run `payload["task"]` in a child process; returns its outcome dict.

    Announces the start on the broker's topic (`payload["topic"]`) before the child is started, and
    the end, with the outcome, once the child has answered: the broker takes the outcome from that
    event, in order after the start on this worker's stream, and need not gather the result.
    Never raises for the job's own failures; a child that dies without an answer is a failed
    outcome naming its exit status or signal."""
    from distributed import get_worker

    worker = get_worker()
    key = payload["key"]
    child = _Child()
    with _lock:
        _children[key] = child
    try:
        worker.log_event(payload["topic"], {"key": key, "worker": worker.address})
        outcome = await _supervise(payload, child, worker)
    finally:
        with _lock:
            _children.pop(key, None)
    worker.log_event(payload["topic"], {"key": key, "worker": worker.address, "outcome": outcome})
    return outcome


class _Process:
    """A warm child process: `python -m park_broker.execution.dask_task FD`, taking one task at a time."""

    def __init__(self, owner: str, python_path: tuple[str, ...]):
        self.owner = owner
        self.python_path = python_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*python_path, env.get("PYTHONPATH", "")) if p)
        self.sock, theirs = socket.socketpair()
        self.sock.setblocking(False)   # the worker's event loop waits on it (`_exchange`)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "park_broker.execution.dask_task", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL, env=env)

    def stop(self) -> None:
        self.sock.close()   # the child's loop ends at end of file
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


_idle: list[_Process] = []   # warm processes of this worker between tasks


def _process(owner: str, python_path: tuple[str, ...]) -> _Process:
    """A warm process of `owner`'s started with `python_path` (modules stay imported in a process, so
    another set of package directories, or another user, needs another process), or a new one."""
    with _lock:
        for i, warm in enumerate(_idle):
            if (warm.owner, warm.python_path) == (owner, python_path) and warm.proc.poll() is None:
                return _idle.pop(i)
    return _Process(owner, python_path)


def _release(process: _Process, keep: int) -> None:
    with _lock:
        _idle.append(process)
        surplus = _idle[:-keep] if len(_idle) > keep else []
        del _idle[:len(surplus)]
    for old in surplus:
        old.stop()


async def _supervise(payload: dict[str, Any], child: _Child, worker: Any) -> dict[str, Any]:
    key, grace = payload["key"], float(payload["grace"])
    process = _process(payload["task"]["owner"], (*payload["task"]["python_path"], *payload["python_path"]))
    with _lock:
        if child.cancelled:
            cancelled = True
        else:
            cancelled, child.proc = False, process.proc
    if cancelled:
        _release(process, getattr(worker, "nthreads", 1))
        return {"ok": False, "error": "cancelled before it started"}
    limit = float(payload["task"].get("timeout") or 0)
    deadline = time.monotonic() + limit if limit > 0 else float("inf")
    timed_out = False

    def check() -> None:
        nonlocal timed_out
        if _released(worker, key):
            log.info("task %s released by the scheduler: terminating its job", key)
            child.terminate(grace)
        elif not timed_out and time.monotonic() > deadline:
            timed_out = True
            child.terminate(grace)

    try:
        reply = await _exchange(process.sock, payload["task"], check)
    except OSError:
        reply = None
    except asyncio.CancelledError:   # the worker is closing: its jobs go with it, as when it dies
        process.stop()
        raise
    if reply is not None and not child.cancelled:
        _release(process, getattr(worker, "nthreads", 1))
        return reply
    process.sock.close()
    while (code := process.proc.poll()) is None:   # it is going (end of file, or terminated)
        await asyncio.sleep(0.05)
    if timed_out:
        return {"ok": False, "error": f"timed out after {limit:g} s"}
    if child.cancelled:
        return {"ok": False, "error": "cancelled"}
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return {"ok": False, "error": f"the process running the job on Dask worker {worker.address} {how}"}


async def _exchange(sock: socket.socket, task: dict[str, Any], check: Callable[[], None]) -> dict[str, Any] | None:
    """Send `task` to a warm process and read its answer, in `worker.send`/`recv`'s framing (the
    child's end), without blocking the worker's event loop, calling `check` every `POLL` seconds
    while it runs; None if the process closed its end."""
    loop = asyncio.get_running_loop()
    body = json.dumps(task).encode()
    await loop.sock_sendall(sock, _HEADER.pack(len(body)) + body)
    answer = bytearray()
    while len(answer) < _HEADER.size or len(answer) < _HEADER.size + _HEADER.unpack_from(answer)[0]:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            if not await _readable(loop, sock):
                check()
            continue
        if not chunk:
            return None
        answer += chunk
    return json.loads(answer[_HEADER.size:])


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """Whether `sock` has become readable within `POLL` seconds. One future and one timer, not a task
    per wait: this is on every job's path."""
    ready: asyncio.Future[bool] = loop.create_future()

    def settle(readable: bool) -> None:
        if not ready.done():
            ready.set_result(readable)

    loop.add_reader(sock, settle, True)
    timer = loop.call_later(POLL, settle, False)
    try:
        return await ready
    finally:
        loop.remove_reader(sock)
        timer.cancel()


def _die_with_parent(parent: int) -> None:
    """In the child: when the worker process is gone (we were re-parented), take the whole process
    group (command-line children included) down with it."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    adopt_orphans()
    sock = socket.socket(fileno=int(sys.argv[1]))
    threading.Thread(target=_die_with_parent, args=(os.getppid(),), name="park-parent-watch", daemon=True).start()
    serve(sock, reports=False)


if __name__ == "__main__":
    main()
