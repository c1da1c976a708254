"""The destination's half of a site-to-site transfer (DESIGN §7): pulling a file.

`fetch` (one `Downloader` run) pulls a file through any stream factory, resumes
from the bytes already on disk after a broken stream, and guarantees that
nothing appears under the final name unless it is complete, fsynced and its
sha256 matches what the source announced. On any failure it raises
`TransferFailed` and removes its part file; only a cancellation (the broker
stopping) keeps the part file, so a restarted fetch resumes from it.

The one piece of gRPC knowledge, which source statuses deserve another
attempt, sits in `retryable` next to `RetryPolicy`, so the whole retry policy
has one home.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from park.config import sync_directory
from park_broker.errors import BrokerError, Code
from park_broker.transfer.part_file import PartFile

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When a fetch tries again. `max_retries` counts consecutive attempts that
    moved no bytes: an attempt that made progress resets the count and the backoff."""

    max_retries: int = 20
    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt` + 1 (attempt >= 1), with jitter."""
        base = min(self.maximum, self.initial * self.multiplier ** max(attempt - 1, 0))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


RETRY = RetryPolicy()
# Statuses that say "the source or the path to it is unwell", not "no": worth another attempt.
RETRYABLE_STATUS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})


def _status_name(exc: BaseException) -> str | None:
    """The gRPC status name of an RpcError (without importing grpc), else None."""
    code = getattr(exc, "code", None)
    name = getattr(code(), "name", None) if callable(code) else None
    return name if isinstance(name, str) else None


def retryable(exc: BaseException) -> bool:
    """True for a broken connection or a source that is temporarily unavailable."""
    if isinstance(exc, BrokerError):
        return exc.code is Code.UNAVAILABLE and not isinstance(exc, TransferFailed)
    name = _status_name(exc)
    if name is not None:
        return name in RETRYABLE_STATUS
    return isinstance(exc, (ConnectionError, TimeoutError))


class TransferFailed(BrokerError):
    """A fetch failed for good; the message says why (shown on the fetch job)."""


class ChunkLike(Protocol):
    """What `fetch` reads from a stream: `park.v1.Chunk` or anything shaped like it."""

    offset: int
    data: bytes
    size: int
    sha256: str


OpenStream = Callable[[int], AsyncIterable[ChunkLike]]
Progress = Callable[[int, int], None]


class _Restart(Exception):
    """The part file left by an earlier run does not fit the source: start from 0."""


class _Incomplete(ConnectionError):
    """The source closed the stream before the end of the file (retryable)."""


class Downloader:
    """One fetch into `part`, renamed to `final` when complete and verified.

    Constraints: bytes on disk always equal the prefix of the source file the
    resume offset claims; the announced size and digest may not change between
    resumed streams; `final` is written only by an atomic rename after fsync.
    """

    def __init__(self, open_stream: OpenStream, part: Path, final: Path, *, policy: RetryPolicy = RETRY,
                 on_progress: Progress | None = None, max_size: int | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.open_stream, self.part, self.final = open_stream, part, final
        self.policy, self.on_progress, self.max_size, self._sleep = policy, on_progress, max_size, sleep
        self.size: int | None = None
        self.sha256: str | None = None
        self.written = self.attempts = 0
        self._file: PartFile | None = None

    async def run(self) -> tuple[int, str]:
        """Fetch, verify, rename; return (size, sha256). Raises TransferFailed."""
        try:
            try:
                await asyncio.to_thread(self._open_part)
                await self._transfer()
                await asyncio.to_thread(self._commit)
            except OSError as exc:  # the local disk: connection errors never leave _transfer
                raise TransferFailed(Code.FAILED_PRECONDITION,
                                     f"cannot write {self.part}: {exc.strerror or exc}") from None
        except BaseException as exc:
            self._close()
            if isinstance(exc, Exception):  # not a cancellation: the part is useless now
                self.part.unlink(missing_ok=True)
            raise
        assert self.size is not None and self.sha256 is not None
        return self.size, self.sha256

    # -- file side (runs in threads) --

    def _open_part(self) -> None:
        self._file = PartFile(self.part)
        self.written = self._file.length

    def _truncate(self) -> None:
        assert self._file is not None
        self._file.truncate()
        self.written = self._file.length

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.append(data)
        except OSError as exc:  # raised as TransferFailed so that no retry mistakes it for the network
            raise TransferFailed(Code.FAILED_PRECONDITION, f"cannot write {self.part}: {exc.strerror}") from None

    def _flush(self) -> None:
        """After a stream: every byte received is in the file, so a resume from `written` is sound."""
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            raise TransferFailed(Code.FAILED_PRECONDITION, f"cannot write {self.part}: {exc.strerror}") from None

    def _commit(self) -> None:
        assert self._file is not None
        self._file.sync()
        digest = self._file.hash.hexdigest()
        if digest != self.sha256:
            raise TransferFailed(Code.FAILED_PRECONDITION,
                                 f"sha256 mismatch: the source announced {self.sha256}, the bytes received hash "
                                 f"to {digest}; nothing was kept")
        os.replace(self.part, self.final)
        for directory in {self.part.parent, self.final.parent}:
            sync_directory(directory)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()

    # -- stream side --

    async def _transfer(self) -> None:
        failures = 0
        from_disk = self.written > 0   # a part file left by an earlier run, source unknown yet
        while True:
            start = self.written
            self.attempts += 1
            try:
                await self._one_stream()
                return
            except _Restart:
                from_disk = False
                await asyncio.to_thread(self._truncate)
                continue
            except TransferFailed:
                raise
            except Exception as exc:  # noqa: BLE001 (classified just below: retry, restart or fail)
                if from_disk and self.size is None and _status_name(exc) == "INVALID_ARGUMENT":
                    from_disk = False   # the old part is longer than the source: start over
                    await asyncio.to_thread(self._truncate)
                    continue
                name = _status_name(exc) or type(exc).__name__
                details = getattr(exc, "details", None)
                detail = (details() if callable(details) else str(exc)) or name
                if not retryable(exc):
                    code = Code.__members__.get(name, Code.FAILED_PRECONDITION)
                    raise TransferFailed(code, f"the source refused the read ({name}): {detail}") from None
                failures = 1 if self.written > start else failures + 1
                if failures > self.policy.max_retries:
                    raise TransferFailed(Code.UNAVAILABLE, f"gave up after {self.policy.max_retries} attempts "
                                                           f"without progress: {name}: {detail}") from None
                delay = self.policy.delay(failures)
                log.info("fetch into %s interrupted at %d bytes, retry %d in %.2fs: %s",
                         self.final.name, self.written, failures, delay, name)
                await self._sleep(delay)

    def _accept_header(self, msg: ChunkLike, first: bool) -> None:
        if not first and not msg.sha256:
            return
        if msg.size < 0 or not _SHA256.fullmatch(msg.sha256):
            raise TransferFailed(Code.FAILED_PRECONDITION, "the source sent no valid size and sha256 "
                                                           "with the first chunk")
        if self.size is None:
            if self.max_size is not None and msg.size > self.max_size:
                raise TransferFailed(Code.RESOURCE_EXHAUSTED, f"the file is {msg.size} bytes; the limit "
                                                              f"is {self.max_size}")
            if msg.size < self.written:
                raise _Restart()
            self.size, self.sha256 = msg.size, msg.sha256
        elif (msg.size, msg.sha256) != (self.size, self.sha256):
            raise TransferFailed(Code.FAILED_PRECONDITION, "the source file changed between resumed reads "
                                                           f"(was {self.size} bytes, sha256 {self.sha256[:12]}..., "
                                                           f"now {msg.size} bytes, {msg.sha256[:12]}...)")

    async def _one_stream(self) -> None:
        """Read one stream to its end; chunk n is written and hashed, in two threads, while n+1 arrives."""
        stream = self.open_stream(self.written)
        writing: asyncio.Future[None] | None = None
        hashing: asyncio.Future[None] | None = None
        first = True
        try:
            async for msg in stream:
                self._accept_header(msg, first)
                first = False
                assert self.size is not None
                if msg.offset != self.written:
                    raise TransferFailed(Code.FAILED_PRECONDITION, f"the source sent bytes at offset {msg.offset}"
                                                                   f", expected {self.written}")
                data = msg.data   # once: each read of a protobuf bytes field copies it
                if self.written + len(data) > self.size:
                    raise TransferFailed(Code.FAILED_PRECONDITION, "the source sent more bytes than it announced")
                if not data:
                    continue
                if writing is not None:
                    await writing
                if hashing is not None:
                    await hashing
                assert self._file is not None
                writing = asyncio.ensure_future(asyncio.to_thread(self._write, data))
                hashing = asyncio.ensure_future(asyncio.to_thread(self._file.hash_update, data))
                self.written += len(data)
                if self.on_progress is not None:
                    self.on_progress(self.written, self.size)
        finally:
            await _cancel(stream)
            # Both finish before anything else touches the part file or the digest; a write error wins.
            done = await asyncio.gather(*(f for f in (writing, hashing) if f is not None), return_exceptions=True)
            if errors := [e for e in done if isinstance(e, BaseException)]:
                raise errors[0]
            await asyncio.to_thread(self._flush)
        if first:
            raise _Incomplete("the source closed the stream without sending anything")
        if self.written != self.size:
            raise _Incomplete(f"the source ended the stream at {self.written} of {self.size} bytes")


async def _cancel(stream: object) -> None:
    """Stop a stream we no longer read: a gRPC call's cancel(), an async generator's aclose()."""
    if callable(cancel := getattr(stream, "cancel", None)):
        cancel()
    if callable(aclose := getattr(stream, "aclose", None)):
        await aclose()


async def fetch(open_stream: OpenStream, part: Path, final: Path, *, max_retries: int = RETRY.max_retries,
                on_progress: Progress | None = None, max_size: int | None = None) -> tuple[int, str]:
    """Fetch a file through `open_stream(offset)` into `final`; return (size, sha256).

    `part` is a temporary name in the same directory (hidden, e.g. `.name.part`,
    so the Files service never serves it). A part left by a stopped broker is
    re-hashed and resumed. On TransferFailed nothing exists under `final` (if it
    did not before) and `part` is gone.
    """
    policy = RetryPolicy(max_retries=max_retries)
    return await Downloader(open_stream, part, final, policy=policy, on_progress=on_progress,
                            max_size=max_size).run()
