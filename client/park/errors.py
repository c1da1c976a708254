"""Park's exceptions, all in one tree:

    ParkError
    ├── ServiceError        a broker refused a call or could not be reached (.code, .message)
    │   └── SubmitError     a submitted job was refused (.job_id)
    ├── JobFailed           job.result() of a job that failed (.job, .error, .traceback)
    ├── JobCancelled        job.result() of a job that was cancelled (.job, .cause)
    ├── NoServiceError      no service given and no `with service:` around the call
    └── ConfigError         the client configuration is missing or wrong

Waiting too long raises the built-in TimeoutError.
"""
from __future__ import annotations

from typing import Any

import grpc

__all__ = ["ParkError", "ServiceError", "SubmitError", "JobFailed", "JobCancelled", "NoServiceError", "ConfigError"]


# What gRPC says of a TLS handshake that failed (a certificate other than the pinned one, a peer port).
_TLS_TROUBLE = ("certificate_verify_failed", "ssl", "tls", "handshake", "socket closed")


class ParkError(Exception):
    """Base of every error Park raises on purpose."""


class ServiceError(ParkError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code          # a gRPC status name: "NOT_FOUND", "INVALID_ARGUMENT", ...
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, doing: str, where: str = "", cert: str = "") -> ServiceError:
        """The error of a failed call, in words; `where` names the broker ("site sns at HOST:PORT") and
        `cert` the certificate pinned for it, so that a connection that failed says what to check."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        if code is grpc.StatusCode.UNAVAILABLE and where:
            if any(word in details.lower() for word in _TLS_TROUBLE):
                details = (f"the TLS handshake with {where} failed: it is not the broker whose certificate is "
                           f"pinned ({cert}), or it is a site's peer port (clients use the client port)")
            else:
                details = f"nothing answers at {where}: is the broker running, and is this its client port? " \
                          f"({details})"
        return cls(code.name, f"{doing}: {details}")


class SubmitError(ServiceError):
    def __init__(self, job_id: str, code: str, message: str):
        super().__init__(code, message)
        self.job_id = job_id


class JobFailed(ParkError):
    """A job failed at its site: `error` is the one line it failed with, `traceback` the remote Python
    traceback (empty for a command line), both shown when the exception is printed."""

    def __init__(self, job: Any, error: str, traceback: str = ""):
        remote = f"\n\nthe job's traceback, at its site:\n{traceback.rstrip()}" if traceback else ""
        super().__init__(f"job {job.id} failed: {error}{remote}")
        self.job, self.error, self.traceback = job, error, traceback


class JobCancelled(ParkError):
    """A job was cancelled: `cause` is why, as its site says; `root_cause` (a park.causes.RootCause, or
    None) is where a chain of cancellations began, across sites: the failure at the bottom of it."""

    def __init__(self, job: Any, cause: str, root_cause: Any = None):
        because = f"because {root_cause} (directly: {cause})" if root_cause is not None else cause
        super().__init__(f"job {job.id} was cancelled {because}" if root_cause is not None else
                         f"job {job.id} was cancelled: {cause}")
        self.job, self.cause, self.root_cause = job, cause, root_cause


class NoServiceError(ParkError):
    pass


class ConfigError(ParkError):
    pass
