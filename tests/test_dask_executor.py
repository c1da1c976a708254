"""The Dask executor on a real `LocalCluster`: brokers started with `--executor dask://HOST:PORT`
run their jobs on the cluster's worker processes, with the local executor's behaviour."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import park
from harness import Broker, alive, broker_cli, check_cpus_are_held, wait_for  # type: ignore[import-not-found]

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       scheduler_port=0, dashboard_address=None)
    yield cluster
    cluster.close()


@pytest.fixture
def dask_broker(new_broker: Callable[..., Broker], cluster: distributed.LocalCluster) -> Broker:
    address = cluster.scheduler_address.removeprefix("tcp://")
    return new_broker(extra=["--executor", f"dask://{address}"]).start()


@pytest.fixture
def service(dask_broker: Broker) -> park.Service:
    return dask_broker.service()


def test_call_and_command_jobs_complete_with_results_and_stdout(service: park.Service) -> None:
    assert service.info.executor == "dask"
    with service:
        call = park.submit("park_test_tasks:write_output", "hello", output="data.txt")
        command = park.run([sys.executable, "-c", "import os; print('hi from', os.environ['PARK_JOB_ID'])"])
        bad = park.run([sys.executable, "-c", "raise SystemExit(4)"])
    assert call.result(timeout=30) == call.id
    assert Path(call.filename).read_text() == "hello"
    [output] = call.record().outputs
    assert output.size == 5 and len(output.sha256) == 64
    assert (Path(call.filename).parent / "stdout.log").read_text() == "wrote 5 characters\n"
    assert command.result(timeout=30) is None
    assert (Path(command.filename).parent / "stdout.log").read_text() == f"hi from {command.id}\n"
    with pytest.raises(park.JobFailed, match="exited with status 4"):
        bad.result(timeout=30)
    assert [e.kind for e in call.events()] == ["submitted", "queued", "started", "completed"]


def test_failure_is_job_failed_with_traceback_and_a_chain_runs_in_order(service: park.Service,
                                                                        tmp_path: Path) -> None:
    lines = str(tmp_path / "lines.txt")
    with service:
        failed = park.submit("park_test_tasks:fail", "boom")
        a = park.submit("park_test_tasks:append_line", lines, "a")
        b = park.submit("park_test_tasks:append_line", lines, "b", when=a.iscompleted)
        c = park.submit("park_test_tasks:append_line", lines, "c", when=b.iscompleted)
    with pytest.raises(park.JobFailed, match="ValueError: boom") as raised:
        failed.result(timeout=30)
    assert "Traceback" in raised.value.traceback and "park_test_tasks.py" in raised.value.traceback
    assert c.result(timeout=30) == 3
    assert Path(lines).read_text() == "a\nb\nc\n"


def test_cancel_running_job_terminates_its_process(service: park.Service, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with service:
        job = park.submit("park_test_tasks:sleep", 60, str(marker))
    wait_for(marker.exists)
    pid = int(marker.read_text())
    assert job.state == "running"
    assert job.cancel() == "cancelled"
    wait_for(lambda: not alive(pid), timeout=20)
    with service:   # the Dask worker's thread is free again
        assert [park.submit("park_test_tasks:add", i, 1).result(timeout=30) for i in range(3)] == [1, 2, 3]


def test_progress_reports_from_a_dask_worker_gate_an_improved_dependent(service: park.Service,
                                                                          tmp_path: Path) -> None:
    marker = tmp_path / "dependent-started"
    with service:
        fit = park.submit("park_test_tasks:fit", [3.0, 2.0, 0.9, 0.8], 0.05, wait_for=str(marker))
        dependent = park.submit("park_test_tasks:touch", str(marker), when=fit.improved("chisq < 1.0"))
    # The fit only finishes once the dependent has started: it must have started mid-run.
    assert fit.result(timeout=30) == {"chisq": 0.8, "steps": 4}
    assert dependent.result(timeout=30) == str(marker)
    assert [e.detail["values"]["chisq"] for e in fit.history() if e.kind == "improved"] == [3.0, 2.0, 0.9, 0.8]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker's pid in /proc")
def test_a_worker_that_dies_fails_its_job_and_the_cluster_goes_on(service: park.Service) -> None:
    # The command's grandparent is the Dask worker process (worker -> job process -> command).
    kill_worker = ("import os, time; worker = int(open(f'/proc/{os.getppid()}/stat').read().split()[3]); "
                   "os.kill(worker, 9); time.sleep(60)")
    with service:
        job = park.run([sys.executable, "-c", kill_worker])
    with pytest.raises(park.JobFailed, match="the Dask worker running the job .* died"):
        job.result(timeout=30)
    with service:
        assert park.submit("park_test_tasks:add", 2, 3).result(timeout=30) == 5


def test_kill_9_broker_reruns_the_dask_job_after_restart(dask_broker: Broker, tmp_path: Path) -> None:
    marker = tmp_path / "slow.pid"
    s = dask_broker.service()
    with s:
        slow = park.submit("park_test_tasks:sleep", 60, str(marker))
        after = park.submit("park_test_tasks:noop", when=slow.iscompleted)
    wait_for(marker.exists)
    wait_for(lambda: slow.state == "running")   # its start is committed: the re-run is attempt 2
    first = int(marker.read_text())
    marker.unlink()
    dask_broker.kill()
    # The scheduler drops the dead broker's client, and the released task terminates its job's
    # process: an orphaned attempt does not race the re-run.
    wait_for(lambda: not alive(first), timeout=20)
    dask_broker.start()
    s = dask_broker.service()
    again = s.job(slow.id)
    wait_for(marker.exists)
    second = int(marker.read_text())
    assert second != first and again.state == "running"
    assert again.record().attempts == 2
    assert s.job(after.id).state == "waiting"
    again.cancel()
    wait_for(lambda: not alive(second), timeout=20)
    assert s.job(after.id).wait(timeout=30) == "cancelled"
    assert [e.kind for e in again.events()].count("started") == 2


def _job_of(key: object) -> str:
    """The job id in one of our Dask keys, ("park-SITE-JOB-ATTEMPT-RUN",), or "" for another key."""
    return key[0].split("-")[2] if isinstance(key, tuple) and str(key[0]).startswith("park-") else ""


def _keys_of(cluster: distributed.LocalCluster, jobs: list[park.Job]) -> list[tuple[str]]:
    """The Dask keys the scheduler holds for `jobs`."""
    ids = {job.id for job in jobs}
    return [key for key in list(cluster.scheduler.tasks) if _job_of(key) in ids]


def test_a_release_reaches_the_scheduler_as_one_graph_and_outcomes_come_back_as_events(
        service: park.Service, cluster: distributed.LocalCluster) -> None:
    """Jobs released together go to the scheduler in one graph update, not one per job (the broker may
    commit, and so release, one submission in a few pieces); every job's outcome
    comes back on the broker's event topic, after its start, so no result is gathered; and the scheduler
    forgets every task once its job has ended."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Graphs(SchedulerPlugin):
        def __init__(self) -> None:
            self.updates: list[set[tuple[str]]] = []

        def update_graph(self, scheduler: object, *, keys: set[tuple[str]], **kwargs: object) -> None:
            self.updates.append(set(keys))

    graphs = Graphs()
    cluster.scheduler.add_plugin(graphs, name="park-test-graphs")
    try:
        with service:
            jobs = [park.submit("park_test_tasks:add", i, 1) for i in range(40)]
        assert [job.result(timeout=30) for job in jobs] == list(range(1, 41))
    finally:
        cluster.scheduler.remove_plugin(name="park-test-graphs")
    ids = {job.id for job in jobs}
    ours = [keys for keys in graphs.updates if any(_job_of(key) in ids for key in keys)]
    assert len(ours) <= 3 and sum(map(len, ours)) == 40, [len(keys) for keys in ours]
    [(name,)] = [k for keys in ours for k in keys if _job_of(k) == jobs[0].id]
    messages = [message for events in cluster.scheduler.get_events().values() for _, message in events
                if isinstance(message, dict) and message.get("key") == name]
    assert ["outcome" in m for m in messages] == [False, True], "started, then finished with the outcome"
    assert messages[1]["outcome"]["ok"] is True and messages[1]["outcome"]["result_json"] == "1"
    wait_for(lambda: not _keys_of(cluster, jobs), timeout=10)


def test_waiting_jobs_are_assigned_to_workers_not_held_back_on_the_scheduler(
        service: park.Service, cluster: distributed.LocalCluster, tmp_path: Path) -> None:
    """Each run is its own Dask task group, so Dask's root-task queuing does not hold Park's tasks on the
    scheduler: with both worker threads busy, the other jobs wait on the workers, and cancelling them
    there drops them."""
    gate = tmp_path / "gate"
    with service:
        jobs = [park.submit("park_test_tasks:wait_with_marker", str(tmp_path / f"started-{i}"), str(gate))
                for i in range(8)]
    wait_for(lambda: sum((tmp_path / f"started-{i}").exists() for i in range(8)) == 2)
    states = {cluster.scheduler.tasks[key].state for key in _keys_of(cluster, jobs)}
    assert states == {"processing"}, states   # not "queued"
    waiting = [job for i, job in enumerate(jobs) if not (tmp_path / f"started-{i}").exists()]
    for job in waiting:
        assert job.cancel() == "cancelled"
    gate.touch()
    assert {job.wait(timeout=30) for job in jobs if job not in waiting} == {"completed"}
    assert not any((tmp_path / f"started-{i}").exists() for i, job in enumerate(jobs) if job in waiting)
    wait_for(lambda: not _keys_of(cluster, jobs), timeout=10)


def test_an_attempt_over_its_timeout_is_terminated_and_fails(service: park.Service, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with service:
        job = park.submit("park_test_tasks:sleep", 60, str(marker), timeout=1)
    wait_for(marker.exists)
    pid = int(marker.read_text())
    assert job.wait(timeout=30) == "failed" and job.record().error == "timed out after 1 s"
    wait_for(lambda: not alive(pid), timeout=20)


def test_a_task_cancelled_outside_park_fails_its_job_and_stops_its_process(
        service: park.Service, cluster: distributed.LocalCluster, tmp_path: Path) -> None:
    """The one path that settles a job from its Dask future rather than from our events: the future ended
    (here cancelled by another client of the cluster) without the task reporting an outcome."""
    marker = tmp_path / "pid"
    with service:
        job = park.submit("park_test_tasks:sleep", 60, str(marker))
    wait_for(marker.exists)
    pid = int(marker.read_text())
    [key] = _keys_of(cluster, [job])
    with distributed.Client(cluster) as client:
        client.cancel([distributed.Future(key, client)], force=True)
    assert job.wait(timeout=30) == "failed"
    assert "the job's Dask task was cancelled outside Park" in job.record().error
    wait_for(lambda: not alive(pid), timeout=20)   # the released task terminated its job's process


def test_an_executor_that_is_not_local_or_dask_is_refused(tmp_path: Path) -> None:
    result = broker_cli("serve", str(tmp_path / "nowhere"), "--executor", "slurm://login1")
    assert result.returncode == 2
    assert "is not an executor: use local or dask://HOST:PORT" in result.stderr


def test_a_starting_broker_kills_attempts_its_sites_previous_broker_left_on_the_cluster(
        cluster: distributed.LocalCluster, tmp_path: Path) -> None:
    """`dask_task.kill_stale`, as a starting broker runs it on every worker: the attempts of an earlier
    run of the same site die (and it waits for that), those of its own run and of other sites do not."""
    from park_broker.execution import dask_task

    def attempt(key: str) -> dict[str, object]:
        marker = tmp_path / key
        (tmp_path / f".{key}.attempt").mkdir()   # as a broker makes each attempt's directory
        task = {"job_id": key, "attempt": 1, "owner": "alice", "kind": "command", "target": "", "args_json": "",
                "kwargs_json": "", "argv": ["sh", "-c", f"echo $$ > {marker}.tmp && mv {marker}.tmp {marker}; "
                                                          "exec sleep 60"],
                "work_dir": str(tmp_path / f".{key}.attempt"), "output_name": "output", "env": {},
                "python_path": []}
        return {"key": key, "topic": "park-test", "grace": 1.0, "python_path": [], "task": task}

    keys = ["park-site1-a-1-oldrun", "park-site1-b-1-newrun"]   # the cluster runs two tasks at once
    with distributed.Client(cluster) as client:
        futures = [client.submit(dask_task.run, attempt(k), key=k, pure=False) for k in keys]
        wait_for(lambda: all((tmp_path / k).exists() for k in keys))
        pids = [int((tmp_path / k).read_text()) for k in keys]
        assert sum(client.run(dask_task.kill_stale, "park-site2-", "newrun").values()) == 0, "another site's"
        assert sum(client.run(dask_task.kill_stale, "park-site1-", "newrun").values()) == 1
        # kill_stale waits for the warm child it killed; the job's command in that child's process group
        # has SIGKILL pending (it never runs again) but is torn down a moment later.
        wait_for(lambda: not alive(pids[0]), timeout=5)
        assert alive(pids[1])
        assert futures[0].result(timeout=10)["ok"] is False
        client.run(dask_task.kill_stale, "park-", "no-run-of-this-name")
        for future in futures:
            future.result(timeout=10)


def test_resources_map_onto_the_workers_declared_resources(new_broker: Callable[..., Broker],
                                                           tmp_path: Path) -> None:
    """One worker declaring 2 cpus, with two threads: two 1-cpu jobs run together, a 2-cpu job runs alone."""
    with distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=2, resources={"cpus": 2},
                                  host="127.0.0.1", scheduler_port=0, dashboard_address=":0") as cluster:
        address = cluster.scheduler_address.removeprefix("tcp://")
        check_cpus_are_held(new_broker(extra=["--executor", f"dask://{address}"]).start().service(), tmp_path)


def test_a_job_that_leaves_nothing_keeps_no_directory_on_dask_too(service: park.Service) -> None:
    """As on the local executor (core.attempts): the Dask child says whether an attempt left nothing, seeing a
    command's background processes too, and the broker keeps no directory for one that did."""
    with service:
        quiet = [park.submit("park_test_tasks:noop", memo=False) for _ in range(3)]
        lingering = park.run(["sh", "-c", "sleep 2 &"], memo=False)
    for job in quiet:
        assert job.wait(timeout=30) == "completed"
        record = job.record()
        assert record.left_nothing and not Path(record.directory).exists(), job.id
        assert job.logs() == "" and job.logs("stderr") == ""
    assert lingering.wait(timeout=30) == "completed"
    record = lingering.record()
    assert not record.left_nothing and Path(record.directory).is_dir(), "its background process could still write"
