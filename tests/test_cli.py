"""The `park` command line against real brokers, and `park demo` end to end."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import park
from harness import alive, federate  # type: ignore[import-not-found]
from park.cli import main
from park.agent_client import default_subject
from park.config import add_service, load_services, remove_service
from park.cli.demo.run import EXAMPLE, expectations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "client" / "config.toml"
    monkeypatch.setenv("PARK_CONFIG", str(path))
    return path


@pytest.fixture
def configured(broker, config) -> Path:
    add_service("sns", broker.address, broker.cert)
    return config


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_services_add_writes_the_config(broker, config, capsys):
    status, out, _ = run(capsys, "services", "add", "sns", "--address", broker.address, "--cert", str(broker.cert))
    assert status == 0 and "saved in" in out
    entry = load_services(config)["sns"]
    assert (entry.address, entry.cert) == (broker.address, broker.cert.resolve())


def test_services_add_refuses_bad_input(broker, config, capsys):
    status, _, err = run(capsys, "services", "add", "sns", "--address", "no-port", "--cert", str(broker.cert))
    assert status == 2 and "park: --address 'no-port' must be HOST:PORT" in err
    status, _, err = run(capsys, "services", "add", "sns", "--address", broker.address, "--cert", "/nonexistent.crt")
    assert status == 1 and "certificate /nonexistent.crt does not exist" in err
    status, _, err = run(capsys, "services", "add")
    assert status == 2 and "park services add: error" in err
    assert not config.exists()


def test_status_of_a_reachable_service(configured, capsys):
    status, out, err = run(capsys, "status", "--json")
    assert status == 0, err
    [row] = json.loads(out)["services"]
    assert row["status"] == "ok" and row["site"] == "sns" and row["version"] == park.__version__ and row["caller"]
    status, out, _ = run(capsys, "status")
    assert status == 0 and re.search(r"sns .* ok .* sns .* " + re.escape(park.__version__), out)
    assert f"your tokens name you {default_subject()!r}" in out


def test_status_shows_an_operator_each_sites_peers(new_broker, config, capsys, monkeypatch, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from harness import broker_cli, public_key_of  # type: ignore[import-not-found]
    from park.signer import write_private_key

    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    for b in (sns, cluster):
        add_service(b.site, b.address, b.cert)
    status, out, _ = run(capsys, "status", "--json")
    assert status == 0 and not [r for r in json.loads(out)["services"] if "peers" in r]   # not an operator
    key = tmp_path / "operator.key"
    write_private_key(key, Ed25519PrivateKey.generate(), None)
    done = broker_cli("users", "add", str(sns.directory), "operator", "--key", public_key_of(key), "--allow", "admin")
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)   # a running broker re-reads users.toml at most once a second
    monkeypatch.setenv("PARK_KEY_FILE", str(key))
    monkeypatch.setenv("PARK_USER", "operator")
    status, out, err = run(capsys, "status", "--json")
    rows = {r["name"]: r for r in json.loads(out)["services"]}
    assert status == 1 and rows["cluster"]["status"] == "refused" and "peers" not in rows["cluster"]
    [peer] = rows["sns"]["peers"]
    assert (peer["name"], peer["address"], peer["state"], peer["subscribed"]) == \
        ("cluster", cluster.peer_address, "idle", False)
    status, out, _ = run(capsys, "status")
    assert re.search(rf"cluster .* {re.escape(cluster.peer_address)} .* idle .* not subscribed", out), out


def test_status_fails_when_a_service_is_unreachable(configured, broker, capsys):
    add_service("down", f"127.0.0.1:{closed_port()}", broker.cert)
    status, out, err = run(capsys, "status", "--json")
    assert status == 1
    rows = {r["name"]: r for r in json.loads(out)["services"]}
    assert rows["sns"]["status"] == "ok" and rows["down"]["status"] == "unreachable"
    assert "park: service down: connecting: nothing answers at site sns at 127.0.0.1:" in err and "client port" in err


def test_status_tells_a_wrong_certificate_refused_credentials_and_no_credentials_apart(
        new_broker, config, capsys, monkeypatch):
    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    add_service("wrongcert", sns.address, cluster.cert)          # cluster's certificate for sns's address
    add_service("peerport", cluster.peer_address, cluster.cert)  # the port peers use, not clients
    status, out, err = run(capsys, "status", "--json")
    rows = {r["name"]: r for r in json.loads(out)["services"]}
    assert status == 1
    assert rows["wrongcert"]["status"] == "tls" and "pinned" in rows["wrongcert"]["error"]
    assert rows["peerport"]["status"] == "tls" and "peer port" in rows["peerport"]["error"]
    remove_service("wrongcert")
    remove_service("peerport")
    add_service("sns", sns.address, sns.cert)
    monkeypatch.setenv("PARK_USER", "nobody-registered")
    status, out, err = run(capsys, "status")
    assert status == 1 and "refused" in out
    assert "it refused your credentials" in err and "'nobody-registered'" in err
    assert "your tokens name you 'nobody-registered' (from $PARK_USER)" in out
    monkeypatch.delenv("PARK_USER")
    monkeypatch.delenv("PARK_KEY_FILE")
    status, out, err = run(capsys, "status")
    assert status == 1 and "no credentials" in out and "start park-agent" in err


def test_status_without_services(config, capsys):
    status, _, err = run(capsys, "status")
    assert status == 1 and "no services configured" in err and "park services add" in err


def test_jobs_json_lists_jobs_with_states(configured, service, capsys):
    with service:
        good = park.submit("park_test_tasks:add", 1, 2, label="adder")
        bad = park.submit("park_test_tasks:fail", "boom")
    assert good.wait(timeout=30) == "completed" and bad.wait(timeout=30) == "failed"
    status, out, err = run(capsys, "jobs", "--json")
    assert status == 0, err
    rows = {r["id"]: r for r in json.loads(out)["jobs"]}
    assert set(rows) == {good.id, bad.id}
    assert rows[good.id]["label"] == "adder" and rows[good.id]["state"] == "completed"
    assert rows[bad.id]["state"] == "failed" and rows[bad.id]["finished"] is not None
    status, out, _ = run(capsys, "jobs", "--service", "sns", "--state", "failed", "--json")
    assert status == 0 and [r["id"] for r in json.loads(out)["jobs"]] == [bad.id]
    status, out, _ = run(capsys, "jobs")
    assert status == 0 and good.id in out and "adder" in out


def test_jobs_rejects_unknown_service_and_state(configured, capsys):
    status, _, err = run(capsys, "jobs", "--service", "nowhere")
    assert status == 2 and "no service named 'nowhere'" in err
    status, _, err = run(capsys, "jobs", "--state", "sleeping")
    assert status == 2 and "invalid choice: 'sleeping'" in err


def test_watch_a_finished_job_prints_its_events(configured, service, capsys):
    with service:
        job = park.submit("park_test_tasks:add", 1, 2)
    assert job.result(timeout=30) == 3
    status, out, err = run(capsys, "watch", job.id)
    assert status == 0, err
    assert f"watching park://sns/jobs/{job.id}" in out
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["submitted", "queued", "started", "completed"]
    assert "result 3" in out
    status, out, _ = run(capsys, "watch", f"park://sns/jobs/{job.id}", "--json")
    document = json.loads(out)
    assert status == 0 and document["state"] == "completed"
    assert [e["kind"] for e in document["events"]] == ["submitted", "queued", "started", "completed"]


def test_watch_exit_status_of_a_failed_job(configured, service, capsys):
    with service:
        job = park.submit("park_test_tasks:fail", "on purpose")
    assert job.wait(timeout=30) == "failed"
    status, out, _ = run(capsys, "watch", job.id)
    assert status == 1 and "ValueError: on purpose" in out
    assert "Traceback (most recent call last)" in out, "the remote traceback is shown"


@pytest.mark.timeout(60)
def test_cancel_a_waiting_job_and_watch_shows_the_cause(configured, service, capsys):
    with service:
        sleeper = park.submit("park_test_tasks:sleep", 30)
        waiting = park.submit("park_test_tasks:add", 1, 2, when=sleeper.iscompleted)
        after = park.submit("park_test_tasks:add", 3, 4, when=waiting.iscompleted)
    assert waiting.state == "waiting"
    status, out, err = run(capsys, "cancel", f"park://sns/jobs/{waiting.id}", "--reason", "not needed")
    assert status == 0, err
    assert f"park://sns/jobs/{waiting.id} cancelled (was waiting)" in out
    assert waiting.state == "cancelled" and after.wait(timeout=30) == "cancelled"
    assert "not needed" in waiting.record().cause.message
    status, out, _ = run(capsys, "watch", waiting.id)
    assert status == 1 and "cancelled by" in out and "not needed" in out, "a cancelled job: exit 1"
    status, out, _ = run(capsys, "watch", after.id)
    assert status == 1 and f"its condition was cancelled by sns/{waiting.id}.completed" in out
    status, out, _ = run(capsys, "cancel", waiting.id)
    assert status == 0 and "was already cancelled" in out
    assert run(capsys, "cancel", sleeper.id, "--json")[0] == 0


def test_cancel_a_completed_job_fails(configured, service, capsys):
    with service:
        job = park.submit("park_test_tasks:add", 1, 2)
    job.wait(timeout=30)
    status, _, err = run(capsys, "cancel", job.id)
    assert status == 1 and f"park: job {job.id} had already completed; it was not cancelled" in err


def test_bad_job_ids_fail_with_a_clear_message(configured, broker, capsys):
    status, out, err = run(capsys, "watch", "not-a-job")
    assert (status, out) == (1, "")
    assert err.startswith("park: job id 'not-a-job' is not a Park job id")
    unknown = "a" * 26
    status, _, err = run(capsys, "cancel", unknown)
    assert status == 1 and f"NOT_FOUND: reading job {unknown}: site 'sns' has no job {unknown}" in err
    status, _, err = run(capsys, "watch", f"park://elsewhere/jobs/{unknown}")
    assert status == 1 and "no configured service is site 'elsewhere'" in err
    add_service("other", broker.address, broker.cert)
    status, _, err = run(capsys, "watch", unknown)
    assert status == 1 and f"no configured service has job {unknown}" in err


def test_a_bare_job_id_is_found_among_several_services_and_its_files_come_back(new_broker, config, capsys,
                                                                               tmp_path):
    """No --service needed: the client asks every configured service; `park get` downloads the outputs
    (verified), `park logs` prints the job's standard output, for a job and for a memo hit of it."""
    sns, cluster = new_broker("sns").start(), new_broker("cluster").start()
    add_service("sns", sns.address, sns.cert)
    add_service("cluster", cluster.address, cluster.cert)
    with cluster.service():
        job = park.submit("park_test_tasks:write_output", "hello")
    assert job.wait(timeout=30) == "completed"
    status, out, _ = run(capsys, "watch", job.id)
    assert status == 0 and "completed" in out
    status, out, err = run(capsys, "get", job.id, "-o", str(tmp_path / "got"))
    assert status == 0, err
    assert (tmp_path / "got" / "output").read_text() == "hello"
    status, out, _ = run(capsys, "logs", job.id)
    assert status == 0 and out == "wrote 5 characters\n"
    with cluster.service():
        again = park.submit("park_test_tasks:write_output", "hello")
    assert again.memo_hit
    assert again.open().read() == b"hello" and again.logs() == "wrote 5 characters\n"
    assert again.download(tmp_path / "memo", "output").read_text() == "hello"


def test_demo_outside_a_checkout_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(park, "__file__", str(tmp_path / "site-packages" / "lib" / "park" / "__init__.py"))
    status, _, err = run(capsys, "demo", "--plain")
    assert status == 1 and "cannot find examples/demo_workflow.py; run `park demo` from the Park checkout" in err


def _demo(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}      # PARK_KEY_FILE included: the demo must not use it
    return subprocess.Popen([sys.executable, "-m", "park.cli", "demo", "--plain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state_dir(output: str) -> Path:
    match = re.search(r"state in (\S+)", output)
    assert match, output
    return Path(match[1])


def _pids(output: str) -> dict[str, int]:
    """The demo's agent and brokers, as its first line names them."""
    match = re.search(r"agent pid (\d+); brokers sns pid (\d+) .* cluster pid (\d+) ", output)
    assert match, output
    return dict(zip(("agent", "sns", "cluster"), map(int, match.groups())))


def _assert_all_stopped(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if alive(pid)], f"outlived the demo: {pids}"


def _what_ran_where(out: str, run: int) -> str:
    """The `run N: what ran where` table of the demo's output."""
    return out.split(f"run {run}: what ran where", 1)[1].split("park demo:", 1)[0]


def _run_demo(*args: str) -> str:
    proc = _demo(*args)
    out, err = proc.communicate(timeout=170)
    assert proc.returncode == 0, out + err
    _assert_all_stopped(_pids(out))
    assert not _state_dir(out).exists(), "the demo left its temporary directory behind"
    return out


@pytest.mark.timeout(180)
def test_demo_plain_runs_the_seed_workflow_on_two_sites():
    out = _run_demo("--ui", "--no-browser")
    dashboard = re.search(r"the dashboard is at http://127\.0\.0\.1:(\d+)/\?secret=\S+", out)
    assert dashboard, out
    with pytest.raises(ConnectionRefusedError):   # stopped with the demo
        socket.create_connection(("127.0.0.1", int(dashboard[1])), timeout=5).close()
    expect = expectations(ROOT / "examples" / EXAMPLE)
    table = _what_ran_where(out, 1)
    for label, state in expect.states.items():
        assert re.search(rf"{re.escape(label)}\s+(sns|cluster)\s+{state}\s+no ", table), f"{label}:\n{out}"
    assert re.search(r"reduction\s+sns\s+completed", table) and re.search(r"final fit\s+cluster\s+completed", table)
    winner = re.search(r"run 1: the race was won by (fit seed \d+)", out)
    assert winner and winner[1] in expect.contestants, out
    for loser in set(expect.contestants) - {winner[1]}:
        assert re.search(rf"{loser}\s+cluster\s+cancelled\s+no\s+lost the race to {winner[1]}", table), out
        assert re.search(rf"cluster\s+{loser}\s+cancelled\s+lost the race to {winner[1]}", out), out  # the stream
    assert re.search(rf"{winner[1]}\s+cluster\s+completed\s+no\s+chisq=", table), out
    assert re.search(r"transfer fetch bigfile.refl: 48.0 of 48.0 MiB in [\d.]+ s", out), out
    assert "all jobs ended as expected in 1 run" in out


@pytest.mark.timeout(180)
def test_demo_again_shows_the_rerun_as_memo_hits():
    out = _run_demo("--again")
    assert "to watch it in a browser as well, run `park demo --ui`" in out
    expect = expectations(ROOT / "examples" / EXAMPLE)
    first, second = _what_ran_where(out, 1), _what_ran_where(out, 2)
    for label in expect.memoized:
        assert re.search(rf"{re.escape(label)}\s+\S+\s+completed\s+no ", first), out
        assert re.search(rf"{re.escape(label)}\s+\S+\s+completed\s+yes \(job ", second), out
        assert re.search(rf"\S+\s+{re.escape(label)}[\w. ]*\s+memo hit\s+reused job", out), out
    for label in ("race", "final fit", *expect.contestants):
        assert re.search(rf"{re.escape(label)}\s+cluster\s+(completed|cancelled)\s+no ", second), out
    assert f"run 2: {len(expect.memoized)} of {len(expect.memoized) + len(expect.contestants) + 2} jobs were memo hits" in out
    assert "The race is never memoized" in out
    assert "all jobs ended as expected in 2 runs" in out


@pytest.mark.timeout(180)
def test_demo_stops_its_agent_and_brokers_when_terminated():
    proc = _demo("--keep")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    state, pids = _state_dir(first), _pids(first)
    assert json.loads((state / "pids.json").read_text()) == pids
    assert all(alive(pid) for pid in pids.values())
    for line in proc.stdout:            # terminate it mid-run, once the workflow's jobs are running
        if re.search(r"\s+running\s+attempt", line):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "park: interrupted" in err
    _assert_all_stopped(pids)
    assert not _processes_using(state), "the whole process tree stops (the workflow, its pip, the workers)"
    assert f"kept {state}" in out
    assert all((state / log).exists() for log in ("agent.log", "sns.log", "cluster.log"))
    shutil.rmtree(state)


def _processes_using(directory: Path) -> list[str]:
    """Processes whose command line or environment names `directory` (the demo's TMPDIR is under it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:   # gone meanwhile, or not ours to read
            continue
        if str(directory).encode() in text:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found


def test_jobs_why_names_what_changed(configured, service, capsys):
    with service:
        park.submit("park_test_tasks:add", 1, 2).wait(timeout=30)
        again = park.submit("park_test_tasks:add", 1, 2)
        other = park.submit("park_test_tasks:add", 1, 5)
    other.wait(timeout=30)
    code, out, err = run(capsys, "jobs", "--why", other.id)
    assert code == 0, err
    assert "ran anew" in out and "args[1]: 2 -> 5" in out
    assert f"sns/{other.id} (park_test_tasks:add) ran anew; compared with sns/" in out
    code, out, _ = run(capsys, "jobs", "--why", again.id)
    assert code == 0 and "a memo hit" in out and f"sns/{again.id} reused sns/" in out


def test_jobs_why_of_a_rerun_after_a_failure_says_the_earlier_one_failed(configured, service, capsys):
    with service:
        first = park.submit("park_test_tasks:fail", "flaky")
    assert first.wait(timeout=30) == "failed"
    with service:
        second = park.submit("park_test_tasks:fail", "flaky")
    second.wait(timeout=30)
    code, out, _ = run(capsys, "jobs", "--why", second.id)
    assert code == 0 and f"job {first.id}" in out and "had the same inputs but failed (ValueError: flaky)" in out


def test_why_shows_where_two_long_values_differ_not_two_identical_prefixes() -> None:
    from park_broker.core.memo import differences

    a, b = "x" * 200 + "tail-a", "x" * 200 + "tail-b"
    [line] = differences({"work": a}, {"work": b})
    shown_a, shown_b = line.removeprefix("work: ").split(" -> ")
    assert shown_a != shown_b and "tail-a" in shown_a and "tail-b" in shown_b


def test_a_download_resumes_what_an_earlier_one_left_and_refuses_a_corrupt_part(service, tmp_path):
    with service:
        job = park.submit("park_test_tasks:write_bytes", 3 << 20)
    assert job.wait(timeout=30) == "completed"
    whole = Path(job.filename).read_bytes()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "output.part").write_bytes(whole[:1 << 20])   # an interrupted download
    seen: list[int] = []
    assert job.download(tmp_path / "a", "output", progress=lambda done, size: seen.append(done)).read_bytes() == whole
    assert seen[0] > 1 << 20, "it went on from the part it had"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "output.part").write_bytes(b"x" * 1000)          # not a prefix of the file
    with pytest.raises(park.ServiceError) as refused:
        job.download(tmp_path / "b", "output")
    assert refused.value.code == "DATA_LOSS" and not (tmp_path / "b" / "output.part").exists()
    assert job.download(tmp_path / "b", "output").read_bytes() == whole, "and the next try starts afresh"


def test_services_remove(configured, capsys):
    status, out, _ = run(capsys, "services", "remove", "sns")
    assert status == 0 and "service sns removed" in out
    assert load_services() == {}
    status, _, err = run(capsys, "services", "remove", "sns")
    assert status == 1 and "no service named 'sns'" in err


def test_fetch_url_without_credentials_says_what_to_pass(service):
    with pytest.raises(TypeError, match=r"auth=park.credentials\(service="):
        park.fetch_url("park://sns/files/x/y/z", auth=None, service=service)  # type: ignore[arg-type]


def test_jobs_and_watch_show_a_groups_counts(configured, broker, capsys):
    service = broker.service()
    with service:
        items = park.map("park_test_tasks:fail_on", [1, 2, 3], bad=2)
    assert items.wait(timeout=60) == "failed"
    status, out, _ = run(capsys, "jobs")
    assert status == 0 and re.search(r"failed \(2/3 completed, 1\s+failed\)", out), out
    status, out, _ = run(capsys, "jobs", "--json")
    [group] = [j for j in json.loads(out)["jobs"] if j["group"] is not None]
    assert re.fullmatch("[0-9a-f]{64}", group["group"].pop("membersKey"))   # its members' memo keys, folded
    assert group["group"] == {"size": 3, "joined": 3, "completed": 2, "failed": 1, "firstUnfinished": items[1].id}
    assert all(j["member_of"] == items.id for j in json.loads(out)["jobs"] if j["group"] is None)
    status, out, _ = run(capsys, "watch", items.id)
    assert status == 1 and "group_progress member" in out and "/3 completed" in out
    assert "failed     1 of 3 members did not complete (1 failed, 0 cancelled)" in out


def test_logs_follow_prints_each_attempts_log_once_as_it_grows(broker, configured, tmp_path):
    """`park logs -f` on a retried job: the first attempt's log, then the second's from its start (the same
    length as the first's, so only the attempt number tells them apart), then the rest as it comes."""
    import queue
    import threading

    runs, gate1, gate2 = tmp_path / "runs", tmp_path / "gate1", tmp_path / "gate2"
    script = (f"if [ ! -e {runs} ]; then touch {runs}; echo attempt one; "
              f"while [ ! -e {gate1} ]; do sleep 0.05; done; exit 3; fi; "
              f"echo attempt two; while [ ! -e {gate2} ]; do sleep 0.05; done; echo done")
    with broker.service():
        job = park.run(["sh", "-c", script], memo=False, retries=1, retry_delay=0)
    follower = subprocess.Popen([sys.executable, "-m", "park.cli", "logs", "-f", job.id, "--service", "sns"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        assert lines.get(timeout=30) == "attempt one\n"
        gate1.touch()
        assert lines.get(timeout=30) == "attempt two\n"
        gate2.touch()
        assert lines.get(timeout=30) == "done\n"
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
    assert "runs again (attempt 2)" in follower.stderr.read()   # type: ignore[union-attr]
    assert lines.empty()
