"""What large transfers need from the C library to move at full speed: allocator tuning, early writeback."""
from __future__ import annotations

import ctypes
import ctypes.util


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_STEP = 32 << 20


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _libc()   # loaded once: read-only afterwards


def tune_allocator(*, mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Keep freed blocks of up to `mmap_threshold` bytes in the heap (glibc); call once at start.

    Every ~1 MiB chunk makes protobuf (upb arenas) and gRPC allocate and free
    buffers of about its size. With glibc's defaults each is a fresh mmap, or a
    heap trim and regrowth, and pays a page fault per 4 KiB touched: building
    and serializing one 1 MiB `Chunk` ran at 0.9 GB/s instead of 18 GB/s on
    the benchmark machine, and a loopback Read stream at half its speed
    (docs/benchmarks.md, "Transfer"). The cost: up to `trim_threshold` bytes
    of free heap are kept rather than returned to the system. Process-wide;
    returns False where mallopt is missing (not glibc) or refuses.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes of `fd` to disk now, without waiting (Linux).

    A later fsync then has only what was written since to wait for. It is a
    hint: nothing here replaces that fsync, and where sync_file_range is
    missing (not Linux) or refuses, nothing happens.
    """
    sync_file_range = getattr(_LIBC, "sync_file_range", None)
    if sync_file_range is not None:
        sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
