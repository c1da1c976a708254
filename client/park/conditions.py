"""The condition algebra: three-valued boolean expressions over atoms.

An atom is one observable fact about one job on one site (`job.iscompleted`,
`job.iscancelled`, ...). It starts PENDING and resolves once, to READY or to
CANCELLED; it never changes again. Expressions combine atoms with `&`, `|` and
`~` following the seed's truth table (shared/seed-condition.txt, `test()`):

    a & b   READY when both are READY; CANCELLED as soon as either is CANCELLED
    a | b   READY when either is READY; CANCELLED only when both are CANCELLED
    ~a      READY while a is PENDING; PENDING once a is READY; CANCELLED with a

This module is pure: it evaluates against a mapping of atom states and never
talks to a broker. The broker's scheduler and the client's job proxies both use
it; `park.wire` converts expressions to and from their postfix wire form.
"""
from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Hashable

__all__ = ["State", "AtomKey", "Condition", "Atom", "And", "Or", "Not", "ATOM_KINDS", "EXPR_KINDS"]


class State(enum.IntEnum):
    PENDING = 0
    READY = 1
    CANCELLED = 2


#: The kinds of job atom, as in DESIGN §2 (`isfetched` is `completed` on a fetch job; `count` is a
#: group's counting atom, park.counting).
ATOM_KINDS = ("completed", "cancelled", "finished", "improved", "count")
#: The kinds whose atoms carry an expression (`AtomKey.expr`).
EXPR_KINDS = ("improved", "count")


@dataclass(frozen=True, order=True, slots=True)
class AtomKey:
    """Names one atom: `park://<site>/jobs/<job_id>` and which fact about it."""

    site: str
    job_id: str
    kind: str
    expr: str = ""

    def __str__(self) -> str:
        suffix = f"({self.expr!r})" if self.kind == "improved" else f"({self.expr})" if self.kind == "count" else ""
        return f"{self.site}/{self.job_id}.{self.kind}{suffix}"


def _and(a: State, b: State) -> State:
    if State.CANCELLED in (a, b):
        return State.CANCELLED
    return State.READY if a is State.READY and b is State.READY else State.PENDING


def _or(a: State, b: State) -> State:
    if State.READY in (a, b):
        return State.READY
    return State.CANCELLED if a is State.CANCELLED and b is State.CANCELLED else State.PENDING


def _not(a: State) -> State:
    return {State.PENDING: State.READY, State.READY: State.PENDING, State.CANCELLED: State.CANCELLED}[a]


_ALL = frozenset(State)
# Above this many unresolved atoms, can_hold() of an expression that reads an atom more than once uses
# a sound over-approximation instead of enumerating every future (3**n evaluations).
_EXACT_LIMIT = 6


class Condition:
    """A three-valued boolean expression over atoms. Immutable."""

    # Every kind is slotted: a broker holds one expression per waiting job, a million of them.
    __slots__ = ()
    negates: bool   # whether it has a NOT; without one it is monotone (an atom turning READY never hurts)

    class Cancelled(Exception):
        """Raised by `.ready` when the condition can no longer be satisfied."""

    def __and__(self, other: Condition) -> Condition:
        return And(self, _check(other))

    def __or__(self, other: Condition) -> Condition:
        return Or(self, _check(other))

    def __invert__(self) -> Condition:
        return Not(self)

    def __bool__(self) -> bool:
        # `a and b` would silently drop a condition; `&` is what is meant.
        raise TypeError("a condition has no truth value; combine conditions with &, | and ~")

    @property
    def depends(self) -> frozenset[Atom]:
        """The atoms the expression reads."""
        return frozenset(self.atoms())

    @property
    def reads_atoms_once(self) -> bool:
        """Whether no atom occurs twice in the expression."""
        return sum(1 for _ in self.atoms()) == len(self.depends)

    def atoms(self) -> Iterator[Atom]:
        raise NotImplementedError

    def evaluate(self, states: Mapping[Atom, State]) -> State:
        """The expression's state given the atoms' states; missing atoms are pending."""
        raise NotImplementedError

    def _possible(self, states: Mapping[Atom, State]) -> frozenset[State]:
        raise NotImplementedError

    def can_hold(self, states: Mapping[Atom, State]) -> bool:
        """False when no future of the pending atoms can make the expression READY.

        Pending atoms may stay pending or resolve either way; resolved atoms are
        final. Exact for an expression that reads each atom once (its parts then
        resolve independently, so the states each part can still reach combine
        exactly), and for one with up to a few pending atoms; beyond that it may
        answer True for an expression that cannot hold (never the other way
        round), so a job is never cancelled for this reason by mistake.
        """
        atoms = self.depends
        if not self.negates and all(states.get(a, State.PENDING) is not State.CANCELLED for a in atoms):
            return True   # the pending atoms can all turn READY, and then so does a monotone expression
        if self.reads_atoms_once:
            return State.READY in self._possible(states)
        pending = [a for a in atoms if states.get(a, State.PENDING) is State.PENDING]
        if len(pending) > _EXACT_LIMIT:
            return State.READY in self._possible(states)
        fixed = {a: states.get(a, State.PENDING) for a in atoms}
        for future in itertools.product(State, repeat=len(pending)):
            fixed.update(zip(pending, future))
            if self.evaluate(fixed) is State.READY:
                return True
        return False

    # The seed's live interface, for conditions whose atoms carry a state source.
    def _live(self) -> State:
        return self.evaluate({a: a.current() for a in self.depends})

    @property
    def ready(self) -> bool:
        """True if satisfied now; raises Condition.Cancelled if it never will be."""
        state = self._live()
        if state is State.CANCELLED:
            raise Condition.Cancelled(str(self))
        return state is State.READY

    @property
    def cancelled(self) -> bool:
        return self._live() is State.CANCELLED


def _check(other: object) -> Condition:
    if not isinstance(other, Condition):
        raise TypeError(f"cannot combine a condition with {type(other).__name__}; "
                        "use job.iscompleted, job.iscancelled, job.isfinished or job.improved(...)")
    return other


_anonymous = itertools.count()


class Atom(Condition):
    """One fact. Equal atoms have equal keys; `source`, if given, reports its live state."""

    __slots__ = ("key", "source", "origin", "_hash")
    negates = False

    def __init__(self, key: Hashable | None = None, source: Callable[[AtomKey], State] | None = None,
                 origin: object = None):
        self.key = key if key is not None else ("anonymous", next(_anonymous))
        self.source = source
        self.origin = origin    # what made the atom (a park.Job); opaque here
        self._hash = hash(("Atom", self.key))   # atoms key every state mapping: hashed once

    def atoms(self) -> Iterator[Atom]:
        yield self

    @property
    def depends(self) -> frozenset[Atom]:
        return frozenset((self,))

    @property
    def reads_atoms_once(self) -> bool:
        return True

    def evaluate(self, states: Mapping[Atom, State]) -> State:
        return states.get(self, State.PENDING)

    def _possible(self, states: Mapping[Atom, State]) -> frozenset[State]:
        state = states.get(self, State.PENDING)
        return _ALL if state is State.PENDING else frozenset((state,))

    def current(self) -> State:
        return self.source(self.key) if self.source is not None else State.PENDING

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Atom) and other.key == self.key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Atom({self.key})"

    __str__ = __repr__


class _Composite(Condition):
    """An expression of expressions, which keeps its atoms once it has been asked for them: the scheduler
    asks every time one of a waiting job's atoms resolves."""

    __slots__ = ("_depends", "_once")

    @property
    def depends(self) -> frozenset[Atom]:
        try:
            return self._depends
        except AttributeError:
            self._depends: frozenset[Atom] = frozenset(self.atoms())
            return self._depends

    @property
    def reads_atoms_once(self) -> bool:
        try:
            return self._once
        except AttributeError:
            self._once: bool = sum(1 for _ in self.atoms()) == len(self.depends)
            return self._once


class _Binary(_Composite):
    __slots__ = ("left", "right", "negates")
    _op: Callable[[State, State], State]
    _symbol: str

    def __init__(self, left: Condition, right: Condition):
        self.left, self.right = _check(left), _check(right)
        self.negates = left.negates or right.negates

    def atoms(self) -> Iterator[Atom]:
        yield from self.left.atoms()
        yield from self.right.atoms()

    def evaluate(self, states: Mapping[Atom, State]) -> State:
        return type(self)._op(self.left.evaluate(states), self.right.evaluate(states))

    def _possible(self, states: Mapping[Atom, State]) -> frozenset[State]:
        op = type(self)._op
        return frozenset(op(a, b) for a in self.left._possible(states) for b in self.right._possible(states))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (other.left, other.right) == (self.left, self.right)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.left, self.right))

    def __repr__(self) -> str:
        return f"({self.left} {self._symbol} {self.right})"

    __str__ = __repr__


class And(_Binary):
    __slots__ = ()
    _op = staticmethod(_and)
    _symbol = "&"


class Or(_Binary):
    __slots__ = ()
    _op = staticmethod(_or)
    _symbol = "|"


class Not(_Composite):
    __slots__ = ("inner",)
    negates = True

    def __init__(self, inner: Condition):
        self.inner = _check(inner)

    def atoms(self) -> Iterator[Atom]:
        yield from self.inner.atoms()

    def evaluate(self, states: Mapping[Atom, State]) -> State:
        return _not(self.inner.evaluate(states))

    def _possible(self, states: Mapping[Atom, State]) -> frozenset[State]:
        return frozenset(_not(s) for s in self.inner._possible(states))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Not) and other.inner == self.inner

    def __hash__(self) -> int:
        return hash(("Not", self.inner))

    def __repr__(self) -> str:
        return f"~{self.inner}"

    __str__ = __repr__
