"""kill -9 at random moments through a few hundred conditioned jobs (DESIGN §10): nothing acknowledged is
lost, every job ends in the state its DAG implies, no result is recorded twice, every output matches the
digest recorded for it, and no two attempts of one job ever run at the same time."""
from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest

import park
from park.conditions import Condition

pytestmark = pytest.mark.timeout(300)

JOBS = 200
KILLS = 10
TERMINAL = ("completed", "failed", "cancelled")


def _duration(rng: random.Random) -> float:
    # Some jobs outlast a broker's restart: an attempt that outlived its broker would overlap its re-run.
    return rng.uniform(1.5, 3.0) if rng.random() < 0.1 else rng.uniform(0.02, 0.25)


def test_random_kill_9s_lose_nothing_and_run_nothing_twice(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20261201)
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o777)   # the jobs write here, as whichever account they run as
    broker = new_broker(workers=3).start()
    plan: list[tuple[list[int], bool]] = []    # (upstream jobs, planned failure) of each job
    for i in range(JOBS):
        upstream = rng.sample(range(i), k=min(i, rng.choice([0, 1, 1, 2]))) if i else []
        plan.append((upstream, rng.random() < 0.06))
    jobs: list[park.Job] = []
    with broker.service():
        for i, (upstream, fail) in enumerate(plan):
            when: Condition | None = None
            for u in upstream:
                when = jobs[u].iscompleted if when is None else when & jobs[u].iscompleted
            jobs.append(park.submit("park_test_tasks:chaos_step", str(markers), f"job{i}", fail,
                                    _duration(rng), when=when, memo=False))
    # Every job is acknowledged (the `with` block flushed them). Now kill the broker again and again.
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.2, 1.2))
        broker.kill()
        broker.start()
    service = broker.service()
    states = {j.id: service.job(j.id).wait(timeout=180) for j in jobs}

    expected: list[str] = []
    for upstream, fail in plan:
        if any(expected[u] != "completed" for u in upstream):
            expected.append("cancelled")
        else:
            expected.append("failed" if fail else "completed")
    wrong = {f"job{i}": (states[j.id], expected[i]) for i, j in enumerate(jobs) if states[j.id] != expected[i]}
    assert not wrong, f"jobs not in the state their DAG implies (state, expected): {wrong}"
    assert not list(markers.glob("*.collision-*")), "two attempts of one job ran at the same time"
    for i, job in enumerate(jobs):
        record = service.job(job.id).record()
        events = [e.kind for e in service.job(job.id).events()]
        assert sum(kind in TERMINAL for kind in events) == 1, (f"job{i}", events)
        if expected[i] == "completed":
            [output] = record.outputs
            data = Path(output.path).read_bytes()
            assert data.startswith(f"output of job{i} by".encode())
            assert hashlib.sha256(data).hexdigest() == output.sha256 and len(data) == output.size
    assert sum(s == "completed" for s in states.values()) > JOBS // 2, "the plan exercised completions"
