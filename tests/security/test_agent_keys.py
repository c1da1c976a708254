"""Who may use a key held by the agent, and for how long: lifetimes, confirmation, locking."""
from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park.agent_client import AgentError, NoKeysError
from agent_harness import askpass, cli_env, run_cli

pytestmark = pytest.mark.timeout(30)


def _key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes_raw()


class _Sleeps:
    """Records the unlock delays instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def test_list_without_agent_exits_2(tmp_path):
    result = run_cli("list", env=cli_env(tmp_path))
    assert result.returncode == 2
    assert "PARK_AUTH_SOCK is not set" in result.stderr


def test_list_with_dead_socket_exits_2(tmp_path):
    result = run_cli("list", env=cli_env(tmp_path, PARK_AUTH_SOCK=str(tmp_path / "gone.sock")))
    assert result.returncode == 2
    assert "no agent listening at" in result.stderr


def test_list_with_agent_but_no_keys_exits_1(agent_process):
    agent = agent_process()
    result = run_cli("list", env=agent.env)
    assert result.returncode == 1
    assert "The agent has no keys." in result.stderr


def test_key_forgotten_when_its_lifetime_ends(start_agent):
    agent = start_agent()
    agent.client.add(_key(), comment="short", lifetime=10)
    agent.clock.t += 9.9
    assert agent.client.session_token("sns").token
    agent.clock.t += 0.1
    with pytest.raises(NoKeysError, match="the agent holds no keys"):
        agent.client.session_token("sns")
    assert agent.client.list() == ((), False)


def test_confirm_denied_by_askpass(start_agent, tmp_path, monkeypatch):
    monkeypatch.setenv("PARK_ASKPASS", askpass(tmp_path, "no", "exit 1"))
    agent = start_agent()
    kid = agent.client.add(_key(), comment="careful", confirm=True)
    with pytest.raises(AgentError, match=f"use of key {kid[:12]} was not confirmed") as info:
        agent.client.session_token("sns")
    assert info.value.code == "denied"


def test_confirm_without_askpass_is_denied(start_agent, monkeypatch):
    monkeypatch.delenv("PARK_ASKPASS", raising=False)
    agent = start_agent()
    agent.client.add(_key(), confirm=True)
    with pytest.raises(AgentError) as info:
        agent.client.delegate("sns", scopes=["jobs.submit"], confirm="ab" * 32)
    assert info.value.code == "denied"


def test_confirm_granted_by_askpass_sees_the_question(start_agent, tmp_path, monkeypatch):
    seen = tmp_path / "question"
    monkeypatch.setenv("PARK_ASKPASS", askpass(tmp_path, "yes", f'echo "$PARK_ASKPASS_PROMPT: $1" > {seen}'))
    agent = start_agent()
    kid = agent.client.add(_key(), comment="careful", confirm=True)
    assert agent.client.session_token("sns").key_id == kid
    question = f"confirm: Allow park-agent to sign a session token for 'sns' with key {kid[:12]} (careful)?"
    assert seen.read_text() == question + "\n"


def test_key_removed_while_confirm_pending_is_not_used(start_agent):
    async def confirm_after_wipe(question: str) -> bool:
        running.agent.wipe()
        return True

    running = start_agent(confirm=confirm_after_wipe)
    running.client.add(_key(), confirm=True)
    with pytest.raises(AgentError, match="removed while awaiting confirmation") as info:
        running.client.session_token("sns")
    assert info.value.code == "unknown_key"


def test_locked_agent_lists_nothing_and_refuses_signing(start_agent):
    agent = start_agent()
    agent.client.add(_key())
    agent.client.lock("hunter22")
    assert agent.client.list() == ((), True)
    for attempt in (lambda: agent.client.session_token("sns"), lambda: agent.client.add(_key()),
                    lambda: agent.client.remove(), lambda: agent.client.lock("again"), agent.client.stop):
        with pytest.raises(AgentError, match="the agent is locked") as info:
            attempt()
        assert info.value.code == "locked"


def test_lock_with_empty_passphrase_refused(start_agent):
    agent = start_agent()
    with pytest.raises(AgentError, match="an empty passphrase cannot lock the agent") as info:
        agent.client.lock("")
    assert info.value.code == "invalid_argument"
    assert agent.client.list() == ((), False)


def test_unlock_with_empty_passphrase_refused(start_agent):
    agent = start_agent(sleep=_Sleeps())
    agent.client.lock("hunter22")
    with pytest.raises(AgentError, match="wrong passphrase") as info:
        agent.client.unlock("")
    assert info.value.code == "bad_passphrase"
    assert agent.client.list() == ((), True)


def test_wrong_unlock_passphrases_answered_ever_more_slowly(start_agent):
    sleeps = _Sleeps()
    agent = start_agent(sleep=sleeps, unlock_delay=0.5)
    agent.client.lock("hunter22")
    for guess in ("a", "b", "c", "d", "e", "f", "g"):
        with pytest.raises(AgentError, match="wrong passphrase"):
            agent.client.unlock(guess)
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert agent.client.list() == ((), True)


def test_unlock_with_right_passphrase_restores_keys(start_agent):
    agent = start_agent(sleep=_Sleeps())
    kid = agent.client.add(_key())
    agent.client.lock("hunter22")
    with pytest.raises(AgentError):
        agent.client.unlock("hunter2")
    agent.client.unlock("hunter22")
    assert [k.key_id for k in agent.client.list()[0]] == [kid]
    assert agent.client.session_token("sns").key_id == kid
