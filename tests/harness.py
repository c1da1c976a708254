"""Real brokers for tests: `park-broker` processes on loopback ports, in temporary directories."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from park import certificates, tokens
from park.agent_client import default_subject
from park.signer import read_private_key, write_private_key
from park_broker.auth.users import add_user
from park_broker.federation.peers import add_peer
from park_broker.site import init_site

TASKS = Path(__file__).parent / "tasks"
sys.path.insert(0, str(TASKS))  # the @park.job test imports the same module the brokers run


# A broker running as root (as CI does) never runs jobs as root: the test user's jobs run as nobody.
JOB_ACCOUNT = "nobody" if os.geteuid() == 0 else ""
JOB_ACCOUNT_OPTION = ["--default-unix-user", JOB_ACCOUNT] if JOB_ACCOUNT else []


@dataclass
class Broker:
    directory: Path
    site: str
    workers: int = 2
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    peer_address: str = ""
    services: list[park.Service] = field(default_factory=list)

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    def start(self, timeout: float = 30) -> Broker:
        serve_file = self.directory / "serve.json"
        serve_file.unlink(missing_ok=True)
        listen = self.address or "127.0.0.1:0"
        peer_listen = ["--peer-listen", self.peer_address] if self.peer_address else []
        log = open(self.directory / "broker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "park_broker.cli", "serve", str(self.directory), "--listen", listen,
             "--workers", str(self.workers), "--python-path", str(TASKS), "--grace", "1", *peer_listen,
             *JOB_ACCOUNT_OPTION, *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not serve_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker did not start:\n{self.log()}")
            time.sleep(0.05)
        serving = json.loads(serve_file.read_text())
        self.address, self.peer_address = serving["address"], serving["peer_address"] or self.peer_address
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


@contextlib.contextmanager
def as_user(broker: Broker, name: str, key_dir: Path, *extra: str) -> Iterator[None]:
    """Register another user `name` at `broker` (`extra`: options of `users add`, such as --allow) and make
    the clients made inside the block speak for them (PARK_KEY_FILE, PARK_USER)."""
    key_file = key_dir / f"{name}.key"
    if not key_file.exists():
        write_private_key(key_file, Ed25519PrivateKey.generate(), None)
        result = broker_cli("users", "add", str(broker.directory), name, "--key", public_key_of(key_file), *extra)
        assert result.returncode == 0, result.stderr
        time.sleep(1.1)   # a running broker re-reads users.toml at most once a second
    with mock.patch.dict(os.environ, PARK_KEY_FILE=str(key_file), PARK_USER=name):
        yield


def site_audience(broker: Broker) -> str:
    """What tokens for `broker`'s site name: its name and identity key, from its certificate."""
    return certificates.audience(broker.cert.read_bytes())


def public_key_of(path: Path) -> str:
    return tokens.format_public_key(read_private_key(path, None).public_key())


def make_broker(tmp_path: Path, site: str = "sns", allow: str = "submit,upload", **kwargs: object) -> Broker:
    """An initialised site whose one user is the test user (`default_subject()`).

    What `park-broker init` and `users add` do, called here rather than in two more Pythons: most tests
    start a broker, and starting a Python that imports the broker is most of a second (test_daemon and
    test_cli run the commands themselves)."""
    directory = tmp_path / site
    init_site(directory, site)
    add_user(directory, default_subject(), public_key_of(Path(os.environ["PARK_KEY_FILE"])),
             [a for a in allow.split(",") if a])
    return Broker(directory, site, **kwargs)  # type: ignore[arg-type]




def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):   # gone, or gone between opening and reading
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until `predicate()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def federate(*brokers: Broker) -> None:
    """Start the brokers, then pin every broker's certificate and peer address at every other one, and wait
    until each has taken its peers up. Each peer port is the one its broker bound (port 0), not one picked
    here beforehand: a port found free and closed again can be taken by another process before the broker
    binds it."""
    for b in brokers:
        b.start()
    for b in brokers:
        for other in brokers:
            if other is not b:
                add_peer(b.directory, other.site, other.peer_address, other.cert)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGHUP)   # reread the peers file now, not at the next look
    for b in brokers:
        # The line the broker logs once it has, in either log format (text, or JSON ending in `"}`).
        taken = re.compile(re.escape("now " + ", ".join(sorted(o.site for o in brokers if o is not b))) + '["\n]')
        wait_for(lambda b=b, taken=taken: taken.search(b.log()) is not None, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_cpus_are_held(service: park.Service, directory: Path) -> None:
    """On a site with 2 cpus: two 1-cpu jobs run together, and a 2-cpu job runs alone (`directory`: where
    the jobs mark that they started, writable by them)."""
    gate, marker = directory / "cpu-gate", [directory / f"cpu-{i}" for i in range(4)]
    with service:
        ones = [park.submit("park_test_tasks:wait_with_marker", str(marker[i]), str(gate), memo=False)
                for i in (0, 1)]
    wait_for(lambda: marker[0].exists() and marker[1].exists())
    gate.touch()
    assert [j.wait(timeout=30) for j in ones] == ["completed", "completed"]
    gate.unlink()
    with service:
        big = park.submit("park_test_tasks:wait_with_marker", str(marker[2]), str(gate), resources={"cpus": 2},
                          memo=False)
        small = park.submit("park_test_tasks:wait_with_marker", str(marker[3]), str(gate), memo=False)
    wait_for(marker[2].exists)
    time.sleep(1.0)
    assert not marker[3].exists(), "the 2-cpu job holds the site's cpus"
    gate.touch()
    assert big.wait(timeout=30) == "completed" and small.wait(timeout=30) == "completed"
