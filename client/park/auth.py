"""The client's credentials: session tokens on every call, delegated tokens on request.

A script never handles keys. Tokens come from the user's `park-agent`
(`$PARK_AUTH_SOCK`) or, for robots and CI where no agent runs, from a key file
(`$PARK_KEY_FILE`, see park.signer). A session token is a 10-minute bearer token
for one site; `SessionTokens` keeps one per service and asks for a fresh one a
minute before it expires, so a long script never sends an expired token. With
neither source, calls go out without a token and the broker's refusal says what
to set up.

`credentials()` asks for a delegated token: audience the site that will be
read, scopes only what the job needs, and `confirm` the identity key of the
broker that will present it (by default the service of the enclosing `with`).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc

from park import tokens
from park.agent_client import AgentClient, IssuedToken
from park.errors import ConfigError
from park.signer import KeyFileError, LocalSigner

if TYPE_CHECKING:
    from park.service import Service

__all__ = ["SessionTokens", "Credentials", "credentials", "token_source"]

REFRESH_BEFORE = 60.0


class TokenSource(Protocol):
    def session_token(self, audience: str, *, scopes: Iterable[str] = ...) -> IssuedToken: ...

    def delegate(self, audience: str, *, scopes: Iterable[str], confirm: str, lifetime: int = ...,
                 max_depth: int = ...) -> IssuedToken: ...


def token_source() -> TokenSource | None:
    """The agent if $PARK_AUTH_SOCK is set, else the key file of $PARK_KEY_FILE, else None."""
    if os.environ.get("PARK_AUTH_SOCK"):
        return AgentClient.from_env()
    if os.environ.get("PARK_KEY_FILE"):
        try:
            return LocalSigner.from_env()
        except KeyFileError as exc:
            raise ConfigError(f"PARK_KEY_FILE: {exc}") from None
    return None


class SessionTokens(grpc.AuthMetadataPlugin):
    """Adds `authorization: Bearer <session token>` to every call to one site."""

    def __init__(self, audience: str, source: TokenSource | None):
        self.audience = audience
        self.source = source
        self._token: IssuedToken | None = None
        self._lock = threading.Lock()

    def current(self) -> str | None:
        if self.source is None:
            return None
        with self._lock:
            if self._token is None or self._token.expires - time.time() < REFRESH_BEFORE:
                self._token = self.source.session_token(self.audience)
            return self._token.token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            token = self.current()
        except Exception as exc:  # noqa: BLE001 - handed to gRPC, which fails the call with it
            callback((), exc)
            return
        callback((("authorization", f"Bearer {token}"),) if token else (), None)


@dataclass
class Credentials:
    """Delegated access to `audience` for whoever holds key `confirm` (a destination broker)."""

    audience: str
    confirm: str
    scopes: tuple[str, ...]
    lifetime: int
    source: TokenSource = field(repr=False)
    service: Service = field(repr=False)     # the site the tokens are for
    _issued: dict[tuple[str, ...], IssuedToken] = field(default_factory=dict, repr=False)

    def token(self, scopes: Sequence[str] = ()) -> str:
        """A token for `scopes` (default: the scopes given to `credentials()`), reused until near expiry."""
        wanted = tuple(scopes) or self.scopes
        if not wanted:
            raise ValueError("a delegated token needs scopes, e.g. 'files.read:/owner/job/name'")
        issued = self._issued.get(wanted)
        if issued is None or issued.expires - time.time() < REFRESH_BEFORE:
            issued = self._issued[wanted] = self.source.delegate(self.audience, scopes=wanted, confirm=self.confirm,
                                                                 lifetime=self.lifetime)
        return issued.token


def credentials(service: Service, scopes: Sequence[str] = (), lifetime: int = 0,
                destination: Service | None = None) -> Credentials:
    """Delegated credentials for reading from `service`, usable only by `destination`
    (default: the service of the enclosing `with`). `lifetime` in seconds: 0 = 1 hour, at most 6 hours."""
    from park.service import default_service

    destination = default_service(destination)
    source = token_source()
    if source is None:
        raise ConfigError("delegation needs your keys: start park-agent (PARK_AUTH_SOCK) or set PARK_KEY_FILE")
    key = destination.info.identity_public_key
    if len(key) != 32:
        raise ConfigError(f"{destination} did not say which key it presents tokens with")
    for scope in scopes:
        tokens.parse_scope(scope)
    return Credentials(audience=service.site, confirm=tokens.key_id(key), scopes=tuple(scopes), lifetime=lifetime,
                       source=source, service=service)
