"""Job functions the test brokers import (their --python-path includes this directory)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import park


def add(a: float, b: float) -> float:
    return a + b


def noop() -> None:
    return None


def fail(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float, marker: str = "") -> str:
    if marker:
        Path(marker).write_text(str(os.getpid()))
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
    """Appends to a shared file, so a test can count how often a job ran."""
    with open(path, "a") as f:
        f.write(line + "\n")
    return len(Path(path).read_text().splitlines())


def crash() -> None:
    os._exit(3)
