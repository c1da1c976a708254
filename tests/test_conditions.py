"""The condition algebra: the seed's truth table, and a property test against a
brute-force reference built from the seed's own (ready, cancelled) definitions."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from park._proto import conditions_pb2 as cpb
from park.wire import InvalidInput, condition_from_proto, condition_to_proto
from park.conditions import And, Atom, AtomKey, Condition, Not, Or, State

P, R, C = State.PENDING, State.READY, State.CANCELLED


class _Fixed(Atom):
    """An atom with a fixed live state, like the seed's `true`, `false`, `cancelled`."""

    def __init__(self, state: State):
        super().__init__(source=lambda _key: state)


def _check(expr: Condition, ready: object, depends: set[Atom]) -> None:
    # The seed's _check(): Exception means .ready raises and .cancelled is True.
    if ready is Exception:
        with pytest.raises(Condition.Cancelled):
            expr.ready
        assert expr.cancelled is True
    else:
        assert expr.ready is ready
        assert expr.cancelled is False
    assert expr.depends == depends


def test_seed_truth_table() -> None:
    true, false, cancelled = _Fixed(R), _Fixed(P), _Fixed(C)
    _check((true | false) & true, True, {true, false})
    _check(cancelled | true, True, {true, cancelled})
    _check(cancelled | false, False, {false, cancelled})
    _check(cancelled | cancelled, Exception, {cancelled})
    _check(cancelled & true, Exception, {true, cancelled})
    _check(cancelled & false, Exception, {false, cancelled})
    _check(cancelled & cancelled, Exception, {cancelled})
    _check(~true, False, {true})
    _check(~false, True, {false})
    _check(~cancelled, Exception, {cancelled})


# -- reference: the seed's two booleans per expression ------------------------------

def _ref(expr: Condition, states: dict[Atom, State]) -> tuple[bool, bool]:
    """(ready, cancelled) exactly as the seed's And/Or/Not/Atom classes define them."""
    if isinstance(expr, Atom):
        s = states.get(expr, P)
        return s is R, s is C
    if isinstance(expr, Not):
        r, c = _ref(expr.inner, states)
        return (not r and not c), c
    lr, lc = _ref(expr.left, states)   # type: ignore[attr-defined]
    rr, rc = _ref(expr.right, states)  # type: ignore[attr-defined]
    if isinstance(expr, And):
        cancelled = lc or rc
        return (lr and rr and not cancelled), cancelled
    cancelled = lc and rc
    return (lr or rr), cancelled


ATOMS = [Atom(AtomKey("sns", "a" * 26, "completed")), Atom(AtomKey("sns", "b" * 26, "completed")),
         Atom(AtomKey("sns", "c" * 26, "cancelled")), Atom(AtomKey("sns", "d" * 26, "finished"))]

expressions = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(st.builds(And, inner, inner), st.builds(Or, inner, inner), st.builds(Not, inner)),
    max_leaves=12)
assignments = st.fixed_dictionaries({a: st.sampled_from(list(State)) for a in ATOMS})


@given(expressions, assignments)
@settings(max_examples=500, deadline=None)
def test_evaluate_matches_seed_reference(expr: Condition, states: dict[Atom, State]) -> None:
    ready, cancelled = _ref(expr, states)
    assert expr.evaluate(states) is (C if cancelled else R if ready else P)


def _futures(expr: Condition, states: dict[Atom, State]):  # type: ignore[no-untyped-def]
    pending = [a for a in expr.depends if states.get(a, P) is P]
    for values in itertools.product(State, repeat=len(pending)):
        yield {**states, **dict(zip(pending, values))}


@given(expressions, assignments)
@settings(max_examples=500, deadline=None)
def test_can_hold_is_exact_for_few_atoms(expr: Condition, states: dict[Atom, State]) -> None:
    expected = any(expr.evaluate(f) is R for f in _futures(expr, states))
    assert expr.can_hold(states) is expected


MANY = [Atom(AtomKey("sns", chr(ord("a") + i) * 26, "completed")) for i in range(8)]


@st.composite
def read_once(draw: st.DrawFn) -> Condition:
    """An expression that reads each of its atoms once, over more atoms than enumeration is used for."""
    atoms = draw(st.permutations(MANY))
    parts: list[Condition] = [draw(st.sampled_from([a, ~a])) for a in atoms]
    while len(parts) > 1:
        i = draw(st.integers(0, len(parts) - 2))
        joined = draw(st.sampled_from([And, Or]))(parts[i], parts[i + 1])
        parts[i:i + 2] = [draw(st.sampled_from([joined, ~joined]))]
    return parts[0]


@given(read_once(), st.fixed_dictionaries({a: st.sampled_from(list(State)) for a in MANY}))
@settings(max_examples=100, deadline=None)
def test_can_hold_is_exact_for_expressions_that_read_each_atom_once(expr: Condition,
                                                                   states: dict[Atom, State]) -> None:
    expected = any(expr.evaluate(f) is R for f in _futures(expr, states))
    assert expr.can_hold(states) is expected


def test_can_hold_examples_from_design() -> None:
    x, a, b = ATOMS[:3]
    assert (~x).can_hold({x: R}) is False          # ~x after x completed
    assert (a & ~b).can_hold({b: R}) is False       # a & ~b after b completed
    assert (a & ~b).can_hold({}) is True
    assert (x & ~x).can_hold({x: R}) is False


def test_can_hold_is_sound_beyond_exact_limit() -> None:
    many = [Atom(AtomKey("sns", f"{i:026d}".replace("0", "a").replace("1", "b")[:26], "completed"))
            for i in range(8)]
    expr: Condition = many[0]
    for atom in many[1:]:
        expr = expr & atom
    # With 8 pending atoms the approximation is used; it must still say "can hold".
    assert expr.can_hold({}) is True
    assert (expr & ~many[0]).can_hold({many[0]: R}) is False


def test_conditions_refuse_python_truthiness() -> None:
    with pytest.raises(TypeError, match="combine conditions with &"):
        bool(ATOMS[0])
    with pytest.raises(TypeError, match="cannot combine"):
        ATOMS[0] & True  # type: ignore[operator]


@given(expressions)
@settings(max_examples=200, deadline=None)
def test_wire_round_trip(expr: Condition) -> None:
    assert condition_from_proto(condition_to_proto(expr)) == expr


def test_deep_condition_round_trips_without_recursion() -> None:
    expr: Condition = ATOMS[0]
    for _ in range(60):
        expr = ~expr
    assert condition_from_proto(condition_to_proto(expr)) == expr


@pytest.mark.parametrize("nodes, message", [
    ([cpb.ConditionNode(op=cpb.OP_AND)], "lacks operands"),
    ([cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="a" * 26, kind=cpb.ATOM_KIND_COMPLETED))] * 2,
     "leaves 2 expressions"),
    ([cpb.ConditionNode()], "neither an atom"),
    ([cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="../etc", kind=cpb.ATOM_KIND_COMPLETED))],
     "not a Park job id"),
    ([cpb.ConditionNode(atom=cpb.Atom(site="SNS!", job_id="a" * 26, kind=cpb.ATOM_KIND_COMPLETED))],
     "site name"),
    ([cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="a" * 26))], "atom kind"),
    ([cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="a" * 26, kind=cpb.ATOM_KIND_COMPLETED, expr="x"))],
     "only improved"),
])
def test_malformed_postfix_is_refused(nodes: list[cpb.ConditionNode], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        condition_from_proto(cpb.Condition(postfix=nodes))


def test_condition_size_and_depth_limits() -> None:
    atom = cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="a" * 26, kind=cpb.ATOM_KIND_COMPLETED))
    with pytest.raises(InvalidInput, match="nodes; the limit"):
        condition_from_proto(cpb.Condition(postfix=[atom] * 600))
    with pytest.raises(InvalidInput, match="more than 128 atoms"):
        condition_from_proto(cpb.Condition(postfix=[atom] * 129 + [cpb.ConditionNode(op=cpb.OP_AND)] * 128))
    deep = [atom] + [cpb.ConditionNode(op=cpb.OP_NOT)] * 70
    with pytest.raises(InvalidInput, match="nested deeper"):
        condition_from_proto(cpb.Condition(postfix=deep))
