"""A broker as scripts use it: the submission pipeline, and the default service of a `with` block.

`Service` is synchronous for scripts. Submissions do not wait for the broker:
job ids are chosen here, so a job's id, filename and url are known when
`submit` returns, and a background thread sends what is queued in `SubmitMany`
calls of up to MAX_BATCH jobs, keeping up to MAX_IN_FLIGHT of them unanswered
so that the broker admits one batch while it commits the one before. The
batches are numbered, and the broker decides them in the order they were sent
(a later batch may name jobs of an earlier one). Sends are retried on
UNAVAILABLE; a retry is safe because the broker recognises an id it already holds. A job the broker
refuses raises `SubmitError` from anything that needs it, and from
`service.flush()`, which runs when a `with service:` block ends and when the
interpreter exits.

The default service is the one documented piece of global state: a ContextVar
holding the stack of services entered with `with`, so it nests and is separate
per thread and per asyncio task.
"""
from __future__ import annotations

import atexit
import contextvars
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from park._proto import jobs_pb2 as jpb
from park.connection import Connection, status_name
from park.config import load_services
from park.errors import ConfigError, NoServiceError, ServiceError, SubmitError
from park.job import Job, Pending
from park.renewal import renew_quietly
from park.wire import ORDERED_BATCHES

_default: contextvars.ContextVar[tuple[Service, ...]] = contextvars.ContextVar("park_default_service", default=())

MAX_BATCH = 1000
MAX_IN_FLIGHT = 2         # batches sent and not yet acknowledged: the broker admits one while it commits another
RETRY_FOR = 60.0          # seconds a submission keeps retrying an unreachable broker


# Each random byte names one of the 32 characters of a job id (256 is a multiple of 32: uniform).
_ID_CHARACTERS = bytes(b"abcdefghijklmnopqrstuvwxyz234567"[i % 32] for i in range(256))


def new_job_id() -> str:
    """130 random bits as 26 lowercase base32 characters (a translation of random bytes: a script may submit
    a million jobs, and base64.b32encode costs six times as much)."""
    return os.urandom(26).translate(_ID_CHARACTERS).decode()   # what secrets.token_bytes reads, without its layers


def default_service(service: Service | None = None) -> Service:
    """`service` if given, else the innermost `with service:`; raises NoServiceError."""
    if service is not None:
        return service
    stack = _default.get()
    if not stack:
        raise NoServiceError("no service: pass service=... or submit inside `with service:`")
    return stack[-1]


def remote_service(address_or_name: str, cert: str | os.PathLike[str] | None = None) -> Service:
    """Connect to a broker by HOST:PORT (with `cert`, its TLS certificate) or by a configured name."""
    if cert is not None:
        return Service(address_or_name, Path(cert))
    services = load_services()
    entry = services.get(address_or_name)
    if entry is None:
        known = ", ".join(sorted(services)) or "none"
        raise ConfigError(f"no service named {address_or_name!r} in the client config (known: {known}); "
                          "add it with `park services add NAME --address HOST:PORT --cert FILE`, "
                          "or pass cert= with an address")
    return Service(entry.address, entry.cert)


@dataclass(slots=True)
class _Batch:
    """Jobs sent in one SubmitMany: its `number` in this service's stream, the batch it follows (`after`, 0:
    none) and the call on its way."""

    number: int
    jobs: list[Pending]
    after: int
    call: grpc.Future


class Service(Connection):
    """One broker. Use `with service:` to make it the default for submissions inside."""

    def __init__(self, address: str, cert: str | os.PathLike[str]):
        super().__init__(address, cert)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Pending] = deque()
        self._in_flight = 0       # jobs sent and not yet acknowledged or refused
        self._stream = secrets.token_bytes(16)   # names this service's batches to the broker (their order)
        self._sent = 0
        self._refused: list[SubmitError] = []
        self._closed = False
        self._sender: threading.Thread | None = None
        self._background: list[threading.Thread] = []
        self._failures: list[ServiceError] = []
        self._renewing = False
        atexit.register(self._at_exit)

    # -- default service -----------------------------------------------------------

    def __enter__(self) -> Service:
        _default.set((*_default.get(), self))
        if not self._renewing:   # once a session: what its jobs here hold that is about to expire
            self._renewing = True
            threading.Thread(target=renew_quietly, args=(self,), name="park-renew", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stack = _default.get()
        if not stack or stack[-1] is not self:
            raise RuntimeError("`with service:` blocks were exited out of order")
        _default.set(stack[:-1])
        if kind is None:
            self.flush()

    # -- submission pipeline -----------------------------------------------------------

    def enqueue(self, spec: jpb.JobSpec) -> Pending:
        pending = Pending(spec, self._wake)
        with self._lock:
            if self._closed:
                raise ServiceError("FAILED_PRECONDITION", f"{self} is closed")
            self._queue.append(pending)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name=f"park-submit-{self.address}",
                                                daemon=True)
                self._sender.start()
            if len(self._queue) == 1:   # else the sender knows there is work, and takes it once it may
                self._wake.notify_all()
        return pending

    def background(self, work: Callable[[], None], what: str) -> None:
        """Run `work` (an upload) on its own thread; `flush` waits for it and reports its failure."""
        def run() -> None:
            try:
                work()
            except ServiceError as exc:
                with self._lock:
                    self._failures.append(exc)
            except Exception as exc:  # noqa: BLE001 - kept for flush(), which raises it in the script
                with self._lock:
                    self._failures.append(ServiceError("UNKNOWN", f"{what} failed: {exc}"))

        thread = threading.Thread(target=run, name=f"park-{what}", daemon=True)
        with self._lock:
            self._background = [t for t in self._background if t.is_alive()] + [thread]
        thread.start()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submission so far is acknowledged and every upload done;
        raise for refused submissions and failed uploads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"submissions to {self.address} not acknowledged within {timeout} s")
                self._wake.wait(left)
            refused, self._refused = self._refused, []
            background = list(self._background)
        for thread in background:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise TimeoutError(f"{thread.name} did not finish within {timeout} s")
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise failures[0]
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            first = refused[0]
            raise SubmitError(first.job_id, first.code, f"job {first.job_id} was refused{more}: {first.message}")

    def _send_loop(self) -> None:
        """Send what is queued, keeping up to MAX_IN_FLIGHT batches unacknowledged, and settle their answers in
        the order they were sent."""
        in_flight: deque[_Batch] = deque()
        limit = self._batches_in_flight()
        while True:
            with self._lock:
                while not (in_flight and in_flight[0].call.done()) and not (
                        self._queue and len(in_flight) < limit):
                    if self._closed and not self._queue and not in_flight:
                        return
                    self._wake.wait()
                if self._queue and len(in_flight) < limit:
                    jobs = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                    self._in_flight += len(jobs)
                    self._sent += 1
                    number = self._sent
                else:
                    jobs = []
            if jobs:
                # Decided after the batch sent just before it, if that one is not acknowledged yet.
                after = in_flight[-1].number if in_flight else 0
                batch = _Batch(number, jobs, after, self._submit(number, jobs, after))
                batch.call.add_done_callback(self._answered)
                in_flight.append(batch)
                continue
            oldest = in_flight.popleft()
            self._settle(oldest)
            with self._lock:   # wakes flush() and whoever waits for one of these jobs (Pending.wait)
                self._refused += [p.error for p in oldest.jobs if p.error is not None]
                self._in_flight -= len(oldest.jobs)
                self._wake.notify_all()

    def _batches_in_flight(self) -> int:
        """MAX_IN_FLIGHT for a broker that decides a client's batches in the order they were sent; one at a
        time for any other (an older broker decides them as they come), or one not reached yet."""
        try:
            ordered = ORDERED_BATCHES in self.info.capabilities   # fetched before the first submission
        except ServiceError:
            ordered = False
        return MAX_IN_FLIGHT if ordered else 1

    def _submit(self, number: int, jobs: list[Pending], after: int) -> grpc.Future:
        request = jpb.SubmitManyRequest(jobs=[p.spec for p in jobs], stream=self._stream, number=number, after=after)
        return self.jobs_stub.SubmitMany.future(request, timeout=60)

    def _answered(self, call: grpc.Future) -> None:
        with self._lock:
            self._wake.notify_all()

    def _settle(self, batch: _Batch) -> None:
        """Take a sent batch's answer, sending it again while the broker is unreachable (a retry is safe: the
        broker recognises the ids it holds); each job is then acknowledged or refused (the caller notifies)."""
        deadline = time.monotonic() + RETRY_FOR
        delay = 0.1
        call = batch.call
        while True:
            try:
                response = call.result()
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    call = self._submit(batch.number, batch.jobs, 0)   # every batch sent before it is settled
                    continue
                error = self.error(exc, "submitting jobs")
                for p in batch.jobs:
                    p.error = SubmitError(p.spec.id, error.code, error.message)
                return
        for p, result in zip(batch.jobs, response.results):
            if result.code:
                p.error = SubmitError(p.spec.id, status_name(result.code), result.message)
            else:
                p.ref = result.ref

    def close(self) -> None:
        """Send what is queued, then close the connection."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._sender is not None:
            self._sender.join()
        super().close()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        # A script that ends right after submitting must not lose its jobs.
        try:
            self.flush(timeout=RETRY_FOR)
        except (SubmitError, TimeoutError) as exc:
            print(f"park: {exc}", flush=True)

    # -- queries ---------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """A proxy for a job already at this broker; raises ServiceError NOT_FOUND if it is not."""
        record = self.call(self.jobs_stub.Get, jpb.GetRequest(job_id=job_id), f"reading job {job_id}")
        # Keep the id asked for: for a memo hit it names the submission, the record the job it reused.
        return Job(self, job_id, record.url, record.filename)

    def list_jobs(self, states: Iterator[int] | list[int] = (), limit: int = 1000) -> list[jpb.Job]:
        """Every job of the caller on this site, oldest first, in pages of `limit`."""
        out: list[jpb.Job] = []
        after = ""
        while True:
            page = self.call(self.jobs_stub.List, jpb.ListRequest(states=list(states), limit=limit, after_id=after),
                             "listing jobs")
            out += page.jobs
            if not page.next_after_id:
                return out
            after = page.next_after_id
