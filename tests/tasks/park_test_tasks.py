"""Job functions the test brokers import (their --python-path includes this directory)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import park


def _write_whole(marker: str, text: str) -> None:
    """`text` in `marker`, which appears whole or not at all (a test reads it as soon as it exists)."""
    part = Path(f"{marker}.part")
    part.write_text(text)
    part.rename(marker)


def _write_pid(marker: str) -> None:
    _write_whole(marker, str(os.getpid()))


def add(a: float, b: float) -> float:
    return a + b


def square(x: float) -> float:
    return x * x


def fail_on(x: float, bad: float, gate: str = "") -> float:
    """`x`, unless it is `bad` (then a failure at once); with `gate`, the others wait for that file first."""
    if x == bad:
        raise ValueError(f"item {x} is bad")
    while gate and not os.path.exists(gate):
        time.sleep(0.02)
    return x


def noop() -> None:
    return None


def fail(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float, marker: str = "") -> str:
    if marker:
        _write_pid(marker)
    time.sleep(seconds)
    return "slept"


def write_output(text: str) -> str:
    job = park.current_job()
    Path(job.filename).write_text(text)
    print(f"wrote {len(text)} characters")
    return job.id


def big_result(n: int) -> list[int]:
    return list(range(n))


def not_json() -> set[int]:
    return {1, 2, 3}


def append_line(path: str, line: str) -> int:
    """Appends to a shared file, so a test can count how often a job ran; returns how many lines it has.
    Under a lock: two runs at once must not both count the other's line as well as their own."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        f.flush()
        f.seek(0)
        return len(f.read().splitlines())


def crash() -> None:
    os._exit(3)


def fit(chisqs: list[float], delay: float, marker: str = "", wait_for: str = "") -> dict[str, float]:
    """Report each chisq in turn, `delay` seconds apart, like an iterating fit.

    With `wait_for`, after the last report wait (up to 30 s) for that file to appear:
    proof that a dependent started while this job was still running."""
    if marker:
        _write_pid(marker)
    for step, chisq in enumerate(chisqs):
        park.report(chisq=chisq, step=step)
        time.sleep(delay)
    if wait_for:
        deadline = time.monotonic() + 30
        while not Path(wait_for).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{wait_for} never appeared")
            time.sleep(0.05)
    return {"chisq": chisqs[-1], "steps": len(chisqs)}


def report_without_network(chisq: float) -> int:
    """Report with the broker's network address made useless: only the local worker's socket can carry it."""
    os.environ["PARK_BROKER_ADDRESS"] = "127.0.0.1:9"
    park.report(chisq=chisq)
    return 0


def touch(path: str) -> str:
    Path(path).write_text("started")
    return path


def result_only(chisq: float) -> dict[str, float]:
    return {"chisq": chisq}


def count_run(directory: str, name: str) -> int:
    """Appends a line to directory/name and returns how many runs it records; the file
    is named by its directory, so its growing content is not an input of the job."""
    return append_line(str(Path(directory) / name), "run")


def read_length(path: str) -> int:
    return len(Path(path).read_text())


def reduce(directory: str, text: str) -> int:
    """A 'reduction': writes `text` as its output and counts its own runs in directory/reduce-runs.txt."""
    Path(park.current_job().filename).write_text(text)
    return count_run(directory, "reduce-runs.txt")


def write_bytes(n: int) -> int:
    """Writes n pseudo-random bytes as the job's output (for transfers of several chunks)."""
    import random

    Path(park.current_job().filename).write_bytes(random.Random(n).randbytes(n))
    return n


def file_size(path: str) -> int:
    return Path(path).stat().st_size


def settle_when(path: str, ok: bool, chisq: float) -> dict[str, float]:
    """Run until `path` exists, then complete with `chisq` as the result or fail: a job whose end a test decides."""
    while not Path(path).exists():
        time.sleep(0.02)
    if not ok:
        raise RuntimeError("planned failure")
    return {"chisq": chisq}


def chaos_step(directory: str, key: str, fail: bool, seconds: float) -> dict[str, str]:
    """A job for the kill -9 test: proves no other attempt of it runs meanwhile (an exclusive lock it
    holds while it runs; a collision leaves a marker), writes an output that names it, then sleeps."""
    import fcntl

    lock = open(Path(directory) / f"{key}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        (Path(directory) / f"{key}.collision-{os.getpid()}").write_text("two attempts at once")
        fcntl.flock(lock, fcntl.LOCK_EX)
    Path(park.current_job().filename).write_text(f"output of {key} by attempt in {os.getpid()}\n" * 100)
    time.sleep(seconds)
    if fail:
        raise RuntimeError(f"planned failure of {key}")
    return {"key": key}


def fail_times(directory: str, name: str, failures: int) -> int:
    """Fails its first `failures` runs (counted in directory/name), then returns how many runs it took."""
    runs = count_run(directory, name)
    if runs <= failures:
        raise RuntimeError(f"planned failure {runs} of {failures}")
    return runs


def allocate(n_bytes: int) -> int:
    """Holds `n_bytes` of memory for a moment (a job that needs more than it asked for)."""
    block = bytearray(n_bytes)
    return len(block)


def wait_with_marker(marker: str, gate: str) -> str:
    """Says it started (marker), then waits for `gate` to exist; returns CUDA_VISIBLE_DEVICES."""
    _write_whole(marker, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    while not Path(gate).exists():
        time.sleep(0.05)
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")
