"""What the agent does with requests it must not honour: too big, garbled, unknown, raw signing."""
from __future__ import annotations

import socket

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park._proto import agent_pb2 as apb
from park.agent_client import HEADER, MAX_FRAME, frame

pytestmark = pytest.mark.timeout(20)


def _exchange(path: str, data: bytes) -> bytes:
    """Send raw bytes, half-close, and return everything the agent sends before it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def _error(data: bytes) -> apb.AgentError:
    (size,) = HEADER.unpack(data[:4])
    assert len(data) == 4 + size, "exactly one response, then the connection closes"
    return apb.AgentResponse.FromString(data[4:]).error


def _still_serves(agent) -> None:
    assert agent.client.list() == ((), False)


def test_oversize_request_closes_connection_and_agent_keeps_serving(start_agent):
    agent = start_agent()
    assert _exchange(str(agent.server.path), HEADER.pack(MAX_FRAME + 1) + b"\0" * 1024) == b""
    _still_serves(agent)


def test_request_at_size_cap_is_read_not_refused_for_size(start_agent):
    agent = start_agent()
    error = _error(_exchange(str(agent.server.path), HEADER.pack(MAX_FRAME) + b"\xff" * MAX_FRAME))
    assert error.code == apb.AGENT_ERROR_CODE_MALFORMED


def test_garbled_request_answered_malformed_then_closed(start_agent):
    agent = start_agent()
    error = _error(_exchange(str(agent.server.path), HEADER.pack(5) + b"\xff\xff\xff\xff\xff"))
    assert error.code == apb.AGENT_ERROR_CODE_MALFORMED
    assert error.message == "malformed request"
    _still_serves(agent)


def test_truncated_frame_closes_connection(start_agent):
    agent = start_agent()
    assert _exchange(str(agent.server.path), HEADER.pack(100) + b"\x0a\x00") == b""
    _still_serves(agent)


def test_unknown_request_type_rejected(start_agent):
    agent = start_agent()
    # Field 9, length-delimited: what a "sign these bytes" request would look like.
    sign_raw = b"\x4a\x0bhello bytes"
    error = _error(_exchange(str(agent.server.path), HEADER.pack(len(sign_raw)) + sign_raw))
    assert error.code == apb.AGENT_ERROR_CODE_UNKNOWN_REQUEST
    assert error.message == "unknown request type"
    _still_serves(agent)


def test_known_request_with_smuggled_field_rejected(start_agent):
    agent = start_agent()
    data = apb.AgentRequest(list=apb.AgentListRequest()).SerializeToString() + b"\x4a\x03abc"
    error = _error(_exchange(str(agent.server.path), HEADER.pack(len(data)) + data))
    assert error.code == apb.AGENT_ERROR_CODE_UNKNOWN_REQUEST


def test_no_request_signs_caller_bytes():
    requests = {f.name: f.message_type for f in apb.AgentRequest.DESCRIPTOR.oneofs_by_name["request"].fields}
    assert set(requests) == {"list", "add", "remove", "lock", "unlock", "issue_session", "delegate", "stop"}
    byte_fields = [(name, f.name) for name, msg in requests.items() for f in msg.fields
                   if f.type == f.TYPE_BYTES]
    assert byte_fields == [("add", "private_key")]


def test_private_key_never_in_any_response(start_agent):
    agent = start_agent()
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    kid = agent.client.add(raw, comment="k")
    responses = [agent.client.request(apb.AgentRequest(list=apb.AgentListRequest())),
                 agent.client.request(apb.AgentRequest(issue_session=apb.AgentIssueSessionRequest(audience="sns"))),
                 agent.client.request(apb.AgentRequest(delegate=apb.AgentDelegateRequest(
                     audience="sns", scopes=["jobs.submit"], confirm=kid)))]
    for response in responses:
        assert raw not in frame(response)
