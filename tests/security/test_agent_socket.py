"""The agent's socket: private directory and mode, peer uid checked, clean exits."""
from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from park._proto import agent_pb2 as apb
from park.agent_client import NoAgentError, NoKeysError, frame

pytestmark = pytest.mark.timeout(30)

NOBODY = 65534
_OUTCOMES = {10: "connect refused", 11: "eof", 12: "answered"}


def _probe_as_nobody(path: str) -> str:
    """Connect as user nobody (a forked child; the interpreter itself is not readable
    by nobody), send a List, and say what happened."""
    request = frame(apb.AgentRequest(list=apb.AgentListRequest()))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except PermissionError:
                    code = 10
                else:
                    s.sendall(request)
                    code = 11 if s.recv(4) == b"" else 12
        except (ConnectionResetError, BrokenPipeError):
            code = 11
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return _OUTCOMES.get(os.waitstatus_to_exitcode(status), "probe failed")


def test_socket_is_0600_in_a_0700_directory(agent_process):
    agent = agent_process()
    sock = Path(agent.socket)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert sock.parent.stat().st_uid == os.getuid()


def test_connection_from_foreign_uid_dropped(start_agent):
    agent = start_agent(uid=os.getuid() + 1)  # the agent believes it belongs to someone else
    with pytest.raises(NoAgentError, match="closed the connection"):
        agent.client.list()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_user_cannot_reach_the_socket(agent_process):
    assert _probe_as_nobody(agent_process().socket) == "connect refused"


@pytest.fixture
def traversable_dir():
    """A directory under /tmp that other users can pass through (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="park-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    path.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_user_dropped_even_when_permissions_are_loosened(traversable_dir, start_agent):
    agent = start_agent(parent=traversable_dir)
    path = agent.server.path
    path.parent.chmod(0o711)
    path.chmod(0o666)
    assert _probe_as_nobody(str(path)) == "eof"
    assert agent.client.list() == ((), False)  # its owner is still served


def test_sigterm_removes_socket_and_directory(agent_process):
    agent = agent_process()
    directory = Path(agent.socket).parent
    assert agent.stop(signal.SIGTERM) == 0
    assert not directory.exists()


def test_stop_request_removes_socket_and_directory(agent_process):
    agent = agent_process()
    agent.client.stop()
    assert agent.proc.wait(timeout=10) == 0
    assert not Path(agent.socket).parent.exists()


def test_sigusr1_wipes_keys(agent_process):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    agent = agent_process()
    agent.client.add(Ed25519PrivateKey.generate().private_bytes_raw(), comment="k")
    assert len(agent.client.list()[0]) == 1
    agent.proc.send_signal(signal.SIGUSR1)
    with pytest.raises(NoKeysError, match="the agent holds no keys"):
        for _ in range(100):  # the signal is handled asynchronously
            agent.client.session_token("sns")
    assert agent.client.list() == ((), False)
    assert agent.proc.poll() is None


def test_raw_socket_client_gets_one_answer_per_frame(start_agent):
    agent = start_agent()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.server.path))
        s.sendall(frame(apb.AgentRequest(list=apb.AgentListRequest())) * 2)
        data = b""
        while len(data) < 8:
            data += s.recv(100)
        assert data == frame(apb.AgentResponse(list=apb.AgentListResponse())) * 2
