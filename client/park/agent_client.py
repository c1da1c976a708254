"""A synchronous client of park-agent, and the agent's frame format.

Each message on the agent's Unix socket is a 4-byte big-endian length and a
serialized `park.v1.AgentRequest` / `AgentResponse` (agent.proto). This module
owns that framing for both sides (`park_agent.protocol` reuses the constants)
and the errors a caller can act on:

    AgentError        the agent answered with an error (`.code`: "locked", "denied", ...)
    ├── NoAgentError  $PARK_AUTH_SOCK unset, or nothing answering there
    └── NoKeysError   the agent runs but holds no usable key

It never logs a token, a passphrase or a key.
"""
from __future__ import annotations

import getpass
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from park._proto import agent_pb2 as apb

__all__ = ["AgentClient", "AgentError", "NoAgentError", "NoKeysError", "IssuedToken", "AgentKeyInfo",
           "MAX_FRAME", "HEADER", "frame", "default_subject"]

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
# Long enough for a person to answer a confirm prompt.
TIMEOUT = 300.0

_CODES = {v: k.removeprefix("AGENT_ERROR_CODE_").lower() for k, v in apb.AgentErrorCode.items()}


class AgentError(Exception):
    """The agent refused a request; `code` is the lower-case AgentErrorCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NoAgentError(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__("no_agent", message)


class NoKeysError(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__("no_keys", message)


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedToken:
    token: str       # park.tokens.encode form, for the `authorization` metadata
    expires: int     # unix seconds
    key_id: str      # the key that signed it


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentKeyInfo:
    key_id: str
    comment: str
    public_key: bytes
    expires: int     # 0 = until removed
    confirm: bool


def frame(message: apb.AgentRequest | apb.AgentResponse) -> bytes:
    data = message.SerializeToString()
    return HEADER.pack(len(data)) + data


def default_subject() -> str:
    """The user name tokens speak for: $PARK_USER, else the login name."""
    return os.environ.get("PARK_USER") or getpass.getuser()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionResetError("end of stream")
        chunks += chunk
    return bytes(chunks)


class AgentClient:
    """Talks to one agent socket; one short connection per request."""

    def __init__(self, path: str, *, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def from_env(cls) -> AgentClient:
        path = os.environ.get("PARK_AUTH_SOCK")
        if not path:
            raise NoAgentError("no agent: PARK_AUTH_SOCK is not set (start one with: eval \"$(park-agent)\")")
        return cls(path)

    def request(self, request: apb.AgentRequest) -> apb.AgentResponse:
        """Send one request; raise AgentError (or a subclass) if the agent answers with an error."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(frame(request))
                (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
                if size > MAX_FRAME:
                    raise AgentError("malformed", f"agent answered with a {size}-byte frame")
                response = apb.AgentResponse.FromString(_recv_exactly(sock, size))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoAgentError(f"no agent listening at {self.path} ({e.strerror})") from None
        except (ConnectionResetError, BrokenPipeError):
            # What a foreign uid, an oversize frame or a stopping agent gets.
            raise NoAgentError(f"the agent at {self.path} closed the connection") from None
        except OSError as e:
            raise NoAgentError(f"agent at {self.path} unreachable: {e}") from None
        if response.WhichOneof("response") == "error":
            code = _CODES.get(response.error.code, "unspecified")
            if code == "no_keys":
                raise NoKeysError(response.error.message)
            raise AgentError(code, response.error.message)
        return response

    def list(self) -> tuple[tuple[AgentKeyInfo, ...], bool]:
        """The keys the agent holds, and whether it is locked (then the list is empty)."""
        reply = self.request(apb.AgentRequest(list=apb.AgentListRequest())).list
        keys = tuple(AgentKeyInfo(key_id=k.key_id, comment=k.comment, public_key=k.public_key, expires=k.expires,
                                  confirm=k.confirm) for k in reply.keys)
        return keys, reply.locked

    def add(self, private_key: bytes, *, comment: str = "", lifetime: int = 0, confirm: bool = False) -> str:
        req = apb.AgentAddRequest(private_key=private_key, comment=comment, lifetime_seconds=lifetime,
                                  confirm=confirm)
        return self.request(apb.AgentRequest(add=req)).ok.key_id

    def remove(self, key_id: str | None = None) -> None:
        req = apb.AgentRemoveRequest(key_id=key_id or "", all=key_id is None)
        self.request(apb.AgentRequest(remove=req))

    def lock(self, passphrase: str) -> None:
        self.request(apb.AgentRequest(lock=apb.AgentLockRequest(passphrase=passphrase)))

    def unlock(self, passphrase: str) -> None:
        self.request(apb.AgentRequest(unlock=apb.AgentUnlockRequest(passphrase=passphrase)))

    def stop(self) -> None:
        self.request(apb.AgentRequest(stop=apb.AgentStopRequest()))

    def session_token(self, audience: str, *, scopes: Iterable[str] = (), subject: str | None = None,
                      key_id: str = "") -> IssuedToken:
        """A 10-minute bearer token for `audience`; subject and key default to the agent's."""
        req = apb.AgentIssueSessionRequest(audience=audience, scopes=list(scopes),
                                           subject=subject or "", key_id=key_id)
        return self._token(self.request(apb.AgentRequest(issue_session=req)))

    def delegate(self, audience: str, *, scopes: Iterable[str], confirm: str, lifetime: int = 0,
                 max_depth: int = 0, subject: str | None = None, key_id: str = "") -> IssuedToken:
        """A token only the holder of key id `confirm` may use (lifetime 0 = 1 hour, at most 6)."""
        req = apb.AgentDelegateRequest(audience=audience, scopes=list(scopes), lifetime_seconds=lifetime,
                                       confirm=confirm, max_depth=max_depth,
                                       subject=subject or "", key_id=key_id)
        return self._token(self.request(apb.AgentRequest(delegate=req)))

    @staticmethod
    def _token(response: apb.AgentResponse) -> IssuedToken:
        t = response.token
        log.debug("agent issued a token", extra={"key_id": t.key_id, "expires": t.expires})
        return IssuedToken(token=t.token, expires=t.expires, key_id=t.key_id)
