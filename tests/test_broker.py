"""A real broker running real job processes: lifecycles, outputs, cancellation, watching."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc
import pytest

import park
from harness import alive, wait_for  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park._proto import jobs_pb2_grpc as jpb_grpc
from park._proto import site_pb2

pytestmark = pytest.mark.timeout(90)


def test_names_are_known_at_submission_and_output_lands_there(service: park.Service, tmp_path: Path) -> None:
    with service:
        gate = park.submit("park_test_tasks:wait_with_marker", str(tmp_path / "started"), str(tmp_path / "gate"))
        job = park.submit("park_test_tasks:write_output", "hello", when=gate.iscompleted, output="data.txt")
        # Known before the broker has answered, and before the job can run.
        assert job.filename.endswith(f"/{job.id}/data.txt")
        assert job.url == f"park://sns/files/{service.info.caller}/{job.id}/data.txt"
        assert job.state == "waiting"
    (tmp_path / "gate").touch()
    assert job.result(timeout=30) == job.id
    assert Path(job.filename).read_text() == "hello"
    record = job.record()
    assert record.filename == job.filename and record.url == job.url
    [output] = record.outputs
    assert output.size == 5 and len(output.sha256) == 64
    assert (Path(job.filename).parent / "stdout.log").read_text() == "wrote 5 characters\n"


def test_failure_cancels_dependents_transitively_with_cause(service: park.Service) -> None:
    with service:
        a = park.submit("park_test_tasks:fail", "boom")
        b = park.submit("park_test_tasks:add", 1, 1, when=a.iscompleted)
        c = park.submit("park_test_tasks:add", 2, 2, when=b.iscompleted)
        d = park.submit("park_test_tasks:add", 3, 3, when=a.iscancelled)
    with pytest.raises(park.JobFailed, match="ValueError: boom") as failed:
        a.result(timeout=30)
    assert "Traceback" in failed.value.traceback
    with pytest.raises(park.JobCancelled, match=f"cancelled by sns/{a.id}.completed"):
        b.result(timeout=30)
    assert c.wait(timeout=30) == "cancelled"
    assert c.record().cause.kind == jpb.Cause.KIND_CONDITION
    assert c.record().cause.atoms[0].job_id == b.id
    assert d.result(timeout=30) == 6


def test_condition_that_can_never_hold_is_cancelled_at_once(service: park.Service) -> None:
    with service:
        slow = park.submit("park_test_tasks:sleep", 30)
        quick = park.submit("park_test_tasks:noop")
        job = park.submit("park_test_tasks:noop", when=slow.iscompleted & ~quick.iscompleted)
    assert job.wait(timeout=20) == "cancelled"
    cause = job.record().cause
    assert cause.kind == jpb.Cause.KIND_NEVER_HOLDS and "can never hold" in cause.message
    assert slow.state == "running", "the decision must not wait for the slow job"
    slow.cancel()


def test_not_of_pending_job_starts_at_once(service: park.Service) -> None:
    with service:
        slow = park.submit("park_test_tasks:sleep", 30)
        job = park.submit("park_test_tasks:add", 1, 2, when=~slow.iscompleted)
    assert job.result(timeout=20) == 3
    slow.cancel()


def test_cancel_waiting_job(service: park.Service) -> None:
    with service:
        gate = park.submit("park_test_tasks:sleep", 30)
        job = park.submit("park_test_tasks:noop", when=gate.iscompleted)
        after = park.submit("park_test_tasks:noop", when=job.iscompleted)
    assert job.cancel("changed my mind") == "cancelled"
    assert after.wait(timeout=20) == "cancelled"
    cause = job.record().cause
    assert cause.kind == jpb.Cause.KIND_REQUESTED and "changed my mind" in cause.message
    gate.cancel()


def test_cancel_running_job_terminates_its_process(service: park.Service, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    with service:
        job = park.submit("park_test_tasks:sleep", 60, str(marker))
    wait_for(marker.exists)
    pid = int(marker.read_text())
    assert job.state == "running"
    assert job.cancel() == "cancelled"
    wait_for(lambda: not alive(pid), timeout=10)
    # The worker pool recovers: the next job runs.
    with service:
        assert park.submit("park_test_tasks:add", 2, 3).result(timeout=30) == 5


def test_command_jobs(service: park.Service) -> None:
    with service:
        ok = park.run([sys.executable, "-c", "import os; print('hi from', os.environ['PARK_JOB_ID'])"])
        bad = park.run([sys.executable, "-c", "raise SystemExit(4)"])
    assert ok.result(timeout=30) is None
    assert (Path(ok.filename).parent / "stdout.log").read_text() == f"hi from {ok.id}\n"
    with pytest.raises(park.JobFailed, match="exited with status 4"):
        bad.result(timeout=30)


def test_large_and_non_json_results_are_files(service: park.Service) -> None:
    with service:
        big = park.submit("park_test_tasks:big_result", 20000)
        odd = park.submit("park_test_tasks:not_json")
    result = big.result(timeout=30)
    assert isinstance(result, park.ResultFile) and result.format == "json"
    assert Path(result.path).stat().st_size > 64 * 1024
    other = odd.result(timeout=30)
    assert isinstance(other, park.ResultFile) and other.format == "pickle"


def test_worker_that_dies_fails_its_job_and_is_replaced(service: park.Service) -> None:
    with service:
        crash = park.submit("park_test_tasks:crash")
    with pytest.raises(park.JobFailed, match="exited with status 3"):
        crash.result(timeout=30)
    with service:
        jobs = [park.submit("park_test_tasks:add", i, i) for i in range(6)]
    assert [j.result(timeout=30) for j in jobs] == [2 * i for i in range(6)]


def test_watch_replays_then_follows_without_gaps(service: park.Service) -> None:
    with service:
        jobs = [park.submit("park_test_tasks:add", i, 1) for i in range(10)]
    for j in jobs:
        j.wait(timeout=30)
    events = list(jobs[3].events())
    assert [e.kind for e in events] == ["submitted", "queued", "started", "completed"]
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Resuming from the middle yields exactly the rest.
    assert [e.seq for e in jobs[3].events(from_seq=seqs[1])] == seqs[2:]


def test_watch_all_jobs_stream_is_strictly_increasing(service: park.Service) -> None:
    stream = service.jobs_stub.Watch(jpb.WatchRequest(from_seq=0), timeout=60)
    with service:
        jobs = [park.submit("park_test_tasks:noop", memo=False) for _ in range(20)]
    seen: list[int] = []
    completed = set()
    for item in stream:
        for event in item.events:
            seen.append(event.seq)
            if event.WhichOneof("kind") == "completed":
                completed.add(event.job_id)
        if completed == {j.id for j in jobs}:
            break
    stream.cancel()
    assert seen == sorted(set(seen)), "sequence numbers must strictly increase with no repeats"
    assert len(seen) == 80


def test_resubmitting_the_same_id_is_a_safe_retry(service: park.Service) -> None:
    spec = jpb.JobSpec(id="a" * 26, call=jpb.PythonCall(target="park_test_tasks:noop"))
    first = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]))
    again = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]))
    assert first.results[0].code == 0 and again.results[0].code == 0
    assert again.results[0].ref.id == first.results[0].ref.id
    other = jpb.JobSpec(id="a" * 26, call=jpb.PythonCall(target="park_test_tasks:add", args_json="[1, 2]"))
    clash = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[other]))
    assert clash.results[0].code == 6 and "already taken" in clash.results[0].message  # ALREADY_EXISTS
    assert len(service.list_jobs()) == 1


def _submit_a_chain_recording_batches(service: park.Service, n: int) -> tuple[list[jpb.SubmitManyRequest],
                                                                             list[park.Job]]:
    """Submit `n` jobs, each waiting on the one before, and record the SubmitMany requests the sender made."""
    sent: list[jpb.SubmitManyRequest] = []
    submit_many = service.jobs_stub.SubmitMany

    class Recording:
        def future(self, request: jpb.SubmitManyRequest, timeout: float):  # type: ignore[no-untyped-def]
            sent.append(request)
            return submit_many.future(request, timeout=timeout)

    service.jobs_stub.SubmitMany = Recording()  # type: ignore[assignment]
    with service:
        jobs = [park.submit("park_test_tasks:noop", 0, memo=False)]
        for i in range(1, n):
            jobs.append(park.submit("park_test_tasks:noop", i, when=jobs[-1].isfinished, memo=False))
    return sent, jobs


def test_a_service_keeps_two_batches_in_flight_and_the_broker_decides_them_in_order(service: park.Service) -> None:
    """The sender does not wait for a batch's answer before sending the next one (the broker admits it while it
    commits the first); each names the one it follows, and a chain of jobs across batches is all accepted."""
    sent, jobs = _submit_a_chain_recording_batches(service, 3000)
    assert [r.number for r in sent] == list(range(1, len(sent) + 1))
    assert len({r.stream for r in sent}) == 1 and len(sent[0].stream) == 16
    assert any(r.after == r.number - 1 for r in sent[1:]), [(r.number, r.after, len(r.jobs)) for r in sent]
    assert all(r.after in (0, r.number - 1) for r in sent)
    assert sum(len(r.jobs) for r in sent) == 3000 and not any(job.memo_hit for job in jobs)


def test_default_service_nests_and_is_per_thread(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outer, inner = broker.service(), broker.service()
    seen: list[object] = []
    with outer:
        with inner:
            assert park.submit("park_test_tasks:noop").service is inner

            def other_thread() -> None:
                try:
                    park.submit("park_test_tasks:noop")
                except park.NoServiceError as exc:
                    seen.append(exc)

            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert park.submit("park_test_tasks:noop").service is outer
    assert len(seen) == 1, "a new thread must not inherit another thread's `with`"
    with pytest.raises(park.NoServiceError, match="pass service="):
        park.submit("park_test_tasks:noop")


def test_job_decorator_submits(service: park.Service) -> None:
    from park_test_tasks import add  # type: ignore[import-not-found]

    remote_add = park.job(add)
    with service:
        assert remote_add(20, 22).result(timeout=30) == 42
    assert remote_add.local(1, 1) == 2


def test_many_submissions_share_few_round_trips(broker) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    class Count(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
            if details.method.endswith("/SubmitMany"):
                calls.append(len(request.jobs))
            return continuation(details, request)

    service = broker.service()
    service._channel = grpc.intercept_channel(service._channel, Count())
    service.jobs_stub = jpb_grpc.JobsStub(service._channel)
    with service:
        jobs = [park.submit("park_test_tasks:noop", memo=False) for _ in range(1000)]
    assert sum(calls) == 1000
    assert len(calls) < 200, f"1000 submissions took {len(calls)} round trips"
    assert jobs[-1].wait(timeout=60) == "completed"


def test_live_condition_interface_of_the_seed(service: park.Service) -> None:
    with service:
        a = park.submit("park_test_tasks:add", 1, 1)
        bad = park.submit("park_test_tasks:fail", "no")
    a.wait(timeout=30)
    bad.wait(timeout=30)
    assert (a.iscompleted & bad.iscancelled).ready is True
    assert (a.iscompleted | bad.iscompleted).cancelled is False
    with pytest.raises(park.Condition.Cancelled):
        (a.iscompleted & bad.iscompleted).ready



def test_a_service_sends_one_batch_at_a_time_to_a_broker_that_does_not_order_them(service: park.Service) -> None:
    """An older broker decides batches as they come (no `ordered-batches` capability): the client waits for
    each answer before it sends the next, as before, and a chain across batches is still accepted."""
    from park.wire import ORDERED_BATCHES

    info = site_pb2.InfoResponse()
    info.CopyFrom(service.info)
    info.ClearField("capabilities")
    info.capabilities.extend(c for c in service.info.capabilities if c != ORDERED_BATCHES)
    service._info = info   # what an older broker says of itself
    sent, jobs = _submit_a_chain_recording_batches(service, 3000)
    assert len(sent) > 1 and all(r.after == 0 for r in sent), [(r.number, r.after) for r in sent]
    assert sum(len(r.jobs) for r in sent) == 3000
    assert jobs[-1].acknowledged(timeout=30).id == jobs[-1].id
