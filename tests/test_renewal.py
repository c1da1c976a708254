"""Credentials that outlive the wait: a site caps delegated tokens' lifetime (`serve --max-delegation`), a
job that waits longer says it needs fresh credentials instead of failing, and `park renew` lets it go on."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import park
from harness import federate, wait_for  # type: ignore[import-not-found]
from park.cli.app import main
from park.config import add_service

pytestmark = pytest.mark.timeout(120)
CAP = 6   # seconds: sns accepts delegated tokens of at most this lifetime


def _park(capsys, *argv: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out + err


def test_a_waiting_fetch_outlives_the_delegation_cap_through_park_renew(new_broker, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns", extra=["--max-delegation", str(CAP)]), new_broker("cluster")
    federate(sns, cluster)
    monkeypatch.setenv("PARK_CONFIG", str(tmp_path / "client.toml"))
    add_service("sns", sns.address, sns.cert)
    add_service("cluster", cluster.address, cluster.cert)
    s, c = sns.service(), cluster.service()
    assert s.info.max_delegation_seconds == CAP
    gate = tmp_path / "gate"   # the reduction waits for it, as for a slot in a facility's queue
    with s:
        reduction = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done; echo data > output"])
    with c:
        # Both the grant (to watch the reduction) and the fetch's token are for sns: CAP seconds each.
        fetch = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=reduction.iscompleted)
    job = c.job(fetch.id)
    wait_for(lambda: "needs fresh credentials for sns" in job.record().attention, timeout=CAP + 20)
    assert job.state == "waiting", "waiting for fresh credentials, not cancelled"
    status, out = _park(capsys, "jobs", "--service", "cluster")
    assert status == 0 and "needs fresh credentials for sns" in out and "park renew" in out
    assert "needs_credentials" in [e.kind for e in job.history()]

    status, out = _park(capsys, "renew")
    assert status == 0, out
    assert f"cluster: renewed the grant token of job {fetch.id} (for sns)" in out
    assert f"cluster: renewed the fetch token of job {fetch.id} (for sns)" in out
    assert job.record().attention == ""
    gate.touch()
    assert job.wait(timeout=30) == "completed"
    assert Path(fetch.filename).read_text() == "data\n"
    kinds = [e.kind for e in job.events()]
    assert kinds.count("renewed") == 2 and "cancelled" not in kinds and "failed" not in kinds


@pytest.fixture
def capped(new_broker):  # type: ignore[no-untyped-def]
    """Federated sns (which accepts delegated tokens of CAP seconds at most) and cluster, and a
    completed job at sns with an output to fetch."""
    sns, cluster = new_broker("sns", extra=["--max-delegation", str(CAP)]), new_broker("cluster")
    federate(sns, cluster)
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.run(["sh", "-c", "echo data > output"])
    assert reduction.wait(timeout=30) == "completed"
    return s, c, reduction


def test_a_site_refuses_a_delegated_token_longer_than_it_accepts(capped) -> None:  # type: ignore[no-untyped-def]
    s, c, reduction = capped
    with c:
        long = park.fetch_url(reduction.url, auth=park.credentials(service=s, lifetime=CAP * 10))
    assert long.wait(timeout=30) == "failed"
    assert f"accepts at most {CAP} s" in long.record().error


def test_renewing_needs_a_like_token_of_the_jobs_owner(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Renew replaces a credential only with one of the same audience, scopes and confirm key, for the
    job's owner, expiring later; and nobody else's job can be renewed (the same answer as no job)."""
    from park._proto import jobs_pb2 as jpb
    from park.errors import ServiceError

    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.run(["sh", "-c", f"while [ ! -e {tmp_path / 'never'} ]; do sleep 0.2; done"])
    with c:
        fetch = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=reduction.iscompleted)
    fetch.acknowledged()
    [held] = [h for h in c.jobs_stub.Credentials(jpb.CredentialsRequest(), timeout=10).credentials
              if h.use == "fetch"]
    assert held.job_id == fetch.id and held.site == "sns" and held.audience == s.audience
    source = c.tokens.source
    assert source is not None
    cases = {
        "other scopes": source.delegate(held.audience, scopes=["files.read:/x/" + "a" * 26 + "/y"],
                                        confirm=held.confirm, lifetime=3600).token,
        "not a token": "garbage",
    }
    for what, token in cases.items():
        with pytest.raises(ServiceError) as refused:
            c.call(c.jobs_stub.Renew, jpb.RenewRequest(job_id=fetch.id, use="fetch", site="sns", token=token), what)
        assert refused.value.code == "INVALID_ARGUMENT", what
    with pytest.raises(ServiceError) as refused:
        c.call(c.jobs_stub.Renew, jpb.RenewRequest(job_id="b" * 26, use="fetch", site="sns", token="x"), "no job")
    assert refused.value.code == "NOT_FOUND"
    assert fetch.record().spec.fetch.token == "", "answers never carry tokens"
    c.job(fetch.id).cancel()
    s.job(reduction.id).cancel()


def test_a_fetch_whose_token_expired_while_it_waited_holds_until_renewed(capped, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s, c, reduction = capped
    gate = tmp_path / "gate"
    with c:   # waits on a job of its own site: only the fetch's token is at stake
        local = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done"])
        fetch = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=local.iscompleted)
    fetch.acknowledged()
    time.sleep(CAP + 1)   # the token is now expired
    gate.touch()
    job = c.job(fetch.id)
    wait_for(lambda: "needs fresh credentials for sns" in job.record().attention, timeout=30)
    assert job.state == "queued", "held back, not failed"
    assert [cred.use for cred in park.renew(c)] == ["fetch"]
    assert job.wait(timeout=30) == "completed"
