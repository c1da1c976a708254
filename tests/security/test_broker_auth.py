"""Every broker call is authenticated and authorized: real brokers, real tokens, raw calls."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from harness import broker_cli, site_audience  # type: ignore[import-not-found]
from park import certificates, tokens
from park._proto import jobs_pb2 as jpb
from park._proto import tokens_pb2
from park._proto import jobs_pb2_grpc, site_pb2, site_pb2_grpc
from park.agent_client import default_subject
from park.auth import SessionTokens
from park.signer import read_private_key, write_private_key

pytestmark = pytest.mark.timeout(60)

NOOP = jpb.JobSpec(id="f" * 26, call=jpb.PythonCall(target="park_test_tasks:noop"))


def _user_key() -> Ed25519PrivateKey:
    return read_private_key(Path(os.environ["PARK_KEY_FILE"]), None)


def _raw(broker, token: str | None, *extra: tuple[str, str]):  # type: ignore[no-untyped-def]
    """A JobsStub on a channel that sends exactly the metadata given, nothing automatic."""
    channel = grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes()))
    metadata = ([("authorization", f"Bearer {token}")] if token is not None else []) + list(extra)
    return jobs_pb2_grpc.JobsStub(channel), metadata, channel


def _second_user(broker, name: str = "mallory"):  # type: ignore[no-untyped-def]
    """Register another user (submit only) at `broker`, and a JobsStub that calls as them."""
    key = Ed25519PrivateKey.generate()
    result = broker_cli("users", "add", str(broker.directory), name, "--key",
                        tokens.format_public_key(key.public_key()), "--allow", "submit")
    assert result.returncode == 0, result.stderr
    time.sleep(1.1)   # the broker re-reads users.toml at most once a second
    return _raw(broker, tokens.encode(tokens.issue(key, subject=name, audience=site_audience(broker))))


def _code(broker, token: str | None, *extra: tuple[str, str], request=None):  # type: ignore[no-untyped-def]
    stub, metadata, channel = _raw(broker, token, *extra)
    try:
        stub.SubmitMany(request or jpb.SubmitManyRequest(jobs=[NOOP]), metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    finally:
        channel.close()
    return grpc.StatusCode.OK, ""


def _session(broker, key: Ed25519PrivateKey, audience: str | None = None, **kwargs) -> str:  # type: ignore[no-untyped-def]
    return tokens.encode(tokens.issue(key, subject=default_subject(), audience=audience or site_audience(broker),
                                      **kwargs))


def test_missing_token_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    code, details = _code(broker, None)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no token" in details and "PARK_KEY_FILE" in details


def test_garbled_token_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    code, details = _code(broker, "not-base64-at-all!!")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token refused" in details


def test_malformed_authorization_metadata(broker) -> None:  # type: ignore[no-untyped-def]
    stub, _, channel = _raw(broker, None)
    for metadata in ([("authorization", "Basic dXNlcjpwdw==")],
                     [("authorization", f"Bearer {_session(broker, _user_key())}")] * 2):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitMany(jpb.SubmitManyRequest(jobs=[NOOP]), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "exactly one 'authorization: Bearer" in info.value.details()
    channel.close()


def test_expired_session_token_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    old = _session(broker, _user_key(), now=time.time() - 3600)
    code, details = _code(broker, old)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details


def test_token_for_another_site_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    code, details = _code(broker, _session(broker, _user_key(), audience="SNS"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and f"not {site_audience(broker)!r}" in details


def test_a_token_handed_to_an_impostor_of_the_same_name_is_refused(new_broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Any operator can init a site called sns: what a client's token names is the site it pinned, name and
    identity key, so a token made for the impostor is refused by the real sns."""
    real = new_broker().start()
    broker_cli("init", str(tmp_path / "impostor"), "--site", "sns")
    impostor_audience = certificates.audience((tmp_path / "impostor" / "tls.crt").read_bytes())
    assert impostor_audience.startswith("sns:") and impostor_audience != site_audience(real)
    code, details = _code(real, _session(real, _user_key(), audience=impostor_audience))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "pinned another site's certificate under this name" in details


def test_a_token_of_the_old_format_is_refused_with_a_message_to_upgrade(broker) -> None:  # type: ignore[no-untyped-def]
    claims = tokens_pb2.Claims(version=1, issuer=tokens.key_id(_user_key().public_key()), subject=default_subject(),
                               audience="sns", scopes=["jobs.submit"], not_before=int(time.time()) - 60,
                               expires=int(time.time()) + 600, id="ab" * 16)
    old = tokens.encode(tokens_pb2.Token(links=[tokens.sign_link(claims, _user_key())]))
    code, details = _code(broker, old)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "format 1" in details and "upgrade" in details


def test_key_not_registered_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    code, details = _code(broker, _session(broker, Ed25519PrivateKey.generate()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not signed by a key registered" in details


def test_token_without_the_scope_is_permission_denied(broker) -> None:  # type: ignore[no-untyped-def]
    read_only = _session(broker, _user_key(), scopes=["jobs.read:/"])
    code, details = _code(broker, read_only)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may not submit" in details


def test_user_not_allowed_to_submit_is_permission_denied(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(allow="upload").start()
    stub, metadata, channel = _raw(broker, _session(broker, _user_key()))
    [result] = stub.SubmitMany(jpb.SubmitManyRequest(jobs=[NOOP]), metadata=metadata, timeout=10).results
    assert result.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "may not submit" in result.message
    channel.close()
    reader = new_broker("cluster", allow="").start()   # every user may read; this one nothing more
    code, details = _code(reader, _session(reader, _user_key()))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may not submit or upload" in details


def test_delegated_token_used_as_bearer_is_unauthenticated(broker) -> None:  # type: ignore[no-untyped-def]
    other = Ed25519PrivateKey.generate()
    delegated = _session(broker, _user_key(), confirm=tokens.key_id(other.public_key()))
    code, details = _code(broker, delegated)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "did not prove possession" in details


def test_revocation_takes_effect_on_a_running_broker(broker) -> None:  # type: ignore[no-untyped-def]
    token = tokens.issue(_user_key(), subject=default_subject(), audience=site_audience(broker))
    text = tokens.encode(token)
    assert _code(broker, text)[0] == grpc.StatusCode.OK
    result = broker_cli("tokens", "revoke", str(broker.directory), tokens.link_id(token.links[0]))
    assert result.returncode == 0, result.stderr
    time.sleep(1.1)   # re-read within a second
    code, details = _code(broker, text, request=jpb.SubmitManyRequest(jobs=[
        jpb.JobSpec(id="g" * 26, call=jpb.PythonCall(target="park_test_tasks:noop"))]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details


def test_another_users_job_is_not_found(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    mine = broker.service()
    with mine:
        job = park.submit("park_test_tasks:noop")
    job.wait(timeout=30)
    # A second user, registered at the same site.
    stub, metadata, channel = _second_user(broker)
    for call in (lambda: stub.Get(jpb.GetRequest(job_id=job.id), metadata=metadata, timeout=10),
                 lambda: stub.Cancel(jpb.CancelRequest(job_id=job.id), metadata=metadata, timeout=10),
                 lambda: list(stub.Watch(jpb.WatchRequest(job_id=job.id), metadata=metadata, timeout=10))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "of yours" in info.value.details()
    listing = stub.List(jpb.ListRequest(), metadata=metadata, timeout=10)
    assert list(listing.jobs) == []
    channel.close()


def test_conditions_and_races_cannot_name_another_users_jobs(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    with broker.service():
        running = park.submit("park_test_tasks:sleep", 30, memo=False)
    stub, metadata, channel = _second_user(broker)
    oracle = jpb.JobSpec(id=park.service.new_job_id(), call=jpb.PythonCall(target="park_test_tasks:noop"))
    oracle.when.CopyFrom(park.wire.condition_to_proto(running.iscompleted))
    race = jpb.JobSpec(id=park.service.new_job_id(), race=jpb.Race(contestants=[running.id], until="step > 0"))
    results = stub.SubmitMany(jpb.SubmitManyRequest(jobs=[oracle, race]), metadata=metadata, timeout=10).results
    for result in results:
        assert result.code == grpc.StatusCode.NOT_FOUND.value[0], result.message
        assert f"names job {running.id}, which site 'sns' does not have" in result.message
    assert running.state == "running", "mallory's race did not cancel alice's job"
    running.cancel()
    channel.close()


def test_public_info_is_anonymous_but_a_bad_token_is_still_refused(broker) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes()))
    stub = site_pb2_grpc.SiteStub(channel)
    assert stub.Info(site_pb2.InfoRequest(), timeout=10).caller == ""
    with pytest.raises(grpc.RpcError) as info:
        stub.Info(site_pb2.InfoRequest(), metadata=[("authorization", "Bearer junk")], timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_client_without_credentials_is_told_what_to_set_up(broker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("PARK_KEY_FILE")
    service = park.Service(broker.address, broker.cert)
    with pytest.raises(park.ServiceError, match="start park-agent") as info:
        with service:
            park.submit("park_test_tasks:noop")
    assert info.value.code == "UNAUTHENTICATED"
    service.close()


def test_client_key_file_readable_by_others_is_refused(broker, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    loose = tmp_path / "loose.key"
    write_private_key(loose, Ed25519PrivateKey.generate(), None)
    loose.chmod(0o644)
    monkeypatch.setenv("PARK_KEY_FILE", str(loose))
    with pytest.raises(park.ConfigError, match="PARK_KEY_FILE"):
        park.Service(broker.address, broker.cert)


def test_session_tokens_are_refreshed_before_they_expire() -> None:
    issued: list[float] = []

    class Source:
        def session_token(self, audience: str, *, scopes=()):  # type: ignore[no-untyped-def]
            from park.agent_client import IssuedToken
            issued.append(time.time())
            # A token with 30 s left is inside the refresh margin: asked for again next time.
            return IssuedToken(token=f"t{len(issued)}", expires=int(time.time()) + 30, key_id="k")

    plugin = SessionTokens("sns", Source())  # type: ignore[arg-type]
    assert plugin.current() == "t1"
    assert plugin.current() == "t2"

    class LongSource(Source):
        def session_token(self, audience: str, *, scopes=()):  # type: ignore[no-untyped-def]
            from park.agent_client import IssuedToken
            issued.append(time.time())
            return IssuedToken(token="long", expires=int(time.time()) + 600, key_id="k")

    plugin = SessionTokens("sns", LongSource())  # type: ignore[arg-type]
    assert plugin.current() == plugin.current() == "long"
    assert len(issued) == 3, "a token far from expiry is reused"


def test_no_answer_carries_a_delegated_token_even_to_an_admin(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(allow="submit,upload,admin").start()
    service = broker.service()
    secret = "c2VjcmV0LWRlbGVnYXRlZC10b2tlbg"
    spec = jpb.JobSpec(id=park.service.new_job_id(), call=jpb.PythonCall(target="park_test_tasks:noop"),
                       grants={"sns": secret})
    live = service.jobs_stub.Watch(jpb.WatchRequest(), timeout=20)   # events as they are committed
    assert next(live).HasField("progress")   # caught up: what follows is live
    [result] = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]), timeout=10).results
    assert result.code == 0, result.message
    service.job(spec.id).wait(timeout=30)
    answers: list[Any] = []
    while not any(e.WhichOneof("kind") == "completed" for e in answers):
        answers.extend(next(live).events)
    live.cancel()
    assert answers[0].WhichOneof("kind") == "submitted" and "sns" in answers[0].submitted.spec.grants
    answers += [service.jobs_stub.Get(jpb.GetRequest(job_id=spec.id), timeout=10),
                *service.jobs_stub.List(jpb.ListRequest(), timeout=10).jobs]
    stream = service.jobs_stub.Watch(jpb.WatchRequest(job_id=spec.id), timeout=10)   # replayed from the store
    for response in stream:
        if response.HasField("progress"):   # caught up with the log
            stream.cancel()
            break
        answers.extend(response.events)
    assert [e.WhichOneof("kind") for e in answers[-4:]] == ["submitted", "queued", "started", "completed"]
    assert "sns" in answers[-4].submitted.spec.grants
    for answer in answers:
        assert secret.encode() not in answer.SerializeToString(), answer


def test_a_submission_may_carry_only_its_submitters_delegated_tokens(new_broker) -> None:  # type: ignore[no-untyped-def]
    """The confused deputy: mallory hands the site a token alice delegated, for the site to present."""
    broker = new_broker().start()
    alices = tokens.encode(tokens.issue(_user_key(), subject=default_subject(), audience=site_audience(broker),
                                        scopes=["files.read:/x/" + "a" * 26 + "/output"], confirm="ab" * 32))
    stub, metadata, channel = _second_user(broker)
    grant = jpb.JobSpec(id=park.service.new_job_id(), call=jpb.PythonCall(target="park_test_tasks:noop"),
                        grants={"cluster": alices})
    fetch = jpb.JobSpec(id=park.service.new_job_id(), fetch=jpb.Fetch(url="park://cluster/files/x/y/z", token=alices))
    results = stub.SubmitMany(jpb.SubmitManyRequest(jobs=[grant, fetch]), metadata=metadata, timeout=10).results
    for result in results:
        assert result.code == grpc.StatusCode.PERMISSION_DENIED.value[0], result.message
        assert f"speaks for {default_subject()!r}, not for you ('mallory')" in result.message
    channel.close()


def test_revocation_ends_an_open_watch_within_seconds(broker) -> None:  # type: ignore[no-untyped-def]
    token = tokens.issue(_user_key(), subject=default_subject(), audience=site_audience(broker))
    stub, metadata, channel = _raw(broker, tokens.encode(token))
    stream = stub.Watch(jpb.WatchRequest(), metadata=metadata, timeout=30)
    first = next(stream)
    assert first.HasField("progress"), "the stream is open and caught up"
    result = broker_cli("tokens", "revoke", str(broker.directory), tokens.link_id(token.links[0]))
    assert result.returncode == 0, result.stderr
    revoked = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:   # an idle Watch: it would otherwise only send progress marks every 15 s
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no longer hold" in (info.value.details() or "") and "revoked" in (info.value.details() or "")
    assert time.monotonic() - revoked < 5
    channel.close()


def test_a_removed_user_is_refused_at_once_open_streams_included(broker) -> None:  # type: ignore[no-untyped-def]
    stub, metadata, channel = _second_user(broker)
    stream = stub.Watch(jpb.WatchRequest(), metadata=metadata, timeout=30)
    assert next(stream).HasField("progress")
    result = broker_cli("users", "remove", str(broker.directory), "mallory")
    assert result.returncode == 0 and "may no longer use site sns" in result.stdout
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "no longer hold" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as refused:
        stub.List(jpb.ListRequest(), metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert broker.service().info.caller == default_subject(), "the other users are untouched"
    again = broker_cli("users", "remove", str(broker.directory), "mallory")
    assert again.returncode == 2 and "has no user 'mallory'" in again.stderr
    channel.close()


def test_warm_workers_are_never_shared_between_users(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(workers=1).start()
    stub, metadata, channel = _second_user(broker)
    service = broker.service()

    def pid_of_a_job(who: str, submit) -> int:  # type: ignore[no-untyped-def]
        marker = tmp_path / f"{who}-{len(list(tmp_path.iterdir()))}.pid"
        job_id = park.service.new_job_id()
        submit(jpb.JobSpec(id=job_id, no_memo=True, call=jpb.PythonCall(
            target="park_test_tasks:sleep", args_json=f'[0, "{marker}"]')))
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline, f"{who}'s job did not run"
            time.sleep(0.05)
        time.sleep(0.3)   # the job has ended and its worker is idle again
        return int(marker.read_text())

    mine = lambda spec: service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]), timeout=10)  # noqa: E731
    hers = lambda spec: stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]), metadata=metadata, timeout=10)  # noqa: E731
    first, again = pid_of_a_job("me", mine), pid_of_a_job("me", mine)
    assert first == again, "a user's jobs share a warm worker"
    theirs = pid_of_a_job("mallory", hers)
    assert theirs != first, "another user's job gets a fresh process"
    assert pid_of_a_job("me", mine) not in (first, theirs)
    channel.close()


def test_a_watch_that_outlives_its_session_token_resumes_with_a_fresh_one(broker) -> None:  # type: ignore[no-untyped-def]
    """The broker ends a stream whose token expired (within about a second); the client library resumes
    it from the last event with a fresh token, so an honest watcher loses nothing and sees nothing twice."""
    from park.agent_client import IssuedToken

    audience = site_audience(broker)
    issued: list[float] = []

    class ShortLived:
        def session_token(self, audience_: str, *, scopes=()):  # type: ignore[no-untyped-def]
            issued.append(time.time())
            token = tokens.issue(_user_key(), subject=default_subject(), audience=audience, lifetime=3)
            return IssuedToken(token=tokens.encode(token), expires=int(time.time()) + 3, key_id="k")

    service = broker.service()
    service.tokens.source = ShortLived()  # type: ignore[assignment]   (each call: 3 s left, so a fresh one)
    with service:
        job = park.run(["sleep", "8"])
    events = list(job.events(timeout=60))
    assert [e.kind for e in events] == ["submitted", "queued", "started", "completed"]
    assert len({e.seq for e in events}) == len(events)
    assert len(issued) >= 3, "the stream was resumed with fresh tokens"
