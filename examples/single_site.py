"""A single-site workflow: reduce a measurement, simulate it twice, fit, and
show how a failure cancels what depends on it.

    reduction ──► sim-narrow ──┐
              └─► sim-wide ────┴─► fit ──┬─► fallback-report   (when calibrate.iscancelled & fit.iscompleted)
    calibrate (fails on purpose) ────────┴─► absolute-scale    (when calibrate.iscompleted & fit.iscompleted)
                                                └─► publish    (when absolute-scale.iscompleted)

Expected: reduction, both simulations, fit and fallback-report complete;
calibrate fails; absolute-scale is cancelled because calibrate failed, and
publish is cancelled in turn because absolute-scale was (cancellation
propagates). `EXPECTED` below says the same; `park demo` checks it.

Run it against any broker that can import this file as module `single_site`
(its workers' path must include this directory: `park-broker serve DIR
--python-path examples/`). Name the broker with either

    python examples/single_site.py --address 127.0.0.1:7701 --cert DIR/tls.crt
    python examples/single_site.py --service NAME          # from the client config
    PARK_DEMO_ADDRESS=127.0.0.1:7701 PARK_DEMO_CERT=DIR/tls.crt python examples/single_site.py

`park demo` starts a broker in a temporary directory and runs this for you.
Exit status: 0 when every job ended as expected, 1 otherwise, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import park

EXPECTED = {
    "reduction": "completed",
    "sim-narrow": "completed",
    "sim-wide": "completed",
    "fit": "completed",
    "calibrate": "failed",
    "absolute-scale": "cancelled",
    "publish": "cancelled",
    "fallback-report": "completed",
}
PEAK, TRUE_WIDTH = 2.0, 0.8


# -- the job functions (run on the broker as single_site:<name>) ------------------

def _gauss(q: float, width: float) -> float:
    return math.exp(-((q - PEAK) ** 2) / (2 * width ** 2))


def reduce(points: int, seed: int) -> dict[str, float]:
    """Turn a (synthetic) raw measurement into a reduced I(q) curve, written to the job's output file."""
    rng = random.Random(seed)
    curve = [(4 * i / points, _gauss(4 * i / points, TRUE_WIDTH) + rng.gauss(0, 0.02)) for i in range(points)]
    Path(park.current_job().filename).write_text(json.dumps(curve))
    time.sleep(0.5)
    return {"points": points, "max_intensity": round(max(i for _, i in curve), 3)}


def simulate(reduced: str, width: float) -> dict[str, float]:
    """Compare a model of the given peak width with the reduced data; writes the model curve."""
    curve = json.loads(Path(reduced).read_text())
    model = [(q, _gauss(q, width)) for q, _ in curve]
    chisq = sum((i - m) ** 2 for (_, i), (_, m) in zip(curve, model)) / (0.02 ** 2 * len(curve))
    Path(park.current_job().filename).write_text(json.dumps({"width": width, "chisq": chisq}))
    time.sleep(1.0)
    return {"width": width, "chisq": round(chisq, 2)}


def fit(reduced: str, simulations: list[str]) -> dict[str, float]:
    """Refine the peak width between the simulated ones by golden-section search on chi-square."""
    curve = json.loads(Path(reduced).read_text())
    lo, hi = sorted(json.loads(Path(s).read_text())["width"] for s in simulations)

    def chisq(width: float) -> float:
        return sum((i - _gauss(q, width)) ** 2 for q, i in curve) / (0.02 ** 2 * len(curve))

    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if chisq(a) < chisq(b) else (a, hi)
    time.sleep(0.5)
    return {"width": round((lo + hi) / 2, 3), "chisq": round(chisq((lo + hi) / 2), 2)}


def calibrate(cycle: str) -> float:
    """Fails on purpose: there is no calibration run for this cycle."""
    raise FileNotFoundError(f"no vanadium calibration run for cycle {cycle}")


def absolute_scale(fit_result: str) -> str:
    return f"absolute intensities from {fit_result}"


def publish(scaled: str) -> str:
    return f"published {scaled}"


def fallback_report(fit_result: str) -> str:
    """Without a calibration, report the fit on a relative scale."""
    Path(park.current_job().filename).write_text(f"relative-scale fit: {fit_result}\n")
    return "relative-scale report written"


# -- the workflow (runs where this script runs) -----------------------------------

def workflow() -> dict[str, park.Job]:
    """Submit every job at once; the broker starts each when its condition holds."""
    reduction = park.submit(reduce, 200, seed=7, label="reduction")
    sims = [park.submit(simulate, reduction.filename, width, when=reduction.iscompleted, label=label)
            for label, width in (("sim-narrow", 0.5), ("sim-wide", 1.5))]
    fitted = park.submit(fit, reduction.filename, [s.filename for s in sims],
                         when=sims[0].iscompleted & sims[1].iscompleted, label="fit")
    calib = park.submit(calibrate, "2026-3", label="calibrate")
    scaled = park.submit(absolute_scale, fitted.url, when=calib.iscompleted & fitted.iscompleted,
                         label="absolute-scale")
    published = park.submit(publish, scaled.url, when=scaled.iscompleted, label="publish")
    fallback = park.submit(fallback_report, fitted.url, when=calib.iscancelled & fitted.iscompleted,
                           label="fallback-report")
    return {"reduction": reduction, "sim-narrow": sims[0], "sim-wide": sims[1], "fit": fitted,
            "calibrate": calib, "absolute-scale": scaled, "publish": published, "fallback-report": fallback}


def _outcome(job: park.Job) -> tuple[str, str]:
    """The job's final state and a one-line account of it."""
    try:
        return "completed", json.dumps(job.result(timeout=120))
    except park.JobFailed as exc:
        return "failed", exc.error
    except park.JobCancelled as exc:
        return "cancelled", exc.cause


def _service(argv: list[str] | None) -> park.Service:
    parser = argparse.ArgumentParser(description="Run Park's single-site example workflow.")
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


def main(argv: list[str] | None = None) -> int:
    try:
        service = _service(argv)
        with service:
            jobs = workflow()
        print(f"submitted {len(jobs)} jobs to site {service.site}", flush=True)
        outcomes = {label: _outcome(job) for label, job in jobs.items()}
    except (park.ParkError, TimeoutError) as exc:
        print(f"single_site: {exc}", file=sys.stderr)
        return 1
    print(f"\n{'job':<16} {'expected':<10} {'ended':<10} detail")
    for label, (state, detail) in outcomes.items():
        mark = "" if state == EXPECTED[label] else "  <-- unexpected"
        print(f"{label:<16} {EXPECTED[label]:<10} {state:<10} {detail[:100]}{mark}")
    wrong = [label for label, (state, _) in outcomes.items() if state != EXPECTED[label]]
    print(f"\n{len(outcomes) - len(wrong)} of {len(outcomes)} jobs ended as expected"
          + (f"; unexpected: {', '.join(wrong)}" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
