"""The dashboard's web server: the Starlette app, its routes, and running it on a loopback port.

    GET  /?secret=S                          the page (sets the secret cookie; see park.cli.ui.guard)
    GET  /static/...                         its script and style sheet
    GET  /api/stream                         server-sent events: a snapshot of every job, then what changed
    GET  /api/jobs/SITE/ID                   a job's detail (spec, events, cause, root cause, outputs, memo)
    GET  /api/jobs/SITE/ID/graph?depth=N     its condition graph across sites
    GET  /api/jobs/SITE/ID/series            the values it (or a race's contestants) reported over time
    GET  /api/jobs/SITE/ID/logs/stdout|stderr
    GET  /api/jobs/SITE/ID/outputs/NAME      an output's bytes, checked against its recorded sha256 first
    POST /api/jobs/SITE/ID/cancel            {"reason": "..."}

`Dashboard` binds the socket itself (so its URL, with a port chosen by the system
when asked for 0, is known before it serves) and refuses any address that is not
loopback. A broker's refusal becomes the matching HTTP status with the broker's
sentence; an unknown site or a malformed id is 404 or 400.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from park.cli.ui.feed import Feed
from park.cli.ui.guard import Guard
from park.cli.ui.views import job_detail, job_graph, job_series
from park.config import ServiceEntry
from park.errors import ParkError, ServiceError
from park.service import Service
from park.wire import InvalidInput, check_job_id

__all__ = ["Dashboard", "build_app", "parse_listen"]

STATIC = Path(__file__).parent / "static"
PUSH_EVERY = 0.25      # seconds: at most this often a page is sent what changed
_HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 409, "PERMISSION_DENIED": 403,
                "UNAUTHENTICATED": 401, "ALREADY_EXISTS": 409, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class _Refused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT of a loopback address; ValueError saying what to fix otherwise."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8765 (0: any free port)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--listen {listen!r}: the dashboard listens on loopback only (127.0.0.1, ::1 or "
                         "localhost), since it acts with your credentials")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def build_app(feed: Feed, depth: int = 5) -> Starlette:
    """The dashboard's routes over `feed` (not yet guarded: `Dashboard` wraps it in a Guard)."""

    def job_service(request: Request) -> tuple[Service, str, str]:
        site, job_id = request.path_params["site"], request.path_params["job_id"]
        try:
            check_job_id(job_id)
        except InvalidInput as exc:
            raise _Refused(400, f"{exc}") from None
        service = feed.service_of(site)
        if service is None:
            raise _Refused(404, f"no configured service is site {site!r}")
        return service, site, job_id

    async def blocking(work: Callable[[], Any]) -> Any:
        try:
            return await run_in_threadpool(work)
        except ServiceError as exc:
            raise _Refused(_HTTP_STATUS.get(exc.code, 502), str(exc)) from None
        except (ParkError, ValueError) as exc:
            raise _Refused(400, str(exc)) from None

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def stream(request: Request) -> Response:
        async def messages() -> AsyncIterator[str]:
            sub = feed.subscribe()
            try:
                yield f"event: snapshot\ndata: {json.dumps(feed.snapshot())}\n\n"
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sub.ready.wait(), 15)
                    sites = sub.sites
                    sub.sites = False
                    message = sub.take(feed.board)
                    if sites:
                        message["sites"] = feed.sites()
                    yield f"event: update\ndata: {json.dumps(message)}\n\n"   # empty: a keep-alive
                    await asyncio.sleep(PUSH_EVERY)
            finally:
                feed.unsubscribe(sub)
        return StreamingResponse(messages(), media_type="text/event-stream")

    async def detail(request: Request) -> Response:
        service, _, job_id = job_service(request)
        return JSONResponse(await blocking(lambda: job_detail(service, feed.entries, job_id)))

    async def graph(request: Request) -> Response:
        service, site, job_id = job_service(request)
        wanted = request.query_params.get("depth", str(depth))
        if not wanted.isdigit() or int(wanted) > 20:
            raise _Refused(400, "depth must be a whole number from 0 to 20")
        return JSONResponse(await blocking(lambda: job_graph(service, feed.entries, site, job_id, int(wanted))))

    async def series(request: Request) -> Response:
        service, _, job_id = job_service(request)
        return JSONResponse(await blocking(lambda: job_series(service, job_id)))

    async def logs(request: Request) -> Response:
        service, _, job_id = job_service(request)
        stream_name = request.path_params["stream"]
        if stream_name not in ("stdout", "stderr"):
            raise _Refused(404, "logs are stdout or stderr")
        return PlainTextResponse(await blocking(lambda: service.job(job_id).logs(stream_name)))

    async def output(request: Request) -> Response:
        service, _, job_id = job_service(request)
        name = request.path_params["name"]
        spool = Path(tempfile.mkdtemp(prefix="park-ui-"))
        try:
            path = await blocking(lambda: service.job(job_id).download(spool, name))
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        return FileResponse(path, filename=name, media_type="application/octet-stream",
                            background=BackgroundTask(shutil.rmtree, spool, ignore_errors=True))

    async def cancel(request: Request) -> Response:
        service, _, job_id = job_service(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str) or len(reason) > 1000:
            raise _Refused(400, 'send {"reason": "..."} (a string of at most 1000 characters) as JSON')
        state = await blocking(lambda: service.job(job_id).cancel(reason or "cancelled from park ui"))
        return JSONResponse({"state": state})

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Refused)
        return PlainTextResponse(f"park ui: {exc}\n", status_code=exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feed.start(asyncio.get_running_loop())
        yield

    job = "/api/jobs/{site}/{job_id}"
    return Starlette(routes=[
        Route("/", page), Route("/api/stream", stream), Route(job, detail), Route(f"{job}/graph", graph),
        Route(f"{job}/series", series), Route(f"{job}/logs/{{stream}}", logs),
        Route(f"{job}/outputs/{{name}}", output), Route(f"{job}/cancel", cancel, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ], exception_handlers={_Refused: refused}, lifespan=lifespan)


@dataclass
class Dashboard:
    """A dashboard over `entries`, bound to a loopback socket; `url` carries this run's secret."""

    feed: Feed
    server: uvicorn.Server
    sock: socket.socket
    url: str

    @classmethod
    def open(cls, entries: list[ServiceEntry], listen: str = "127.0.0.1:0") -> Dashboard:
        host, port = parse_listen(listen)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)   # before the URL is printed: a request made at once waits instead of being refused
        except OSError as exc:
            sock.close()
            raise ParkError(f"cannot listen on {listen}: {exc.strerror}") from None
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        origins = [f"http://{shown}:{port}"] + ([f"http://localhost:{port}"] if host == "127.0.0.1" else [])
        secret = secrets.token_urlsafe(32)
        feed = Feed(entries)
        app = Guard(build_app(feed), secret, origins)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on")
        return cls(feed, uvicorn.Server(config), sock, f"{origins[0]}/?secret={secret}")

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C) or `stop`."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.feed.close()
            self.sock.close()

    def start(self) -> threading.Thread:
        """Serve in a thread of its own (park demo --ui); `stop` ends it."""
        thread = threading.Thread(target=self.serve, name="park-ui", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.server.should_exit = True
