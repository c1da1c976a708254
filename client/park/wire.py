"""Conversions between Park's Python values and their wire messages, and the
limits every party checks before trusting a message.

Both the client and the broker call `condition_from_proto` and the `check_*`
functions, so a bad input is refused with the same words on both sides. Every
check raises `InvalidInput` with a message that says what to fix.
"""
from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from park._proto import conditions_pb2 as cpb
from park._proto import jobs_pb2 as jpb
from park.counting import Count
from park.conditions import ATOM_KINDS, And, Atom, AtomKey, Condition, Not, Or

__all__ = [
    "InvalidInput", "condition_to_proto", "condition_from_proto", "check_job_id", "check_site",
    "check_target", "check_name", "STATE_NAMES", "TERMINAL_STATES", "JOB_ID_LENGTH", "ORDERED_BATCHES",
    "MAX_CONDITION_NODES", "MAX_CONDITION_ATOMS", "MAX_CONDITION_DEPTH", "MAX_ARGS_BYTES",
]

MAX_CONDITION_NODES = 512
MAX_CONDITION_ATOMS = 128
MAX_CONDITION_DEPTH = 64
MAX_ARGS_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
MAX_EXPR_LENGTH = 500
JOB_ID_LENGTH = 26

_JOB_ID = re.compile(r"[a-z2-7]{26}")
_SITE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_TARGET = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")

STATE_NAMES = {
    jpb.JOB_STATE_WAITING: "waiting",
    jpb.JOB_STATE_QUEUED: "queued",
    jpb.JOB_STATE_RUNNING: "running",
    jpb.JOB_STATE_COMPLETED: "completed",
    jpb.JOB_STATE_FAILED: "failed",
    jpb.JOB_STATE_CANCELLED: "cancelled",
}
TERMINAL_STATES = frozenset((jpb.JOB_STATE_COMPLETED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED))
# The capability (`InfoResponse.capabilities`) of a broker that decides a client's numbered SubmitMany batches
# in the order they were sent: only to such a broker does a client send a batch before the last is answered
# (an older one would decide them as they come, and refuse a job naming one of a batch not yet decided).
ORDERED_BATCHES = "ordered-batches"

_KIND_TO_PROTO = {
    "completed": cpb.ATOM_KIND_COMPLETED,
    "cancelled": cpb.ATOM_KIND_CANCELLED,
    "finished": cpb.ATOM_KIND_FINISHED,
    "improved": cpb.ATOM_KIND_IMPROVED,
    "count": cpb.ATOM_KIND_COUNT,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_OPS = {And: cpb.OP_AND, Or: cpb.OP_OR}


class InvalidInput(ValueError):
    """A message or argument that breaks a rule; the text says which and how to fix it."""


def check_job_id(job_id: str, what: str = "job id") -> str:
    if not _JOB_ID.fullmatch(job_id):
        shown = job_id[:40] + ("..." if len(job_id) > 40 else "")
        raise InvalidInput(f"{what} {shown!r} is not a Park job id ({JOB_ID_LENGTH} characters of a-z and 2-7)")
    return job_id


def check_site(site: str) -> str:
    if not _SITE.fullmatch(site):
        raise InvalidInput(f"site name {site[:70]!r} must be 1-63 characters of a-z, 0-9 and '-', "
                           "starting with a letter")
    return site


def check_target(target: str) -> str:
    if not _TARGET.fullmatch(target) or len(target) > 500:
        raise InvalidInput(f"callable {target[:100]!r} must look like 'package.module:function'")
    return target


def check_name(name: str, what: str = "output name") -> str:
    """A single file name: no separators, no '..', no NUL, no leading dot."""
    if not _NAME.fullmatch(name) or name in {".", ".."}:
        raise InvalidInput(f"{what} {name[:100]!r} must be a plain file name (letters, digits, '_.+-', "
                           "not starting with '.', no '/', at most 255 characters)")
    return name


def check_json(text: str, kind: type, what: str) -> str:
    """`text` is a JSON array or object (`kind`) that every party can read back the same way: at most
    MAX_ARGS_BYTES of UTF-8, nested at most MAX_JSON_DEPTH deep, finite numbers only, no lone surrogates."""
    parse_json(text, kind, what)
    return text


def parse_json(text: str, kind: type, what: str) -> Any:
    """The value of `text`, checked as `check_json` says; an empty `text` is an empty `kind`."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} holds a lone surrogate, which is not text; send valid UTF-8") from None
    if size > MAX_ARGS_BYTES:
        raise InvalidInput(f"{what} is larger than {MAX_ARGS_BYTES} bytes; pass a file instead")
    if text:
        try:
            value = _DECODER.decode(text)
        except RecursionError:
            raise InvalidInput(f"{what} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
        except ValueError as exc:
            raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
        if not isinstance(value, kind):
            raise InvalidInput(f"{what} must be a JSON {'array' if kind is list else 'object'}")
        _check_value(value, what, 1)
        return value
    return kind()


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:30]} is too large for a float")
    return value


# Made once: json.loads with hooks builds a decoder per call, which costs more than decoding a job's arguments.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _check_value(value: object, what: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"{what} is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:   # "\ud800" decodes to a lone surrogate: not text anyone can store
            raise InvalidInput(f"{what} holds a lone surrogate, which is not text; send valid UTF-8") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(key, what, depth)
            _check_value(item, what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, what, depth + 1)


def condition_to_proto(cond: Condition | None) -> cpb.Condition:
    """Postfix form of `cond`; None (no condition) is the empty, always-true form."""
    out = cpb.Condition()
    if cond is None:
        return out
    stack: list[tuple[Condition, bool]] = [(cond, False)]
    # Iterative post-order walk: a deep expression must not hit the recursion limit.
    while stack:
        node, expanded = stack.pop()
        if isinstance(node, Atom):
            out.postfix.add().atom.CopyFrom(atom_to_proto(node.key))
        elif expanded:
            out.postfix.add().op = cpb.OP_NOT if isinstance(node, Not) else _OPS[type(node)]
        elif isinstance(node, Not):
            stack += [(node, True), (node.inner, False)]
        elif isinstance(node, (And, Or)):
            stack += [(node, True), (node.right, False), (node.left, False)]
        else:
            raise InvalidInput(f"cannot send a {type(node).__name__} to a broker")
    return out


def atom_to_proto(key: object) -> cpb.Atom:
    if not isinstance(key, AtomKey):
        raise InvalidInput(f"atom {key!r} is not bound to a job; use job.iscompleted and friends")
    return cpb.Atom(site=key.site, job_id=key.job_id, kind=_KIND_TO_PROTO[key.kind], expr=key.expr)


def atom_from_proto(msg: cpb.Atom) -> AtomKey:
    kind = _KIND_FROM_PROTO.get(msg.kind)
    if kind is None:
        raise InvalidInput(f"atom kind {msg.kind} is not one of {', '.join(ATOM_KINDS)}")
    check_site(msg.site)
    check_job_id(msg.job_id, "atom's job id")
    if kind == "improved":
        if not msg.expr or len(msg.expr) > MAX_EXPR_LENGTH:
            raise InvalidInput(f"an improved(...) atom needs an expression of 1-{MAX_EXPR_LENGTH} characters")
    elif kind == "count":
        try:
            Count.parse(msg.expr)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    elif msg.expr:
        raise InvalidInput(f"only improved(...) and counting atoms take an expression, not {kind}")
    # Interned: a broker holds an atom per waiting job, naming a job whose id it holds already.
    return AtomKey(sys.intern(msg.site), sys.intern(msg.job_id), kind, msg.expr)


def condition_from_proto(msg: cpb.Condition) -> Condition | None:
    """Rebuild and bound-check a postfix condition; None when it is empty."""
    nodes = msg.postfix
    if not nodes:
        return None
    if len(nodes) > MAX_CONDITION_NODES:
        raise InvalidInput(f"condition has {len(nodes)} nodes; the limit is {MAX_CONDITION_NODES}")
    stack: list[tuple[Condition, int]] = []
    atoms = 0
    for i, node in enumerate(nodes):
        which = node.WhichOneof("node")
        if which == "atom":
            atoms += 1
            if atoms > MAX_CONDITION_ATOMS:
                raise InvalidInput(f"condition names more than {MAX_CONDITION_ATOMS} atoms")
            stack.append((Atom(atom_from_proto(node.atom)), 1))
            continue
        arity = {cpb.OP_AND: 2, cpb.OP_OR: 2, cpb.OP_NOT: 1}.get(node.op) if which == "op" else None
        if arity is None:
            raise InvalidInput(f"condition node {i} is neither an atom nor AND/OR/NOT")
        if len(stack) < arity:
            raise InvalidInput(f"condition node {i} ({cpb.Op.Name(node.op)}) lacks operands; "
                               "the postfix form is malformed")
        operands = [stack.pop() for _ in range(arity)][::-1]
        depth = 1 + max(d for _, d in operands)
        if depth > MAX_CONDITION_DEPTH:
            raise InvalidInput(f"condition is nested deeper than {MAX_CONDITION_DEPTH}")
        if node.op == cpb.OP_NOT:
            built: Condition = Not(operands[0][0])
        else:
            built = (And if node.op == cpb.OP_AND else Or)(operands[0][0], operands[1][0])
        stack.append((built, depth))
    if len(stack) != 1:
        raise InvalidInput(f"condition leaves {len(stack)} expressions instead of one; "
                           "the postfix form is malformed")
    return stack[0][0]


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
          "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40, "P": 10**15, "PB": 10**15,
          "PIB": 2**50}


def parse_size(text: str | int) -> int:
    """Bytes from "8GiB", "512MB", "1.5G" or a plain number of bytes; ValueError saying what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size of {text} bytes: it must be 0 or more")
        return text
    match = _SIZE.fullmatch(str(text))
    unit = (match.group(2) or "").upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{str(text)[:40]!r} is not a size: write bytes, or a number with KiB, MiB, GiB, TiB "
                         "(or KB, MB, GB, TB)")
    return int(float(match.group(1)) * _UNITS[unit])
