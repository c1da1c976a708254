"""Jobs run as their user's own Unix account, never with the site's privileges (issue: a site many
users can share). Real accounts, made with `useradd` for the test: this needs root, as CI runs."""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import park
from harness import as_user, broker_cli, wait_for  # type: ignore[import-not-found]
from park.agent_client import default_subject

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="creating Unix accounts for jobs needs root and useradd (CI runs as root)"),
]

PROBE = """
for f in identity.key tls.key park.db users.toml; do
  if cat "$SITE/$f" >/dev/null 2>&1; then echo "read $f"; else echo "denied $f"; fi
done
if ls "$SITE" >/dev/null 2>&1; then echo "listed site"; else echo "denied listing"; fi
if cat "$OTHER" >/dev/null 2>&1; then echo "read other"; else echo "denied other"; fi
if ls "$OTHERS" >/dev/null 2>&1; then echo "listed others"; else echo "denied listing others"; fi
if ls "$OTHERS/.attempts" >/dev/null 2>&1; then echo "listed attempts"; else echo "denied listing attempts"; fi
id -un
"""


@pytest.fixture(scope="module")
def accounts() -> Iterator[tuple[str, str]]:
    """Two fresh unprivileged accounts, removed afterwards."""
    names = (f"pka{secrets.token_hex(3)}", f"pkb{secrets.token_hex(3)}")
    for name in names:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    yield names
    for name in names:
        subprocess.run(["userdel", name], check=False)


def test_each_users_jobs_run_as_their_account_and_reach_neither_the_sites_secrets_nor_other_users_outputs(
        new_broker, accounts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice_account, bob_account = accounts
    broker = new_broker()
    me = default_subject()
    assert broker_cli("users", "set", str(broker.directory), me, "--unix-user", alice_account).returncode == 0
    broker.start()
    with as_user(broker, "bob", tmp_path, "--unix-user", bob_account):
        with broker.service():
            secret = park.run(["sh", "-c", "echo bob-secret > output; id -un"])
            assert secret.wait(timeout=60) == "completed"
    bob_output = Path(secret.filename)
    assert bob_output.read_text() == "bob-secret\n"
    assert (bob_output.parent / "stdout.log").read_text() == f"{bob_account}\n"
    assert bob_output.parent.stat().st_uid == pwd.getpwnam(bob_account).pw_uid

    with broker.service():
        probe = park.run(["env", f"SITE={broker.directory}", f"OTHER={bob_output}",
                          f"OTHERS={bob_output.parent.parent}", "sh", "-c", PROBE])
        assert probe.wait(timeout=60) == "completed"
    said = (Path(probe.filename).parent / "stdout.log").read_text().split("\n")
    assert said[:9] == ["denied identity.key", "denied tls.key", "denied park.db", "denied users.toml",
                        "denied listing", "denied other", "denied listing others", "denied listing attempts",
                        alice_account], said
    for folder in (bob_output.parent.parent, bob_output.parent.parent / ".attempts"):   # the broker's, passed through
        assert folder.stat().st_uid == 0 and folder.stat().st_mode & 0o777 == 0o711, folder
    assert Path(probe.filename).parent.stat().st_uid == pwd.getpwnam(alice_account).pw_uid


def test_a_job_starts_with_a_clean_environment_not_the_brokers(new_broker, accounts) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker()
    assert broker_cli("users", "set", str(broker.directory), default_subject(), "--unix-user",
                      accounts[0]).returncode == 0
    os.environ["PARK_BROKER_SECRET_FOR_TEST"] = "operator-only"
    try:
        broker.start()
    finally:
        del os.environ["PARK_BROKER_SECRET_FOR_TEST"]
    with broker.service():
        job = park.run(["sh", "-c", "env"])
        assert job.wait(timeout=60) == "completed"
    env = dict(line.split("=", 1) for line in (Path(job.filename).parent / "stdout.log").read_text().splitlines()
               if "=" in line)
    assert "PARK_BROKER_SECRET_FOR_TEST" not in env and "PARK_KEY_FILE" not in env
    assert env["USER"] == accounts[0] and env["PARK_JOB_ID"] == job.id


def test_root_is_never_a_jobs_account(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker()
    refused = broker_cli("users", "set", str(broker.directory), default_subject(), "--unix-user", "root")
    assert refused.returncode == 2 and "jobs never run as root" in refused.stderr
    # A root broker with a user who has no account, and no --default-unix-user, refuses to serve.
    unmapped = broker_cli("serve", str(broker.directory), "--listen", "127.0.0.1:0")
    assert unmapped.returncode == 2
    assert f"site user {default_subject()!r} has no Unix account" in unmapped.stderr
    assert "--default-unix-user" in unmapped.stderr


def test_a_broker_that_cannot_switch_accounts_refuses_a_users_file_naming_other_accounts(
        new_broker, accounts) -> None:  # type: ignore[no-untyped-def]
    """Not root, a broker serves its own account only: mapping a user to another makes `serve` refuse."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) runs the broker as an unprivileged account")
    broker = new_broker()
    own, other = accounts
    assert broker_cli("users", "set", str(broker.directory), default_subject(), "--unix-user", other).returncode == 0
    subprocess.run(["chown", "-R", f"{own}:", str(broker.directory)], check=True)
    result = subprocess.run(
        ["setpriv", f"--reuid={own}", f"--regid={pwd.getpwnam(own).pw_gid}", "--clear-groups",
         sys.executable, "-m", "park_broker.cli", "serve", str(broker.directory), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"this broker runs as {own!r}, not root" in result.stderr and other in result.stderr


def test_status_says_how_jobs_are_isolated(broker) -> None:  # type: ignore[no-untyped-def]
    assert broker.service().info.isolation == "jobs run as each user's own Unix account"
    wait_for(lambda: "jobs run as each user's own Unix account" in broker.log())
