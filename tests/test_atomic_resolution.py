"""A job's terminal transition resolves all of its atoms together (DESIGN §2, "One transition, all its
atoms"): a dependent's verdict is the same whether it was submitted while the job ran or after it ended.

Every ordered pair of one job's atoms (completed, cancelled, finished, improved) in every condition shape
that cannot hold while both atoms are pending, for a job that completes and for one that fails. Shapes
that hold at once while an atom is pending (`x | ~y`: "y has not happened yet") are left out: for them
the moment of submission is the meaning, by design.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import park
from harness import federate  # type: ignore[import-not-found]
from park.conditions import Condition

SHAPES: dict[str, Callable[[Condition, Condition], Condition]] = {
    "x & y": lambda x, y: x & y,
    "x | y": lambda x, y: x | y,
    "x & ~y": lambda x, y: x & ~y,
    "~x & y": lambda x, y: ~x & y,
}


def _atoms(job: park.Job) -> dict[str, Condition]:
    return {"completed": job.iscompleted, "cancelled": job.iscancelled, "finished": job.isfinished,
            "improved": job.improved("chisq < 1")}


def _dependents(job: park.Job) -> dict[tuple[str, str, str], park.Job]:
    atoms = _atoms(job)
    return {(shape, x, y): park.submit("park_test_tasks:noop", when=make(atoms[x], atoms[y]), memo=False)
            for shape, make in SHAPES.items() for x, y in itertools.permutations(atoms, 2)}


@pytest.mark.parametrize("ok", [True, False], ids=["completes", "fails"])
@pytest.mark.parametrize("where", ["same site", "across sites"])
def test_a_verdict_does_not_depend_on_when_the_dependent_was_submitted(new_broker, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       ok: bool, where: str) -> None:
    home = new_broker("sns")
    if where == "same site":
        home.start()
        there = home
    else:   # the dependents wait at another site: the peer must apply the job's atoms together too
        there = new_broker("cluster")
        federate(home, there)
    flag = tmp_path / "end"
    with home.service():
        job = park.submit("park_test_tasks:settle_when", str(flag), ok, 0.5, memo=False)
    deadline = time.monotonic() + 30
    while job.state != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    service = there.service()
    with service:
        before = _dependents(job)
    time.sleep(0.5)   # across sites: the peer has answered the subscription (every atom still pending)
    undecided = {k for k, d in before.items() if d.state == "waiting"}
    flag.touch()
    assert job.wait(timeout=60) == ("completed" if ok else "failed")
    with service:
        after = _dependents(job)
    verdicts_before = {k: d.wait(timeout=60) for k, d in before.items()}
    verdicts_after = {k: d.wait(timeout=60) for k, d in after.items()}
    assert undecided == set(before), "no condition of these shapes is decided while both atoms are pending"
    differ = {k: (verdicts_before[k], verdicts_after[k]) for k in before if verdicts_before[k] != verdicts_after[k]}
    assert not differ, f"verdicts that depend on the time of submission (before, after): {differ}"
    # The verdicts themselves: a few that the truth table fixes, to prove the jobs were judged at all.
    assert verdicts_after[("x & ~y", "completed", "finished")] == "cancelled"
    assert verdicts_after[("x | y", "completed", "cancelled")] == "completed"
    assert verdicts_after[("x & y", "improved", "finished")] == ("completed" if ok else "cancelled")
