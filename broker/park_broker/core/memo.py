"""Memo keys (DESIGN §4): what makes two submissions the same work.

A key is the sha256 of a canonical JSON document of the job's inputs:

    {"v": 1, "owner": ..., "kind": "call" | "command" | "install",
     "work": target | argv | wheel digest, "args": [...], "kwargs": {...},
     "output": name, "packages": {name: exact version}, "when": postfix condition}

Canonical means stable across processes and hash seeds: keys sorted, compact
separators, floats as Python's shortest round-trip repr. Inside the arguments
every string that names a file is replaced by what the file *is*:

- another job's output (`park://site/files/owner/<job>/name`, or a path under
  the site's file store) by `{"output": <that job's memo key>, "name": name}`,
  so keys chain like a Merkle tree and are known before anything upstream ran;
- an existing regular file on this host by `{"file": <sha256 of its content>}`,
  so path spelling does not matter and a changed file is new work.

This module is pure apart from reading the files it digests.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from park.wheels import sha256_file

VERSION = 1
Resolver = Callable[[str], Any]


# Made once: json.dumps with options builds an encoder per call, about a third of the cost of a memo document.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(value: Any) -> str:
    return _CANONICAL.encode(value)


def key_of(inputs: dict[str, Any]) -> str:
    return digest(canonical(inputs))


def digest(document: str) -> str:
    """The key of a canonical document (`canonical`): what a submission keeps both of computes it once."""
    return hashlib.sha256(document.encode()).hexdigest()


NO_KEY = "-"   # a group's running digest once a member has no memo key: the group has none either


def fold(chain: str, member_key: str) -> str:
    """A group's running digest of its members' memo keys, one more member in (NO_KEY once one has none)."""
    if chain == NO_KEY or not member_key:
        return NO_KEY
    return hashlib.sha256(f"{chain}:{member_key}".encode()).hexdigest()


def group_key(owner: str, size: int, chain: str) -> str:
    """The memo key of a group all `size` of whose members have joined ("" if one has none): a job gated on
    it counts it by this, so a rerun whose members are the same work is the same upstream work."""
    if chain == NO_KEY:
        return ""
    return key_of({"v": VERSION, "owner": owner, "kind": "group", "size": size, "members": chain})


def substitute(value: Any, resolve: Resolver) -> Any:
    """`value` with every string `resolve` knows replaced by what it returns (None: kept)."""
    if isinstance(value, str):
        found = resolve(value)
        return value if found is None else found
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    return value


def strings(value: Any) -> list[str]:
    """Every string inside a JSON value (what substitute may replace)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    return []


@dataclass
class FileDigests:
    """sha256 of files by content, cached by (device, inode, size, mtime)."""

    _cache: dict[tuple[int, int, int, int], str] = field(default_factory=dict)

    def digest(self, path: str) -> str | None:
        """The digest of an existing regular file at absolute `path`, else None. Blocking."""
        if not os.path.isabs(path) or "\0" in path:
            return None
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None   # never read a FIFO or a device: it could block or never end
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp not in self._cache:
            self._cache[stamp] = sha256_file(path)
        return self._cache[stamp]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two memo input documents, in words, component by component."""
    out: list[str] = []
    for component in sorted(set(old) | set(new)):
        a, b = old.get(component), new.get(component)
        if a == b:
            continue
        if component == "packages" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"package {name}: {a.get(name, 'absent')} -> {b.get(name, 'absent')}")
        elif component in ("args", "kwargs"):
            out += [f"{component}{where}: {x} -> {y}" for where, x, y in _walk_diff(a, b, "")]
        else:
            x, y = _contrast(a, b)
            out.append(f"{component}: {x} -> {y}")
    return out


def _walk_diff(a: Any, b: Any, where: str) -> list[tuple[str, str, str]]:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _walk_diff(x, y, f"{where}[{i}]")]
    if isinstance(a, dict) and isinstance(b, dict) and not (_is_input(a) or _is_input(b)):
        return [d for k in sorted(set(a) | set(b)) for d in _walk_diff(a.get(k), b.get(k), f"{where}[{k!r}]")]
    if a == b:
        return []
    if any(isinstance(v, dict) and _is_input(v) for v in (a, b)):
        return [(where, _describe(a), _describe(b))]
    return [(where, *_contrast(a, b))]


def _is_input(value: dict[str, Any]) -> bool:
    """A file or job output that `substitute` put in place of a string: compared whole."""
    return set(value) in ({"file"}, {"output", "name"})


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "output" in value:
        return f"the output {value.get('name')!r} of a job with key {str(value['output'])[:12]}"
    if isinstance(value, dict) and "file" in value:
        return f"a file with content {str(value['file'])[:12]}"
    return _contrast(value, value)[0]


def _text(value: Any) -> str:
    return canonical(value) if not isinstance(value, str) else repr(value)


def _contrast(a: Any, b: Any, width: int = 80) -> tuple[str, str]:
    """Two values as text, each cut to about `width` characters around where they first differ, so
    that what is shown of them differs (two long values never look the same)."""
    x, y = _text(a), _text(b)
    if len(x) <= width and len(y) <= width:
        return x, y
    common = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    start = max(0, common - width // 3)

    def window(text: str) -> str:
        part = text[start:start + width]
        return ("..." if start else "") + part + ("..." if start + width < len(text) else "")
    return window(x), window(y)
