"""Fixtures: the test user's key, and real brokers (see harness.py)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from harness import Broker, make_broker
from park.signer import write_private_key


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


@pytest.fixture(autouse=True)
def jobs_reach_tmp_path(request: pytest.FixtureRequest) -> None:
    """As root (CI), brokers run jobs as an unprivileged account (harness.JOB_ACCOUNT), and many tests'
    jobs write markers into `tmp_path`: let any account traverse to it and write there."""
    if os.geteuid() != 0 or "tmp_path" not in request.fixturenames:
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    tmp_path.chmod(0o777)
    for parent in tmp_path.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o711)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the test item, so fixtures can tell in teardown whether it failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def new_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Broker]]:
    """A factory of initialised (not yet started) brokers, all stopped after the test (and, when the
    test failed, the end of each one's log printed, which pytest shows with the failure)."""
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
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for b in made:
            if (b.directory / "broker.log").exists():
                print(f"--- the end of {b.site}'s broker log ---\n{b.log()[-4000:]}")


@pytest.fixture
def broker(new_broker: Callable[..., Broker]) -> Broker:
    return new_broker().start()


@pytest.fixture
def service(broker: Broker) -> park.Service:
    return broker.service()
