"""The servicers' boundary: domain errors to gRPC statuses, in one place.

`unary` and `streaming` wrap a servicer method so that a `BrokerError` becomes
its status and message (`status_for`), and anything unexpected becomes INTERNAL
with the detail logged, never sent. A servicer that must handle errors inside a
client stream calls `abort` itself.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from park_broker.errors import BrokerError

log = logging.getLogger(__name__)


def status_for(error: BrokerError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code.name]


async def abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, BrokerError):
        await context.abort(status_for(exc), exc.message)
    log.error("internal error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the broker log has the details")
    raise AssertionError("context.abort returned")


def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map a unary handler's domain errors to statuses (see the module docstring)."""
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort(context, fn.__name__, exc)
    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort(context, fn.__name__, exc)
    return wrapper
