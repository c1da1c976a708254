"""A toy reflectometry model: what a scientist would upload with park.install_service."""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import park

__version__ = "1.0"


def reduce_events(raw_bytes: int) -> dict[str, object]:
    """The facility's reduction (a stand-in for SnsReduce): writes the reduced file as the job's output."""
    data = hashlib.sha256(b"raw neutron events").digest() * (raw_bytes // 32)
    Path(park.current_job().filename).write_bytes(data)
    return {"bytes": len(data)}


def prefit_simulation(points: int = 200) -> dict[str, float]:
    """Explore the model's parameter space; writes the feasible starting point as the job's output."""
    best = min((abs(math.sin(t / 17.0)) + t / 1000.0, t) for t in range(1, points))
    start = {"thickness": float(best[1]), "roughness": 3.0}
    Path(park.current_job().filename).write_text(json.dumps(start))
    return start


def fit(model_file: str, data_file: str, steps: int = 40) -> dict[str, float]:
    """Refine the model against the reduced data, reporting chi-squared as it improves."""
    start = json.loads(Path(model_file).read_text())
    data = Path(data_file).read_bytes()
    chisq = 10.0 + len(data) % 7
    for step in range(steps):
        chisq = 1.0 + (chisq - 1.0) * 0.85
        park.report(chisq=chisq, step=step)
    return {"chisq": chisq, "thickness": start["thickness"], "steps": steps}


def race_fit(model_file: str, data_file: str, seed: int, pause: float = 0.25) -> dict[str, float]:
    """One contestant of a race of fits: a descent from a starting point drawn with `seed`.

    The start lies 10**uniform(0.2, 2) from the optimum, so seeds differ in how far they have to go:
    with `chisq < 1.2` as the bar, seed 3 needs 2 steps, seed 5 needs 7 and seed 2 needs 11 (each
    `pause` seconds long). Reports chi-squared after every step; stops when chisq < 1.01."""
    start = json.loads(Path(model_file).read_text())
    if not Path(data_file).is_file():
        raise FileNotFoundError(f"no reduced data at {data_file}")
    scale = 5.0
    distance = 10 ** random.Random(seed).uniform(0.2, 2.0)
    step = 0
    chisq = 1.0 + (distance / scale) ** 2
    park.report(chisq=chisq, step=step)
    while chisq >= 1.01:
        time.sleep(pause)
        step += 1
        distance *= 0.7
        chisq = 1.0 + (distance / scale) ** 2
        park.report(chisq=chisq, step=step)
    return {"chisq": round(chisq, 4), "thickness": start["thickness"] + distance, "steps": step, "seed": seed}
