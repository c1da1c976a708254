"""The safe expression language of `job.improved("chisq < 1.2 and step > 10")`.

Grammar (DESIGN §2): numbers, names of reported values, `+ - * / **`, unary
`- +`, comparisons (chains allowed), `and or not`, parentheses, and calls of
`abs min max sqrt log exp`. Nothing else is accepted: no attributes, no
subscripts, no other calls, no strings, no keywords. An expression is parsed
with `ast` and compiled into a tree of closures; nothing is ever `eval`ed.

Evaluation is in floating point, so `10 ** 10 ** 10` overflows at once instead
of building a huge integer. An evaluation that cannot give an answer (a name
not reported yet, a division by zero, an overflow, a log of a negative) means
"not yet" (`evaluate` returns False), never an exception. The client parses
expressions when they are written and the broker parses them again.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from park.conditions import State

__all__ = ["Expression", "ExpressionError", "improved_state", "MAX_LENGTH", "MAX_DEPTH", "MAX_NODES"]

MAX_LENGTH = 500
MAX_DEPTH = 32
MAX_NODES = 200

Env = Mapping[str, float]
Fn = Callable[[Env], float]

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_FUNCTIONS: dict[str, tuple[Callable[..., float], int, int]] = {   # name: (function, min args, max args)
    "abs": (abs, 1, 1), "sqrt": (math.sqrt, 1, 1), "log": (math.log, 1, 1), "exp": (math.exp, 1, 1),
    "min": (min, 2, 16), "max": (max, 2, 16),
}


class ExpressionError(ValueError):
    """The expression is outside the language or its limits; the text says where."""


class _NotYet(Exception):
    pass


class Expression:
    """A parsed, checked expression. `evaluate(values)` is True when it holds."""

    __slots__ = ("source", "names", "_fn")

    def __init__(self, source: str):
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError("an improved(...) expression must be a non-empty string")
        if len(source) > MAX_LENGTH:
            raise ExpressionError(f"expression is {len(source)} characters long; the limit is {MAX_LENGTH}")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"expression {source!r} is not valid: {exc.msg}") from None
        count = sum(1 for _ in ast.walk(tree))
        if count > MAX_NODES:
            raise ExpressionError(f"expression has {count} parts; the limit is {MAX_NODES}")
        self.source = source
        self.names: frozenset[str] = frozenset()
        names: set[str] = set()
        self._fn = _compile(tree.body, 1, names)
        self.names = frozenset(names)

    def evaluate(self, values: Env) -> bool:
        try:
            return bool(self._fn(values))
        except (_NotYet, ArithmeticError, ValueError, TypeError):
            # TypeError: a negative number to a fractional power is complex.
            return False

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _compile(node: ast.expr, depth: int, names: set[str]) -> Fn:
    if depth > MAX_DEPTH:
        raise ExpressionError(f"expression is nested deeper than {MAX_DEPTH}")
    d = depth + 1
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            value = float(node.value)
        except OverflowError:
            raise ExpressionError(f"number {str(node.value)[:20]}... is too large for a float") from None
        if not math.isfinite(value):
            raise ExpressionError(f"number {str(node.value)[:20]}... is too large for a float")
        return lambda env: value
    if isinstance(node, ast.Name):
        name = node.id
        if name in _FUNCTIONS:
            raise ExpressionError(f"{name} is a function; call it as {name}(...)")
        names.add(name)

        def lookup(env: Env) -> float:
            if name not in env:
                raise _NotYet
            return float(env[name])
        return lookup
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op, left, right = _BINARY[type(node.op)], _compile(node.left, d, names), _compile(node.right, d, names)
        return lambda env: op(left(env), right(env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        inner = _compile(node.operand, d, names)
        if isinstance(node.op, ast.Not):
            return lambda env: float(not inner(env))
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return lambda env: sign * inner(env)
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, d, names) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda env: float(all(p(env) for p in parts))
        return lambda env: float(any(p(env) for p in parts))
    if isinstance(node, ast.Compare) and all(type(o) in _COMPARE for o in node.ops):
        terms = [_compile(node.left, d, names)] + [_compile(c, d, names) for c in node.comparators]
        ops = [_COMPARE[type(o)] for o in node.ops]

        def compare(env: Env) -> float:
            values = [t(env) for t in terms]
            return float(all(op(a, b) for op, a, b in zip(ops, values, values[1:])))
        return compare
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args):
        fn, low, high = _FUNCTIONS[node.func.id]
        if not low <= len(node.args) <= high:
            raise ExpressionError(f"{node.func.id}() takes {low}{'' if low == high else f' to {high}'} arguments")
        args = [_compile(a, d, names) for a in node.args]
        return lambda env: float(fn(*(a(env) for a in args)))
    raise ExpressionError(f"{ast.unparse(node)[:60]!r} is not allowed; use numbers, reported names, "
                          "+ - * / **, comparisons, and/or/not, abs min max sqrt log exp")


def improved_state(expr: Expression, reports: Iterable[Mapping[str, float]], *, finished: bool,
                   result: Any = None) -> State:
    """The state of `job.improved(expr)` (DESIGN §2) from the job's reports so far.

    READY if any report satisfies it, or, for a job that completed, its result
    (a JSON object of numbers, laid over its last report); CANCELLED if the job
    has finished without that; PENDING while it may still happen. Pass `result`
    only for a job that completed.
    """
    last: Mapping[str, float] = {}
    for values in reports:
        if expr.evaluate(values):
            return State.READY
        last = values
    if isinstance(result, dict):
        final = {**last, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
        if expr.evaluate(final):
            return State.READY
    return State.CANCELLED if finished else State.PENDING
