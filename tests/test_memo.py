"""Memoized reruns and model packages, end to end with a real broker and real wheels."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

import park
from park._proto import jobs_pb2 as jpb
from park._proto import packages_pb2 as ppb
from park._proto import packages_pb2_grpc
from park.wheels import build_wheel, sha256_file
from test_packages import write_project  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(180)

STEP2 = '''
def step2(data_file):
    import mymodel
    if mymodel.__version__ == "1.0":
        raise RuntimeError("bug in mymodel 1.0")
    return {"version": mymodel.__version__, "size": len(open(data_file).read())}


def version():
    import mymodel
    return mymodel.__version__
'''


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_memo_hit_across_two_client_processes(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import park
        service = park.Service({broker.address!r}, {str(broker.cert)!r})
        with service:
            job = park.submit("park_test_tasks:count_run", {str(tmp_path)!r}, "runs.txt")
        print(job.result(timeout=60), job.memo_hit)
    """))
    first = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    second = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert first.stdout.split() == ["1", "False"], first.stderr
    assert second.stdout.split() == ["1", "True"], second.stderr
    assert _lines(runs) == 1, "the second script must not run the job again"


def test_each_key_component_causes_a_miss_and_is_named(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "input.txt"
    data.write_text("first")
    service = broker.service()
    with service:
        base = park.submit("park_test_tasks:add", 1, 2)
        same = park.submit("park_test_tasks:add", 1, 2)
        other_arg = park.submit("park_test_tasks:add", 1, 3)
        reader = park.submit("park_test_tasks:read_length", str(data))
    assert reader.result(timeout=30) == 5
    assert same.memo_hit and not other_arg.memo_hit
    assert same.memo_report().hit is True
    report = other_arg.memo_report()
    assert report.nearest_id == base.record().id
    assert report.differences == ("args[1]: 2 -> 3",)
    # The same path with new content is new work, named as such.
    data.write_text("second, longer")
    with service:
        reread = park.submit("park_test_tasks:read_length", str(data))
    assert reread.result(timeout=30) == 14 and not reread.memo_hit
    [difference] = reread.memo_report().differences
    assert difference.startswith("args[0]: a file with content") and "-> a file with content" in difference
    # The first content again, under another spelling of the path: the same work as the first read.
    data.write_text("first")
    with service:
        respelled = park.submit("park_test_tasks:read_length", f"{data.parent}/./{data.name}")
    assert respelled.memo_hit and respelled.result(timeout=30) == 5
    # An upstream job's key is part of the key: a different upstream is new work downstream.
    with service:
        up1 = park.submit("park_test_tasks:write_output", "one")
        down1 = park.submit("park_test_tasks:read_length", up1.filename, when=up1.iscompleted)
        up2 = park.submit("park_test_tasks:write_output", "two")
        down2 = park.submit("park_test_tasks:read_length", up2.filename, when=up2.iscompleted)
    down2.wait(timeout=30)
    down1.wait(timeout=30)
    differences = down2.memo_report().differences
    assert any("the output 'output' of a job with key" in d for d in differences), differences


def test_in_flight_identical_job_is_not_run_twice(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs.txt"
    service = broker.service()
    with service:
        gate = park.submit("park_test_tasks:sleep", 1.0)
        first = park.submit("park_test_tasks:count_run", str(tmp_path), "runs.txt", when=gate.iscompleted)
    with service:   # a separate batch, while the first is still waiting
        second = park.submit("park_test_tasks:count_run", str(tmp_path), "runs.txt", when=gate.iscompleted)
    assert second.memo_hit and first.state in ("waiting", "queued", "running")
    assert second.result(timeout=30) == first.result(timeout=30) == 1
    assert _lines(runs) == 1


def test_memo_false_always_runs(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    with service:
        jobs = [park.submit("park_test_tasks:count_run", str(tmp_path), "runs.txt", memo=False) for _ in range(3)]
    assert sorted(j.result(timeout=30) for j in jobs) == [1, 2, 3]
    assert not any(j.memo_hit for j in jobs)


def test_rerun_after_a_fix_in_a_new_package_version(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The scenario of the issue: step 2 fails, the fix is mymodel 1.1, the rerun reuses step 1."""
    runs = tmp_path / "reduce-runs.txt"
    service = broker.service()

    def workflow(version: str) -> tuple[park.Job, park.Job, park.Job, park.Job]:
        project = tmp_path / f"mymodel-{version}"
        if not project.exists():   # the third run rebuilds the same project: the same wheel bytes
            write_project(project, version, body=STEP2)
        with service:
            upload = park.install_service(project)
            step1 = park.submit("park_test_tasks:reduce", str(tmp_path), "reduced data")
            step2 = park.submit("mymodel:step2", step1.filename, requires=[f"mymodel=={version}"],
                                when=upload.iscompleted & step1.iscompleted)
            step3 = park.submit("park_test_tasks:add", 1, 2, when=step2.iscompleted)
        return upload, step1, step2, step3

    upload, step1, step2, step3 = workflow("1.0")
    assert upload.result(timeout=120) == {"name": "mymodel", "version": "1.0", "sha256": upload.record()
                                          .spec.install.sha256}
    with pytest.raises(park.JobFailed, match="bug in mymodel 1.0"):
        step2.result(timeout=60)
    assert step3.wait(timeout=30) == "cancelled"

    upload, step1b, step2b, step3b = workflow("1.1")
    assert step1b.memo_hit and step1b.result(timeout=30) == 1 and _lines(runs) == 1
    assert step2b.result(timeout=60) == {"version": "1.1", "size": len("reduced data")}
    assert not step2b.memo_hit and not step3b.memo_hit
    assert step3b.result(timeout=30) == 3
    assert "package mymodel: 1.0 -> 1.1" in step2b.memo_report().differences
    # A third run of the fixed script redoes nothing.
    upload_c, step1c, step2c, step3c = workflow("1.1")
    assert upload_c.memo_hit and step1c.memo_hit and step2c.memo_hit and step3c.memo_hit
    assert [p.version for p in service.packages()] == ["1.0", "1.1"]


def test_two_versions_run_at_once(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    with service:
        jobs = []
        for version in ("1.0", "1.1"):
            upload = park.install_service(write_project(tmp_path / version, version, body=STEP2))
            gate = park.submit("park_test_tasks:sleep", 0.5)
            jobs.append(park.submit("mymodel:version", requires=[f"mymodel=={version}"],
                                    when=upload.iscompleted & gate.iscompleted))
    assert [j.result(timeout=120) for j in jobs] == ["1.0", "1.1"]
    # Both ran while the other's version was installed: each worker had its own.
    started = [next(e for e in j.events() if e.kind == "started").seq for j in jobs]
    finished = [next(e for e in j.events() if e.kind == "completed").seq for j in jobs]
    assert max(started) < max(finished)


def test_requires_a_version_the_site_lacks(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    with service:
        park.install_service(write_project(tmp_path / "p", "1.0", body=STEP2)).wait(timeout=120)
    with pytest.raises(park.SubmitError, match="1.0") as info:
        with service:
            park.submit("mymodel:version", requires=["mymodel==2.0"])
    assert info.value.code == "FAILED_PRECONDITION"


def test_implicit_install_from_the_site_wheelhouse(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    house = tmp_path / "wheelhouse"
    build_wheel(write_project(tmp_path / "p", "1.0", body=STEP2), house)
    broker = new_broker()
    broker.extra = ["--package-index", str(house)]
    service = broker.start().service()
    with service:
        job = park.submit("mymodel:version", requires=["mymodel==1.0"])
    assert job.result(timeout=120) == "1.0"
    assert [(p.name, p.version) for p in service.packages()] == [("mymodel", "1.0")]


def upload_wheel(service: park.Service, job_id: str, wheel: Path, data: bytes | None = None,
            sha: str | None = None) -> grpc.RpcError | ppb.PackageRef:
    payload = wheel.read_bytes() if data is None else data
    requests = iter([ppb.UploadRequest(header=ppb.UploadHeader(job_id=job_id, filename=wheel.name,
                                                               sha256=sha or sha256_file(wheel), size=len(payload))),
                     ppb.UploadRequest(data=payload)])
    try:
        return packages_pb2_grpc.PackagesStub(service.channel).Upload(requests, timeout=60)
    except grpc.RpcError as exc:
        return exc


def test_reupload_of_a_version_with_other_bytes_is_refused(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    with service:
        park.install_service(write_project(tmp_path / "a", "1.0")).wait(timeout=120)
    # The refusal reaches the script where it waits for its uploads: the end of the `with`.
    with pytest.raises(park.ServiceError, match="bump the version") as info:
        with service:
            changed = park.install_service(write_project(tmp_path / "b", "1.0", body="CHANGED = 1\n"))
    assert info.value.code == "FAILED_PRECONDITION"
    assert changed.wait(timeout=120) == "failed"
    assert "bump the version" in changed.record().error
    with pytest.raises(park.JobFailed):
        changed.result()


def test_upload_without_permission_is_denied(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(allow="submit").start()
    service = broker.service()
    wheel = build_wheel(write_project(tmp_path / "p", "1.0"), tmp_path / "out")
    result = upload_wheel(service, "a" * 26, wheel)
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.PERMISSION_DENIED and "may not upload" in result.details()
    assert service.packages() == []


def test_damaged_and_malicious_uploads_install_nothing(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import zipfile

    service = broker.service()
    wheel = build_wheel(write_project(tmp_path / "p", "1.0"), tmp_path / "out")
    with service:
        job = park.submit("park_test_tasks:noop")   # an id that is not an install job
    job.wait(timeout=30)
    wrong_job = upload_wheel(service, job.id, wheel)
    assert isinstance(wrong_job, grpc.RpcError) and "not an install job" in wrong_job.details()
    # A declared install whose bytes arrive damaged, then one whose archive escapes its directory.
    from park.api import queue_spec, spec_for
    from park._proto import jobs_pb2 as jpb

    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.py", "print('owned')")
        zf.writestr("evil-1.0.dist-info/METADATA", "Name: evil\nVersion: 1.0\n")
    for path, damage in ((wheel, b"not the wheel"), (evil, None)):
        spec = spec_for(service, None, "output", "install")
        name = path.name.split("-")[0]
        spec.install.CopyFrom(jpb.Install(name=name, version="1.0", sha256=sha256_file(path), filename=path.name))
        install = queue_spec(service, spec)
        install.acknowledged(timeout=30)
        result = upload_wheel(service, install.id, path, data=damage)
        assert isinstance(result, grpc.RpcError)
        assert result.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert service.packages() == []
    assert not (broker.directory / "packages" / "escape.py").exists()
    assert not (broker.directory.parent / "escape.py").exists()


def test_a_user_with_upload_alone_can_install_a_package(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker(allow="upload").start()
    service = broker.service()
    with service:
        upload = park.install_service(write_project(tmp_path / "p", "1.0"))
    assert upload.wait(timeout=120) == "completed", upload.record().error
    assert [(p.name, p.version) for p in service.packages()] == [("mymodel", "1.0")]


def _events(service: park.Service, job_id: str = "") -> list[jpb.Event]:
    """The events of `job_id` (every job of the caller: ""), replayed up to the stream's live mark."""
    stream = service.jobs_stub.Watch(jpb.WatchRequest(job_id=job_id, from_seq=0), timeout=30)
    events = []
    for item in stream:
        if item.HasField("progress"):
            stream.cancel()
            return events
        events.extend(item.events)
    raise AssertionError("the stream ended without a live mark")


def test_a_memo_hit_is_a_reused_event_of_the_submitted_id(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from harness import as_user  # type: ignore[import-not-found]

    broker = new_broker("sns").start()
    service = broker.service()
    with service:
        first = park.submit("park_test_tasks:add", 20, 22, label="answer")
    assert first.result(timeout=30) == 42
    live = service.jobs_stub.Watch(jpb.WatchRequest(job_id="", from_seq=first.record().last_seq), timeout=30)
    with service:
        again = park.submit("park_test_tasks:add", 20, 22, label="answer")
    assert again.memo_hit and again.id != first.id
    pushed = next(event for item in live for event in item.events)     # live, not only on replay
    live.cancel()
    assert (pushed.job_id, pushed.WhichOneof("kind"), pushed.reused.job_id) == (again.id, "reused", first.id)

    everything = _events(service)
    assert [e for e in everything if e.WhichOneof("kind") == "reused"] == [pushed]
    assert [e.WhichOneof("kind") for e in everything if e.job_id == first.id] == \
        ["submitted", "queued", "started", "completed"]
    assert "reused" not in {e.WhichOneof("kind") for e in _events(service, again.id)}   # the job it names
    assert again.record().memo_hit and again.record().id == first.id and not first.record().memo_hit
    with as_user(broker, "alice", tmp_path, "--allow", "submit"):
        with park.Service(broker.address, broker.cert) as alices:
            assert _events(alices) == []       # another user's stream carries nothing of it


def test_memo_keys_are_the_ones_earlier_brokers_computed(tmp_path: Path) -> None:
    """A rerun must hit the jobs a site already holds, so the canonical document and its key never change for
    the same job: these keys were computed by the broker before the memo document's encoder was made once and
    arguments without strings skipped substitution. Nested and unsorted objects, floats, non-ASCII text, an
    upstream job's output, a condition with a NOT, and a command line."""
    import json

    from park.conditions import Atom, AtomKey
    from park.wire import condition_to_proto
    from park_broker.core import memo
    from park_broker.core.admission import Admission
    from park_broker.packages.store import PackageStore

    admission = Admission("sns", tmp_path / "files", PackageStore(tmp_path / "packages"))
    upstream = "b" * 26
    call = jpb.JobSpec(id="a" * 26, versions={"numpy": "2.1.0", "m": "1.0"}, call=jpb.PythonCall(
        target="m:f", args_json="[1, 2.5, -0.0, 1e300]", kwargs_json='{"z": "\\u00e9t\\u00e9", "a": {"y": [true, null], "b": "x"}}'))
    call.when.CopyFrom(condition_to_proto(Atom(AtomKey("sns", upstream, "completed"))
                                          & ~Atom(AtomKey("sns", "e" * 26, "finished"))))
    reading = jpb.JobSpec(id="c" * 26, output_name="out", call=jpb.PythonCall(
        target="m:g", args_json=f'["park://sns/files/alice/{upstream}/output", 3]'))
    command = jpb.JobSpec(id="d" * 26, command=jpb.CommandLine(argv=["sh", "-c", "echo \u2603"]))
    keys = []
    for spec in (call, reading, command):
        inputs = admission.memo_inputs("alice", spec, admission.validate(spec), [], {}, {},
                                       lambda job_id: {upstream: "f" * 64}.get(job_id))
        assert memo.canonical(inputs) == json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                                    allow_nan=False)
        keys.append(memo.key_of(inputs))
    assert keys == ["8d503083032d4e066b58f31b388c6e8bfc8fb7f3e36c8705e48eb9c6942255f5",
                    "d13000cf45ab6f061369a8b10c0db48a2596d817036b742eb9b916ddb71c36fe",
                    "62e6dc1d872707d97dfcace6b9c40e747c254db7f6b4216a6debc83b4efcf73f"]
