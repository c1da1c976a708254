"""Park's TOML files are written by a real TOML writer: every name comes back exactly as written."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from harness import broker_cli, site_audience, wait_for  # type: ignore[import-not-found]
from park import tokens
from park._proto import jobs_pb2, jobs_pb2_grpc, site_pb2, site_pb2_grpc
from park.config import add_service, load_services, replace_file
from park_broker.auth.users import UsersError, add_user, load_users, revoke
from park_broker.federation.peers import PeerTable, add_peer
from park_broker.site import init_site, load_site

pytestmark = pytest.mark.timeout(60)


def _public(key: Ed25519PrivateKey) -> str:
    return tokens.format_public_key(key.public_key())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- users.toml -------------------------------------------------------------------------------------

# User names a bare TOML key cannot hold: '.' would nest tables.
@pytest.mark.parametrize("name", ["john.smith", "j.r.r.tolkien", "0.9", "a-b.c_d"])
def test_users_add_round_trips_a_name_toml_must_quote(tmp_path: Path, name: str) -> None:
    first, second, other = (Ed25519PrivateKey.generate() for _ in range(3))
    add_user(tmp_path, name, _public(first), ["submit"])
    add_user(tmp_path, "alice", _public(other), ["upload"])
    add_user(tmp_path, name, _public(second), ["submit", "admin"])   # a second key for the same user
    users = load_users(tmp_path / "users.toml")
    assert set(users) == {name, "alice"}
    assert users[name].keys == [first.public_key().public_bytes_raw(), second.public_key().public_bytes_raw()]
    assert users[name].allow == {"submit", "admin"}
    assert users["alice"].allow == {"upload"}
    assert _mode(tmp_path / "users.toml") == 0o600


def test_users_add_refuses_a_name_no_token_can_carry(tmp_path: Path) -> None:
    with pytest.raises(UsersError, match="user name 'ann\\+lab': subject must be 1-64 of"):
        add_user(tmp_path, "ann+lab", _public(Ed25519PrivateKey.generate()), ["submit"])
    assert not (tmp_path / "users.toml").exists()


def test_revocations_and_users_stay_private(tmp_path: Path) -> None:
    add_user(tmp_path, "john.smith", _public(Ed25519PrivateKey.generate()), [])
    revoke(tmp_path, "ab" * 32)
    revoke(tmp_path, "cd" * 32)
    assert (tmp_path / "revoked.txt").read_text() == f"{'ab' * 32}\n{'cd' * 32}\n"
    assert _mode(tmp_path / "revoked.txt") == _mode(tmp_path / "users.toml") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["revoked.txt", "users.toml"]   # no temporary left


# -- replace_file -----------------------------------------------------------------------------------

def test_replace_file_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    replace_file(path, "a = 1\n")
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(path) == 0o666 & ~umask
    path.chmod(0o640)
    replace_file(path, "a = 2\n")
    assert path.read_text() == "a = 2\n" and _mode(path) == 0o640
    replace_file(path, "a = 3\n", mode=0o600)
    assert _mode(path) == 0o600


def test_replace_file_leaves_the_old_file_if_it_cannot_finish(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users.toml"
    path.write_text("old\n")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        replace_file(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["users.toml"]


# -- site.toml, peers.toml, the client's config.toml ---------------------------------------------

def test_site_and_peers_round_trip(tmp_path: Path) -> None:
    # Site and peer names are a-z, 0-9 and '-' (check_site): bare keys; the addresses are strings.
    site = init_site(tmp_path / "sns", "sns", "[::1]:7701")
    assert (load_site(site.directory).name, load_site(site.directory).listen) == ("sns", "[::1]:7701")
    for name in ("cluster-2", "hpc"):
        init_site(tmp_path / name, name)
        add_peer(site.directory, name, f"{name}.example.org:7701", tmp_path / name / "tls.crt")
    add_peer(site.directory, "hpc", "hpc.example.org:7799", tmp_path / "hpc" / "tls.crt")   # moved
    peers = PeerTable.load(site.directory).peers
    assert {n: p.address for n, p in peers.items()} == {"cluster-2": "cluster-2.example.org:7701",
                                                        "hpc": "hpc.example.org:7799"}


def test_services_add_round_trips_any_certificate_path(tmp_path: Path) -> None:
    # The old writer quoted with json.dumps, which escapes an emoji as a surrogate pair
    # (\ud83d\ude00): not valid TOML.
    certs = tmp_path / 'certs "quoted" \\ 😀'
    certs.mkdir()
    (certs / "sns.crt").write_text("pem")
    config = tmp_path / "client" / "config.toml"
    add_service("sns", "sns.example.org:7701", certs / "sns.crt", config)
    add_service("cluster-2", "[::1]:7701", certs / "sns.crt", config)
    services = load_services(config)
    assert {n: (s.address, s.cert) for n, s in services.items()} == {
        "sns": ("sns.example.org:7701", (certs / "sns.crt").resolve()),
        "cluster-2": ("[::1]:7701", (certs / "sns.crt").resolve())}


# -- a real broker ----------------------------------------------------------------------------------

def test_a_broker_serves_a_user_with_a_dotted_name(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker()
    john, alice = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for name, key in (("john.smith", john), ("alice", alice)):
        result = broker_cli("users", "add", str(broker.directory), name, "--key", _public(key), "--allow", "submit")
        assert result.returncode == 0, result.stderr
    listed = broker_cli("users", "list", str(broker.directory))
    assert listed.returncode == 0 and "john.smith" in listed.stdout and "alice" in listed.stdout, listed.stderr
    broker.start()
    with grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes())) as channel:
        def bearer(key: Ed25519PrivateKey, subject: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {tokens.encode(tokens.issue(key, subject=subject, audience=site_audience(broker)))}")]

        info = site_pb2_grpc.SiteStub(channel).Info(site_pb2.InfoRequest(), metadata=bearer(john, "john.smith"),
                                                   timeout=10)
        assert info.caller == "john.smith"
        listing = jobs_pb2_grpc.JobsStub(channel).List(jobs_pb2.ListRequest(), metadata=bearer(alice, "alice"),
                                                       timeout=10)
        assert list(listing.jobs) == []


def test_a_users_file_that_stops_parsing_leaves_the_last_good_one_in_force(broker) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    assert service.info.caller
    good = (broker.directory / "users.toml").read_text()
    (broker.directory / "users.toml").write_text(good + "\n[users.broken\n")   # a hand edit gone wrong
    time.sleep(1.2)   # re-read within a second
    with park.Service(broker.address, broker.cert) as again:
        assert again.info.caller == service.info.caller, "every call still works"
    wait_for(lambda: "stays in force until it is fixed" in broker.log())
