"""The broker's metrics, served in Prometheus text format on `GET /metrics`.

`park-broker serve DIR --metrics-listen HOST:PORT` (a bare PORT listens on
127.0.0.1) starts a small plain-HTTP server on the broker's event loop. It
serves what it reads at scrape time and keeps no history:

- `park_broker_info{site}`: always 1, naming the site;
- `park_jobs{state}`: jobs in the store by state (one `GROUP BY state` query per scrape);
- `park_events_committed_total`: the store's last event sequence number, which
  counts every event ever committed (numbers are never reused), so it survives
  restarts; Prometheus derives events/s with `rate()`;
- `park_transfer_bytes_total{direction}`: bytes moved by fetch jobs, through
  `transfer_meter()` (a `transfer.Progress` callback);
- per peer: `park_peer_last_seq`, `park_peer_connected`, `park_peer_pending_atoms`
  and `park_peer_last_message_age_seconds`.

The text is written by `prometheus_client`: a collector on a private registry
(never the library's global one, which would mix in the process's own
metrics) builds the families from the broker's state when scraped. Reading the
job counts is an await (a SQLite read in a thread) and a collector cannot
await, so each scrape first reads them, then renders with that snapshot.

It never serves job contents, owners, ids or tokens: only counts. The endpoint
has no authentication, which is why it listens on loopback unless told otherwise;
put it behind the site's scraper network, not on the internet.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from park.wire import STATE_NAMES
from park_broker.core.events import EventHub
from park_broker.core.store import Store
from park_broker.federation.links import PeerStatus
from park_broker.site import SiteError

__all__ = ["Metrics", "parse_listen"]

log = logging.getLogger(__name__)

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


class _BrokerCollector(Collector):
    """The broker's families, read from `metrics` when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # Set by Metrics.render for the one synchronous collection that follows its read of the store.
        self.job_counts: dict[int, int] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.job_counts is None:
            raise RuntimeError("the job counts were not read; render metrics with Metrics.render()")
        m = self.metrics
        if m.site:
            info = GaugeMetricFamily("park_broker_info", "The site this broker serves (always 1).",
                                     labels=["site"])
            info.add_metric([m.site], 1)
            yield info
        jobs = GaugeMetricFamily("park_jobs", "Jobs in the store, by state.", labels=["state"])
        for number, name in STATE_NAMES.items():
            jobs.add_metric([name], self.job_counts.get(number, 0))
        yield jobs
        # Counter families get their `_total` suffix from prometheus_client.
        yield CounterMetricFamily(
            "park_events_committed",
            "Events committed to the store since it was created (the last event sequence number). "
            "Events per second: rate(park_events_committed_total[1m]).", value=m.hub.head)
        transfer = CounterMetricFamily(
            "park_transfer_bytes", "Bytes of files moved between sites by fetch jobs, since the broker started.",
            labels=["direction"])
        for direction, nbytes in sorted(m.transfer_bytes.items()):
            transfer.add_metric([direction], nbytes)
        yield transfer
        yield from _peer_families(sorted(m.peers(), key=lambda p: p.peer))


def _peer_families(peers: list[PeerStatus]) -> Iterator[Metric]:
    last_seq = GaugeMetricFamily(
        "park_peer_last_seq", "The peer's event sequence number as of its last message on the subscription stream.",
        labels=["peer"])
    connected = GaugeMetricFamily(
        "park_peer_connected",
        "1 while the subscription stream to the peer is open (open only while a job waits on it).", labels=["peer"])
    pending = GaugeMetricFamily("park_peer_pending_atoms", "Conditions on the peer's jobs still waited for.",
                                labels=["peer"])
    age = GaugeMetricFamily("park_peer_last_message_age_seconds",
                            "Seconds since the peer's last message; an open stream hears at least every 10 s.",
                            labels=["peer"])
    for p in peers:
        last_seq.add_metric([p.peer], p.last_seq)
        connected.add_metric([p.peer], int(p.connected))
        pending.add_metric([p.peer], p.pending_atoms)
        if p.idle_seconds is not None:      # never heard from: no age to report
            age.add_metric([p.peer], round(p.idle_seconds, 3))
    yield from (last_seq, connected, pending, age)


class Metrics:
    """Reads the broker's state at scrape time; `start(listen)` serves it until `close()`."""

    def __init__(self, *, store: Store, hub: EventHub, federation: Any = None, site: str = ""):
        self.store = store
        self.hub = hub
        self.federation = federation
        self.site = site
        self.transfer_bytes: dict[str, int] = {"received": 0}
        self.registry = CollectorRegistry()
        self._collector = _BrokerCollector(self)
        self.registry.register(self._collector)
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

    def peers(self) -> list[PeerStatus]:
        return self.federation.peer_status() if self.federation is not None else []

    # -- exposition -----------------------------------------------------------------

    async def render(self) -> bytes:
        """The exposition (CONTENT_TYPE_LATEST), as of now."""
        counts = await self.store.count_by_state()
        # No await between setting the snapshot and collecting: concurrent scrapes on the loop
        # cannot see each other's counts, and none is left behind for a later scrape.
        self._collector.job_counts = counts
        try:
            return generate_latest(self.registry)
        finally:
            self._collector.job_counts = None

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
            return "200 OK", await self.render(), {}
        except Exception:  # noqa: BLE001 - logged here, answered as 500: a scrape must not kill the broker
            log.exception("metrics could not be read")
            return "500 Internal Server Error", b"metrics could not be read; see the broker's log\n", {}


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _response(status: str, body: bytes, extra: dict[str, str], head_only: bool) -> bytes:
    content_type = CONTENT_TYPE_LATEST if status.startswith("200") else "text/plain; charset=utf-8"
    headers = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
               "Connection: close", *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body)
