"""Delegated credentials: tokens that let one site act at another on the user's behalf.

`credentials()` asks for a delegated token: audience the site that will be
read, scopes only what the job needs, and `confirm` the identity key of the
broker that will present it (by default the service of the enclosing `with`).
Each token is reused until a minute before it expires. A token scoped to one job
or one file lives, unless asked otherwise, as long as the site it is for
accepts (`Site.Info.max_delegation_seconds`, 7 days by default), so that a job
waiting in a queue keeps it; `park renew` replaces those of waiting jobs later.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from park import tokens
from park.agent_client import IssuedToken
from park.auth import REFRESH_BEFORE, TokenSource, token_source
from park.errors import ConfigError
from park.service import Service, default_service

__all__ = ["Credentials", "credentials"]


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
                                                                 lifetime=self.lifetime or self._longest(wanted))
        return issued.token

    def _longest(self, scopes: Sequence[str]) -> int:
        """What to ask for when not told: as long as the site accepts for a job- or file-scoped token."""
        accepted = self.service.info.max_delegation_seconds
        if accepted > 0 and tokens.narrow(tokens.parse_scope(s) for s in scopes):
            return min(accepted, tokens.MAX_NARROW_LIFETIME)
        return tokens.DELEGATED_LIFETIME


def credentials(service: Service, scopes: Sequence[str] = (), lifetime: int = 0,
                destination: Service | None = None) -> Credentials:
    """Delegated credentials for reading from `service`, usable only by `destination`
    (default: the service of the enclosing `with`). `lifetime` in seconds: 0 = as long as `service` accepts for
    a token scoped to one job or file (else 1 hour); at most 6 hours for broader scopes."""
    destination = default_service(destination)
    source = token_source()
    if source is None:
        raise ConfigError("delegation needs your keys: start park-agent (PARK_AUTH_SOCK) or set PARK_KEY_FILE")
    key = destination.info.identity_public_key
    if len(key) != 32:
        raise ConfigError(f"{destination} did not say which key it presents tokens with")
    for scope in scopes:
        tokens.parse_scope(scope)
    return Credentials(audience=service.audience, confirm=tokens.key_id(key), scopes=tuple(scopes), lifetime=lifetime,
                       source=source, service=service)
