"""Capability scopes (DESIGN §6): their one text form, parsing, coverage and narrowness, and
`TokenError`, the one error of token handling (park.tokens), which parsing a scope raises first.

A scope is an action (`jobs.submit`, `packages.upload`, `admin`) or an action
on a path (`jobs.read:/<job>`, `files.read:/<owner>/<job>/<name>`, a trailing
`/` for a directory). Parsing refuses rather than normalizes, so a scope always
formats back to exactly its text.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NoReturn

PLAIN_ACTIONS = frozenset({"jobs.submit", "packages.upload", "admin"})
PATH_ACTIONS = frozenset({"jobs.read", "files.read"})
MAX_SCOPES = 64
MAX_SCOPE_LENGTH = 1024

Kind = Literal["unauthenticated", "permission_denied", "invalid_argument"]

# Deliberately narrow: anything a shell, a URL or a file system treats
# specially (%, \, whitespace, control characters, non-ASCII) is refused.
_SEGMENT = re.compile(r"[A-Za-z0-9_.+@=,~-]+")


class TokenError(Exception):
    """A token or scope was refused. `kind` maps to a gRPC status at the servicer."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message


def refuse(message: str) -> NoReturn:
    """TokenError("unauthenticated"): the token is not good here."""
    raise TokenError("unauthenticated", message)


def bad_request(message: str) -> NoReturn:
    """TokenError("invalid_argument"): what was asked for can never be a token or a scope."""
    raise TokenError("invalid_argument", message)



@dataclass(frozen=True, slots=True)
class Scope:
    """One parsed capability; `segments` is None for an action without a path.

    Actions never imply one another: `admin` does not cover `jobs.submit` (the
    broker's users file decides what an admin may do).
    """

    action: str
    segments: tuple[str, ...] | None = None
    directory: bool = False

    def __str__(self) -> str:
        if self.segments is None:
            return self.action
        path = "/" + "/".join(self.segments)
        return f"{self.action}:{path}/" if self.directory and self.segments else f"{self.action}:{path}"


def parse_scope(text: str) -> Scope:
    """Parse one scope, rejecting rather than normalizing; formats back to exactly `text`.

    Refused: `..`, `.`, empty segments, any `%` (so no percent-encoded dot can be
    decoded into `..` further down), NUL and characters outside a small safe set,
    relative paths, a path on a plain action, a path action without a path.
    """
    if len(text) > MAX_SCOPE_LENGTH:
        bad_request(f"scope longer than {MAX_SCOPE_LENGTH} characters")
    if "\x00" in text:
        bad_request(f"scope {text.replace(chr(0), '?')!r}: contains NUL")
    action, sep, path = text.partition(":")
    if action in PLAIN_ACTIONS:
        if sep:
            bad_request(f"scope {text!r}: {action} takes no path")
        return Scope(action)
    if action not in PATH_ACTIONS:
        bad_request(f"scope {text!r}: unknown action {action!r}")
    if not path:
        bad_request(f"scope {text!r}: {action} needs a path, e.g. {action}:/john/")
    if "%" in path:
        bad_request(f"scope {text!r}: percent-encoding is not allowed in paths")
    if not path.startswith("/"):
        bad_request(f"scope {text!r}: the path must be absolute (start with '/')")
    if path == "/":
        return Scope(action, (), True)
    directory = path.endswith("/")
    segments = tuple((path[1:-1] if directory else path[1:]).split("/"))
    for seg in segments:
        if seg == "":
            bad_request(f"scope {text!r}: empty path segment")
        if seg in (".", ".."):
            bad_request(f"scope {text!r}: {seg!r} segment")
        if not _SEGMENT.fullmatch(seg):
            bad_request(f"scope {text!r}: segment {seg!r} has a character outside [A-Za-z0-9_.+@=,~-]")
    return Scope(action, segments, directory)


def covers(granted: Scope, wanted: Scope) -> bool:
    """True when holding `granted` allows everything `wanted` allows.

    Paths compare segment by segment; a directory covers itself and what lies
    strictly below it, a file only itself.
    """
    if granted.action != wanted.action:
        return False
    if granted.segments is None or wanted.segments is None:
        return granted.segments is None and wanted.segments is None
    if not granted.directory:
        return not wanted.directory and granted.segments == wanted.segments
    n = len(granted.segments)
    return wanted.segments[:n] == granted.segments and (wanted.directory or len(wanted.segments) > n)


def covered(granted: Iterable[Scope], wanted: Scope) -> bool:
    return any(covers(g, wanted) for g in granted)


def parse_scopes(scopes: Iterable[str]) -> tuple[Scope, ...]:
    parsed = tuple(parse_scope(s) for s in scopes)
    if not parsed:
        bad_request("a token needs at least one scope")
    if len(parsed) > MAX_SCOPES:
        bad_request(f"more than {MAX_SCOPES} scopes")
    return parsed


def narrow(scopes: Iterable[Scope]) -> bool:
    """Whether every scope names one job (`jobs.read:/<job>`) or one file (`files.read:/<owner>/<job>/<name>`)."""
    scopes = list(scopes)
    return bool(scopes) and all(
        s.segments is not None and not s.directory and len(s.segments) >= (1 if s.action == "jobs.read" else 3)
        for s in scopes)
