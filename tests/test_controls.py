"""Everyday job controls against a real broker: retries with backoff, time limits, the site's limit."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import park
from harness import alive, as_user, broker_cli, check_cpus_are_held, wait_for  # type: ignore[import-not-found]
from park.agent_client import default_subject

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    directory = tmp_path / "runs"
    directory.mkdir()
    directory.chmod(0o777)   # the jobs count their runs here, as whichever account they run as
    return directory


def test_a_failed_attempt_runs_again_and_dependents_see_only_the_final_outcome(service, runs) -> None:  # type: ignore[no-untyped-def]
    with service:
        flaky = park.submit("park_test_tasks:fail_times", str(runs), "flaky", 2, retries=2, retry_delay=0.2)
        after = park.submit("park_test_tasks:count_run", str(runs), "after", when=flaky.iscompleted)
    assert flaky.result(timeout=60) == 3
    assert after.result(timeout=30) == 1, "the dependent ran once, after the final attempt"
    events = flaky.history()
    assert [e.detail.get("attempt") for e in events if e.kind == "started"] == [1, 2, 3]
    retried = [e.detail["reason"] for e in events if e.kind == "queued" and "attempt" in e.detail.get("reason", "")]
    assert retried == ["attempt 1 failed: RuntimeError: planned failure 1 of 2; attempt 2 of 3 in 0.2 s",
                       "attempt 2 failed: RuntimeError: planned failure 2 of 2; attempt 3 of 3 in 0.4 s"]
    started = [e.time for e in events if e.kind == "started"]
    assert started[2] - started[1] >= 0.35, "the delay doubles"


def test_a_job_out_of_retries_fails_and_its_dependents_are_cancelled(service, runs) -> None:  # type: ignore[no-untyped-def]
    with service:
        doomed = park.submit("park_test_tasks:fail_times", str(runs), "doomed", 5, retries=1, retry_delay=0)
        after = park.submit("park_test_tasks:noop", when=doomed.iscompleted)
    assert doomed.wait(timeout=60) == "failed"
    assert doomed.record().attempts == 2 and "planned failure 2 of 5" in doomed.record().error
    assert after.wait(timeout=30) == "cancelled"


def test_an_attempt_over_its_time_limit_is_terminated_and_fails(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "slow.pid"
    with service:
        slow = park.submit("park_test_tasks:sleep", 60, str(marker), timeout=1.5, retries=1, retry_delay=0)
    begun = time.monotonic()
    assert slow.wait(timeout=60) == "failed"
    assert time.monotonic() - begun < 30
    record = slow.record()
    assert record.error == "timed out after 1.5 s" and record.attempts == 2, "timed out, retried, timed out"
    wait_for(lambda: not alive(int(marker.read_text())), timeout=10)


def test_a_cancelled_job_is_never_retried(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "c.pid"
    with service:
        job = park.submit("park_test_tasks:sleep", 60, str(marker), retries=3, retry_delay=0)
    wait_for(lambda: marker.exists() and marker.read_text().strip() != "")
    assert job.cancel() == "cancelled"
    time.sleep(1.0)
    assert job.state == "cancelled" and job.record().attempts == 1


def test_the_sites_walltime_limit_refuses_more_and_bounds_the_rest(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(extra=["--max-walltime", "2"]).start()
    service = broker.service()
    with pytest.raises(park.SubmitError) as refused:
        with service:
            park.submit("park_test_tasks:sleep", 1, timeout=10)
    assert refused.value.code == "FAILED_PRECONDITION" and "lets an attempt run 2 s at most" in str(refused.value)
    with service:
        unbounded = park.submit("park_test_tasks:sleep", 60)
    assert unbounded.wait(timeout=60) == "failed" and unbounded.record().error == "timed out after 2 s"


@pytest.mark.parametrize("controls", [dict(retries=-1), dict(retries=1000), dict(retry_delay=-1.0),
                                      dict(timeout=0), dict(timeout=float("nan"))])
def test_controls_that_cannot_be_kept_are_refused_before_they_are_sent(service, controls) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        park.submit("park_test_tasks:noop", service=service, **controls)


def _order(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_users_queued_jobs_run_highest_priority_first(new_broker, runs) -> None:  # type: ignore[no-untyped-def]
    service = new_broker(workers=1).start().service()
    gate, order = runs / "gate", runs / "order"
    with service:
        blocker = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"])
        jobs = [park.submit("park_test_tasks:append_line", str(order), name, priority=p, memo=False)
                for name, p in (("low", 0), ("high", 10), ("middle", 5))]
    wait_for(lambda: blocker.state == "running")
    gate.touch()
    for job in jobs:
        job.wait(timeout=30)
    assert _order(order) == ["high", "middle", "low"]


def test_the_queue_takes_turns_between_users(new_broker, runs) -> None:  # type: ignore[no-untyped-def]
    """Twenty queued jobs of one user delay another user's one job by a single turn, not twenty."""
    broker = new_broker(workers=1).start()
    gate, order = runs / "gate", runs / "order"
    with broker.service():
        blocker = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"])
        mine = [park.submit("park_test_tasks:append_line", str(order), f"mine{i}", memo=False) for i in range(20)]
    wait_for(lambda: blocker.state == "running")
    with as_user(broker, "bob", runs.parent, "--allow", "submit"):
        with broker.service():
            theirs = park.submit("park_test_tasks:append_line", str(order), "bob", memo=False)
            theirs.acknowledged()
    gate.touch()
    for job in [theirs, *mine]:
        job.wait(timeout=60)
    assert _order(order).index("bob") <= 1, _order(order)


def test_a_running_quota_holds_further_jobs_and_a_waiting_quota_refuses_them(new_broker, runs) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(workers=2)
    me = default_subject()
    assert broker_cli("users", "set", str(broker.directory), me, "--max-running", "1", "--max-waiting",
                      "2").returncode == 0
    service = broker.start().service()
    gate, second = runs / "gate", runs / "second"
    with service:
        first = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"])
        held = park.submit("park_test_tasks:touch", str(second))
    wait_for(lambda: first.state == "running")
    time.sleep(1.0)
    assert not second.exists() and held.state == "queued", "a free worker, but the user is at their quota"
    with service:
        waiting = [park.submit("park_test_tasks:noop", when=first.iscompleted, memo=False)]
    with pytest.raises(park.SubmitError) as refused:
        with service:
            park.submit("park_test_tasks:noop", when=first.iscompleted, memo=False)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert f"user {me!r} may have 2 jobs waiting or queued at site 'sns' and has 2" in str(refused.value)
    gate.touch()
    assert held.wait(timeout=30) == "completed" and waiting[0].wait(timeout=30) == "completed"


def test_jobs_start_only_when_the_resources_they_ask_for_are_free(new_broker, runs) -> None:  # type: ignore[no-untyped-def]
    """On a 2-cpu site (3 workers): GPUs are given to one job each; two 1-cpu jobs run together; a 2-cpu job
    runs alone."""
    service = new_broker(workers=3, extra=["--cpus", "2", "--gpus", "2"]).start().service()
    gate = runs / "gate"
    marker = [runs / f"m{i}" for i in range(2)]
    with service:
        ones = [park.submit("park_test_tasks:wait_with_marker", str(marker[i]), str(gate), resources={"gpus": 1},
                            memo=False) for i in (0, 1)]
    wait_for(lambda: marker[0].exists() and marker[1].exists())
    assert sorted(m.read_text() for m in marker) == ["0", "1"], "one GPU each"
    gate.touch()
    assert sorted(j.result(timeout=30) for j in ones) == ["0", "1"]
    check_cpus_are_held(service, runs)


def test_a_job_over_its_memory_limit_fails_saying_so(service) -> None:  # type: ignore[no-untyped-def]
    with service:
        greedy = park.submit("park_test_tasks:allocate", 800 << 20, resources={"memory": "100MiB"})
        modest = park.submit("park_test_tasks:allocate", 10 << 20, resources={"memory": "100MiB"})
    assert greedy.wait(timeout=30) == "failed"
    assert greedy.record().error == "MemoryError: the job went over its memory limit of 0.10 GiB"
    assert modest.result(timeout=30) == 10 << 20


def test_a_request_no_site_resource_could_meet_is_refused_saying_what_the_site_has(new_broker) -> None:  # type: ignore[no-untyped-def]
    service = new_broker(extra=["--cpus", "2", "--memory", "4GiB"]).start().service()
    with pytest.raises(park.SubmitError) as refused:
        with service:
            park.submit("park_test_tasks:noop", resources={"cpus": 64})
    assert refused.value.code == "FAILED_PRECONDITION"
    assert "site 'sns' has 2 cpus, 4.0 GiB of memory and 0 gpus for jobs" in str(refused.value)
    assert service.info.resources.cpus == 2 and service.info.resources.memory_bytes == 4 << 30
    for bad in ({"cpus": -1}, {"memory": "lots"}, {"disks": 2}, {"gpus": 0.5}):
        with pytest.raises(ValueError):
            park.submit("park_test_tasks:noop", service=service, resources=bad)


def test_jobs_run_at_the_sites_job_nice_value(new_broker) -> None:  # type: ignore[no-untyped-def]
    """Jobs yield the CPU to the broker (default nice 10, as batch processes that never preempt the broker when
    it hands them work); an operator can set the nice value, and a job cannot undo it."""
    for site, extra, nice in (("sns", [], 10), ("hfir", ["--job-nice", "3"], 3)):
        broker = new_broker(site, extra=extra).start()
        with broker.service():
            now, raised = park.submit("os:nice", 0, memo=False), park.submit("os:nice", -1, memo=False)
            policy = park.submit("os:sched_getscheduler", 0, memo=False)
        assert policy.result(timeout=60) == os.SCHED_BATCH
        assert now.result(timeout=60) == nice
        assert raised.wait(timeout=60) == "failed" and "PermissionError" in raised.record().error
        broker.stop()
