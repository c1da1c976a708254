"""Process-wide tuning that large transfers need to move at full speed."""
from __future__ import annotations

import ctypes
import ctypes.util


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
