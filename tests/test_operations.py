"""Operating a broker: gRPC reflection, structured logs without secrets, Prometheus metrics."""
from __future__ import annotations

import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import park
from harness import Broker  # type: ignore[import-not-found]
from park._proto import jobs_pb2, jobs_pb2_grpc
from park_broker.ops import logs
from park_broker.ops.metrics import Metrics, parse_listen
from park_broker.site import SiteError

pytestmark = pytest.mark.timeout(120)


def _channel(broker: Broker) -> grpc.Channel:
    return grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes()))


def _reflect(channel: grpc.Channel, method: str, request: reflection_pb2.ServerReflectionRequest
             ) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return next(iter(call(iter([request]), timeout=10)))


def _json_records(broker: Broker) -> list[dict[str, object]]:
    """The broker's log records; every line on stderr must be one JSON object."""
    records = []
    for line in broker.log().splitlines():
        if not line.strip() or line.startswith("park-broker: "):   # the serve banner, on stdout
            continue
        records.append(json.loads(line))
    return records


# -- reflection ---------------------------------------------------------------------------------

def test_reflection_lists_the_services_anonymously(broker: Broker) -> None:
    with _channel(broker) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10)))
        names = {s.name for s in reply.list_services_response.service}
        assert {"park.v1.Jobs", "park.v1.Site", "park.v1.Packages", "park.v1.Files", "park.v1.Federation",
                "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        described = _reflect(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                             reflection_pb2.ServerReflectionRequest(file_containing_symbol="park.v1.Jobs"))
        assert described.file_descriptor_response.file_descriptor_proto
        # grpcurl >= 1.8.8 asks the v1 name first; the same messages answer it.
        v1 = _reflect(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                      reflection_pb2.ServerReflectionRequest(list_services=""))
        assert {s.name for s in v1.list_services_response.service} == names


def test_reflection_is_public_but_refuses_a_bad_token(broker: Broker) -> None:
    with _channel(broker) as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        replies = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10,
                       metadata=(("authorization", "Bearer not-a-token"),))
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(replies))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token refused" in (refused.value.details() or "")


# -- logs -----------------------------------------------------------------------------------------

def _capture(fmt: str) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    return stream, logs.configure("DEBUG", fmt, stream)


def test_json_logs_are_one_object_per_line_with_extra_fields() -> None:
    stream, handler = _capture("json")
    try:
        log = logging.getLogger("park_broker.test")
        log.info("job %s finished", "abc", extra={"job_id": "abc", "state": "completed", "seconds": 1.5})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "job abc finished" and first["level"] == "INFO"
    assert first["logger"] == "park_broker.test" and first["time"].endswith("Z")
    assert (first["job_id"], first["state"], first["seconds"]) == ("abc", "completed", 1.5)
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_the_redactor_removes_bearer_tokens_and_token_fields(fmt: str) -> None:
    stream, handler = _capture(fmt)
    secret = "Q2hBS0" * 30
    try:
        log = logging.getLogger("park_broker.test")
        log.warning("metadata: %s", [("authorization", f"Bearer {secret}")])
        log.warning("got Bearer hunter2", extra={"token": "hunter2", "grant_token": "x", "job_id": "j"})
        try:
            raise RuntimeError(f"refused {secret}")
        except RuntimeError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert secret not in text and "hunter2" not in text and "[redacted]" in text
    if fmt == "json":
        second = json.loads(text.splitlines()[1])
        assert (second["token"], second["grant_token"], second["job_id"]) == ("[redacted]", "[redacted]", "j")


def test_a_token_in_metadata_never_reaches_the_log(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(extra=["--log-format", "json", "--log-level", "DEBUG"]).start()
    service = broker.service()
    with service:
        job = park.submit("park_test_tasks:add", 1, 2)
    assert job.result(timeout=60) == 3
    valid = service.tokens.current()
    assert valid and len(valid) > 100
    forged = "Zm9yZ2Vk" * 40
    with _channel(broker) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        for token in (forged, "hunter2-not-a-token", valid):
            with pytest.raises(grpc.RpcError) as refused:   # forged, malformed, or no such job
                stub.Get(jobs_pb2.GetRequest(job_id="a" * 26), metadata=(("authorization", f"Bearer {token}"),),
                         timeout=10)
            assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)
    assert broker.stop() == 0
    records = _json_records(broker)
    assert any(r["logger"] == "park_broker.server" and r["level"] == "INFO" for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    text = broker.log()
    for secret in (valid, forged, "hunter2-not-a-token"):
        assert secret not in text


def test_log_format_is_accepted_before_and_after_serve(tmp_path: Path) -> None:
    from park_broker.cli import build_parser

    assert build_parser().parse_args(["--log-format", "json", "serve", str(tmp_path)]).log_format == "json"
    assert build_parser().parse_args(["serve", str(tmp_path), "--log-format", "json"]).log_format == "json"
    assert build_parser().parse_args(["serve", str(tmp_path)]).log_format == "text"


# -- metrics ----------------------------------------------------------------------------------------

def _metrics_address(broker: Broker) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in _json_records(broker):
            if record["logger"] == "park_broker.ops.metrics" and "address" in record:
                return str(record["address"])
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in the log:\n{broker.log()}")


def _scrape(address: str) -> tuple[dict[str, float], str, str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        body = reply.read().decode()
        content_type = reply.headers["Content-Type"]
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples, body, content_type


def _until_state(job: park.Job, state: str) -> None:
    deadline = time.monotonic() + 30
    while job.state != state:
        assert time.monotonic() < deadline, f"job never reached {state}"
        time.sleep(0.05)


def test_metrics_count_jobs_by_state_and_events(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(extra=["--metrics-listen", "127.0.0.1:0", "--log-format", "json"]).start()
    address = _metrics_address(broker)
    assert address.startswith("127.0.0.1:")
    before, _, _ = _scrape(address)
    assert before['park_jobs{state="completed"}'] == 0 and before["park_events_committed_total"] == 0
    with broker.service():
        done = [park.submit("park_test_tasks:add", i, 1) for i in range(2)]
        failed = park.submit("park_test_tasks:fail", "on purpose")
        running = park.submit("park_test_tasks:sleep", 60)
        waiting = park.submit("park_test_tasks:add", 1, 1, when=running.iscompleted)
        doomed = park.submit("park_test_tasks:add", 2, 2, when=running.iscompleted)
    for job in done:
        assert job.wait(timeout=60) == "completed"
    assert failed.wait(timeout=60) == "failed"
    _until_state(running, "running")
    doomed.cancel("not needed")
    samples, body, content_type = _scrape(address)
    assert content_type == CONTENT_TYPE_LATEST
    assert {s: samples[f'park_jobs{{state="{s}"}}'] for s in
            ("waiting", "queued", "running", "completed", "failed", "cancelled")} == \
        {"waiting": 1, "queued": 0, "running": 1, "completed": 2, "failed": 1, "cancelled": 1}
    assert waiting.state == "waiting"
    assert samples["park_events_committed_total"] >= 6 * 2
    assert samples['park_transfer_bytes_total{direction="received"}'] == 0
    assert samples['park_broker_info{site="sns"}'] == 1
    assert "# TYPE park_events_committed_total counter" in body and "rate(" in body
    running.cancel()
    assert running.wait(timeout=30) == "cancelled"
    after, _, _ = _scrape(address)
    assert after["park_events_committed_total"] > samples["park_events_committed_total"]


def test_metrics_parse_with_the_prometheus_parser(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(extra=["--metrics-listen", "127.0.0.1:0", "--log-format", "json"]).start()
    address = _metrics_address(broker)
    with broker.service():
        job = park.submit("park_test_tasks:add", 2, 3)
    assert job.result(timeout=60) == 5
    _, body, _ = _scrape(address)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    # The parser names counter families without their `_total`, as the library's writer does.
    assert {name: f.type for name, f in families.items()} == {
        "park_broker_info": "gauge", "park_jobs": "gauge", "park_events_committed": "counter",
        "park_transfer_bytes": "counter", "park_peer_last_seq": "gauge", "park_peer_connected": "gauge",
        "park_peer_pending_atoms": "gauge", "park_peer_last_message_age_seconds": "gauge"}
    jobs = {s.labels["state"]: s.value for s in families["park_jobs"].samples}
    assert jobs == {"waiting": 0, "queued": 0, "running": 0, "completed": 1, "failed": 0, "cancelled": 0}
    (events,) = families["park_events_committed"].samples
    assert events.name == "park_events_committed_total" and events.value >= 2
    assert [(s.name, s.labels, s.value) for s in families["park_transfer_bytes"].samples] == [
        ("park_transfer_bytes_total", {"direction": "received"}, 0)]
    assert families["park_broker_info"].samples[0].labels == {"site": "sns"}
    assert "_created" not in body
    with urllib.request.urlopen(urllib.request.Request(f"http://{address}/metrics", method="HEAD"),
                                timeout=10) as head:
        assert head.read() == b"" and int(head.headers["Content-Length"]) > 0
        assert head.headers["Content-Type"] == CONTENT_TYPE_LATEST


def test_metrics_endpoint_answers_only_get_on_metrics(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(extra=["--metrics-listen", "127.0.0.1:0", "--log-format", "json"]).start()
    address = _metrics_address(broker)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{address}/", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(f"http://{address}/metrics", data=b"x", method="POST"),
                               timeout=10)
    assert posted.value.code == 405 and posted.value.headers["Allow"] == "GET, HEAD"


def test_metrics_listen_parsing() -> None:
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in (":9100", "host:", "host:port", "9100000"):
        with pytest.raises(SiteError, match="must be HOST:PORT or PORT"):
            parse_listen(bad)


def test_transfer_meter_counts_each_byte_once_across_retries() -> None:
    metrics = Metrics(store=None, hub=None)  # type: ignore[arg-type]
    meter = metrics.transfer_meter()
    for written in (100, 250, 250, 120, 300):   # a retry that restarted from an earlier offset
        meter(written, 300)
    assert metrics.transfer_bytes == {"received": 250 + 180}


def test_metrics_show_the_stream_from_each_peer(new_broker) -> None:  # type: ignore[no-untyped-def]
    from test_federation import federate  # type: ignore[import-not-found]

    sns = new_broker("sns")
    cluster = new_broker("cluster", extra=["--metrics-listen", "0", "--log-format", "json"])
    federate(sns, cluster)
    address = _metrics_address(cluster)
    with sns.service():
        gate = park.submit("park_test_tasks:sleep", 2.0)
    with cluster.service():
        fit = park.submit("park_test_tasks:add", 1, 1, when=gate.iscompleted)
    waiting = _scrape(address)[0]      # the gate sleeps for 2 s: the atom is still awaited
    assert waiting['park_peer_pending_atoms{peer="sns"}'] == 1 and fit.state == "waiting"
    assert waiting['park_peer_connected{peer="sns"}'] in (0, 1)
    assert fit.result(timeout=60) == 2
    samples = _scrape(address)[0]
    assert samples['park_peer_pending_atoms{peer="sns"}'] == 0
    assert samples['park_peer_last_seq{peer="sns"}'] >= gate.record().last_seq


def test_the_broker_logs_refused_calls_and_peer_streams_never_a_token(new_broker) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from park import tokens
    from park._proto import jobs_pb2 as jpb
    from park._proto import jobs_pb2_grpc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from harness import federate, site_audience, wait_for  # type: ignore[import-not-found]

    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    stranger = tokens.encode(tokens.issue(Ed25519PrivateKey.generate(), subject="mallory",
                                          audience=site_audience(sns)))
    with grpc.secure_channel(sns.address, grpc.ssl_channel_credentials(sns.cert.read_bytes())) as channel:
        with pytest.raises(grpc.RpcError):
            jobs_pb2_grpc.JobsStub(channel).List(jpb.ListRequest(), metadata=[("authorization", f"Bearer {stranger}")],
                                                  timeout=10)
    wait_for(lambda: "refused a call from ipv4:127.0.0.1:" in sns.log())
    line = next(x for x in sns.log().splitlines() if "refused a call" in x)
    assert "'mallory'" in line and "not signed by a key registered" in line and stranger not in sns.log()
    s, c = sns.service(), cluster.service()
    with s:
        upstream = park.submit("park_test_tasks:noop")
    with c:
        assert park.submit("park_test_tasks:noop", when=upstream.iscompleted).wait(timeout=60) == "completed"
    wait_for(lambda: "subscribed to peer sns" in cluster.log() and "peer cluster subscribed" in sns.log())


# -- the operators' view of peers (Site.Peers) -----------------------------------------------------

_PEER_FIELDS = {"name", "address", "state", "since", "last_error", "last_seq", "atoms_pending", "atoms_received",
                "idle_seconds", "subscribed", "subscribed_since", "atoms_watched"}


def _operator(broker: Broker, key: Path) -> park.Service:
    """A service of `broker` as the user "operator", whose tokens grant `admin` only."""
    from harness import broker_cli, public_key_of  # type: ignore[import-not-found]

    done = broker_cli("users", "add", str(broker.directory), "operator", "--key", public_key_of(key), "--allow", "admin")
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)   # a running broker re-reads users.toml at most once a second
    with mock.patch.dict(os.environ, PARK_KEY_FILE=str(key), PARK_USER="operator"):
        return broker.service()


def test_an_operator_sees_each_peers_streams_both_ways_and_no_secret(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from harness import federate, wait_for  # type: ignore[import-not-found]
    from park.signer import write_private_key

    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    key = tmp_path / "operator.key"
    write_private_key(key, Ed25519PrivateKey.generate(), None)
    at_sns, at_cluster = _operator(sns, key), _operator(cluster, key)
    assert "admin" in at_cluster.info.permissions
    (before,) = at_cluster.peers()
    assert {f.name for f in before.DESCRIPTOR.fields} == _PEER_FIELDS, "a new field: make sure it is no secret"
    assert (before.name, before.address, before.state) == ("sns", sns.peer_address, "idle")
    assert not before.subscribed and before.since == 0 and before.idle_seconds == -1

    gate = tmp_path / "gate"
    with sns.service():
        upstream = park.submit("park_test_tasks:settle_when", str(gate), True, 1.0)
    with cluster.service():
        fit = park.submit("park_test_tasks:add", 1, 1, when=upstream.iscompleted)
    wait_for(lambda: at_cluster.peers()[0].state == "connected" and at_sns.peers()[0].atoms_watched == 1)
    (ours,), (theirs,) = at_cluster.peers(), at_sns.peers()
    assert ours.atoms_pending == 1 and ours.atoms_received == 0 and ours.since > time.time() - 60
    assert theirs.name == "cluster" and theirs.subscribed and theirs.subscribed_since > time.time() - 60
    assert theirs.state == "idle"     # no job at sns waits on cluster: sns keeps no stream to it
    gate.write_text("go")
    assert fit.result(timeout=60) == 2
    (ours,), (theirs,) = at_cluster.peers(), at_sns.peers()
    assert (ours.atoms_pending, ours.atoms_received, theirs.atoms_watched) == (0, 1, 0)
    assert ours.last_seq >= upstream.record().last_seq and ours.last_error == ""

    with sqlite3.connect(cluster.directory / "park.db") as db:
        grants = [jobs_pb2.Job.FromString(r[0]).spec.grants["sns"] for r in db.execute("SELECT record FROM jobs")]
    secrets = [g for g in grants if g] + [sns.cert.read_text().splitlines()[1], cluster.cert.read_text().splitlines()[1]]
    assert len(secrets) == 3
    answers = at_cluster.peers() + at_sns.peers()
    assert not [s for s in secrets for a in answers if s.encode() in a.SerializeToString()]

    sns.stop()
    wait_for(lambda: at_cluster.peers()[0].state == "down")
    (down,) = at_cluster.peers()
    assert down.last_error.startswith(("cannot reach it (UNAVAILABLE", "the peer ended the stream")), down.last_error
    wait_for(lambda: at_cluster.peers()[0].last_error.startswith("cannot reach it (UNAVAILABLE"))


def test_peers_is_refused_to_all_but_operators(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from park._proto import site_pb2, site_pb2_grpc

    broker = new_broker("sns").start()
    user = broker.service()
    assert "admin" not in user.info.permissions and "submit" in user.info.permissions
    with pytest.raises(park.ServiceError) as refused:
        user.peers()
    assert refused.value.code == "PERMISSION_DENIED"
    assert "may not make operators' calls (admin) at site 'sns'" in refused.value.message
    with grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes())) as channel:
        stub = site_pb2_grpc.SiteStub(channel)
        assert list(stub.Info(site_pb2.InfoRequest(), timeout=10).permissions) == []
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Peers(site_pb2.PeersRequest(), timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED and "no token" in anonymous.value.details()
