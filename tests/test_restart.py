"""kill -9 the broker in the middle of a workflow, start it again, and check
that nothing acknowledged is lost and nothing finished is redone."""
from __future__ import annotations

from pathlib import Path

import pytest

import park
from harness import wait_for  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb

pytestmark = pytest.mark.timeout(150)


def test_kill_9_and_restart(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    s = broker.service()
    with s:
        done = park.submit("park_test_tasks:write_output", "kept")
        assert done.result(timeout=30) == done.id
        slow = park.submit("park_test_tasks:sleep", 60, str(tmp_path / "slow.pid"))
        after_slow = park.submit("park_test_tasks:add", 1, 1, when=slow.iscompleted)
        waiting = park.submit("park_test_tasks:add", 2, 2, when=after_slow.iscompleted)
    wait_for((tmp_path / "slow.pid").exists)
    events_before = [e.seq for e in done.events()]
    with s:
        burst = [park.submit("park_test_tasks:noop", memo=False) for _ in range(300)]
    # The burst is acknowledged (the `with` flushed it) and mostly not yet run: kill now.
    broker.kill()
    broker.start()
    s = broker.service()
    # Finished results are intact and not redone.
    again = s.job(done.id)
    assert again.result(timeout=30) == done.id
    assert Path(again.filename).read_text() == "kept"
    assert [e.seq for e in again.events()] == events_before
    # Every acknowledged job is there, and the burst finishes.
    for job in burst:
        assert s.job(job.id).wait(timeout=60) == "completed"
    # The interrupted job runs again, its dependents still wait.
    slow2 = s.job(slow.id)
    wait_for(lambda: slow2.state == "running")
    record = slow2.record()
    assert record.attempts == 2
    assert s.job(after_slow.id).state == "waiting"
    assert s.job(waiting.id).state == "waiting"
    # Cancelling the re-run job cascades as usual.
    slow2.cancel()
    assert s.job(waiting.id).wait(timeout=30) == "cancelled"
    kinds = [e.kind for e in slow2.events()]
    assert kinds.count("started") == 2 and kinds[-1] == "cancelled"


def _collect(service: park.Service, from_seq: int, jobs: list[park.Job]) -> list[int]:
    """Seqs of the Watch stream from `from_seq` until every job in `jobs` has a terminal event."""
    waiting = {j.id for j in jobs}
    seqs = []
    stream = service.jobs_stub.Watch(jpb.WatchRequest(from_seq=from_seq), timeout=60)
    for item in stream:
        for event in item.events:
            seqs.append(event.seq)
            if event.WhichOneof("kind") in ("completed", "failed", "cancelled"):
                waiting.discard(event.job_id)
        if not waiting:
            break
    stream.cancel()
    return seqs


def test_watch_resumes_across_a_restart_without_gaps_or_repeats(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    s = broker.service()
    with s:
        gate = park.submit("park_test_tasks:sleep", 2)
        jobs = [park.submit("park_test_tasks:noop", when=gate.iscompleted, memo=False) for _ in range(5)]
    # Read the first few events (all submissions, before the gate opens), then kill the broker.
    seen = []
    stream = s.jobs_stub.Watch(jpb.WatchRequest(from_seq=0), timeout=30)
    for item in stream:
        seen.extend(event.seq for event in item.events)
        if len(seen) >= 6:
            break
    stream.cancel()
    broker.kill()
    broker.start()
    s2 = broker.service()
    resumed = _collect(s2, seen[-1], jobs)
    everything = _collect(s2, 0, jobs)
    assert seen + resumed == everything, "resuming from the last seen number must miss nothing and repeat nothing"


def test_an_install_waiting_for_its_upload_still_provides_its_package_after_a_restart(
        new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job may require a package whose install job is still waiting for its upload; after kill -9 the
    broker must still know that install is coming, for jobs submitted after the restart too."""
    from park.api import queue_spec, spec_for
    from park.wheels import build_wheel, sha256_file
    from test_memo import STEP2, upload_wheel  # type: ignore[import-not-found]
    from test_packages import write_project  # type: ignore[import-not-found]

    broker = new_broker().start()
    service = broker.service()
    wheel = build_wheel(write_project(tmp_path / "p", "1.0", body=STEP2), tmp_path / "out")
    spec = spec_for(service, None, "output", "install")
    spec.install.CopyFrom(jpb.Install(name="mymodel", version="1.0", sha256=sha256_file(wheel), filename=wheel.name))
    install = queue_spec(service, spec)
    install.acknowledged(timeout=30)
    with service:
        before = park.submit("mymodel:version", requires=["mymodel==1.0"], when=install.iscompleted)
    before.acknowledged(timeout=30)
    broker.kill()
    broker.start()
    service = broker.service()
    with service:
        after = park.submit("mymodel:version", requires=["mymodel==1.0"], when=install.iscompleted)
    after.acknowledged(timeout=30)   # refused as "not installed" if the broker forgot the install is coming
    assert not isinstance(upload_wheel(service, install.id, wheel), Exception)
    assert service.job(install.id).wait(timeout=60) == "completed"
    assert [service.job(j.id).result(timeout=60) for j in (before, after)] == ["1.0", "1.0"]


def test_a_memo_hit_on_an_active_job_still_names_it_after_a_restart(
        new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A memo hit on a job still running is another name of it; conditions and lookups on that name work
    after kill -9 as they did before, for jobs submitted before the restart and after it."""
    gate = tmp_path / "gate"
    broker = new_broker().start()
    service = broker.service()
    with service:
        first = park.submit("park_test_tasks:wait_with_marker", str(tmp_path / "started"), str(gate))
        again = park.submit("park_test_tasks:wait_with_marker", str(tmp_path / "started"), str(gate))
        before = park.submit("park_test_tasks:add", 1, 1, when=again.iscompleted)
    assert again.memo_hit
    wait_for((tmp_path / "started").exists)
    broker.kill()
    broker.start()
    service = broker.service()
    with service:
        after = park.submit("park_test_tasks:add", 2, 2, when=service.job(again.id).iscompleted)
    gate.touch()
    assert service.job(again.id).wait(timeout=60) == "completed"
    assert service.job(before.id).result(timeout=60) == 2
    assert service.job(after.id).result(timeout=60) == 4
