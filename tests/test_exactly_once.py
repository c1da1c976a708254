"""Exactly once (DESIGN §3 "Attempts", §10): workers die with their broker, and only the broker, for
the attempt it considers current, moves an attempt's directory into place, so a stale attempt can
never run beside its re-run's result or replace it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import park
from core_harness import in_process_core  # type: ignore[import-not-found]
from harness import alive, wait_for  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park_broker.execution.base import Outcome, Task
from park_broker.execution.groups import ProcessGroups

pytestmark = pytest.mark.timeout(120)


def test_a_job_and_its_children_die_with_a_killed_broker(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    with broker.service():
        shell = park.run(["sh", "-c", f"echo $$ > {tmp_path / 'shell.pid'}; sleep 300 & echo $! > "
                          f"{tmp_path / 'child.pid'}; wait"])
        call = park.submit("park_test_tasks:sleep", 300, str(tmp_path / "call.pid"))
    wait_for(lambda: all((tmp_path / f).exists() and (tmp_path / f).read_text().strip()
                         for f in ("shell.pid", "child.pid", "call.pid")))
    pids = [int((tmp_path / f).read_text()) for f in ("shell.pid", "child.pid", "call.pid")]
    assert all(alive(p) for p in pids)
    broker.kill()
    wait_for(lambda: not any(alive(p) for p in pids), timeout=10)
    broker.start()
    again = broker.service()
    assert again.job(shell.id).state in ("queued", "running"), "the interrupted jobs run again"
    again.job(call.id).cancel()
    again.job(shell.id).cancel()


def test_a_restarted_broker_kills_what_a_stuck_worker_left_before_it_runs_the_job_again(
        new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A worker whose watchdog cannot run when its broker dies (here: the whole process group is
    stopped) outlives the broker; the next broker on the site kills its group, from the durable record
    of it, before the job runs again, so two attempts never run at once."""
    broker = new_broker().start()
    markers = tmp_path / "attempts"
    markers.mkdir()
    markers.chmod(0o777)   # the job writes here, as whichever account it runs as
    with broker.service():
        job = park.run(["sh", "-c", f"touch {markers}/$$; exec sleep 300"])
    wait_for(lambda: any(markers.iterdir()))
    [first] = [int(p.name) for p in markers.iterdir()]
    group = os.getpgid(first)
    os.killpg(group, signal.SIGSTOP)
    try:
        broker.kill()
        time.sleep(1.0)
        assert alive(first), "a stopped worker survives its broker (the case this guards against)"
        broker.start()
        wait_for(lambda: len(list(markers.iterdir())) == 2)
        assert not alive(first), "the stale attempt was killed before its re-run started"
        assert "left running by the broker that served this site before" in broker.log()
        broker.service().job(job.id).cancel()
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _attempt(task: Task, text: str) -> Outcome:
    """What a worker leaves: the output in the attempt's directory, and the outcome naming it."""
    work = Path(task.work_dir)
    work.mkdir(parents=True, exist_ok=True)   # the dispatcher made it for the attempt
    (work / task.output_name).write_text(text)
    return Outcome(ok=True, result_json='"done"', outputs=((task.output_name, str(work / task.output_name),
                                                          len(text), "0" * 64),))


SPEC = jpb.JobSpec(id="a" * 26, call=jpb.PythonCall(target="m:f"), no_memo=True)


def test_an_interrupted_attempt_never_becomes_the_result_of_its_rerun(tmp_path: Path) -> None:
    async def main() -> None:
        first, executor, store = in_process_core(tmp_path)
        await first.start()
        await first.submissions.submit_many("alice", [SPEC])
        [stale] = executor.tasks
        first.transitions.on_started(SPEC.id, stale.attempt)
        _attempt(stale, "stale")            # what the attempt had written when the broker died
        await asyncio.sleep(0.1)
        store.close()
        second, executor, store = in_process_core(tmp_path)
        await second.start()                # recovery queues the job again: attempt 2, in a fresh directory
        [current] = executor.tasks
        assert current.attempt == stale.attempt + 1 and not Path(stale.work_dir).exists()
        second.transitions.on_started(SPEC.id, current.attempt)
        second.dispatch.finished(SPEC.id, current.attempt, _attempt(current, "current"))
        await asyncio.sleep(0.1)
        record = await second.queries.get("alice", SPEC.id)
        assert record.state == jpb.JOB_STATE_COMPLETED
        final = Path(record.directory) / "output"
        assert record.outputs[0].path == str(final) and final.read_text() == "current"
        store.close()

    asyncio.run(main())


def test_a_rerun_that_leaves_nothing_replaces_what_its_interrupted_attempt_moved_into_place(tmp_path: Path) -> None:
    """The broker stopped after an attempt's directory became the job's, before its start was committed: the
    job runs again as attempt 1, and that attempt, leaving nothing, must still replace the directory (its logs
    are the rerun's, empty), though a first attempt is not otherwise looked for."""
    async def main() -> None:
        first, executor, store = in_process_core(tmp_path)
        await first.start()
        await first.submissions.submit_many("alice", [SPEC])
        [interrupted] = executor.tasks
        record = await first.queries.get("alice", SPEC.id)
        Path(interrupted.work_dir, "stdout.log").write_text("the interrupted attempt's\n")
        os.rename(interrupted.work_dir, record.directory)   # moved into place; the broker stopped there
        await asyncio.sleep(0.1)
        store.close()
        second, executor, store = in_process_core(tmp_path)
        await second.start()
        [rerun] = executor.tasks
        assert rerun.attempt == interrupted.attempt == 1
        second.transitions.on_started(SPEC.id, rerun.attempt)
        Path(rerun.work_dir, "stdout.log").write_text("")   # as its worker leaves it
        second.dispatch.finished(SPEC.id, rerun.attempt, Outcome(ok=True, result_json='"done"', left_nothing=True))
        await asyncio.sleep(0.1)
        record = await second.queries.get("alice", SPEC.id)
        assert record.state == jpb.JOB_STATE_COMPLETED and not record.left_nothing
        assert (Path(record.directory) / "stdout.log").read_text() == ""
        store.close()

    asyncio.run(main())


def test_an_attempt_that_reports_after_its_job_was_cancelled_is_discarded(tmp_path: Path) -> None:
    async def main() -> None:
        core, executor, store = in_process_core(tmp_path)
        await core.start()
        await core.submissions.submit_many("alice", [SPEC])
        [task] = executor.tasks
        core.transitions.on_started(SPEC.id, task.attempt)
        await core.transitions.cancel("alice", SPEC.id, "enough")
        # An executor that could not stop it in time (a Dask task already done) reports anyway.
        core.dispatch.finished(SPEC.id, task.attempt, _attempt(task, "late"))
        await asyncio.sleep(0.2)
        record = await core.queries.get("alice", SPEC.id)
        assert record.state == jpb.JOB_STATE_CANCELLED and not record.outputs
        assert not Path(record.directory).exists(), "the cancelled attempt was never moved into place"
        store.close()

    asyncio.run(main())


def test_process_group_records_never_signal_a_pid_used_again(tmp_path: Path) -> None:
    """A record names a group by its leader's start time and the boot: a pid the kernel handed out again
    (another start time), or a record of an earlier boot, is left alone; the recorded group is killed."""
    groups = ProcessGroups(tmp_path / "groups")
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        groups.record(sleeper.pid)
        boot, started = (tmp_path / "groups" / str(sleeper.pid)).read_text().split()
        for record in (f"{boot} {int(started) + 1}\n", f"another-boot {started}\n"):
            (tmp_path / "groups" / str(sleeper.pid)).write_text(record)
            assert groups.reap() == 0 and sleeper.poll() is None
            assert not (tmp_path / "groups" / str(sleeper.pid)).exists(), "a spent record is removed"
        groups.record(sleeper.pid)
        assert groups.reap() == 1
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_task_cancelled_while_its_worker_process_starts_never_runs(tmp_path: Path) -> None:
    from park_broker.execution.local import LocalExecutor

    async def main() -> None:
        finished: list[str] = []
        executor = LocalExecutor(ProcessGroups(tmp_path / "groups"), workers=1, warm=False)
        await executor.start(lambda job, attempt: None, lambda job, attempt, outcome: finished.append(job))
        work = tmp_path / ".job.attempt-1"
        work.mkdir()
        marker = tmp_path / "ran"
        executor.submit(Task(job_id="j" * 26, attempt=1, owner="alice", kind="command",
                             argv=("sh", "-c", f"touch {marker}"), work_dir=str(work), output_name="output"))
        await asyncio.sleep(0)        # the worker takes it and begins to start its process
        executor.cancel("j" * 26)
        await asyncio.sleep(2.0)
        assert not marker.exists() and finished == [], "cancelled before it could run: it never runs"
        await executor.close()
    asyncio.run(main())
