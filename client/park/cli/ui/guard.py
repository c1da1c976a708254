"""Who may use the dashboard: the holder of this run's secret, from this dashboard's own origin.

The dashboard speaks to the brokers with its user's credentials, so whoever can
reach its port could act as that user. It listens on loopback only, and on top:

- a random secret per run, in the URL `park ui` prints (`/?secret=...`); the page
  answered there sets it as an HttpOnly, SameSite=Strict cookie, and every other
  request must carry that cookie (another account on the machine has neither);
- the `Host` header must name the dashboard's own address (a DNS-rebinding page
  cannot borrow the browser's loopback access);
- an `Origin` header, where present, must be the dashboard's own, and a request
  that changes something (any method but GET and HEAD) must carry one; the
  browser's `Sec-Fetch-Site: cross-site` is refused too.

`Guard` is a pure ASGI middleware doing these checks on every request, the live
push channel included, and answering a refused one with 403 and a sentence
saying why. It adds headers that keep the secret out of referrers and caches and
the page out of frames.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

__all__ = ["Guard", "Refusal"]

_SAFE_METHODS = ("GET", "HEAD")
_HEADERS = [(b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy",
             b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'")]

Scope = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


class Guard:
    """Wraps the dashboard's ASGI app; see the module docstring."""

    def __init__(self, app: Any, secret: str, origins: list[str]):
        self.app = app
        self.secret = secret
        self.origins = frozenset(origins)       # e.g. http://127.0.0.1:8123
        self.hosts = frozenset(o.split("://", 1)[1] for o in origins)
        # Cookies are not kept per port: two dashboards on one machine (park ui beside park demo --ui)
        # must not overwrite each other's.
        self.cookie = f"park_ui_{origins[0].rsplit(':', 1)[1]}"

    def check(self, scope: Scope) -> Refusal | bool:
        """A refusal, or whether the request presented the secret in its URL (the cookie is then set)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if host not in self.hosts:
            return Refusal(f"refused: Host {host!r} is not this dashboard's address "
                           f"(it answers only as {' or '.join(sorted(self.origins))})")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return Refusal(f"refused: requests from other origins ({origin}) may not use this dashboard")
        if origin is None and scope.get("method", "GET") not in _SAFE_METHODS:
            return Refusal("refused: a request that changes something must say its Origin")
        if headers.get("sec-fetch-site") == "cross-site":
            return Refusal("refused: cross-site requests may not use this dashboard")
        cookie = SimpleCookie()
        cookie.load(headers.get("cookie", ""))
        if self.cookie in cookie and hmac.compare_digest(cookie[self.cookie].value, self.secret):
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("secret", [""])[0]
        if scope["path"] == "/" and hmac.compare_digest(given, self.secret):
            return True
        return Refusal("refused: this dashboard needs the secret in the URL `park ui` printed "
                       "(open that URL; it is different every run)")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":            # the dashboard has no WebSocket: nothing else gets through
            await send({"type": "websocket.close", "code": 1008})
            return
        verdict = self.check(scope)
        if isinstance(verdict, Refusal):
            body = (f"park ui: {verdict.reason}\n").encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), *_HEADERS]})
            await send({"type": "http.response.body", "body": body})
            return
        extra = list(_HEADERS)
        if verdict:
            extra.append((b"set-cookie", f"{self.cookie}={self.secret}; HttpOnly; SameSite=Strict; Path=/".encode()))

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
