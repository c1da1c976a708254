"""The broker's error catalog: domain errors with a code, and nothing about gRPC.

Handlers raise `BrokerError(Code.X, "what to fix")`. The servicer layer is the
only place that turns a code into a gRPC status (`servicers.boundary.status_for`), so the
same error reads the same way on every RPC. Messages are shown to callers: they
say what was wrong and how to fix it, and never contain secrets.
"""
from __future__ import annotations

import enum
from typing import NoReturn


class Code(enum.Enum):
    """Failure kinds; names match gRPC status codes one to one."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    UNAVAILABLE = "UNAVAILABLE"


class BrokerError(Exception):
    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: Code, message: str) -> NoReturn:
    raise BrokerError(code, message)
