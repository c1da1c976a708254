"""Who may call what: the per-method policy table and the interceptor enforcing it.

Deny by default: a method that is not in `POLICY` is refused with
UNIMPLEMENTED before any handler runs, and a test checks that the table covers
exactly the methods the broker serves. The interceptor resolves the caller's
identity and hands it to handlers through the `current_identity` ContextVar,
set for the duration of the call and reset after it.

Until token authentication lands (DESIGN §6), a broker listens on loopback only
and every caller is the local user with all permissions: `LocalIdentity`.
"""
from __future__ import annotations

import contextvars
import getpass
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from park._wire import InvalidInput, check_name


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    permissions: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.permissions


current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("park_identity")

PUBLIC = "public"
JOB = "job"   # authenticated by the job-scoped token inside the request, checked by the handler
POLICY: dict[str, str] = {
    "/park.v1.Site/Info": PUBLIC,
    "/park.v1.Jobs/SubmitMany": "submit",
    "/park.v1.Jobs/Get": "read",
    "/park.v1.Jobs/List": "read",
    "/park.v1.Jobs/Cancel": "submit",
    "/park.v1.Jobs/Watch": "read",
    "/park.v1.Jobs/Report": JOB,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
}


def local_identity() -> Identity:
    """The broker's own OS user, the owner of every job before authentication exists."""
    user = getpass.getuser()
    try:
        check_name(user, "local user name")
    except InvalidInput as exc:
        raise RuntimeError(f"cannot use the local user as a job owner: {exc}") from None
    return Identity(user=user, permissions=frozenset({"submit", "read", "admin"}))


def _wrap(behavior: Callable, identity: Identity, streaming: bool) -> Callable:  # type: ignore[type-arg]
    if streaming:
        async def stream(request, context):  # type: ignore[no-untyped-def]
            token = current_identity.set(identity)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                current_identity.reset(token)
        return stream

    async def unary(request, context):  # type: ignore[no-untyped-def]
        token = current_identity.set(identity)
        try:
            return await behavior(request, context)
        finally:
            current_identity.reset(token)
    return unary


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
    return grpc.unary_unary_rpc_method_handler(abort)


class PolicyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, identity: Identity):
        self._identity = identity

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        rule = POLICY.get(details.method)
        if rule is None:
            return _refuse(grpc.StatusCode.UNIMPLEMENTED, f"method {details.method} is not served here")
        handler = await continuation(details)
        if handler is None:
            return None
        if rule not in (PUBLIC, JOB) and rule not in self._identity.permissions:
            return _refuse(grpc.StatusCode.PERMISSION_DENIED, f"{self._identity.user} may not {rule}")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap(handler.unary_unary, self._identity, False))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap(handler.unary_stream, self._identity, True))
        return handler
