"""A test-only Files server over real TLS, and a TCP proxy that cuts streams.

Shared by tests/test_transfer.py and bench/transfer.py. `FilesServicer` is the
thinnest servicer that can be built from park_broker.transfer.download (the broker's
own is wired by server.py): optional token check, `authorize_read`,
`resolve_path`, `read_chunks`, and BrokerError codes mapped to statuses.
`CuttingProxy` forwards TCP between a client and the server and aborts the
n-th connection after `budgets[n]` bytes from the server, so a stream breaks
mid-transfer the way a lost network does (TLS and all).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from park import tokens
from park._proto import files_pb2, files_pb2_grpc
from park_broker.errors import BrokerError, Code
from park_broker.site import SiteConfig
from park_broker.transfer.source import CHUNK_SIZE, authorize_read, read_chunks, resolve_path

MAX_MESSAGE = 16 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [("grpc.max_send_message_length", MAX_MESSAGE),
                                         ("grpc.max_receive_message_length", MAX_MESSAGE)]
# Fast reconnects: the default first reconnect backoff is 1 s, which a cut
# stream would otherwise pay each time (the fetch has its own backoff).
CLIENT_OPTIONS: list[tuple[str, Any]] = [*SERVER_OPTIONS,
                                         ("grpc.initial_reconnect_backoff_ms", 50),
                                         ("grpc.min_reconnect_backoff_ms", 50),
                                         ("grpc.max_reconnect_backoff_ms", 500)]
Verifier = Callable[[str], tokens.Verified]


class FilesServicer(files_pb2_grpc.FilesServicer):
    def __init__(self, files_root: Path, *, verifier: Verifier | None = None, sha256: str | None = None,
                 chunk: int = CHUNK_SIZE, known: dict[str, str] | None = None) -> None:
        self.files_root, self.verifier, self.sha256, self.chunk = files_root, verifier, sha256, chunk
        self.known = known or {}   # path -> digest, as a job's record would give it
        self.calls: list[tuple[str, int]] = []

    async def Read(self, request: files_pb2.ReadRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[files_pb2.Chunk]:
        self.calls.append((request.path, request.offset))
        try:
            if self.verifier is not None:
                bearer = dict(context.invocation_metadata() or ()).get("authorization", "")
                try:
                    verified = self.verifier(str(bearer).removeprefix("Bearer "))
                except tokens.TokenError as exc:
                    raise BrokerError(Code.UNAUTHENTICATED, exc.message) from None
                authorize_read(verified, request.path)
            real = resolve_path(self.files_root, request.path)
            first = True
            async for offset, data, size, digest in read_chunks(
                    real, request.offset, known_sha256=self.known.get(request.path), chunk=self.chunk,
                    within=self.files_root):
                chunk = files_pb2.Chunk(offset=offset, data=data)
                if first:
                    chunk.size, chunk.sha256 = size, self.sha256 or digest
                    first = False
                yield chunk
        except BrokerError as exc:
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)


@dataclass
class CuttingProxy:
    """TCP forwarder on 127.0.0.1:0; connection n is aborted after budgets[n] server bytes."""

    target: int
    budgets: list[int] = field(default_factory=list)
    port: int = 0
    connections: int = 0
    cuts: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._forward(client_r, client_w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        budget = self.budgets[self.connections] if self.connections < len(self.budgets) else None
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.transport.abort()
            return

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> None:
            sent = 0
            while data := await reader.read(64 * 1024):
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[:limit - sent])
                    self.cuts += 1
                    return
                writer.write(data)
                sent += len(data)
                await writer.drain()

        pumps = [asyncio.create_task(pump(client_r, server_w, None)),
                 asyncio.create_task(pump(server_r, client_w, budget))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            client_w.transport.abort()   # RST, like a dead network path
            server_w.transport.abort()


@dataclass
class Serving:
    server: grpc.aio.Server
    servicer: FilesServicer
    channel: grpc.aio.Channel
    stub: files_pb2_grpc.FilesStub
    port: int
    proxy: CuttingProxy | None

    def opener(self, path: str, token: str = "") -> Callable[[int], grpc.aio.UnaryStreamCall]:
        """`open_stream` for park_broker.transfer.fetch: a Read of `path` from an offset."""
        metadata = [("authorization", f"Bearer {token}")] if token else None

        def open_stream(offset: int) -> grpc.aio.UnaryStreamCall:
            return self.stub.Read(files_pb2.ReadRequest(path=path, offset=offset), metadata=metadata)
        return open_stream


@contextlib.asynccontextmanager
async def serving(site: SiteConfig, servicer: FilesServicer, *, budgets: list[int] | None = None,
                  server_options: list[tuple[str, Any]] | None = None,
                  client_options: list[tuple[str, Any]] | None = None) -> AsyncIterator[Serving]:
    """A TLS Files server on 127.0.0.1:0 with the site's key and certificate, and a
    channel to it (through a CuttingProxy when `budgets` is given)."""
    server = grpc.aio.server(options=server_options or SERVER_OPTIONS)
    files_pb2_grpc.add_FilesServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(site.tls_key(), site.certificate())]))
    await server.start()
    proxy = await CuttingProxy(port, budgets).start() if budgets is not None else None
    channel = grpc.aio.secure_channel(f"127.0.0.1:{proxy.port if proxy else port}",
                                      grpc.ssl_channel_credentials(site.certificate()),
                                      options=client_options or CLIENT_OPTIONS)
    try:
        yield Serving(server, servicer, channel, files_pb2_grpc.FilesStub(channel), port, proxy)
    finally:
        await channel.close()
        if proxy is not None:
            await proxy.close()
        await server.stop(None)
