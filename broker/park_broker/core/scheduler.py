"""Decides when waiting jobs start or are cancelled (the seed's `Depends`).

The scheduler keeps, for every waiting job, its condition and the atoms it
reads that have resolved, and an index `atom -> waiting jobs`, so an atom's
change costs O(jobs waiting on it), not O(all jobs). It is pure bookkeeping: it
never touches the store, the executor or the network; the caller applies the
verdicts it returns and feeds back the atoms those verdicts resolve.

A million jobs may wait, most on atoms none of which has resolved, each atom
awaited by one job: so the resolved atoms are kept only for the jobs that have
some, and an atom awaited by one job indexes its id rather than a set of one.
"""
from __future__ import annotations

import enum
import sys
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


def _ends(key: AtomKey, state: State) -> bool:
    """Whether an atom's resolution says its job has ended: its completed, cancelled and finished atoms resolve
    only at its terminal transition, and an improved(...) atom is CANCELLED only there."""
    return state is not State.PENDING and (
        key.kind in ("completed", "cancelled", "finished") or (key.kind == "improved" and state is State.CANCELLED))


class Scheduler:
    """The atom -> waiting-jobs index and the verdicts it implies."""

    def __init__(self) -> None:
        self._waiting: dict[str, Condition] = {}
        self._resolved: dict[str, dict[Atom, State]] = {}   # job id -> its atoms resolved so far, if any
        self._index: dict[AtomKey, str | set[str]] = {}     # atom -> the job waiting on it, or the jobs
        self._with_expr: dict[str, set[AtomKey]] = {}   # job id -> its pending improved(...) and counting atoms

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._waiting

    def add(self, job_id: str, condition: Condition | None, states: Mapping[AtomKey, State]) -> Decision | None:
        """Register a job; returns its verdict at once if the condition is already decided."""
        if condition is None:
            return Decision(job_id, Verdict.START, ())
        atoms = condition.depends
        resolved = {a: state for a in atoms if (state := states.get(a.key, State.PENDING)) is not State.PENDING}
        # Every atom pending, and no NOT: such a condition is pending and can still hold (most jobs submitted).
        decision = self._decide(job_id, condition, resolved) if resolved or condition.negates else None
        if decision is None:
            job_id = sys.intern(job_id)   # one string for the ledger, the index and the conditions naming it
            self._waiting[job_id] = condition
            if resolved:
                self._resolved[job_id] = resolved
            for atom in atoms:
                if atom not in resolved:
                    self._index_add(atom.key, job_id)
                    if atom.key.kind in EXPR_KINDS:
                        self._with_expr.setdefault(atom.key.job_id, set()).add(atom.key)
        return decision

    def remove(self, job_id: str) -> bool:
        """Forget a waiting job (cancelled by request). False if it was not waiting."""
        condition = self._waiting.pop(job_id, None)
        if condition is None:
            return False
        self._resolved.pop(job_id, None)
        for atom in condition.depends:
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
            waiting = self.waiting_on(key)
            self._drop(key)
            atom = Atom(key)
            for job_id in waiting:
                self._resolved.setdefault(job_id, {})[atom] = state
            affected |= waiting
        ended = {(key.site, key.job_id) for key, state in updates.items() if _ends(key, state)}
        decisions = []
        for job_id in sorted(affected):
            if ended and self._awaits_rest_of_transition(job_id, ended):
                continue   # decided when the rest arrives: it is already on its way
            decision = self._decide(job_id, self._waiting[job_id], self._resolved[job_id])
            if decision is not None:
                self.remove(job_id)
                decisions.append(decision)
        return decisions

    def _awaits_rest_of_transition(self, job_id: str, ended: set[tuple[str, str]]) -> bool:
        """Whether a waiting job still waits on an atom of a job whose terminal transition these updates come
        from. That transition resolved all of its job's atoms at once, but a peer's answers may bring them in
        parts (atoms asked for in different requests are answered in different messages): a verdict on part
        of a transition could differ from the verdict on all of it (`x & ~y` of one job's completed and
        finished), and must not depend on how the atoms were asked for (DESIGN §2)."""
        resolved = self._resolved[job_id]
        return any(atom not in resolved and (atom.key.site, atom.key.job_id) in ended
                   for atom in self._waiting[job_id].depends)

    def pending_atoms(self) -> set[AtomKey]:
        return set(self._index)

    def waiting_on(self, key: AtomKey) -> set[str]:
        """The jobs that wait for atom `key` to resolve."""
        waiting = self._index.get(key)
        return set() if waiting is None else {waiting} if isinstance(waiting, str) else set(waiting)

    def expr_atoms(self, job_id: str) -> set[AtomKey]:
        """The improved(...) and counting atoms of `job_id` that some waiting job still needs."""
        return set(self._with_expr.get(job_id, ()))

    def _index_add(self, key: AtomKey, job_id: str) -> None:
        waiting = self._index.get(key)
        if waiting is None:
            self._index[key] = job_id
        elif isinstance(waiting, str):
            self._index[key] = {waiting, job_id}
        else:
            waiting.add(job_id)

    def _unindex(self, key: AtomKey, job_id: str) -> None:
        waiting = self._index.get(key)
        if waiting == job_id:
            self._drop(key)
        elif isinstance(waiting, set):
            waiting.discard(job_id)
            if not waiting:
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
        """The verdict on `condition` given its atoms' `states` (those missing are pending), if any."""
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
