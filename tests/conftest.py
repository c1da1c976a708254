"""Fixtures: the test user's key, and real brokers (see harness.py)."""
from __future__ import annotations

import os
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
