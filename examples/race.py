"""Three fits racing: start them all at once, keep the first that is good enough, cancel the others.

Each fit looks for the width of a peak in the same (synthetic) measured curve,
by a different method, reporting its chi-square after every model evaluation
with `park.report(chisq=..., width=..., step=...)`:

    scan      steps the width up from 0.2 in 0.01 increments
    golden    golden-section search on [0.1, 3.0]
    random    draws widths at random from [0.1, 3.0]

`park.race(fits, until="chisq < 1.2")` makes the first fit to report a reduced
chi-square below 1.2 the winner: the broker cancels the other two at once
(their processes are terminated) and the race completes with the winning
report's values. The winner itself runs on to its own end. Expected: golden
wins after about ten evaluations; scan and random are cancelled ("lost race").

Run it against any broker that can import this file as module `race` (its
workers' path must include this directory: `park-broker serve DIR --workers 3
--python-path examples/`; with fewer than three workers a fit may still be
queued when the race is decided, and is then cancelled before it starts):

    python examples/race.py --address 127.0.0.1:7701 --cert DIR/tls.crt
    python examples/race.py --service NAME          # from the client config
    PARK_DEMO_ADDRESS=127.0.0.1:7701 PARK_DEMO_CERT=DIR/tls.crt python examples/race.py

Exit status: 0 when one fit won and the other two were cancelled, 1 otherwise, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable

import park

PEAK, TRUE_WIDTH, NOISE, POINTS = 2.0, 0.8, 0.02, 200
GOOD_ENOUGH = "chisq < 1.2"
EVALUATION_SECONDS = 0.15    # a stand-in for an expensive model evaluation


# -- the job functions (run on the broker as race:<name>) ---------------------------

def _measurement(seed: int) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(4 * i / POINTS, _gauss(4 * i / POINTS, TRUE_WIDTH) + rng.gauss(0, NOISE)) for i in range(POINTS)]


def _gauss(q: float, width: float) -> float:
    return math.exp(-((q - PEAK) ** 2) / (2 * width ** 2))


def _evaluator(seed: int) -> Callable[[float, int], float]:
    """chisq(width, step): the reduced chi-square of a model, reported to the broker as it is computed."""
    curve = _measurement(seed)

    def chisq(width: float, step: int) -> float:
        time.sleep(EVALUATION_SECONDS)
        value = sum((i - _gauss(q, width)) ** 2 for q, i in curve) / (NOISE ** 2 * len(curve))
        park.report(chisq=value, width=width, step=step)
        return value
    return chisq


def scan(seed: int, start: float = 0.2, step: float = 0.01, limit: int = 400) -> dict[str, float]:
    """Step the width up until chi-square stops falling."""
    chisq = _evaluator(seed)
    best, best_width = math.inf, start
    for n in range(limit):
        width = start + n * step
        value = chisq(width, n)
        if value > best:
            break
        best, best_width = value, width
    return {"width": round(best_width, 4), "chisq": round(best, 3), "steps": n + 1}


def golden(seed: int, lo: float = 0.1, hi: float = 3.0, tolerance: float = 1e-4) -> dict[str, float]:
    """Golden-section search for the width of least chi-square."""
    chisq = _evaluator(seed)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = chisq(a, 0), chisq(b, 1)
    n = 2
    while hi - lo > tolerance:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = chisq(a, n)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = chisq(b, n)
        n += 1
    width = (lo + hi) / 2
    return {"width": round(width, 4), "chisq": round(chisq(width, n), 3), "steps": n + 1}


def random_search(seed: int, lo: float = 0.1, hi: float = 3.0, limit: int = 400) -> dict[str, float]:
    """Try widths at random; keep the best."""
    chisq = _evaluator(seed)
    rng = random.Random(seed + 1)
    best, best_width = math.inf, lo
    for n in range(limit):
        width = rng.uniform(lo, hi)
        value = chisq(width, n)
        if value < best:
            best, best_width = value, width
    return {"width": round(best_width, 4), "chisq": round(best, 3), "steps": limit}


# -- the workflow (runs where this script runs) -----------------------------------

def _service(argv: list[str] | None) -> park.Service:
    parser = argparse.ArgumentParser(description="Race three fits on a Park broker.")
    parser.add_argument("--address", default=os.environ.get("PARK_DEMO_ADDRESS"), help="broker HOST:PORT")
    parser.add_argument("--cert", default=os.environ.get("PARK_DEMO_CERT"), help="the broker's tls.crt")
    parser.add_argument("--service", help="a service name from the client config instead")
    args = parser.parse_args(argv)
    if args.service:
        return park.remote_service(args.service)
    if not args.address or not args.cert:
        parser.error("name a broker: --address HOST:PORT --cert FILE (or PARK_DEMO_ADDRESS and PARK_DEMO_CERT), "
                     "or --service NAME")
    return park.remote_service(args.address, cert=args.cert)


def _reports(job: park.Job) -> str:
    improved = [e.detail["values"] for e in job.history() if e.kind == "improved"]
    if not improved:
        return "no reports"
    return f"{len(improved)} reports, last chisq={improved[-1]['chisq']:.3g} at width={improved[-1]['width']:.4g}"


def main(argv: list[str] | None = None) -> int:
    seed = 7
    try:
        service = _service(argv)
        with service:
            # memo=False: every run races afresh (with memoization a rerun would get the earlier
            # winner back at once, already completed, and win with its final result).
            fits = {"scan": park.submit(scan, seed, label="scan", memo=False),
                    "golden": park.submit(golden, seed, label="golden", memo=False),
                    "random": park.submit(random_search, seed, label="random", memo=False)}
            contest = park.race(list(fits.values()), until=GOOD_ENOUGH, label="race")
        print(f"racing {', '.join(fits)} on site {service.site} until {GOOD_ENOUGH!r}", flush=True)
        started = time.monotonic()
        try:
            values = contest.result(timeout=300)
        except park.JobCancelled as exc:
            print(f"no fit was good enough: {exc.cause}")
            return 1
        winner = next(name for name, job in fits.items() if job is contest.winner)
        print(f"{winner} won after {time.monotonic() - started:.1f} s with "
              + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
        ok = True
        for name, job in fits.items():
            state = job.wait(timeout=300)
            if name == winner:
                detail = json.dumps(job.result()) if state == "completed" else state
                print(f"  {name:<7} {state:<10} ran on to its end: {detail}; {_reports(job)}")
                ok &= state == "completed"
            else:
                cause = job.record().cause.message
                cause = cause.replace(f"race {contest.id}", "the race")   # "lost race <id> to <id>"
                for other, j in fits.items():
                    cause = cause.replace(j.id, other)
                print(f"  {name:<7} {state:<10} {cause}; {_reports(job)}")
                ok &= state == "cancelled"
    except (park.ParkError, TimeoutError) as exc:
        print(f"race: {exc}", file=sys.stderr)
        return 1
    print("one fit won, the others were cancelled" if ok else "unexpected outcome")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
