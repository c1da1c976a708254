"""The job functions bench/progress.py runs (the broker imports them via `--python-path bench`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import park


def _step(inner: int, i: int) -> float:
    """One iteration of pure-Python work, standing in for one step of a fit."""
    s = 0.0
    for j in range(inner):
        s += (i + j) * 1e-9
    return s


def spin(iterations: int, inner: int, every: int, run: int = 0) -> dict[str, float]:
    """Run `iterations` steps; with `every` > 0 call park.report on every `every`-th step.

    `run` only makes repeated submissions differ (no memo hit).

    Returns the in-job time of the loop (park.report calls included, the final
    flush of queued reports excluded), the CPU time of the job's process over the
    loop (all its threads) and the wall-clock moment the loop ended."""
    reports = 0
    cpu = time.process_time()
    start = time.perf_counter()
    for i in range(iterations):
        chisq = 1.0 + _step(inner, i)
        if every and i % every == 0:
            park.report(step=i, chisq=chisq)
            reports += 1
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "cpu": time.process_time() - cpu, "reports": reports, "loop_end": time.time()}


def contestant(role: str, directory: str, losers: int = 2, cpu: bool = True, lead: float = 0.3,
               grpc: bool = False) -> str:
    """A race contestant that reports a falling chisq about every 10 ms (`sent`: when, by its clock).

    role "winner": waits until `losers` pid files exist in `directory` (every loser is
    running), then `lead` seconds more, writes time.time() to `winner.time` just
    before its winning report (chisq=0.5), and finishes 0.2 s later.
    role "loser<N>": writes its pid to `<role>.pid` and never gets below chisq=2,
    running until cancelled (at most 60 s). `cpu`: busy-loop between reports, else sleep.
    `grpc`: send the reports through gRPC, as a job outside a local worker does, not the worker's socket."""
    if grpc:
        os.environ.pop("PARK_REPORT_FD", None)
    out = Path(directory)
    if role != "winner":
        (out / f"{role}.tmp").write_text(str(os.getpid()))
        os.rename(out / f"{role}.tmp", out / f"{role}.pid")   # atomic: the bench never reads half a pid
    deadline = time.monotonic() + 60
    step = 0
    while time.monotonic() < deadline:
        if role == "winner" and len(list(out.glob("loser*.pid"))) >= losers:
            time.sleep(lead)
            stamp = time.time()
            park.report(chisq=0.5, step=step, sent=stamp)
            (out / "winner.time").write_text(repr(stamp))
            time.sleep(0.2)
            return "won"
        park.report(chisq=2.0 + 10.0 / (step + 1), step=step, sent=time.time())
        step += 1
        if cpu:
            until = time.perf_counter() + 0.01
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(0.01)
    return "timed out"
