"""An open Subscribe stream never outlives its grants: when who may use the publishing site changes (a
revocation, a user removed), every watched atom's grant is checked again, and the refused ones end."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import park
from harness import broker_cli, federate  # type: ignore[import-not-found]
from park.agent_client import default_subject

pytestmark = pytest.mark.timeout(120)


def test_removing_the_user_ends_the_grants_their_waiting_jobs_hold_on_an_open_stream(
        new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.run(["sh", "-c", f"while [ ! -e {tmp_path / 'never'} ]; do sleep 0.2; done"])
    with c:
        fit = park.submit("park_test_tasks:noop", when=reduction.iscompleted)
    fit.acknowledged()
    time.sleep(1.5)   # the atom is asked for and watched on cluster's open stream to sns
    assert c.job(fit.id).state == "waiting"
    assert broker_cli("users", "remove", str(sns.directory), default_subject()).returncode == 0
    removed = time.monotonic()
    assert fit.wait(timeout=30) == "cancelled"
    assert time.monotonic() - removed < 10, "ended within seconds, not at the grant's expiry"
    assert f"its condition was cancelled by sns/{reduction.id}.completed" in fit.record().cause.message
    assert "refused atom" in cluster.log() and "not signed by a key registered" in cluster.log()
