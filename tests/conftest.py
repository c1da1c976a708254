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

import park

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


def make_broker(tmp_path: Path, site: str = "sns", **kwargs: object) -> Broker:
    directory = tmp_path / site
    subprocess.run([sys.executable, "-m", "park_broker.cli", "init", str(directory), "--site", site],
                   check=True, capture_output=True)
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
