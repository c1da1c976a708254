"""The agent's Unix socket: where it lives, who may connect, and how it ends.

The socket is created in a fresh 0700 directory and made 0600 as soon as it is
bound; on every accepted connection the peer's uid is read (SO_PEERCRED) and
a connection from any other uid is closed before a byte is read. A connection
that breaks the protocol (oversize frame, garbage, unknown request type) is
closed, and the agent goes on serving everyone else. SIGTERM and SIGINT stop
the server, removing the socket and its directory; SIGUSR1 wipes the keys.

This module moves frames only; what a request means is `park_agent.agent`'s.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from park._proto import agent_pb2 as apb
from park.agent_client import frame
from park_agent.agent import Agent
from park_agent.protocol import FrameError, error_response, peer_uid, read_request

__all__ = ["AgentServer", "make_socket_dir", "SOCKET_NAME"]

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
# An idle connection holds a file descriptor; a client never needs to idle this long.
IDLE_TIMEOUT = 300.0


def make_socket_dir(parent: str | None = None) -> Path:
    """A fresh private directory (0700) for the socket, under `parent` or $TMPDIR."""
    path = Path(tempfile.mkdtemp(prefix="park-", dir=parent))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o700:
        path.rmdir()
        raise OSError(f"{path} was created with mode {mode:04o}, not 0700")
    return path


class AgentServer:
    """Serves one Agent on `directory/agent.sock`; `run()` returns once stopped and cleaned up."""

    def __init__(self, agent: Agent, directory: Path, *, uid: int | None = None, handle_signals: bool = True) -> None:
        self.agent = agent
        self.directory = directory
        self.path = directory / SOCKET_NAME
        self.uid = os.getuid() if uid is None else uid
        self._handle_signals = handle_signals
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self, ready: Callable[[], object] | None = None) -> None:
        """Listen, call `ready()` once connections can be made, serve until stopped, clean up."""
        loop = asyncio.get_running_loop()
        try:
            server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError:
            self.directory.rmdir()
            raise
        try:
            # The 0700 directory already keeps others out of the window before this chmod.
            os.chmod(self.path, 0o600)
            if self._handle_signals:
                loop.add_signal_handler(signal.SIGTERM, self.stop)
                loop.add_signal_handler(signal.SIGINT, self.stop)
                loop.add_signal_handler(signal.SIGUSR1, self.agent.wipe)
            log.info("agent listening", extra={"socket": str(self.path)})
            if ready is not None:
                ready()
            await self._stopped.wait()
        finally:
            server.close()
            await server.wait_closed()
            if self._handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                    loop.remove_signal_handler(sig)
            self.path.unlink(missing_ok=True)
            self.directory.rmdir()
            log.info("agent stopped")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid != self.uid:
                log.warning("dropped a connection from a foreign uid", extra={"peer_uid": uid})
                return
            await self._converse(reader, writer)
        except (ConnectionError, TimeoutError) as e:
            log.info("connection ended: %s", type(e).__name__)
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT)
            except FrameError as e:
                log.info("closing a connection: %s", e)
                if e.code is not None:
                    writer.write(frame(error_response(e.code, str(e))))
                    await writer.drain()
                return
            if request is None:
                return
            response: apb.AgentResponse = await self.agent.handle(request)
            writer.write(frame(response))
            await writer.drain()
            if request.WhichOneof("request") == "stop" and response.WhichOneof("response") == "ok":
                self.stop()
                return
