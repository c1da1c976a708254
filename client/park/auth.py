"""The client's credentials: session tokens on every call, delegated tokens on request.

A script never handles keys. Tokens come from the user's `park-agent`
(`$PARK_AUTH_SOCK`) or, for robots and CI where no agent runs, from a key file
(`$PARK_KEY_FILE`, see park.signer). A session token is a 10-minute bearer token
for one site; `SessionTokens` keeps one per service and asks for a fresh one a
minute before it expires, so a long script never sends an expired token. With
neither source, calls go out without a token and the broker's refusal says what
to set up.
Delegated tokens are asked for in park.delegation.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Protocol

import grpc

from park.agent_client import AgentClient, IssuedToken
from park.errors import ConfigError
from park.signer import KeyFileError, LocalSigner

__all__ = ["SessionTokens", "TokenSource", "token_source"]

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
