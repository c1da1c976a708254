"""The part file a fetch writes into (transfer.download): appending, the running digest, and durability.

`PartFile` appends a file's bytes in order and keeps the sha256 of all of
them. Big appends go around the page cache (O_DIRECT) through an aligned
staging buffer: on the benchmark machine, copying 1 GiB into fresh page-cache
pages cost 0.7–1.5 s of CPU and stalled on writeback, while direct writes of
4 MiB cost 0.13 s of CPU and leave nothing for the final fsync to wait for
(docs/benchmarks.md, "Transfer"). The unaligned rest, and everything where
O_DIRECT is refused (tmpfs, some file systems), goes through the page cache,
whose writeback starts early (tuning.start_writeback). Whatever path the bytes
took, the file is durable only after `sync` (fsync), as before.

Methods run in worker threads, never on the event loop; `append` and
`hash_update` may run at the same time (in two threads), nothing else may.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

from park_broker.transfer.tuning import WRITEBACK_STEP, start_writeback

STAGE = 4 << 20       # bytes per direct write: a multiple of any logical block size
_READ = 4 << 20


class PartFile:
    """An open part file. `length` is what it holds (appended bytes, staged ones included);
    `flush` puts staged bytes on disk, so that a resume from `length` is sound."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._direct = -1
        self._stage: mmap.mmap | None = None
        self._staged = 0          # bytes in the stage, which starts at file offset length - staged
        self._flushed = 0         # bytes handed to start_writeback
        self.length = 0
        self.hash = hashlib.sha256()
        self.rehash()

    def rehash(self) -> None:
        """Start the running digest over the bytes already in the file."""
        self.flush()
        self.hash, self.length = hashlib.sha256(), 0
        while data := os.pread(self._fd, _READ, self.length):
            self.hash.update(data)
            self.length += len(data)

    def truncate(self) -> None:
        """Empty the file (its bytes belong to another version of the source)."""
        self.flush()
        os.ftruncate(self._fd, 0)
        self.rehash()

    def append(self, data: bytes) -> None:
        """Add `data` at the end (the digest is `hash_update`'s business). OSError from the disk."""
        view = memoryview(data)
        if self._stage is None and len(view) >= STAGE // 4 and self.length % STAGE == 0:
            self._open_direct()
        while view and self._stage is not None:
            n = min(len(view), STAGE - self._staged)
            self._stage[self._staged:self._staged + n] = view[:n]
            self._staged += n
            self.length += n
            view = view[n:]
            if self._staged == STAGE:
                self._write_stage()
        if view:
            self._pwrite(self._fd, view, self.length)
            self.length += len(view)
            if self.length - self._flushed >= WRITEBACK_STEP:
                # The disk starts on these bytes while the rest arrives, so the final fsync has only the
                # tail to wait for (it is still what makes the file durable).
                start_writeback(self._fd, self._flushed, self.length - self._flushed)
                self._flushed = self.length

    def hash_update(self, data: bytes) -> None:
        self.hash.update(data)

    def flush(self) -> None:
        """Write the staged bytes through the page cache (an unaligned tail), and stop staging."""
        if self._stage is not None and self._staged:
            self._pwrite(self._fd, memoryview(self._stage)[:self._staged], self.length - self._staged)
        self._staged = 0
        self._close_direct()

    def sync(self) -> None:
        """Make every byte appended durable (fsync) and close the file."""
        self.flush()
        os.fsync(self._fd)
        self.close()

    def close(self) -> None:
        """Close without flushing: staged bytes are dropped, and `length` no longer describes the file."""
        self._close_direct()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_direct(self) -> None:
        try:
            self._direct = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:   # EINVAL: the file system has no O_DIRECT; stay with the page cache
            if exc.errno != errno.EINVAL:
                raise
            return
        self._stage = mmap.mmap(-1, STAGE)   # page-aligned, as O_DIRECT needs

    def _write_stage(self) -> None:
        assert self._stage is not None
        at = self.length - self._staged
        try:
            self._pwrite(self._direct, memoryview(self._stage), at)
        except OSError as exc:   # EINVAL: this file system refuses this alignment after all
            if exc.errno != errno.EINVAL:
                raise
        else:
            self._staged = 0
            return
        self.flush()

    def _close_direct(self) -> None:
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        self._stage = None   # unmapped when the last view of it goes (a traceback may hold one)

    @staticmethod
    def _pwrite(fd: int, view: memoryview, at: int) -> None:
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
