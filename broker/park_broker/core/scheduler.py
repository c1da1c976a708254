"""Decides when waiting jobs start or are cancelled (the seed's `Depends`).

The scheduler keeps, for every waiting job, its condition and the last known
state of each atom it reads, and an index `atom -> waiting jobs`, so an atom's
change costs O(jobs waiting on it), not O(all jobs). It is pure bookkeeping: it
never touches the store, the executor or the network; the caller applies the
verdicts it returns and feeds back the atoms those verdicts resolve.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from park.conditions import EXPR_KINDS, Atom, AtomKey, Condition, State


class Verdict(enum.Enum):
    START = "start"            # the condition is READY
    CANCEL = "cancel"          # the condition is CANCELLED
    NEVER = "never"            # the condition can no longer become READY


@dataclass(frozen=True, slots=True)
class Decision:
    job_id: str
    verdict: Verdict
    atoms: tuple[AtomKey, ...]   # the resolved atoms that decided it, for the cause


@dataclass(slots=True)
class _Waiting:
    condition: Condition
    states: dict[Atom, State]


def job_atom_states(job_state: str) -> dict[str, State]:
    """The state of each atom kind of a job in `job_state` ('completed', 'failed', ...).

    `improved` atoms resolve here only at the end: CANCELLED unless a report
    satisfied them first.
    """
    if job_state == "completed":
        return {"completed": State.READY, "cancelled": State.CANCELLED, "finished": State.READY,
                "improved": State.CANCELLED}
    if job_state in ("failed", "cancelled"):
        return {"completed": State.CANCELLED, "cancelled": State.READY, "finished": State.READY,
                "improved": State.CANCELLED}
    return {"completed": State.PENDING, "cancelled": State.PENDING, "finished": State.PENDING,
            "improved": State.PENDING}


class Scheduler:
    """The atom -> waiting-jobs index and the verdicts it implies."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}
        self._index: dict[AtomKey, set[str]] = {}
        self._with_expr: dict[str, set[AtomKey]] = {}   # job id -> its pending improved(...) and counting atoms

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._waiting

    def add(self, job_id: str, condition: Condition | None, states: Mapping[AtomKey, State]) -> Decision | None:
        """Register a job; returns its verdict at once if the condition is already decided."""
        if condition is None:
            return Decision(job_id, Verdict.START, ())
        known = {a: states.get(a.key, State.PENDING) for a in condition.depends}
        decision = self._decide(job_id, condition, known)
        if decision is None:
            self._waiting[job_id] = _Waiting(condition, known)
            for atom in known:
                if known[atom] is State.PENDING:
                    self._index.setdefault(atom.key, set()).add(job_id)
                    if atom.key.kind in EXPR_KINDS:
                        self._with_expr.setdefault(atom.key.job_id, set()).add(atom.key)
        return decision

    def remove(self, job_id: str) -> bool:
        """Forget a waiting job (cancelled by request). False if it was not waiting."""
        entry = self._waiting.pop(job_id, None)
        if entry is None:
            return False
        for atom in entry.condition.depends:
            self._unindex(atom.key, job_id)
        return True

    def resolve_all(self, updates: Mapping[AtomKey, State]) -> list[Decision]:
        """Atoms resolved to READY or CANCELLED, together (one job's terminal transition resolves all of
        its atoms): every update is applied before any condition is evaluated, so a verdict never depends
        on the order the atoms are listed in. Returns the verdicts for the jobs they decide."""
        affected: set[str] = set()
        for key, state in updates.items():
            if state is State.PENDING:
                continue
            waiting = self._index.get(key, set())
            self._drop(key)
            for job_id in waiting:
                self._waiting[job_id].states[Atom(key)] = state
            affected |= waiting
        decisions = []
        for job_id in sorted(affected):
            entry = self._waiting[job_id]
            decision = self._decide(job_id, entry.condition, entry.states)
            if decision is not None:
                self.remove(job_id)
                decisions.append(decision)
        return decisions

    def pending_atoms(self) -> set[AtomKey]:
        return set(self._index)

    def waiting_on(self, key: AtomKey) -> set[str]:
        """The jobs that wait for atom `key` to resolve."""
        return set(self._index.get(key, ()))

    def expr_atoms(self, job_id: str) -> set[AtomKey]:
        """The improved(...) and counting atoms of `job_id` that some waiting job still needs."""
        return set(self._with_expr.get(job_id, ()))

    def _unindex(self, key: AtomKey, job_id: str) -> None:
        jobs = self._index.get(key)
        if jobs is not None:
            jobs.discard(job_id)
            if not jobs:
                self._drop(key)

    def _drop(self, key: AtomKey) -> None:
        self._index.pop(key, None)
        if key.kind in EXPR_KINDS:
            keys = self._with_expr.get(key.job_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._with_expr[key.job_id]

    @staticmethod
    def _decide(job_id: str, condition: Condition, states: Mapping[Atom, State]) -> Decision | None:
        state = condition.evaluate(states)
        if state is State.READY:
            return Decision(job_id, Verdict.START, tuple(sorted(a.key for a, s in states.items() if s is State.READY)))
        if state is State.CANCELLED:
            cancelled = tuple(sorted(a.key for a, s in states.items() if s is State.CANCELLED))
            return Decision(job_id, Verdict.CANCEL, cancelled)
        if not condition.can_hold(states):
            return Decision(job_id, Verdict.NEVER, tuple(sorted(a.key for a, s in states.items()
                                                                if s is not State.PENDING)))
        return None
