"""Exactly once (DESIGN §3 "Attempts", §10): workers die with their broker, and only the broker, for
the attempt it considers current, moves an attempt's directory into place, so a stale attempt can
never run beside its re-run's result or replace it."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import park
from core_harness import in_process_core  # type: ignore[import-not-found]
from harness import alive, wait_for  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park_broker.execution.base import Outcome, Task

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


def _attempt(task: Task, text: str) -> Outcome:
    """What a worker leaves: the output in the attempt's directory, and the outcome naming it."""
    task.work_dir.mkdir(parents=True)
    (task.work_dir / task.output_name).write_text(text)
    return Outcome(ok=True, result_json='"done"', outputs=((task.output_name, str(task.work_dir / task.output_name),
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
        assert current.attempt == stale.attempt + 1 and not stale.work_dir.exists()
        second.transitions.on_started(SPEC.id, current.attempt)
        second.dispatch.finished(SPEC.id, current.attempt, _attempt(current, "current"))
        await asyncio.sleep(0.1)
        record = await second.queries.get("alice", SPEC.id)
        assert record.state == jpb.JOB_STATE_COMPLETED
        final = Path(record.directory) / "output"
        assert record.outputs[0].path == str(final) and final.read_text() == "current"
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
