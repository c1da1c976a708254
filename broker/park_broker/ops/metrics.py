"""The broker's metrics, served in Prometheus text format on `GET /metrics`.

`park-broker serve DIR --metrics-listen HOST:PORT` (a bare PORT listens on
127.0.0.1) starts a small plain-HTTP server on the broker's event loop. It
serves what it reads at scrape time and keeps no history:

- `park_jobs{state}`: jobs in the store by state (one `GROUP BY state` query per scrape);
- `park_events_committed_total`: the store's last event sequence number, which
  counts every event ever committed (numbers are never reused), so it survives
  restarts; Prometheus derives events/s with `rate()`;
- `park_transfer_bytes_total{direction}`: bytes moved by fetch jobs, through
  `transfer_meter()` (a `transfer.Progress` callback);
- per peer: `park_peer_last_seq`, `park_peer_connected`, `park_peer_pending_atoms`
  and `park_peer_last_message_age_seconds`.

It never serves job contents, owners, ids or tokens: only counts. The endpoint
has no authentication, which is why it listens on loopback unless told otherwise;
put it behind the site's scraper network, not on the internet.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from park.wire import STATE_NAMES
from park_broker.core.events import EventHub
from park_broker.site import SiteError
from park_broker.core.store import Store
from park_broker.federation.links import PeerStatus

__all__ = ["Metrics", "parse_listen", "CONTENT_TYPE"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_TIMEOUT = 10.0
MAX_REQUEST = 16 * 1024


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT`, `[IPV6]:PORT` or a bare `PORT` (loopback). Raises SiteError."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") if host.startswith("[") else host
    if not host or not port.isdigit() or int(port) > 65535:
        raise SiteError(f"--metrics-listen {listen!r} must be HOST:PORT or PORT (loopback); "
                        "use 0.0.0.0:PORT to listen on every interface")
    return host, int(port)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


class _Text:
    """Accumulates the exposition: a HELP and TYPE line per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Reads the broker's state at scrape time; `start(listen)` serves it until `close()`."""

    def __init__(self, *, store: Store, hub: EventHub, federation: Any = None, site: str = ""):
        self.store = store
        self.hub = hub
        self.federation = federation
        self.site = site
        self.transfer_bytes: dict[str, int] = {"received": 0}
        self._server: asyncio.Server | None = None

    # -- hooks ----------------------------------------------------------------------

    def count_transfer(self, nbytes: int, direction: str = "received") -> None:
        self.transfer_bytes[direction] = self.transfer_bytes.get(direction, 0) + max(0, nbytes)

    def transfer_meter(self, direction: str = "received") -> Callable[[int, int], None]:
        """A `transfer.Progress` callback for one fetch: counts each new byte once, across its retries."""
        seen = 0

        def progress(written: int, size: int) -> None:
            nonlocal seen
            if written > seen:
                self.count_transfer(written - seen, direction)
            seen = written
        return progress

    # -- exposition -----------------------------------------------------------------

    async def render(self) -> str:
        counts = await self.store.count_by_state()
        out = _Text()
        if self.site:
            out.family("park_broker_info", "gauge", "The site this broker serves (always 1).",
                       [({"site": self.site}, 1)])
        out.family("park_jobs", "gauge", "Jobs in the store, by state.",
                   [({"state": name}, counts.get(number, 0)) for number, name in STATE_NAMES.items()])
        out.family("park_events_committed_total", "counter",
                   "Events committed to the store since it was created (the last event sequence number). "
                   "Events per second: rate(park_events_committed_total[1m]).", [({}, self.hub.head)])
        out.family("park_transfer_bytes_total", "counter",
                   "Bytes of files moved between sites by fetch jobs, since the broker started.",
                   [({"direction": d}, n) for d, n in sorted(self.transfer_bytes.items())])
        peers = sorted(self._peers(), key=lambda p: p.peer)
        out.family("park_peer_last_seq", "gauge",
                   "The peer's event sequence number as of its last message on the subscription stream.",
                   [({"peer": p.peer}, p.last_seq) for p in peers])
        out.family("park_peer_connected", "gauge",
                   "1 while the subscription stream to the peer is open (open only while a job waits on it).",
                   [({"peer": p.peer}, int(p.connected)) for p in peers])
        out.family("park_peer_pending_atoms", "gauge", "Conditions on the peer's jobs still waited for.",
                   [({"peer": p.peer}, p.pending_atoms) for p in peers])
        out.family("park_peer_last_message_age_seconds", "gauge",
                   "Seconds since the peer's last message; an open stream hears at least every 10 s.",
                   [({"peer": p.peer}, round(p.idle_seconds, 3)) for p in peers if p.idle_seconds is not None])
        return out.render()

    def _peers(self) -> list[PeerStatus]:
        return self.federation.peer_status() if self.federation is not None else []

    # -- HTTP -----------------------------------------------------------------------

    async def start(self, listen: str) -> str:
        """Listen on `listen` (see parse_listen); returns the bound HOST:PORT. Raises SiteError."""
        host, port = parse_listen(listen)
        try:
            self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        except OSError as exc:
            raise SiteError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        bound = self._server.sockets[0].getsockname()
        address = f"[{bound[0]}]:{bound[1]}" if _is_v6(bound[0]) else f"{bound[0]}:{bound[1]}"
        log.info("serving metrics on http://%s/metrics", address, extra={"address": address})
        return address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, body, extra = await self._respond(head)
            writer.write(_response(status, body, extra, head_only=head.startswith(b"HEAD ")))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass    # a client that went away or sent garbage gets nothing more
        finally:
            writer.close()
            log.debug("metrics request served in %.3f s", time.monotonic() - started)

    async def _respond(self, head: bytes) -> tuple[str, bytes, dict[str, str]]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", b"bad request\n", {}
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path != "/metrics":
            return "404 Not Found", b"metrics are at /metrics\n", {}
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"use GET\n", {"Allow": "GET, HEAD"}
        try:
            return "200 OK", (await self.render()).encode(), {}
        except Exception:  # noqa: BLE001 - logged here, answered as 500: a scrape must not kill the broker
            log.exception("metrics could not be read")
            return "500 Internal Server Error", b"metrics could not be read; see the broker's log\n", {}


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _response(status: str, body: bytes, extra: dict[str, str], head_only: bool) -> bytes:
    content_type = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    headers = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
               "Connection: close", *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body)
