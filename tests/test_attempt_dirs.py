"""Attempt directories against a real broker (core.attempts): a job that leaves nothing keeps no directory and
lends its directory to the next attempt of the same account; a job that leaves anything keeps it, as before."""
from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

import park
from harness import Broker  # type: ignore[import-not-found]
from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park.agent_client import default_subject
from park.downloads import file_path

pytestmark = pytest.mark.timeout(120)


def _chain(n: int, target: str, *args: object, **options: object) -> list[park.Job]:
    """`n` jobs, each waiting on the one before: one attempt at a time, so each can reuse the last one's directory."""
    jobs: list[park.Job] = []
    for _ in range(n):
        jobs.append(park.submit(target, *args, memo=False, when=jobs[-1].iscompleted if jobs else None, **options))
    return jobs


def test_a_job_that_leaves_nothing_keeps_no_directory_and_lends_it_to_the_next(broker: Broker, service: park.Service,
                                                                               tmp_path: Path) -> None:
    with service:
        quiet = _chain(5, "park_test_tasks:noop")
    assert quiet[-1].wait(timeout=60) == "completed"
    for job in quiet:
        record = job.record()
        assert job.state == "completed" and record.left_nothing, job.id
        assert not Path(record.directory).exists()
        assert job.logs() == "" and job.logs("stderr") == ""
    # The five attempts, one after another, ran in one directory: one spare is left, not five.
    [spare] = (broker.directory / "files" / default_subject() / ".attempts").iterdir()
    witness = tmp_path / "witness"
    os.link(spare / "stdout.log", witness)   # the spare's log file, under another name
    with service:
        loud = park.submit("park_test_tasks:write_output", "x")
    assert loud.result(timeout=60) == loud.id
    kept = loud.record()
    assert not kept.left_nothing and loud.logs() == "wrote 1 characters\n"
    assert (Path(kept.directory) / "output").read_text() == "x"
    # It ran in the spare, and wrote into its log file (truncated, not made again).
    assert witness.read_text() == "wrote 1 characters\n"
    assert list((broker.directory / "files" / default_subject() / ".attempts").iterdir()) == []


def test_a_broker_starting_removes_what_attempts_left_in_the_owners_folders(new_broker) -> None:  # type: ignore[no-untyped-def]
    """After a crash: a half-run attempt's directory (and its files) goes before anything runs again; its
    successor runs in a directory named for the new broker, never in the old one."""
    broker = new_broker("sns").start()
    with broker.service():
        first = park.submit("park_test_tasks:noop", memo=False)
    assert first.wait(timeout=60) == "completed"
    folder = broker.directory / "files" / default_subject() / ".attempts"
    [spare] = folder.iterdir()
    (spare / "half-written").write_text("from an attempt the crash interrupted")
    broker.kill()
    broker.start()
    assert not spare.exists()
    with broker.service():
        again = park.submit("park_test_tasks:noop", memo=False)
    assert again.wait(timeout=60) == "completed"
    assert [p.name for p in folder.iterdir()] != [spare.name]


@pytest.mark.parametrize("argv, why", [
    (["sh", "-c", "echo hello"], "it wrote to its output"),
    (["sh", "-c", "echo oops >&2"], "it wrote to its error output"),
    (["touch", "made"], "it made a file"),
    (["chmod", "755", "."], "it changed its directory's mode"),
    (["sh", "-c", "sleep 30 >/dev/null 2>&1 &"], "it left a process running"),
])
def test_a_job_that_leaves_anything_keeps_its_directory(service: park.Service, argv: list[str], why: str) -> None:
    with service:
        job = park.run(argv, memo=False)
    assert job.wait(timeout=60) == "completed"
    record = job.record()
    assert not record.left_nothing, why
    assert Path(record.directory).is_dir(), why


def test_a_silent_retry_replaces_what_the_failed_attempt_left(service: park.Service, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)   # counted as the jobs' account
    with service:
        flaky = park.submit("park_test_tasks:fail_times", str(runs), "flaky", 1, retries=1, retry_delay=0)
    assert flaky.result(timeout=60) == 2
    record = flaky.record()
    # The first attempt printed its traceback and its directory became the job's; the second left nothing,
    # so it cannot become a spare: it replaces the first, and the logs are the second attempt's.
    assert not record.left_nothing
    assert flaky.logs("stderr") == ""


def test_the_logs_of_a_job_that_left_nothing_are_an_empty_file(service: park.Service) -> None:
    with service:
        job = park.submit("park_test_tasks:noop", memo=False)
    assert job.wait(timeout=60) == "completed"
    record = job.record()
    stub = files_pb2_grpc.FilesStub(service.channel)
    chunks = list(stub.Read(fipb.ReadRequest(path=file_path(record.owner, job.id, "stdout.log"))))
    assert [(c.offset, c.data, c.size) for c in chunks] == [(0, b"", 0)]
    with pytest.raises(grpc.RpcError) as beyond:
        list(stub.Read(fipb.ReadRequest(path=file_path(record.owner, job.id, "stdout.log"), offset=1)))
    assert beyond.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the file" in (beyond.value.details() or "")
    with pytest.raises(grpc.RpcError) as other:   # only the logs: any other file of it does not exist
        list(stub.Read(fipb.ReadRequest(path=file_path(record.owner, job.id, "output"))))
    assert other.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_job_whose_directory_cannot_be_made_fails_saying_so_and_frees_its_slot(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker("sns", workers=1).start()
    owner_tree = broker.directory / "files" / default_subject()
    owner_tree.parent.mkdir(exist_ok=True)
    owner_tree.write_text("in the way")   # where the owner's job directories go: not a directory
    with broker.service():
        blocked = [park.submit("park_test_tasks:noop", memo=False) for _ in range(2)]
    for job in blocked:
        assert job.wait(timeout=60) == "failed"
        assert f"cannot start at site {broker.site}" in job.record().error
    owner_tree.unlink()
    with broker.service():
        after = park.submit("park_test_tasks:noop", memo=False)
    assert after.wait(timeout=30) == "completed", "the one slot the failed starts held is free again"


def test_a_log_left_as_a_link_is_replaced_and_its_target_untouched(tmp_path: Path) -> None:
    """A half-run (a retry on Dask) may have left anything in the directory: only real log files are reused."""
    from park_broker.execution.worker import WorkerProcess, run_task

    work, target = tmp_path / ".job.attempt-1", tmp_path / "precious"
    work.mkdir(mode=0o700)
    target.write_text("keep me")
    (work / "stdout.log").symlink_to(target)
    (work / "stderr.log").mkdir()
    outcome = run_task({"kind": "command", "argv": ["sh", "-c", "echo fresh"], "work_dir": str(work),
                        "output_name": "output", "env": {}}, WorkerProcess())
    assert outcome["ok"], outcome
    assert target.read_text() == "keep me"
    assert not (work / "stdout.log").is_symlink() and (work / "stdout.log").read_text() == "fresh\n"
    assert (work / "stderr.log").is_file()


def test_a_warm_worker_gives_each_task_exactly_its_own_variables(tmp_path: Path) -> None:
    """A worker process runs one user's tasks one after another: each sees its own values of the variables the
    broker sets, even those an earlier job changed in the process, and none of an earlier task's others (a GPU
    job's CUDA_VISIBLE_DEVICES must not reach the next job)."""
    from park_broker.execution.worker import WorkerProcess, run_task

    process = WorkerProcess()
    first, second = tmp_path / "first", tmp_path / "second"
    for work in (first, second):
        work.mkdir(mode=0o700)
    try:
        outcome = run_task({"kind": "call", "target": "os:environ.__setitem__", "kwargs_json": "",
                            "args_json": '["PARK_SITE", "changed"]', "work_dir": str(first), "output_name": "output",
                            "env": {"PARK_SITE": "sns", "CUDA_VISIBLE_DEVICES": "0"}}, process)
        assert outcome["ok"], outcome
        outcome = run_task({"kind": "command", "argv": ["sh", "-c", 'echo "$PARK_SITE ${CUDA_VISIBLE_DEVICES-unset}"'],
                            "work_dir": str(second), "output_name": "output", "env": {"PARK_SITE": "sns"}}, process)
        assert outcome["ok"], outcome
    finally:
        process.enter({})   # this test's process is the worker: leave it none of the tasks' variables
    assert (second / "stdout.log").read_text() == "sns unset\n"


def test_a_running_jobs_logs_are_read_from_its_current_attempt_and_grow(service: park.Service,
                                                                        tmp_path: Path) -> None:
    """`job.logs()` and `park logs --follow` while the job runs: its logs are in the attempt's directory,
    not yet the job's; each read is a consistent prefix of what it wrote so far."""
    gate = tmp_path / "gate"
    script = (f"echo first; echo oops >&2; while [ ! -e {gate} ]; do sleep 0.05; done; echo second")
    with service:
        job = park.run(["sh", "-c", script], memo=False)
    deadline = time.monotonic() + 30
    while job.logs() != "first\n":
        assert time.monotonic() < deadline, f"the running job's log never showed its first line ({job.state})"
        time.sleep(0.05)
    assert job.state == "running"
    assert job.logs("stderr") == "oops\n"
    gate.touch()
    assert job.wait(timeout=30) == "completed"
    assert job.logs() == "first\nsecond\n" and job.logs("stderr") == "oops\n"


def test_the_logs_of_a_job_that_waits_its_turn_are_empty(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A queued job has no attempt directory yet (it is chosen when a worker is free): its logs read as empty
    files, not as missing ones, and then as its attempt writes them."""
    broker = new_broker("sns", workers=1).start()
    gate = tmp_path / "gate"
    with broker.service():
        busy = park.run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"], memo=False)
        queued = park.run(["echo", "at last"], memo=False)
    deadline = time.monotonic() + 30
    while busy.state != "running" or queued.state != "queued":
        assert time.monotonic() < deadline, (busy.state, queued.state)
        time.sleep(0.05)
    stub = files_pb2_grpc.FilesStub(broker.service().channel)
    for name in ("stdout.log", "stderr.log"):
        chunks = list(stub.Read(fipb.ReadRequest(path=file_path(default_subject(), queued.id, name), no_digest=True)))
        assert [(c.offset, c.data, c.size) for c in chunks] == [(0, b"", 0)], name
    gate.touch()
    assert queued.wait(timeout=30) == "completed" and queued.logs() == "at last\n"


def test_a_retried_jobs_logs_while_it_runs_again_are_the_new_attempts(service: park.Service,
                                                                      tmp_path: Path) -> None:
    """The first attempt's directory became the job's; while the second runs, its own logs are served."""
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    script = (f"if [ ! -e {runs} ]; then touch {runs}; echo attempt one; exit 3; fi; echo attempt two; "
              f"while [ ! -e {gate} ]; do sleep 0.05; done")
    with service:
        job = park.run(["sh", "-c", script], memo=False, retries=1, retry_delay=0)
    deadline = time.monotonic() + 30
    while job.logs() != "attempt two\n":
        assert time.monotonic() < deadline, f"the second attempt's log was never served: {job.logs()!r}"
        time.sleep(0.05)
    gate.touch()
    assert job.wait(timeout=30) == "completed" and job.logs() == "attempt two\n"


def test_logs_are_read_from_an_offset_without_a_digest_and_past_the_end_is_no_error(service: park.Service,
                                                                                    tmp_path: Path) -> None:
    """What `park logs --follow` reads at each look: the bytes after what it showed, with no whole-file digest
    for the site to compute; an offset past the end (a retry's new, shorter log) reads nothing."""
    gate = tmp_path / "gate"
    with service:
        job = park.run(["sh", "-c", f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second"],
                       memo=False)
        quiet = park.submit("park_test_tasks:noop", memo=False)
    deadline = time.monotonic() + 30
    while job.log_from("stdout", 0) != b"first\n":
        assert time.monotonic() < deadline, "the running job's log never showed its first line"
        time.sleep(0.05)
    assert job.log_from("stdout", 6) == b"" and job.log_from("stdout", 100) == b""
    record = job.record()
    stub = files_pb2_grpc.FilesStub(service.channel)
    path = file_path(record.owner, job.id, "stdout.log")
    [chunk] = stub.Read(fipb.ReadRequest(path=path, offset=2, no_digest=True))
    assert (chunk.offset, chunk.data, chunk.size, chunk.sha256) == (2, b"rst\n", 6, "")
    gate.touch()
    assert job.wait(timeout=30) == "completed"
    assert job.log_from("stdout", 6) == b"second\n"
    [chunk] = stub.Read(fipb.ReadRequest(path=path, offset=13, no_digest=True))
    assert (chunk.data, chunk.size, chunk.sha256) == (b"", 13, "")
    with pytest.raises(grpc.RpcError) as beyond:   # a reader that checks the digest is still told
        list(stub.Read(fipb.ReadRequest(path=path, offset=14)))
    assert beyond.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert quiet.wait(timeout=30) == "completed" and quiet.record().left_nothing
    quiet_log = file_path(record.owner, quiet.id, "stdout.log")
    assert [(c.size, c.sha256) for c in stub.Read(fipb.ReadRequest(path=quiet_log, offset=5, no_digest=True))] \
        == [(0, "")]
