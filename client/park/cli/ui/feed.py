"""The dashboard's live picture: every job of the user at every configured site, from the Watch streams.

`Feed` opens one `park.Service` per configured service and, in a thread per
site, follows that broker's all-jobs `Watch` stream from the beginning (replay,
then live), reconnecting from the last event seen when the stream breaks or
outlives its session token. Events are applied on the server's event loop to a
`Board` (park.cli.demo.board, the terminal board's own bookkeeping), so the state
has one writer and needs no lock. Each page's push channel is a `Subscription`:
the rows changed and the progress points reported since its last message,
coalesced so a burst of thousands of events costs one message, not thousands.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc

from park._proto import jobs_pb2 as jpb
from park.cli.demo.board import Board, Row
from park.cli.graph import STATE_COLOURS
from park.config import ServiceEntry
from park.errors import ParkError
from park.job import JobEvent
from park.service import Service

__all__ = ["Feed", "SiteLink", "Subscription", "row_json"]

RETRY_EVERY = 1.0   # seconds between attempts to reach a broker whose stream broke


@dataclass(slots=True)
class SiteLink:
    """One configured service, the site it turned out to be, and how its stream is doing."""

    entry: ServiceEntry
    service: Service
    site: str = ""
    status: str = "connecting"
    stream: grpc.Call | None = None

    def json(self) -> dict[str, str]:
        return {"service": self.entry.name, "address": self.entry.address, "site": self.site, "status": self.status}


@dataclass(slots=True)
class Subscription:
    """What one page has not been sent yet."""

    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    sites: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> dict[str, Any]:
        message = {"jobs": [row_json(r) for r in self.rows.values()], "points": self.points}
        self.rows, self.points = {}, []
        self.ready.clear()
        return message


def row_json(row: Row) -> dict[str, Any]:
    return {"site": row.site, "id": row.job_id, "label": row.label, "work": row.work, "state": row.state,
            "attempt": row.attempt, "values": row.values, "detail": row.detail, "owner": row.owner,
            "submitted": row.submitted}


class Feed:
    """See the module docstring. `start` on the server's loop; `close` stops the threads and connections."""

    def __init__(self, entries: list[ServiceEntry]):
        self.links: list[SiteLink] = []
        try:
            for entry in entries:
                self.links.append(SiteLink(entry, Service(entry.address, entry.cert)))
        except ParkError:
            self.close()
            raise
        self.entries = entries
        self.board = Board()
        self._subscriptions: list[Subscription] = []
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the streams (threads) ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for link in self.links:
            threading.Thread(target=self._follow, args=(link,), name=f"park-ui-watch-{link.entry.name}",
                             daemon=True).start()

    def _follow(self, link: SiteLink) -> None:
        last = 0
        while not self._stop.is_set():
            try:
                link.site = link.site or link.service.site
                link.stream = link.service.jobs_stub.Watch(jpb.WatchRequest(job_id="", from_seq=last))
                self._post(self._status, link, "live")
                for item in link.stream:
                    if item.events:
                        last = item.events[-1].seq
                        self._post(self._apply, link.site, [JobEvent.from_proto(event) for event in item.events])
                status = "stream ended; reconnecting"
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                # An expired session token ends the stream; the next one is made with a fresh token.
                status = f"reconnecting ({exc.code().name}: {exc.details()})"
            except ParkError as exc:
                status = f"unreachable: {str(exc).splitlines()[0]}"
            self._post(self._status, link, status)
            self._stop.wait(RETRY_EVERY)

    def _post(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- on the loop ----------------------------------------------------------------------

    def _status(self, link: SiteLink, status: str) -> None:
        link.status = status
        for sub in self._subscriptions:
            sub.sites = True
            sub.ready.set()

    def _apply(self, site: str, events: list[JobEvent]) -> None:
        for event in events:
            row = self.board.apply(site, event)
            point = {"site": site, "id": event.job_id, "time": event.time, "values": row.values} \
                if event.kind == "improved" else None
            for sub in self._subscriptions:
                sub.rows[(site, row.job_id)] = row
                if point is not None:
                    sub.points.append(point)
        for sub in self._subscriptions:
            sub.ready.set()

    def snapshot(self) -> dict[str, Any]:
        return {"sites": self.sites(), "colours": STATE_COLOURS,
                "jobs": [row_json(r) for r in self.board.rows.values()]}

    def sites(self) -> list[dict[str, str]]:
        return [link.json() for link in self.links]

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.remove(sub)

    def service_of(self, site: str) -> Service | None:
        return next((link.service for link in self.links if link.site == site), None)

    def close(self) -> None:
        self._stop.set()
        for link in self.links:
            if link.stream is not None:
                link.stream.cancel()
            link.service.close()
