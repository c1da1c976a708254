"""Fixtures that start real brokers: `park-broker serve` processes on loopback ports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from park import tokens
from park.agent_client import default_subject
from park.signer import read_private_key, write_private_key

TASKS = Path(__file__).parent / "tasks"
sys.path.insert(0, str(TASKS))  # the @park.job test imports the same module the brokers run


@dataclass
class Broker:
    directory: Path
    site: str
    workers: int = 2
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    services: list[park.Service] = field(default_factory=list)

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    def start(self, timeout: float = 30) -> Broker:
        serve_file = self.directory / "serve.json"
        serve_file.unlink(missing_ok=True)
        listen = self.address or "127.0.0.1:0"
        log = open(self.directory / "broker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "park_broker.cli", "serve", str(self.directory), "--listen", listen,
             "--workers", str(self.workers), "--python-path", str(TASKS), "--grace", "1", *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not serve_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker did not start:\n{self.log()}")
            time.sleep(0.05)
        self.address = json.loads(serve_file.read_text())["address"]
        return self

    def log(self) -> str:
        return (self.directory / "broker.log").read_text(errors="replace")

    def service(self) -> park.Service:
        service = park.Service(self.address, self.cert)
        self.services.append(service)
        return service

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        (self.directory / "serve.json").unlink(missing_ok=True)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "park_broker.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="session", autouse=True)
def user_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test user's key, in a key file (the robots' and CI's source of tokens): every
    client in the suite authenticates with it, unless a test says otherwise."""
    path = tmp_path_factory.mktemp("keys") / "user.key"
    write_private_key(path, Ed25519PrivateKey.generate(), None)
    saved = {k: os.environ.pop(k, None) for k in ("PARK_KEY_FILE", "PARK_AUTH_SOCK", "PARK_KEY_PASSPHRASE")}
    os.environ["PARK_KEY_FILE"] = str(path)
    yield path
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def public_key_of(path: Path) -> str:
    return tokens.format_public_key(read_private_key(path, None).public_key())


def make_broker(tmp_path: Path, site: str = "sns", allow: str = "submit,upload", **kwargs: object) -> Broker:
    """An initialised site whose one user is the test user (`default_subject()`)."""
    directory = tmp_path / site
    for args in (("init", str(directory), "--site", site),
                 ("users", "add", str(directory), default_subject(), "--key",
                  public_key_of(Path(os.environ["PARK_KEY_FILE"])), "--allow", allow)):
        result = broker_cli(*args)
        assert result.returncode == 0, result.stderr
    return Broker(directory, site, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def new_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """A factory of initialised (not yet started) brokers, all stopped after the test."""
    made: list[Broker] = []

    def factory(site: str = "sns", **kwargs: object) -> Broker:
        made.append(make_broker(tmp_path, site, **kwargs))
        return made[-1]

    yield factory
    for b in made:
        for s in b.services:
            s.close()
        if b.proc is not None:
            b.stop()


@pytest.fixture
def broker(new_broker: Callable[..., Broker]) -> Broker:
    return new_broker().start()


@pytest.fixture
def service(broker: Broker) -> park.Service:
    return broker.service()
