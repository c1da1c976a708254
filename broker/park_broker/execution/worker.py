"""A local worker process: runs one task at a time for the local executor.

Started as `python -m park_broker.execution.worker FD WATCH_FD NICE [UID:GID:GROUPS]`
in its own session (so a cancel can signal the whole process group,
command-line children included), at nice value NICE (`serve --job-nice`), so
that jobs yield the CPU to the broker. Given an account, the worker becomes it for
good before it reads a task: the broker starts it as root and lets it drop its
privileges itself, because a process that serves gRPC must not fork to change
accounts (gRPC's fork handlers break the child); a plain spawn is safe. Tasks and outcomes are length-prefixed JSON on the socket FD. For
each task, in the attempt directory the broker made for it, the worker points fds 1 and 2 at
`stdout.log`/`stderr.log` there, runs the call or command and stores the
return value there. It never touches the job's final directory: the broker
moves an attempt's directory into place, and only for the attempt it considers
current, so a stale attempt can never replace a recorded result. With each
outcome it says whether the attempt left nothing (`left_nothing`): then the
broker keeps the directory for a later attempt instead (core.attempts).

A worker dies with its broker: WATCH_FD is the read end of a pipe whose only
write end the broker holds, and a watchdog thread kills the worker's whole
process group (the job's own children included) when it reads end-of-file,
however the broker ended.

This module must import nothing heavy: it is what every worker starts with.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = struct.Struct(">I")
MAX_INLINE_RESULT = 64 * 1024
LOGS = ("stdout.log", "stderr.log")
RESERVED_NAMES = frozenset({*LOGS, "result.json", "result.pickle"})


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def file_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
        return os.fstat(f.fileno()).st_size, digest.hexdigest()


def resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _store_result(value: Any, work_dir: str) -> dict[str, Any]:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        data = pickle.dumps(value)
        Path(work_dir, "result.pickle").write_bytes(data)
        return {"result_file": "result.pickle", "result_format": "pickle"}
    if len(text) > MAX_INLINE_RESULT:
        Path(work_dir, "result.json").write_text(text)
        return {"result_file": "result.json", "result_format": "json"}
    return {"result_json": text}


def _run(task: dict[str, Any], work_dir: str) -> dict[str, Any]:
    if task["kind"] == "command":
        proc = subprocess.run(task["argv"], cwd=work_dir, stdin=subprocess.DEVNULL, stdout=1, stderr=2)
        if proc.returncode != 0:
            return {"ok": False, "error": f"command exited with status {proc.returncode}"}
        return {"ok": True}
    fn = resolve(task["target"])
    args = json.loads(task["args_json"] or "[]")
    kwargs = json.loads(task["kwargs_json"] or "{}")
    return {"ok": True, **_store_result(fn(*args, **kwargs), work_dir)}


class WorkerProcess:
    """What a worker process keeps from one task to the next: its own stdout and stderr (a task's logs take
    fds 1 and 2 while it runs), and the variables its last task set. A task's variables are set as it starts
    (those already holding its values are left alone) and the last task's others removed: restoring them
    after each task would cost a trivial job as much again."""

    def __init__(self) -> None:
        self.stdio = (os.dup(1), os.dup(2))
        self._env: dict[str, str] = {}

    def enter(self, env: dict[str, str]) -> None:
        for key in self._env.keys() - env.keys():
            os.environ.pop(key, None)
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        self._env = env


def run_task(task: dict[str, Any], process: WorkerProcess, report_fd: int = -1) -> dict[str, Any]:
    """Run one task with its output captured in its attempt directory; never raises for the task's own errors.

    `report_fd`: the socket to the broker, which a Python call's `park.report` may write its reports to
    (park.progress) until the call returns."""
    work_dir = task["work_dir"]   # made by the broker, for the account this process runs as
    try:
        with os.scandir(work_dir) as entries:   # a half-run of this attempt (a retry by Dask); a spare's empty logs
            left = [(entry.name, entry.path, entry.is_file(follow_symlinks=False),
                     entry.is_dir(follow_symlinks=False)) for entry in entries]
    except FileNotFoundError:
        return {"ok": False, "error": "the attempt's directory is gone: its broker no longer wants this attempt"}
    except OSError as exc:
        return {"ok": False, "error": f"the job's process (uid {os.getuid()}) cannot use its directory: {exc}"}
    for name, path, is_file, is_dir in left:
        if name in LOGS and is_file:
            continue   # truncated when opened: a log file is reused, not made again
        shutil.rmtree(path) if is_dir else os.unlink(path)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
            log_fd = os.open(os.path.join(work_dir, name),
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            os.dup2(log_fd, fd)
            os.close(log_fd)
        process.enter(task["env"])
        if report_fd >= 0 and task["kind"] != "command":   # a command's processes have no such fd
            os.environ["PARK_REPORT_FD"] = f"{os.getpid()}:{report_fd}"
        os.chdir(work_dir)
        limit = int(task.get("memory_limit") or 0)
        try:
            with _memory_limited(limit):
                outcome = _run(task, work_dir)
        except MemoryError:
            traceback.print_exc()
            outcome = {"ok": False, "error": f"MemoryError: the job went over its memory limit of "
                                             f"{limit / 2**30:.2f} GiB", "traceback": traceback.format_exc()[-20000:]}
        except BaseException as exc:  # noqa: BLE001 - the job's failure, reported, not ours
            traceback.print_exc()
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000],
                       "traceback": traceback.format_exc()[-20000:]}
        if limit and not outcome.get("ok") and outcome.get("error", "").startswith("command exited"):
            outcome["error"] += f" (its memory was limited to {limit / 2**30:.2f} GiB)"
        os.environ.pop("PARK_REPORT_FD", None)   # before the flush: no report may follow the outcome
        reporting = sys.modules.get("park.progress")
        if reporting is not None:   # the job reported progress: deliver it before the outcome
            reporting.flush()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.dup2(process.stdio[0], 1)
        os.dup2(process.stdio[1], 2)
        os.chdir("/")   # not left in a directory the broker moves or removes next
        os.environ.pop("PARK_REPORT_FD", None)
    output = os.path.join(work_dir, task["output_name"])
    if os.path.isfile(output):
        size, sha = file_digest(output)
        outcome["outputs"] = [[task["output_name"], output, size, sha]]
    if outcome.get("result_file"):
        outcome["result_file"] = os.path.join(work_dir, outcome["result_file"])
    return outcome


@contextlib.contextmanager
def _memory_limited(limit: int) -> Iterator[None]:
    """While inside, this process (and what it starts) may allocate `limit` bytes more than it has now:
    the soft address-space limit, restored afterwards (a soft limit may go back up to the hard one)."""
    if not limit:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    wanted = now + limit if hard == resource.RLIM_INFINITY else min(now + limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def left_nothing(work_dir: str) -> bool:
    """Whether an attempt that ran in `work_dir` left nothing behind: its two logs empty, no other file,
    the directory as the broker made it (mode 0700), and no process of the job's still running here (a
    process it started and left could write into the directory, or the logs, later)."""
    try:
        if os.stat(work_dir).st_mode & 0o7777 != 0o700:
            return False
        with os.scandir(work_dir) as entries:
            logs = 0
            for entry in entries:
                if (entry.name not in LOGS or not entry.is_file(follow_symlinks=False)
                        or entry.stat(follow_symlinks=False).st_size):
                    return False
                logs += 1
    except OSError:
        return False
    try:
        while True:   # reap what the job started and left to end; one still running means no
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return False
    except ChildProcessError:   # no child left
        return logs == 2


def die_with_broker(watch_fd: int) -> None:
    """Kill this process group when the broker is gone (see the module docstring). A broker that
    died before this runs is noticed too: its pipe is already at end-of-file. (Not PR_SET_PDEATHSIG:
    it would kill this process alone, before it could take the job's own children with it.)"""
    def watch() -> None:
        try:
            while os.read(watch_fd, 1):
                pass
        finally:
            os.killpg(0, signal.SIGKILL)
    threading.Thread(target=watch, name="park-broker-watchdog", daemon=True).start()


def become(account: str) -> None:
    """Drop to the account "UID:GID:GROUP,GROUP..." for good, before anything of a job is seen."""
    uid, gid, groups = account.split(":")
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
    if os.getuid() != int(uid) or os.geteuid() != int(uid):
        raise SystemExit(f"park worker: could not become uid {uid}")


def adopt_orphans() -> None:
    """Become the parent of whatever a job's processes leave running when their own parent exits (a
    subreaper, prctl(2)), so that `left_nothing` sees a command's background processes too."""
    import ctypes   # here, not at the top: only a worker needs it

    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def main() -> None:
    os.nice(int(sys.argv[3]))   # for good: raising a priority again takes a privilege jobs never have
    # A batch process is never scheduled ahead of the one that woke it: a worker handed a task by the
    # broker does not take the broker's core from it (sched(7), SCHED_BATCH); otherwise it gets its share.
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    adopt_orphans()
    if len(sys.argv) > 4:
        become(sys.argv[4])
    sock = socket.socket(fileno=int(sys.argv[1]))
    die_with_broker(int(sys.argv[2]))
    serve(sock, reports=True)


def serve(sock: socket.socket, *, reports: bool) -> None:
    """Run the tasks read from `sock` one after another, sending back each outcome and whether the attempt
    left nothing (call `adopt_orphans` first). `reports`: a Python call's `park.report` may write to `sock`
    (the local executor reads them; a Dask child's reports go over the network instead)."""
    process = WorkerProcess()
    while (task := recv(sock)) is not None:
        try:
            outcome = run_task(task, process, sock.fileno() if reports else -1)
        except Exception as exc:  # noqa: BLE001 - the worker's own failure is the task's, never a dead worker
            outcome = {"ok": False, "error": f"the worker could not run the job: {type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}
        if left_nothing(task["work_dir"]):
            outcome["left_nothing"] = True
        send(sock, outcome)


if __name__ == "__main__":
    main()
