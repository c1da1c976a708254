"""The agent's side of its socket protocol: reading frames and knowing the peer.

Frames are `park.agent_client.frame`'s: a 4-byte big-endian length, then a
protobuf message. A frame announcing more than `MAX_FRAME` bytes is refused
before a byte of its body is read, and a request that does not parse, names no
request type this agent knows, or carries fields it does not know is refused:
the caller closes that connection, never the agent.

`peer_uid` reads SO_PEERCRED, which the kernel fills in at connect time, so a
peer cannot lie about it.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from park._proto import agent_pb2 as apb
from park.agent_client import HEADER, MAX_FRAME

__all__ = ["FrameError", "read_request", "peer_uid", "error_response"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class FrameError(Exception):
    """The peer broke the protocol; `code` is the AgentErrorCode to answer with, if any."""

    def __init__(self, code: apb.AgentErrorCode.ValueType | None, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_response(code: apb.AgentErrorCode.ValueType, message: str) -> apb.AgentResponse:
    return apb.AgentResponse(error=apb.AgentError(code=code, message=message))


async def read_request(reader: asyncio.StreamReader) -> apb.AgentRequest | None:
    """The next request, or None at a clean end of stream; FrameError for anything malformed."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError(None, "connection closed inside a frame header") from None
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(None, f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError(None, "connection closed inside a frame") from None
    request = apb.AgentRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        raise FrameError(apb.AGENT_ERROR_CODE_MALFORMED, "malformed request") from None
    if request.WhichOneof("request") is None or len(UnknownFieldSet(request)):
        raise FrameError(apb.AGENT_ERROR_CODE_UNKNOWN_REQUEST, "unknown request type")
    return request


class _Socket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_uid(sock: _Socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (Linux SO_PEERCRED)."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)
