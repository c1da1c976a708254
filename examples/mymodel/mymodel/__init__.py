"""A toy reflectometry model: what a scientist would upload with park.install_service."""
from __future__ import annotations

import json
import math
from pathlib import Path

import park

__version__ = "1.0"


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
