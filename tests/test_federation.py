"""Several real brokers on loopback, federating over mutual TLS: remote atoms,
cross-site cancellation, peers that die and come back."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import park
from park._proto import jobs_pb2 as jpb
from harness import broker_cli, federate, wait_for  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def sites(new_broker):  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    return sns, cluster


def test_a_job_waits_on_a_job_at_another_site(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:write_output", "reduced at sns")
    with c:
        fit = park.submit("park_test_tasks:add", 20, 22, when=reduction.iscompleted)
        other = park.submit("park_test_tasks:add", 1, 1, when=reduction.iscancelled)
    assert fit.result(timeout=60) == 42
    assert other.wait(timeout=60) == "cancelled"
    assert "sns/" in other.record().cause.message
    started = next(e for e in fit.events() if e.kind == "started").time
    finished = next(e for e in reduction.events() if e.kind == "completed").time
    assert started >= finished


def test_failure_cancels_dependents_across_sites_transitively(sites) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:fail", "bad data")
    with c:
        simulation = park.submit("park_test_tasks:add", 1, 2, when=reduction.iscompleted)
        fit = park.submit("park_test_tasks:add", 3, 4, when=simulation.iscompleted)
    assert simulation.wait(timeout=60) == "cancelled"
    assert fit.wait(timeout=60) == "cancelled"
    cause = simulation.record().cause
    assert cause.kind == jpb.Cause.KIND_CONDITION and cause.atoms[0].site == "sns"
    assert cause.atoms[0].job_id == reduction.id


def test_a_peer_killed_and_restarted_only_delays(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        gate = park.submit("park_test_tasks:sleep", 1.5)
        reduction = park.submit("park_test_tasks:write_output", "x", when=gate.iscompleted)
    with c:
        dependent = park.submit("park_test_tasks:count_run", str(tmp_path), "runs.txt",
                                when=reduction.iscompleted)
    time.sleep(0.5)
    sns.kill()
    time.sleep(2.0)                      # the dependent must keep waiting, not be cancelled
    assert dependent.state == "waiting"
    sns.start()
    assert dependent.result(timeout=90) == 1
    assert (tmp_path / "runs.txt").read_text() == "run\n", "the dependent ran exactly once"


def test_every_remote_transition_is_applied_once_and_in_order(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        gates = [park.submit("park_test_tasks:sleep", 0.01 * (i % 7), memo=False) for i in range(200)]
    with c:
        waiting = [park.submit("park_test_tasks:add", i, 0, when=g.iscompleted) for i, g in enumerate(gates)]
    # Cut the federation stream repeatedly by restarting the publishing site while atoms resolve.
    for _ in range(2):
        time.sleep(1.0)
        sns.kill()
        time.sleep(0.3)
        sns.start()
    assert [w.result(timeout=120) for w in waiting] == list(range(200))
    for w in waiting:
        kinds = [e.kind for e in w.events()]
        assert kinds == ["submitted", "queued", "started", "completed"], kinds
    # The dependents were released in the order their atoms resolved at sns.
    resolved = {g.id: next(e.seq for e in g.events() if e.kind == "completed") for g in gates}
    queued = sorted(((next(e.seq for e in w.events() if e.kind == "queued"), resolved[g.id])
                     for w, g in zip(waiting, gates)))
    order = [sns_seq for _, sns_seq in queued]
    assert order == sorted(order)


def test_three_sites(new_broker) -> None:  # type: ignore[no-untyped-def]
    a, b, c = new_broker("alpha"), new_broker("beta"), new_broker("gamma")
    federate(a, b, c)
    sa, sb, sc = a.service(), b.service(), c.service()
    with sb:
        y = park.submit("park_test_tasks:add", 2, 2)
    assert y.result(timeout=60) == 4
    with sa:
        x = park.submit("park_test_tasks:sleep", 1.0)
    with sc:
        z = park.submit("park_test_tasks:add", 3, 3, when=x.iscompleted & y.iscompleted)
        # y has finished already, so "x completed while y had not finished" can never hold.
        never = park.submit("park_test_tasks:add", 4, 4, when=x.iscompleted & ~y.isfinished)
    assert never.wait(timeout=60) == "cancelled"
    assert never.record().cause.kind == jpb.Cause.KIND_NEVER_HOLDS
    assert x.state == "running", "decided without waiting for alpha"
    assert z.result(timeout=60) == 6


def test_a_site_that_is_not_a_peer_is_refused(new_broker) -> None:  # type: ignore[no-untyped-def]
    lone, other = new_broker("lone").start(), new_broker("other").start()
    with other.service():
        far = park.submit("park_test_tasks:noop")
    with pytest.raises(park.SubmitError, match="not a peer of 'lone'") as info:
        with lone.service():
            park.submit("park_test_tasks:noop", when=far.iscompleted)
    assert info.value.code == "FAILED_PRECONDITION"


def test_a_forged_grant_is_refused_by_the_publishing_site(sites) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:sleep", 1.0)
    spec = jpb.JobSpec(id="q" * 26, call=jpb.PythonCall(target="park_test_tasks:noop"))
    spec.when.postfix.add().atom.CopyFrom(park.wire.atom_to_proto(reduction.iscompleted.key))
    spec.grants["sns"] = "bm90IGEgdG9rZW4"   # not a token
    [result] = c.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]), timeout=10).results
    assert result.code == 0
    job = c.job("q" * 26)
    assert job.wait(timeout=60) == "cancelled"
    assert reduction.wait(timeout=60) == "completed"


def test_fetch_from_another_site_with_a_delegated_token(sites) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:write_bytes", 5 << 20, output="run42.refl")
    with c:
        fetch = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=reduction.iscompleted)
        size = park.submit("park_test_tasks:file_size", fetch.filename, when=fetch.isfetched)
    assert size.result(timeout=90) == 5 << 20
    assert fetch.filename.endswith("/run42.refl")
    [out] = fetch.record().outputs
    assert out.sha256 == reduction.record().outputs[0].sha256
    # Rerunning the script fetches nothing again.
    with c:
        again = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=reduction.iscompleted)
    assert again.memo_hit


def test_a_fetch_with_a_token_for_the_wrong_path_is_refused(sites) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    s, c = sns.service(), cluster.service()
    with s:
        secret = park.submit("park_test_tasks:write_output", "secret")
        public = park.submit("park_test_tasks:write_output", "public")
    secret.wait(timeout=30)
    public.wait(timeout=30)
    spec = park.api.spec_for(c, None, "output", "sneaky")
    path = public.url.split("/files", 1)[1]
    spec.fetch.CopyFrom(jpb.Fetch(url=secret.url, token=park.credentials(service=s, destination=c).token(
        [f"files.read:{path}"])))
    job = park.api.queue_spec(c, spec)
    assert job.wait(timeout=60) == "failed"
    assert "PERMISSION_DENIED" in job.record().error or "does not grant" in job.record().error
    assert not Path(job.filename).exists()


def test_the_seed_workflow_runs_end_to_end_and_reruns_for_free(new_broker) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    examples = Path(__file__).resolve().parent.parent / "examples"
    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)   # and nothing else: the example ships its own code to both sites
    command = [sys.executable, str(examples / "seed_workflow.py"), "--sns-address", sns.address,
               "--sns-cert", str(sns.cert), "--cluster-address", cluster.address, "--cluster-cert",
               str(cluster.cert), "--raw-bytes", str(2 << 20)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fit        cluster  completed  memo hit: False" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("memo hit: True") == 6, again.stdout


def test_the_root_cause_of_a_chain_across_sites_reaches_the_script_and_park_watch(sites, tmp_path, monkeypatch,
                                                                                  capsys) -> None:  # type: ignore[no-untyped-def]
    """sns's reduction fails; cluster's fetch of it and the fit after the fetch are cancelled. The fit's
    JobCancelled, and `park watch` of it, name the failure at the bottom, with its traceback."""
    from park.cli.app import main
    from park.config import add_service

    sns, cluster = sites
    monkeypatch.setenv("PARK_CONFIG", str(tmp_path / "client.toml"))
    add_service("sns", sns.address, sns.cert)
    add_service("cluster", cluster.address, cluster.cert)
    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:fail", "no module named seed_workflow", label="reduction")
    with c:
        fetch = park.fetch_url(reduction.url, auth=park.credentials(service=s), when=reduction.iscompleted)
        fit = park.submit("park_test_tasks:noop", when=fetch.isfetched, label="fit")
    with pytest.raises(park.JobCancelled) as cancelled:
        fit.result(timeout=60)
    root = cancelled.value.root_cause
    assert (root.site, root.job_id, root.label, root.state) == ("sns", reduction.id, "reduction", "failed")
    assert "no module named seed_workflow" in root.error and "Traceback" in root.traceback
    assert "cancelled because sns/reduction failed: ValueError: no module named seed_workflow" in str(cancelled.value)
    assert main(["watch", fit.id]) == 1
    out = capsys.readouterr().out
    assert "root cause: sns/reduction failed: ValueError: no module named seed_workflow" in out


def test_peers_added_and_removed_on_running_brokers_take_effect_without_a_restart(new_broker) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns").start(), new_broker("cluster").start()
    pid = cluster.proc.pid

    def pin(at, other) -> None:  # type: ignore[no-untyped-def]
        result = broker_cli("peers", "add", str(at.directory), other.site, "--address", other.peer_address,
                            "--cert", str(other.cert))
        assert result.returncode == 0, result.stderr

    s, c = sns.service(), cluster.service()
    with s:
        reduction = park.submit("park_test_tasks:write_output", "reduced at sns")
    with pytest.raises(park.SubmitError, match="not a peer of 'cluster'"):
        with c:
            park.submit("park_test_tasks:add", 1, 1, when=reduction.iscompleted)
    pin(sns, cluster)
    pin(cluster, sns)
    wait_for(lambda: cluster.log().count("peers changed: sns added") == 1 and "cluster added" in sns.log())
    with c:
        fit = park.submit("park_test_tasks:add", 20, 22, when=reduction.iscompleted)
    assert fit.result(timeout=60) == 42

    result = broker_cli("peers", "remove", str(cluster.directory), "sns")
    assert result.returncode == 0, result.stderr
    cluster.proc.send_signal(signal.SIGHUP)   # at once, rather than at the next look at the file
    wait_for(lambda: "sns removed" in cluster.log())
    with pytest.raises(park.SubmitError, match="not a peer of 'cluster'"):
        with c:
            park.submit("park_test_tasks:add", 1, 2, when=reduction.iscompleted)
    assert cluster.proc.pid == pid and cluster.proc.poll() is None, "the same broker, never restarted"
