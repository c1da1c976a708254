"""`park.report(**values)`: progress from inside a running job.

A job calls `park.report(chisq=1.7, step=12)` as often as once per iteration.
The call only appends to an in-memory queue and returns; a background thread
streams everything queued since its last send to the job's broker
(`Jobs.Report`, a client stream), authenticated by the job-scoped token the
broker put in the environment. The job never waits on the network, except at
its very end, when the worker (or the interpreter's exit, for a command-line
job) flushes what is left so that every report is recorded before the job's
outcome.

Inside a local worker process (the broker's local executor runs the call in
it), reports take a shorter way: the worker names its socket to the broker in
`PARK_REPORT_FD` ("PID:FD", so that a child process, which has no such fd,
never takes it for its own), and `report` writes to it from the calling
thread, without waiting for a background thread to win the GIL from a busy job
(bench/progress.py: that wait was most of a race's decision time); reports
less than a millisecond apart go together.
The broker reads them between the worker's messages and credits them to the
attempt the worker runs; no token is needed on a socket only it and the worker
hold.

Every report is kept and evaluated on the broker, so an `improved(...)`
condition that holds for one report is seen even if the next report undoes
it. Only if a job outpaces the network by `MAX_QUEUED` reports are the oldest
unsent ones merged into their successors (a warning says so once).

Per-process state: one reporter per running job attempt, created on the first
report and closed by `flush()`; outside a job `report` is a no-op that warns
once.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import struct
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import grpc

from park._proto import jobs_pb2 as jpb
from park._proto import jobs_pb2_grpc

__all__ = ["report", "flush"]

log = logging.getLogger(__name__)
MAX_QUEUED = 100_000
MAX_BATCH = 1000


class _Reporter:
    def __init__(self, address: str, cert: str, token: str):
        self.token = token
        self._queue: deque[dict[str, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._merged = False
        self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(cert).read_bytes()))
        self._thread = threading.Thread(target=self._run, name="park-report", daemon=True)
        self._thread.start()

    def put(self, values: dict[str, float]) -> None:
        with self._cond:
            if len(self._queue) >= MAX_QUEUED:
                values = {**self._queue.pop(), **values}
                if not self._merged:
                    self._merged = True
                    warnings.warn("park.report: reports arrive faster than they can be sent; "
                                  "merging unsent reports", RuntimeWarning, stacklevel=3)
            self._queue.append(values)
            self._cond.notify()

    def _requests(self) -> Iterator[jpb.ReportRequest]:
        first = True
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            yield jpb.ReportRequest(token=self.token if first else "",
                                    reports=[jpb.Improved(values=v) for v in batch])
            first = False

    def _run(self) -> None:
        try:
            jobs_pb2_grpc.JobsStub(self._channel).Report(self._requests())
        except grpc.RpcError as exc:
            # The job goes on: progress is advisory to the job itself.
            log.warning("park.report: the broker did not take the reports: %s", exc.details())

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        self._channel.close()


class _LocalReporter:
    """Reports written straight to the local worker's socket (see the module docstring).

    A report goes out at once from the calling thread unless one went out less than GAP seconds ago;
    then it waits for the next report after the gap, or for a helper thread at the gap's end (only
    the last report of a burst ever waits on that thread and its GIL). A job reporting every few
    microseconds so costs the broker one message per GAP, not one per report."""

    _HEADER = struct.Struct(">I")   # the worker protocol's framing (park_broker.execution.worker)
    GAP = 0.001

    def __init__(self, fd: int, token: str):
        self.token = token
        self._sock = socket.socket(fileno=os.dup(fd))
        self._cond = threading.Condition()   # one send at a time, and none after close
        self._pending = bytearray()
        self._last = float("-inf")
        self._helper: threading.Thread | None = None

    def put(self, values: dict[str, float]) -> None:
        body = json.dumps({"report": values}).encode()
        with self._cond:
            if self._sock.fileno() < 0:
                return   # closed: the job's outcome is on its way
            first = not self._pending
            self._pending += self._HEADER.pack(len(body)) + body
            if time.monotonic() - self._last >= self.GAP:
                self._send()
                return
            if self._helper is None:
                self._helper = threading.Thread(target=self._send_late, name="park-report-local", daemon=True)
                self._helper.start()
            if first:   # only then: waking the helper for every report would take the GIL from the job each time
                self._cond.notify()

    def _send(self) -> None:
        """Send what is pending (the condition held)."""
        data, self._last = bytes(self._pending), time.monotonic()
        self._pending.clear()
        try:
            sent = self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):   # the broker is behind: wait for it rather than drop a report
            self._sock.sendall(data[sent:])

    def _send_late(self) -> None:
        with self._cond:
            while self._sock.fileno() >= 0:
                if not self._pending:
                    self._cond.wait()
                    continue
                left = self._last + self.GAP - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._send()

    def close(self, timeout: float) -> None:
        with self._cond:
            if self._pending and self._sock.fileno() >= 0:
                self._send()
            self._sock.close()
            self._cond.notify()
        if self._helper is not None:
            self._helper.join(timeout)


def _local_fd() -> int | None:
    """The worker's socket, if this process is the local worker that runs the job."""
    pid, _, fd = os.environ.get("PARK_REPORT_FD", "").partition(":")
    return int(fd) if pid.isdigit() and fd.isdigit() and int(pid) == os.getpid() else None


_reporter: _Reporter | _LocalReporter | None = None
_warned_outside = False


def report(**values: float) -> None:
    """Post progress values (numbers) of the running job; see the module docstring."""
    global _reporter, _warned_outside
    token = os.environ.get("PARK_REPORT_TOKEN")
    if not token:
        if not _warned_outside:
            _warned_outside = True
            warnings.warn("park.report() outside a Park job does nothing", RuntimeWarning, stacklevel=2)
        return
    clean: dict[str, float] = {}
    for name, value in values.items():
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"park.report: {name}={value!r} is not a finite number")
        clean[name] = number
    if _reporter is None or _reporter.token != token:
        flush()
        fd = _local_fd()
        _reporter = (_LocalReporter(fd, token) if fd is not None else
                     _Reporter(os.environ["PARK_BROKER_ADDRESS"], os.environ["PARK_BROKER_CERT"], token))
        atexit.unregister(flush)
        atexit.register(flush)
    _reporter.put(clean)


def flush(timeout: float = 30.0) -> None:
    """Send every queued report and close the stream (the worker calls this when a job ends)."""
    global _reporter
    if _reporter is not None:
        _reporter.close(timeout)
        _reporter = None
