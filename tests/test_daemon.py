"""The broker process: site directories, TLS, health, loopback-only, clean shutdown."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import park
from harness import JOB_ACCOUNT_OPTION, broker_cli  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(60)



def test_init_makes_private_keys_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = broker_cli("init", str(tmp_path / "s"), "--site", "sns")
    assert out.returncode == 0 and "park services add sns" in out.stdout
    for key in ("identity.key", "tls.key"):
        assert (tmp_path / "s" / key).stat().st_mode & 0o777 == 0o600
    again = broker_cli("init", str(tmp_path / "s"), "--site", "sns")
    assert again.returncode == 2 and "already holds a site" in again.stderr
    bad = broker_cli("init", str(tmp_path / "t"), "--site", "../evil")
    assert bad.returncode == 2 and "site name" in bad.stderr


def test_local_only_mode_refuses_non_loopback(tmp_path: Path) -> None:
    broker_cli("init", str(tmp_path / "s"), "--site", "sns")
    out = broker_cli("serve", str(tmp_path / "s"), "--listen", "0.0.0.0:0", "--local-only")
    assert out.returncode == 2 and "loopback only" in out.stderr


def test_a_site_without_users_does_not_serve(tmp_path: Path) -> None:
    broker_cli("init", str(tmp_path / "s"), "--site", "sns")
    out = broker_cli("serve", str(tmp_path / "s"), "--listen", "127.0.0.1:0", *JOB_ACCOUNT_OPTION)
    assert out.returncode == 2 and "has no users" in out.stderr and "park-broker users add" in out.stderr


def test_with_authentication_any_address_may_be_served(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker()
    broker.address = "0.0.0.0:0"
    broker.start()
    port = broker.address.rpartition(":")[2]
    service = park.Service(f"127.0.0.1:{port}", broker.cert)
    assert service.site == "sns" and service.info.caller
    service.close()


def test_serve_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    broker_cli("init", str(tmp_path / "s"), "--site", "sns")
    (tmp_path / "s" / "tls.key").chmod(0o644)
    out = broker_cli("serve", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--local-only", *JOB_ACCOUNT_OPTION)
    assert out.returncode == 2 and "chmod 600" in out.stderr


def test_health_tls_and_sigterm(broker) -> None:  # type: ignore[no-untyped-def]
    pem = broker.cert.read_bytes()
    with grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(pem)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="park.v1.Jobs"),
                                                         timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # A client that does not trust the certificate cannot talk to the broker.
    other = broker.directory.parent / "other"
    broker_cli("init", str(other), "--site", "other")
    wrong = park.Service(broker.address, other / "tls.crt")
    with pytest.raises(park.ServiceError, match="UNAVAILABLE"):
        wrong.info
    wrong.close()
    assert broker.stop() == 0
    assert not (broker.directory / "serve.json").exists()


def test_an_idle_broker_stops_promptly_and_says_so(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker()
    broker.extra = ["--grace", "5"]     # the default grace: an idle broker must not wait it out
    broker.start()
    started = time.monotonic()
    assert broker.stop() == 0
    assert time.monotonic() - started < 2.0
    assert "site sns stopping (asked to stop)" in broker.log() and "site sns stopped" in broker.log()


def test_a_site_directory_is_served_by_one_broker_at_a_time(broker) -> None:  # type: ignore[no-untyped-def]
    second = broker_cli("serve", str(broker.directory), "--listen", "127.0.0.1:0", *JOB_ACCOUNT_OPTION)
    assert second.returncode == 2
    assert "already served by another broker" in second.stderr and f"pid {broker.proc.pid}" in second.stderr
    assert broker.proc.poll() is None
    assert broker.service().info.site == "sns", "the first broker goes on serving"


def test_a_port_in_use_is_refused_not_shared(broker, new_broker) -> None:  # type: ignore[no-untyped-def]
    other = new_broker("cluster")
    taken = broker_cli("serve", str(other.directory), "--listen", broker.address, *JOB_ACCOUNT_OPTION)
    assert taken.returncode == 2 and "address already in use" in taken.stderr, taken.stderr
    assert broker.service().info.site == "sns"


def test_grpc_core_log_lines_reach_neither_the_broker_log_nor_the_terminal(broker) -> None:  # type: ignore[no-untyped-def]
    import re

    with broker.service():
        assert park.submit("park_test_tasks:add", 1, 2).result(timeout=30) == 3   # workers start: forks
    assert not re.search(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\]", broker.log(), re.M), broker.log()


def test_peers_are_listed_and_removed(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns"), new_broker("cluster")
    added = broker_cli("peers", "add", str(sns.directory), "cluster", "--address", "127.0.0.1:7712",
                       "--cert", str(cluster.cert))
    assert added.returncode == 0, added.stderr
    listed = broker_cli("peers", "list", str(sns.directory))
    assert listed.returncode == 0 and listed.stdout.startswith("cluster\t127.0.0.1:7712\tidentity=")
    assert broker_cli("peers", "remove", str(sns.directory), "cluster").returncode == 0
    assert broker_cli("peers", "list", str(sns.directory)).stdout == ""
    again = broker_cli("peers", "remove", str(sns.directory), "cluster")
    assert again.returncode == 2 and "site has no peer 'cluster'" in again.stderr
