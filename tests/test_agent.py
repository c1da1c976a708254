"""park-agent end to end: start, keygen, add, list, tokens that verify, key files for robots."""
from __future__ import annotations

import base64
import os
import re
import signal
import time
from pathlib import Path

import keyring
import keyring.backend
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_harness import SUBJECT, agent_process, askpass, cli_env, run_cli, start_agent  # noqa: F401
from park import tokens
from park.agent_client import AgentClient, AgentError, NoAgentError
from park.signer import KeyFileError, LocalSigner, write_private_key
from park_agent.keystore import KeyStore

pytestmark = pytest.mark.timeout(30)

PASSPHRASE = "correct-horse"


def _verify(issued, public_line: str, presenter: str | None = None) -> tokens.Verified:
    return tokens.verify(issued.token, audience="sns", presenter_key_id=presenter,
                         trusted_root_keys={SUBJECT: [tokens.parse_public_key(public_line)]})


@pytest.fixture
def with_key(tmp_path, agent_process):
    """A foreground agent holding a freshly generated file key (keygen loads it)."""
    agent = agent_process(PARK_ASKPASS=askpass(tmp_path, "pass", f"echo {PASSPHRASE}"))
    result = run_cli("keygen", "--store", "file", "--comment", "alice@test", env=agent.env)
    assert result.returncode == 0, result.stderr
    assert "Key added to the running agent." in result.stderr
    return agent, result.stdout.strip()


def test_daemon_prints_environment_and_stops(tmp_path):
    result = run_cli(env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"PARK_AUTH_SOCK=(\S+); export PARK_AUTH_SOCK;\n"
                         r"PARK_AGENT_PID=(\d+); export PARK_AGENT_PID;\necho Agent pid \2;\n", result.stdout)
    assert match, result.stdout
    sock, pid = match.group(1), int(match.group(2))
    try:
        env = cli_env(tmp_path, PARK_AUTH_SOCK=sock)
        assert run_cli("list", env=env).returncode == 1
        assert run_cli("stop", env=env).returncode == 0
        deadline = time.monotonic() + 10
        while Path(sock).parent.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(sock).parent.exists()
    finally:
        if Path(sock).exists():
            os.kill(pid, signal.SIGTERM)


def test_keygen_then_session_token_verifies(with_key):
    agent, public_line = with_key
    assert public_line.startswith("ed25519:") and public_line.endswith(" alice@test")
    issued = AgentClient(agent.socket).session_token("sns")
    verified = _verify(issued, public_line)
    assert verified.subject == SUBJECT and verified.expires == issued.expires
    assert run_cli("pubkey", env=agent.env).stdout.strip() == public_line


def test_list_prints_id_comment_and_lifetime(with_key):
    agent, public_line = with_key
    kid = tokens.key_id(tokens.parse_public_key(public_line))
    assert run_cli("list", env=agent.env).stdout == f"{kid} alice@test forever\n"
    agent.client.remove()
    assert run_cli("add", "-t", "300", "-c", env=agent.env).returncode == 0
    line = run_cli("list", env=agent.env).stdout
    assert re.fullmatch(rf"{kid} alice@test (29[0-9]|300)s confirm\n", line), line


def test_delegated_token_only_for_its_confirm_key(with_key):
    agent, public_line = with_key
    broker = tokens.key_id(Ed25519PrivateKey.generate().public_key())
    issued = agent.client.delegate("sns", scopes=["files.read:/alice/j1/"], confirm=broker, lifetime=120)
    verified = _verify(issued, public_line, presenter=broker)
    assert [str(s) for s in verified.scopes] == ["files.read:/alice/j1/"] and verified.confirm == broker
    with pytest.raises(tokens.TokenError, match="did not prove possession"):
        _verify(issued, public_line, presenter=None)


def test_delegate_refuses_bearer_and_overlong_requests(start_agent):
    agent = start_agent()
    agent.client.add(Ed25519PrivateKey.generate().private_bytes_raw())
    with pytest.raises(AgentError, match="a delegated token needs a confirm key id"):
        agent.client.delegate("sns", scopes=["jobs.submit"], confirm="")
    with pytest.raises(AgentError, match="must be in \\(0, 21600\\]") as info:
        agent.client.delegate("sns", scopes=["jobs.submit"], confirm="ab" * 32, lifetime=7 * 3600)
    assert info.value.code == "invalid_argument"


def test_keygen_refuses_to_overwrite(with_key):
    agent, _ = with_key
    result = run_cli("keygen", "--store", "file", env=agent.env)
    assert result.returncode == 1
    assert "a key already exists" in result.stderr


def test_lock_and_unlock_through_the_cli(with_key):
    agent, _ = with_key
    assert run_cli("lock", env=agent.env).returncode == 0
    locked = run_cli("list", env=agent.env)
    assert locked.returncode == 1 and "The agent is locked." in locked.stderr
    assert run_cli("unlock", env=agent.env).returncode == 0
    assert run_cli("list", env=agent.env).returncode == 0


def test_remove_unknown_key_refused(start_agent):
    agent = start_agent()
    with pytest.raises(AgentError, match="no key 'abcdef' in the agent") as info:
        agent.client.remove("abcdef")
    assert info.value.code == "unknown_key"


def test_from_env_without_socket_is_no_agent(monkeypatch):
    monkeypatch.delenv("PARK_AUTH_SOCK", raising=False)
    with pytest.raises(NoAgentError, match="PARK_AUTH_SOCK is not set"):
        AgentClient.from_env()


class _MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        del self.items[(service, username)]


def test_real_keyring_holds_the_key(tmp_path):
    previous = keyring.get_keyring()
    keyring.set_keyring(_MemoryKeyring())
    try:
        store = KeyStore(tmp_path / "keys")
        key, where = store.create(store="auto", comment="c", passphrase=lambda: pytest.fail("no passphrase needed"))
        assert where == "keyring (_MemoryKeyring)"
        assert not store.private_path.exists()
        loaded = store.load(lambda prompt: pytest.fail("no passphrase needed"))
        assert loaded.private_bytes_raw() == key.private_bytes_raw()
    finally:
        keyring.set_keyring(previous)


@pytest.mark.parametrize("passphrase", [None, "robot-pass"])
def test_key_file_source_makes_the_same_tokens(tmp_path, monkeypatch, passphrase):
    key = Ed25519PrivateKey.generate()
    write_private_key(tmp_path / "robot.pem", key, passphrase)
    monkeypatch.setenv("PARK_KEY_FILE", str(tmp_path / "robot.pem"))
    monkeypatch.setenv("PARK_USER", "robot")
    if passphrase:
        monkeypatch.setenv("PARK_KEY_PASSPHRASE", passphrase)
    issued = LocalSigner.from_env().session_token("sns")
    verified = tokens.verify(issued.token, audience="sns", presenter_key_id=None,
                             trusted_root_keys={"robot": [key.public_key().public_bytes_raw()]})
    assert verified.subject == "robot"


def test_key_file_source_wrong_passphrase(tmp_path, monkeypatch):
    write_private_key(tmp_path / "robot.pem", Ed25519PrivateKey.generate(), "right")
    monkeypatch.setenv("PARK_KEY_FILE", str(tmp_path / "robot.pem"))
    monkeypatch.setenv("PARK_KEY_PASSPHRASE", "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase or not a PEM private key"):
        LocalSigner.from_env()


def test_no_secret_reaches_the_agent_log(tmp_path, agent_process):
    agent = agent_process("--debug", PARK_ASKPASS=askpass(tmp_path, "pass", f"echo {PASSPHRASE}"))
    assert run_cli("keygen", "--store", "file", env=agent.env).returncode == 0
    key = KeyStore(tmp_path / "keys").load(lambda prompt: PASSPHRASE)
    issued = [agent.client.session_token("sns"),
              agent.client.delegate("sns", scopes=["jobs.submit"], confirm="ab" * 32)]
    assert run_cli("lock", env=agent.env).returncode == 0
    assert run_cli("unlock", env=agent.env).returncode == 0
    assert agent.stop() == 0
    log = agent.log()
    assert "token signed" in log and "agent locked" in log  # the log did record the activity
    raw = key.private_bytes_raw()
    for secret in (PASSPHRASE, raw.hex(), base64.b64encode(raw).decode(), *(i.token[:24] for i in issued)):
        assert secret not in log
