"""Who may call what: the per-method policy table and the interceptor enforcing it.

Deny by default: a method missing from `POLICY` is refused with UNIMPLEMENTED
before any handler runs, and a test checks that the table covers exactly the
methods the broker serves. Every other call is authenticated before its handler
runs, from the `authorization: Bearer <token>` metadata (users.Authority), and
refused with UNAUTHENTICATED (no token, or one that does not verify) or
PERMISSION_DENIED (a valid token without the permission). The caller's identity
reaches handlers through the `current_identity` ContextVar, set for the call
and reset after it.

`PUBLIC` methods (site info, health, reflection) accept anonymous callers but still refuse
a bad token; `JOB` methods are authenticated by the job-scoped token inside the
request, by their handler. In local-only mode (`park-broker serve --local-only`,
loopback addresses only) every caller is the broker's own user.
"""
from __future__ import annotations

import asyncio
import contextvars
import getpass
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from park import tokens
from park.wire import InvalidInput, check_name
from park_broker.federation.peers import PeerTable
from park_broker.auth.users import Authority, Identity

current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("park_identity")

PUBLIC = "public"
JOB = "job"
PEER = "peer"    # a peer broker, known by its TLS client certificate
TOKEN = "token"  # any valid token; the handler checks the scope the call needs
SUBMIT_OR_UPLOAD = "submit|upload"   # either permission; the handler checks which each spec needs
POLICY: dict[str, str] = {
    "/park.v1.Site/Info": PUBLIC,
    "/park.v1.Site/Peers": "admin",
    "/park.v1.Jobs/SubmitMany": SUBMIT_OR_UPLOAD,   # an install job needs only upload; the handler checks
    "/park.v1.Jobs/Get": "read",
    "/park.v1.Jobs/List": "read",
    "/park.v1.Jobs/Cancel": "submit",
    "/park.v1.Jobs/Watch": "read",
    "/park.v1.Jobs/Report": JOB,
    "/park.v1.Jobs/Why": "read",
    "/park.v1.Jobs/Credentials": "read",   # of the caller's own jobs only
    "/park.v1.Jobs/Renew": "submit",
    "/park.v1.Packages/Upload": "upload",
    "/park.v1.Packages/List": "read",
    "/park.v1.Federation/Subscribe": PEER,
    "/park.v1.Files/Read": TOKEN,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,        # grpcurl: service definitions
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
}
ANONYMOUS = Identity(user="", permissions=frozenset())
MAX_TOKEN_METADATA = tokens.MAX_TOKEN_CHARS + 16


RECHECK = 1.0   # seconds between re-checks of a long stream's caller
LOG_REFUSALS_PER_SECOND = 10
log = logging.getLogger(__name__)


def local_identity() -> Identity:
    """The broker's own OS user, the owner of every job in local-only mode."""
    user = getpass.getuser()
    try:
        check_name(user, "local user name")
    except InvalidInput as exc:
        raise RuntimeError(f"cannot use the local user as a job owner: {exc}") from None
    return Identity(user=user, permissions=frozenset({"submit", "read", "upload", "admin"}))


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


class Gate:
    """Decides the identity of one call; shared by all methods."""

    def __init__(self, authority: Authority | None, local: Identity | None = None, peers: PeerTable | None = None):
        if (authority is None) == (local is None):
            raise ValueError("a broker authenticates with tokens or serves its local user, not both")
        self.authority = authority
        self.local = local
        self.peers = peers or PeerTable({})
        self._logged = (0.0, 0)   # (second, refusals logged in it): a flood of bad calls is not a flood of lines

    def identify(self, rule: str, context: grpc.aio.ServicerContext) -> Identity:
        try:
            return self._identify(rule, context)
        except _Refused as refused:
            self._log_refusal(context, refused)
            raise

    def _log_refusal(self, context: grpc.aio.ServicerContext, refused: _Refused) -> None:
        """One line per refused call (the caller's address, who its token claims to be, why; never the
        token), at most LOG_REFUSALS_PER_SECOND of them."""
        second, count = self._logged
        now = int(time.monotonic())
        count = count + 1 if now == second else 1
        self._logged = (now, count)
        if count > LOG_REFUSALS_PER_SECOND:
            return
        bearer = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        claimed = tokens.subject_of(bearer[0][len("Bearer "):]) if bearer and isinstance(bearer[0], str) else None
        claimed = claimed[:64] if claimed else None   # unverified, so never more than a short, quoted name
        log.warning("refused a call from %s (its token speaks for %s): %s", context.peer(),
                    repr(claimed) if claimed else "nobody", refused.message,
                    extra={"peer_address": context.peer(), "subject": claimed or "", "code": refused.code.name})

    def _identify(self, rule: str, context: grpc.aio.ServicerContext) -> Identity:
        peer = self.peers.caller(context)
        if rule == PEER:
            if peer is None:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "only a peer broker, with the TLS client "
                                                                "certificate this site pinned for it, may call this")
            return Identity(user=f"peer:{peer.name}", permissions=frozenset({PEER}), peer=peer)
        if self.local is not None:
            return self.local
        assert self.authority is not None
        bearer = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if not bearer:
            if rule == PUBLIC:
                return ANONYMOUS
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                           "no token: start park-agent and add a key (PARK_AUTH_SOCK), or set PARK_KEY_FILE")
        value = bearer[0] if isinstance(bearer[0], str) else ""
        if len(bearer) > 1 or len(value) > MAX_TOKEN_METADATA or not value.startswith("Bearer "):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata; "
                                                            "send exactly one 'authorization: Bearer <token>'")
        try:
            # A peer proves, by its certificate, the key that tokens delegated to it are bound to.
            identity = self.authority.authenticate(value[len("Bearer "):], peer.key_id if peer else None)
        except tokens.TokenError as exc:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, f"token refused: {exc.message}") from None
        if rule not in (PUBLIC, TOKEN) and not set(rule.split("|")) & identity.permissions:
            action = "make operators' calls (admin)" if rule == "admin" else rule.replace('|', ' or ')
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"user {identity.user!r} may not {action} at site {self.authority.site!r} with this "
                           f"token (it grants: {', '.join(sorted(identity.permissions)) or 'nothing'})")
        return identity


class _Undecodable:
    """What a request that does not decode becomes: the call is refused with INVALID_ARGUMENT."""

    def __init__(self, message: str):
        self.message = message


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that never raises: gRPC would answer UNKNOWN and log a traceback."""
    if deserialize is None:
        return None
    kind = getattr(getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None), "full_name", "message")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any decoding failure is the sender's malformed request
            return _Undecodable(f"the request is not a valid {kind} message; send what the .proto defines")
    return decode


async def _checked(context: grpc.aio.ServicerContext, request: Any) -> Any:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request


async def _checked_stream(context: grpc.aio.ServicerContext, requests: Any) -> Any:
    async for request in requests:
        yield await _checked(context, request)


async def _recheck(gate: Gate | None, rule: str, context: grpc.aio.ServicerContext) -> None:
    if gate is None:   # a job's report stream: its token lives as long as the attempt
        return
    try:
        gate.identify(rule, context)
    except _Refused as refused:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"the stream's credentials no longer hold: "
                                                             f"{refused.message}")


def _wrap(behavior: Callable[..., Any], gate: Gate | None, rule: str, request_stream: bool,
          response_stream: bool) -> Callable[..., Any]:
    """The handler `behavior`, run only for an identified caller (`gate` None: it authenticates itself)
    and only on requests that decode."""
    async def enter(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if gate is not None:
            try:
                identity = gate.identify(rule, context)
            except _Refused as refused:
                await context.abort(refused.code, refused.message)
            # Each call runs in a task of its own, so the identity set here dies with it. Not reset:
            # a stream the client abandons is finalized in another context, where reset() would fail.
            current_identity.set(identity)
        return _checked_stream(context, request) if request_stream else await _checked(context, request)

    if response_stream and inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            items = behavior(await enter(request, context), context).__aiter__()
            checked = time.monotonic()
            pending: asyncio.Future[Any] | None = None
            try:
                while True:
                    pending = asyncio.ensure_future(items.__anext__())
                    # A long stream stays authorized: its caller is identified again every RECHECK
                    # seconds, so revocation, removal of the user or expiry ends it within about that.
                    while True:
                        left = checked + RECHECK - time.monotonic()
                        if left > 0 and (await asyncio.wait({pending}, timeout=left))[0]:
                            break
                        await _recheck(gate, rule, context)
                        checked = time.monotonic()
                    try:
                        item = pending.result()
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                if pending is not None:
                    pending.cancel()
        return stream

    # Unary responses, and streams a handler writes with context.write() (grpc's own health Watch).
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request = await enter(request, context)
        try:
            return await behavior(request, context)
        except NotImplementedError:   # a generated base method no servicer overrides (health List, here)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{behavior.__qualname__} is not served here")
    return call


def _refuse(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)
    return grpc.unary_unary_rpc_method_handler(abort)


class PolicyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate):
        self._gate = gate

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        rule = POLICY.get(details.method)
        if rule is None:
            return _refuse(grpc.StatusCode.UNIMPLEMENTED, f"method {details.method} is not served here")
        handler = await continuation(details)
        if handler is None:
            return handler
        gate = None if rule == JOB else self._gate    # a job's report carries its own credential
        handler = handler._replace(request_deserializer=_lenient(handler.request_deserializer))
        for shape, request_stream, response_stream in _SHAPES:
            behavior = getattr(handler, shape)
            if behavior is not None:
                return handler._replace(**{shape: _wrap(behavior, gate, rule, request_stream, response_stream)})
        return _refuse(grpc.StatusCode.UNIMPLEMENTED, f"method {details.method} has no policy for its shape")


_SHAPES = (("unary_unary", False, False), ("unary_stream", False, True), ("stream_unary", True, False),
           ("stream_stream", True, True))
