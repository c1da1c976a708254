"""The processes `park demo` runs: a credential agent and two federated brokers, in one directory.

`demo_sites(root, ...)` does by program what README's "For scientists" and
"For operators" sections do by hand:

    park-agent --foreground                     (TMPDIR, PARK_KEY_DIR, PARK_ASKPASS under root/agent)
    park-agent keygen --store file; park-agent add -t 3600; park-agent pubkey
    park-broker init root/SITE --site SITE                          for sns and cluster
    park-broker users add root/SITE $USER --key PUBKEY --allow submit,upload
    park-broker peers add root/sns cluster ...; park-broker peers add root/cluster sns ...
    park-broker serve root/SITE --listen 127.0.0.1:0 --peer-listen 127.0.0.1:PORT [--python-path examples]

The key is a passphrase-protected file, never the user's keyring; the
passphrase is random and known only to the askpass script (mode 0700) in root.

Guarantee: on leaving the `with` block, however it is left, every process
started here has been stopped: brokers get SIGTERM, then SIGKILL after
`STOP_GRACE` seconds; the agent is asked to stop, then gets SIGTERM, then
SIGKILL. Each runs in its own session, so a Ctrl-C reaches only the demo.
Processes are ended by their own pid only. This module never prints; it
reports failures as CliError with the tail of the process's log.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from park.agent_client import AgentClient, AgentError, default_subject
from park.cli.output import CliError

__all__ = ["DemoAgent", "DemoBroker", "Sites", "demo_sites", "interruptible", "stop_process", "uninterrupted"]

SITES = ("sns", "cluster")
START_TIMEOUT = 30.0     # seconds for a broker to write serve.json, or the agent to print its socket
STOP_GRACE = 20.0        # seconds between SIGTERM and SIGKILL
KEY_LIFETIME = 3600      # seconds the agent holds the demo's key
# A broker running as root never runs jobs as root: run as root, the demo's jobs run as nobody.
ROOT_JOB_ACCOUNT = ["--default-unix-user", "nobody"] if os.geteuid() == 0 else []
_SOCK_LINE = re.compile(r"PARK_AUTH_SOCK=(\S+); export PARK_AUTH_SOCK;")


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, sig: int, grace: float) -> None:
    """Stop `proc` and everything it started: each demo process leads a session of its own, so `sig`
    goes to its process group, and after `grace` seconds (or once the leader exits) SIGKILL takes what
    is left of the group, children such as the pip that builds a wheel included."""
    if proc is None:
        return
    if proc.poll() is None:
        _signal_group(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120,
                            check=False)
    if result.returncode != 0:
        raise CliError(f"{what} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoAgent:
    """`park-agent --foreground` with its socket, keys and askpass script under `directory`."""

    directory: Path
    proc: subprocess.Popen[str] | None = None
    socket: str = ""
    public_key: str = ""

    @property
    def log_path(self) -> Path:
        return self.directory.parent / "agent.log"

    def _env(self, with_socket: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARK_") or k == "PARK_USER"}
        env.update(TMPDIR=str(self.directory), PARK_KEY_DIR=str(self.directory / "keys"),
                   PARK_ASKPASS=str(self.directory / "askpass"))
        if with_socket:
            env["PARK_AUTH_SOCK"] = self.socket
        return env

    def _cli(self, *args: str, with_socket: bool = True) -> str:
        return _run([sys.executable, "-m", "park_agent", *args], f"park-agent {args[0]}", self._env(with_socket))

    def start(self) -> None:
        """Start the agent, create a key in a passphrase-protected file, load it and read its public half."""
        self.directory.mkdir(mode=0o700)
        askpass = self.directory / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{secrets.token_urlsafe(24)}'\n")
        askpass.chmod(0o700)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "park_agent", "--foreground"],
                                         env=self._env(with_socket=False), stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.socket = self._read_socket()
        self._cli("keygen", "--store", "file", with_socket=False)      # the file store: never the user's keyring
        self._cli("add", "-t", str(KEY_LIFETIME))
        self.public_key = self._cli("pubkey").strip()

    def _read_socket(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        match = _SOCK_LINE.match(line)
        if not match:
            raise CliError(f"park-agent did not start (it printed {line!r}):\n{_tail(self.log_path)}")
        return match.group(1)

    def stop(self) -> None:
        """Ask the agent to stop; SIGTERM, then SIGKILL, if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(AgentError, OSError):
            AgentClient(self.socket, timeout=5).stop()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, signal.SIGTERM, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class DemoBroker:
    """A `park-broker` site directory and, once started, its `serve` process."""

    directory: Path
    site: str
    peer_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def log_path(self) -> Path:
        return self.directory.parent / f"{self.site}.log"

    @property
    def files(self) -> Path:
        return self.directory / "files"

    def _cli(self, *args: str) -> None:
        _run([sys.executable, "-m", "park_broker.cli", *args], f"park-broker {' '.join(args[:2])} ({self.site})")

    def init(self, user: str, public_key: str) -> None:
        self._cli("init", str(self.directory), "--site", self.site)
        self._cli("users", "add", str(self.directory), user, "--key", public_key, "--allow", "submit,upload")

    def pin(self, peer: DemoBroker) -> None:
        self._cli("peers", "add", str(self.directory), peer.site, "--address", f"127.0.0.1:{peer.peer_port}",
                  "--cert", str(peer.cert))

    def start(self, workers: int, python_path: list[Path]) -> None:
        paths = [arg for p in python_path for arg in ("--python-path", str(p))]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "park_broker.cli", "serve", str(self.directory), "--listen", "127.0.0.1:0",
                 "--peer-listen", f"127.0.0.1:{self.peer_port}", "--workers", str(workers), "--grace", "2", *paths,
                 *ROOT_JOB_ACCOUNT],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_serving(self) -> None:
        assert self.proc is not None
        serve_file = self.directory / "serve.json"
        deadline = time.monotonic() + START_TIMEOUT
        while not serve_file.exists():
            if self.proc.poll() is not None:
                raise CliError(f"the {self.site} broker exited with status {self.proc.returncode}:\n"
                               f"{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise CliError(f"the {self.site} broker did not start within {START_TIMEOUT:.0f} s:\n"
                               f"{_tail(self.log_path)}")
            time.sleep(0.05)
        self.address = json.loads(serve_file.read_text())["address"]


@dataclass
class Sites:
    agent: DemoAgent
    sns: DemoBroker
    cluster: DemoBroker

    @property
    def brokers(self) -> tuple[DemoBroker, DemoBroker]:
        return self.sns, self.cluster

    def pids(self) -> dict[str, int]:
        found = {"agent": self.agent.proc.pid if self.agent.proc else 0}
        found.update({b.site: b.proc.pid if b.proc else 0 for b in self.brokers})
        return found


def _stop_brokers(brokers: tuple[DemoBroker, ...]) -> None:
    """SIGTERM to every running broker at once; after the grace, SIGKILL to each broker's process group
    (its session: start_new_session), which takes a broker still running and anything that outlived it."""
    running = [b.proc for b in brokers if b.proc is not None and b.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def demo_sites(root: Path, examples: Path, workers: int) -> Iterator[Sites]:
    """The agent and both brokers, serving and peered; all stopped when the block is left (module docstring)."""
    sites = Sites(DemoAgent(root / "agent"), DemoBroker(root / "sns", "sns"), DemoBroker(root / "cluster", "cluster"))
    try:
        sites.agent.start()
        for broker in sites.brokers:
            broker.init(default_subject(), sites.agent.public_key)
        sites.sns.pin(sites.cluster)
        sites.cluster.pin(sites.sns)
        sites.sns.start(workers, [examples])
        sites.cluster.start(workers, [])
        for broker in sites.brokers:
            broker.wait_serving()
        (root / "pids.json").write_text(json.dumps(sites.pids()))
        yield sites
    finally:
        with uninterrupted():
            _stop_brokers(sites.brokers)
            sites.agent.stop()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), so `finally` blocks tear down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are ignored: a second Ctrl-C cannot cut a teardown short
    (which is bounded: every wait in it ends in SIGKILL)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
