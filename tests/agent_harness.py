"""Real park-agents for tests: in-process on a real socket, or a `park-agent --foreground` process.

Import the fixtures into a test module or conftest (`from agent_harness import ...`).
Every agent lives in the test's own tmp_path and is stopped by the fixture
that started it; processes are ended by their own pid only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from park.agent_client import AgentClient
from park_agent.agent import Agent
from park_agent.server import AgentServer, make_socket_dir

SUBJECT = "alice"


@dataclass
class FakeClock:
    t: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class InProcessAgent:
    """An AgentServer on its own event loop thread, serving a real Unix socket."""

    agent: Agent
    server: AgentServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    clock: FakeClock
    done: concurrent.futures.Future[None]

    @property
    def client(self) -> AgentClient:
        return AgentClient(str(self.server.path), timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.done.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., InProcessAgent]]:
    """start_agent(uid=None, parent=tmp_path, **Agent kwargs): an in-process agent, on a FakeClock
    unless given a clock, whose socket directory is made under `parent`."""
    started: list[InProcessAgent] = []

    def start(*, uid: int | None = None, parent: Path = tmp_path, **kwargs: object) -> InProcessAgent:
        clock = kwargs.setdefault("clock", FakeClock())
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        agent = Agent(subject=SUBJECT, **kwargs)  # type: ignore[arg-type]
        server = AgentServer(agent, make_socket_dir(str(parent)), uid=uid, handle_signals=False)
        ready = threading.Event()
        done = asyncio.run_coroutine_threadsafe(server.run(ready.set), loop)
        assert ready.wait(10), "agent did not start"
        running = InProcessAgent(agent, server, loop, thread, clock, done)  # type: ignore[arg-type]  # clock may be any callable
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment for park-agent commands: no PARK_* from outside, keys under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARK_")}
    env.update(TMPDIR=str(tmp_path), PARK_KEY_DIR=str(tmp_path / "keys"), PARK_USER=SUBJECT)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "park_agent", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def askpass(tmp_path: Path, name: str, body: str) -> str:
    """Write an executable askpass script and return its path."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o700)
    return str(path)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[str]
    env: dict[str, str]
    log_path: Path
    socket: str = ""

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.socket, timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        return code

    def log(self) -> str:
        """Everything the agent wrote to stderr so far."""
        return self.log_path.read_text()


_SOCK_LINE = re.compile(r"PARK_AUTH_SOCK=(\S+); export PARK_AUTH_SOCK;")


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """agent_process(*flags, **env): `park-agent --foreground` with PARK_AUTH_SOCK set in .env."""
    started: list[AgentProcess] = []

    def start(*flags: str, **extra_env: str) -> AgentProcess:
        env = cli_env(tmp_path, **extra_env)
        log_path = tmp_path / f"agent-{len(started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "park_agent", "--foreground", *flags], env=env,
                                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        running = AgentProcess(proc, env, log_path)
        started.append(running)
        assert proc.stdout is not None
        match = _SOCK_LINE.match(proc.stdout.readline())
        assert match, "park-agent did not print PARK_AUTH_SOCK"
        running.socket = match.group(1)
        env["PARK_AUTH_SOCK"] = running.socket
        return running

    yield start
    for running in started:
        running.stop()
