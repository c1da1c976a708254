"""The source's half of a site-to-site transfer (DESIGN §7): serving `Files.Read`.

`resolve_path` turns a wire path (`/<owner>/<job>/<name>`) into a real regular
file inside the file store, `authorize_read` checks the caller's verified token
for it, and `read_chunks` streams the file from an offset with the whole file's
size and sha256, reading the disk in worker threads so the event loop never
waits on it. No servicer lives here: the gRPC layer calls these functions and
maps `BrokerError` codes to statuses.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from park import tokens
from park.wire import InvalidInput, check_name
from park_broker.errors import BrokerError, Code

CHUNK_SIZE = 1 << 20
MAX_PATH = 4096


def split_path(path: str) -> tuple[str, ...]:
    """The segments of a wire path `/<owner>/<job>/<name>[/...]`, each a plain name.

    Refuses (INVALID_ARGUMENT) rather than normalizes: relative paths, empty
    segments, `.`/`..`, `%`, backslashes, NUL and anything `check_name` refuses.
    """
    if len(path) > MAX_PATH:
        raise BrokerError(Code.INVALID_ARGUMENT, f"path longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise BrokerError(Code.INVALID_ARGUMENT, f"path {path[:100]!r} must start with '/': /<owner>/<job>/<name>")
    segments = tuple(path[1:].split("/"))
    for seg in segments:
        try:
            check_name(seg, "path segment")
        except InvalidInput as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, f"path {path[:100]!r}: {exc}") from None
    if len(segments) < 3:
        raise BrokerError(Code.INVALID_ARGUMENT, f"path {path[:100]!r} must name a file: /<owner>/<job>/<name>")
    return segments


def resolve_path(files_root: Path, path: str) -> Path:
    """The real path of the regular file `path` (`/<owner>/<job>/<name>`) names in its owner's part of
    `files_root`.

    Symlinks are followed (a memo hit's job directory links to its twin's, which has the same owner),
    but a file whose real path is outside the owner's directory (a job's link to another user's
    output, or out of the store), missing, or not a regular file is NOT_FOUND, with the same words,
    so callers learn nothing about what lies elsewhere.
    """
    segments = split_path(path)
    root = owner_root(files_root, path)
    missing = BrokerError(Code.NOT_FOUND, f"no file {path} in this site's file store")
    try:
        real = files_root.resolve().joinpath(*segments).resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
        raise missing from None
    if not real.is_relative_to(root) or not stat.S_ISREG(st.st_mode):
        raise missing
    return real


def owner_root(files_root: Path, path: str) -> Path:
    """The directory that holds every file of the owner `path` names."""
    return files_root.resolve() / split_path(path)[0]


def authorize_read(verified: tokens.Verified, path: str) -> None:
    """Allow reading `path` only with a `files.read` scope covering it, held by its owner.

    A user delegates only their own files: the token's subject must be the
    path's owner segment, whatever the scopes say. PERMISSION_DENIED otherwise;
    INVALID_ARGUMENT for a malformed path.
    """
    owner = split_path(path)[0]
    try:
        verified.require(f"files.read:{path}")
    except tokens.TokenError as exc:
        code = Code.INVALID_ARGUMENT if exc.kind == "invalid_argument" else Code.PERMISSION_DENIED
        raise BrokerError(code, exc.message) from None
    if verified.subject != owner:
        raise BrokerError(Code.PERMISSION_DENIED,
                          f"the token's subject {verified.subject!r} cannot delegate files of {owner!r}")


_DIGESTS: collections.OrderedDict[tuple[int, int, int, int], str] = collections.OrderedDict()   # at most 256


def _hash_fd(fd: int, size: int) -> str:
    """Hash and close `fd` (a dup: the caller may close its own fd meanwhile)."""
    h, pos = hashlib.sha256(), 0
    try:
        while pos < size and (data := os.pread(fd, min(CHUNK_SIZE * 4, size - pos), pos)):
            h.update(data)
            pos += len(data)
    finally:
        os.close(fd)
    return h.hexdigest()


async def file_sha256(fd: int) -> str:
    """sha256 of the open file, hashed in a thread; cached by (dev, inode, size, mtime_ns)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if (cached := _DIGESTS.get(key)) is not None:
        _DIGESTS.move_to_end(key)
        return cached
    digest = await asyncio.to_thread(_hash_fd, os.dup(fd), st.st_size)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == key:  # unchanged while hashed
        _DIGESTS[key] = digest
        while len(_DIGESTS) > 256:
            _DIGESTS.popitem(last=False)
    return digest


def _open_regular(real_path: Path, within: Path | None) -> int:
    missing = BrokerError(Code.NOT_FOUND, f"no file {real_path.name} in this site's file store")
    try:  # O_NONBLOCK: a FIFO swapped in must not hang the open
        fd = os.open(real_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        raise missing from None
    try:
        ok = stat.S_ISREG(os.fstat(fd).st_mode)
        proc = Path(f"/proc/self/fd/{fd}")
        if ok and within is not None and proc.exists():  # what was really opened, after any race
            ok = Path(os.readlink(proc)).is_relative_to(within.resolve())
    except OSError:
        ok = False
    if not ok:
        os.close(fd)
        raise missing
    return fd


def _close_after(fd: int, pending: asyncio.Future[bytes] | None) -> None:
    """Close fd now, or once a read still running in a thread has finished with it."""
    if pending is None or pending.done():
        os.close(fd)
        return

    def done(f: asyncio.Future[bytes]) -> None:
        if not f.cancelled():
            f.exception()  # retrieved: nobody waits for this read any more
        os.close(fd)
    pending.add_done_callback(done)


async def read_chunks(real_path: Path, offset: int, *, known_sha256: str | None = None, chunk: int = CHUNK_SIZE,
                      within: Path | None = None, digest: bool = True) -> AsyncIterator[tuple[int, bytes, int, str]]:
    """Yield (offset, data, size, sha256) from `offset` to the end of the file.

    size and sha256 are the whole file's, in every item; the first item comes
    even when there is nothing to send (offset == size). `known_sha256` (from
    the job's record) saves hashing the file; with `digest` False the sha256
    is left empty and never computed, and an offset past the end is no error
    (the one item says the size: a reader of a growing log sees it is another
    file). Reads run in threads, one chunk
    ahead of the consumer. Offsets outside [0, size] are INVALID_ARGUMENT; a
    file that shrinks while read is UNAVAILABLE (a retry sees the new file, and
    the reader's digest check catches any other change). `within`, if given, is
    checked against what was really opened (Linux), closing a symlink race.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    fd = await asyncio.to_thread(_open_regular, real_path, within)
    pending: asyncio.Future[bytes] | None = None
    try:
        size = os.fstat(fd).st_size
        if offset < 0 or (offset > size and digest):
            raise BrokerError(Code.INVALID_ARGUMENT, f"offset {offset} is outside the file (size {size} bytes)")
        sha256 = (known_sha256 or await file_sha256(fd)) if digest else ""
        if offset >= size:   # past the end only without a digest: a log reader learns the log is a new one
            yield offset, b"", size, sha256
            return
        pos = offset
        pending = asyncio.ensure_future(asyncio.to_thread(os.pread, fd, min(chunk, size - pos), pos))
        while pending is not None:
            data = await pending
            pending = None
            if not data:
                raise BrokerError(Code.UNAVAILABLE, f"{real_path.name} shrank while being read; try again")
            after = pos + len(data)
            if after < size:
                pending = asyncio.ensure_future(asyncio.to_thread(os.pread, fd, min(chunk, size - after), after))
            yield pos, data, size, sha256
            pos = after
    finally:
        _close_after(fd, pending)
