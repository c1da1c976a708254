"""Who may use a site: the users file, the revocation list, and token checking.

    DIR/users.toml       [users.NAME] keys = ["ed25519:..."], allow = ["submit", "upload", "admin"],
                         unix_user = "ACCOUNT" (the account NAME's jobs run as; execution.accounts),
                         max_running = N, max_waiting = M (quotas; core.fairness)
    DIR/revoked.txt      one revoked link id (sha256 hex) per line

`Authority.authenticate` turns the bearer token of a call into an `Identity`:
the token must verify (park.tokens) for this site's name and identity key as audience, with a
root key registered for its subject, no revoked link, and, for a token bound
to a key (`confirm`), a caller that proved possession of that key. The files
are re-read when they change, so `park-broker users add` and
`park-broker tokens revoke` take effect on a running broker within a second;
a users file that no longer parses leaves the last good one in force, and the
error is logged.

Permissions are the intersection of what the users file allows and what the
token's scopes grant: a delegated token never carries more than its scopes,
whatever its subject may do.
"""
from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from park import tokens
from park.config import replace_file
from park.wire import InvalidInput, check_name
from park_broker.core.fairness import NO_LIMITS, Limits
from park_broker.execution.accounts import AccountError, default_account_name, lookup

ALLOWED = ("submit", "upload", "admin")
# What each permission needs from the token's scopes (a path scope checks its root).
_SCOPE_OF = {"submit": "jobs.submit", "upload": "packages.upload", "admin": "admin", "read": "jobs.read:/"}
RELOAD_EVERY = 1.0
log = logging.getLogger(__name__)


class UsersError(RuntimeError):
    """The users or revocation file is wrong; the text says how to fix it."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller of one RPC, as the policy interceptor established it."""

    user: str
    permissions: frozenset[str]
    token: tokens.Verified | None = None   # None in local-only mode and for peers
    peer: Any = None                        # the peers.Peer calling, for broker-to-broker calls

    @property
    def admin(self) -> bool:
        return "admin" in self.permissions


@dataclass
class _User:
    keys: list[bytes]
    allow: frozenset[str]
    unix_user: str = ""
    limits: Limits = NO_LIMITS


@dataclass
class Authority:
    site: str
    directory: Path
    audience: str     # what tokens for this site must name: its name and its identity key (park.tokens)
    max_delegation: int = 7 * 24 * 3600   # the longest-lived delegated token it accepts (serve --max-delegation)
    now: Callable[[], float] = time.time
    _users: dict[str, _User] = field(default_factory=dict)
    _revoked: frozenset[str] = frozenset()
    _stamp: tuple[float, float] = (-1.0, -1.0)
    _checked: float = 0.0
    generation: int = 0    # changes whenever who may use the site does: open streams re-check their tokens
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def users_path(self) -> Path:
        return self.directory / "users.toml"

    @property
    def revoked_path(self) -> Path:
        return self.directory / "revoked.txt"

    def has_users(self) -> bool:
        self._reload()
        return bool(self._users)

    def verify(self, token_text: str, presenter_key_id: str | None = None) -> tokens.Verified:
        """A token checked for this site, its registered users and revocations; raises tokens.TokenError."""
        self._reload()
        verified = tokens.verify(token_text, audience=self.audience, revoked=self._revoked,
                                 trusted_root_keys=lambda subject: self._keys(subject),
                                 presenter_key_id=presenter_key_id, now=self.now())
        if verified.confirm and verified.lifetime > self.max_delegation:
            raise tokens.TokenError("unauthenticated", (
                f"the delegated token was issued for {verified.lifetime} s; site {self.site} accepts at most "
                f"{self.max_delegation} s: ask for less (`park renew` replaces a waiting job's before it expires)"))
        return verified

    def authenticate(self, token_text: str, presenter_key_id: str | None = None) -> Identity:
        """The identity a token establishes; raises tokens.TokenError (kind "unauthenticated")."""
        verified = self.verify(token_text, presenter_key_id)
        user = self._users[verified.subject]
        granted = frozenset(p for p in (*user.allow, "read") if verified.allows(_SCOPE_OF[p]))
        return Identity(verified.subject, granted, verified)

    def current_generation(self) -> int:
        """`generation`, after re-reading the files if they may have changed."""
        self._reload()
        return self.generation

    def unix_user(self, name: str) -> str:
        """The Unix account user `name` is mapped to ("" for none, or no such user)."""
        self._reload()
        user = self._users.get(name)
        return user.unix_user if user else ""

    def limits(self, name: str) -> Limits:
        """User `name`'s quotas at this site (none for an unknown user)."""
        self._reload()
        user = self._users.get(name)
        return user.limits if user else NO_LIMITS

    def names(self) -> list[str]:
        self._reload()
        return sorted(self._users)

    def _keys(self, subject: str) -> Iterable[bytes]:
        user = self._users.get(subject)
        return user.keys if user else ()

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return
        with self._lock:
            self._checked = now
            stamp = (_mtime(self.users_path), _mtime(self.revoked_path))
            if stamp != self._stamp:
                try:
                    users = load_users(self.users_path)
                except UsersError as exc:
                    if self._stamp == (-1.0, -1.0):   # at start there is no good one to keep: refuse to serve
                        raise
                    log.error("%s; the users file as it was before stays in force until it is fixed", exc)
                    users = self._users
                self._users = users
                self._revoked = load_revoked(self.revoked_path)
                self._stamp = stamp
                self.generation += 1


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return 0.0


def load_users(path: Path) -> dict[str, _User]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
        return {name: _User([tokens.parse_public_key(k) for k in entry["keys"]],
                            frozenset(entry.get("allow", ())), str(entry.get("unix_user", "")),
                            Limits(int(entry.get("max_running", 0)), int(entry.get("max_waiting", 0))))
                for name, entry in data.get("users", {}).items()}
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, AttributeError, tokens.TokenError) as exc:
        raise UsersError(f"{path} is not a valid users file: {exc}") from None


def load_revoked(path: Path) -> frozenset[str]:
    if not path.exists():
        return frozenset()
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())


def add_user(directory: Path, name: str, key: str, allow: Iterable[str], unix_user: str | None = None) -> None:
    """Register `name` with public key `key` ("ed25519:..."); adds the key if the user exists.

    `unix_user` None maps a new user to the account of the same name when there is one."""
    try:
        check_name(name, "user name")
        tokens.check_subject(name)   # a user no token can name could never call the site
    except InvalidInput as exc:
        raise UsersError(str(exc)) from None
    except tokens.TokenError as exc:
        raise UsersError(f"user name {name!r}: {exc.message}") from None
    try:
        tokens.parse_public_key(key)
    except tokens.TokenError as exc:
        raise UsersError(f"{exc.message}; use the line `park-agent pubkey` prints") from None
    users = _entries(directory)
    entry = users.setdefault(name, {"keys": []})
    if key not in entry["keys"]:
        entry["keys"].append(key)
    if unix_user is None and "unix_user" not in entry:
        unix_user = default_account_name(name)
    _update(entry, allow, unix_user)
    _write_users(directory, users)


def set_user(directory: Path, name: str, allow: Iterable[str] | None, unix_user: str | None,
             max_running: int | None = None, max_waiting: int | None = None) -> None:
    """Change what `name` may do, the account their jobs run as ("" for none), or their quotas (0 for
    none); None leaves each as it is."""
    users = _entries(directory)
    if name not in users:
        raise UsersError(f"site has no user {name!r}; add them with `park-broker users add DIR {name} --key ...`")
    _update(users[name], allow, unix_user)
    for key, value in (("max_running", max_running), ("max_waiting", max_waiting)):
        if value is not None and value < 0:
            raise UsersError(f"--{key.replace('_', '-')} must be 0 (no limit) or more")
        if value:
            users[name][key] = value
        elif value == 0:
            users[name].pop(key, None)
    _write_users(directory, users)


def _update(entry: dict[str, Any], allow: Iterable[str] | None, unix_user: str | None) -> None:
    if allow is not None:
        allowed = frozenset(allow)
        unknown = allowed - set(ALLOWED)
        if unknown:
            raise UsersError(f"unknown permission {sorted(unknown)[0]!r}; choose from {', '.join(ALLOWED)}")
        entry["allow"] = sorted(allowed)
    entry.setdefault("allow", ["submit"])
    if unix_user:
        try:
            lookup(unix_user)
        except AccountError as exc:
            raise UsersError(str(exc)) from None
        entry["unix_user"] = unix_user
    elif unix_user == "":
        entry.pop("unix_user", None)


def remove_user(directory: Path, name: str) -> None:
    """Forget `name`: a running broker refuses the user's calls, open streams included, within seconds."""
    users = _entries(directory)
    if users.pop(name, None) is None:
        raise UsersError(f"site has no user {name!r}; `park-broker users list DIR` shows who it has")
    _write_users(directory, users)


def _entries(directory: Path) -> dict[str, dict[str, Any]]:
    return {n: {"keys": [tokens.format_public_key(k) for k in u.keys], "allow": sorted(u.allow),
                **({"unix_user": u.unix_user} if u.unix_user else {}),
                **({"max_running": u.limits.max_running} if u.limits.max_running else {}),
                **({"max_waiting": u.limits.max_waiting} if u.limits.max_waiting else {})}
            for n, u in load_users(directory / "users.toml").items()}


def _write_users(directory: Path, users: dict[str, dict[str, Any]]) -> None:
    # A real writer quotes names such as "john.smith", which a bare key would turn into nested tables.
    _replace(directory / "users.toml", tomli_w.dumps({"users": dict(sorted(users.items()))}))


def revoke(directory: Path, link_id: str) -> None:
    if len(link_id) != 64 or any(c not in "0123456789abcdef" for c in link_id):
        raise UsersError("a revocation id is the 64 hex characters of a link's sha256")
    path = directory / "revoked.txt"
    revoked = load_revoked(path) | {link_id}
    _replace(path, "".join(f"{r}\n" for r in sorted(revoked)))


def _replace(path: Path, text: str) -> None:
    """Who may use the site is the operator's business: both files stay 0600."""
    replace_file(path, text, mode=0o600)
