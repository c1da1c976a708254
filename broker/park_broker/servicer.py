"""gRPC servicers: the only code that knows about status codes.

Each method validates what the wire cannot, calls the transport-free JobManager
with the caller from `policy.current_identity`, and maps domain errors through
`status_for`. Anything unexpected becomes INTERNAL with the detail logged, never
sent.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc

import park
from park._proto import jobs_pb2 as jpb
from park._proto import jobs_pb2_grpc, packages_pb2_grpc, site_pb2, site_pb2_grpc
from park._proto import federation_pb2 as fpb
from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park._proto import federation_pb2_grpc
from park._proto import packages_pb2 as ppb
from park_broker import transfer
from park_broker.errors import BrokerError, Code, fail
from park_broker.federation import Publisher
from park_broker.jobs import JobManager
from park_broker.store import Store
from park_broker.policy import current_identity

log = logging.getLogger(__name__)


def status_for(error: BrokerError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code.name]


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
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
            await _abort(context, fn.__name__, exc)
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
            await _abort(context, fn.__name__, exc)
    return wrapper


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, manager: JobManager):
        self.manager = manager

    @unary
    async def SubmitMany(self, request: jpb.SubmitManyRequest, context: grpc.aio.ServicerContext
                         ) -> jpb.SubmitManyResponse:
        submissions = await self.manager.submit_many(current_identity.get().user, list(request.jobs))
        response = jpb.SubmitManyResponse()
        for spec, sub in zip(request.jobs, submissions):
            result = response.results.add(id=spec.id)
            if sub.error is not None:
                result.code = status_for(sub.error).value[0]
                result.message = sub.error.message
            else:
                job = sub.job
                assert job is not None
                result.ref.CopyFrom(jpb.JobRef(id=job.id, url=job.url, filename=job.filename, state=job.state,
                                               memo_hit=sub.memo_hit))
        return response

    @unary
    async def Why(self, request: jpb.GetRequest, context: grpc.aio.ServicerContext) -> jpb.MemoReport:
        return await self.manager.why(current_identity.get().user, request.job_id)

    @unary
    async def Get(self, request: jpb.GetRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        caller = current_identity.get()
        return await self.manager.get(caller.user, request.job_id, admin=caller.admin)

    @unary
    async def List(self, request: jpb.ListRequest, context: grpc.aio.ServicerContext) -> jpb.ListResponse:
        caller = current_identity.get()
        jobs = await self.manager.list(caller.user, request.states, request.after_id, request.limit,
                                       admin=caller.admin)
        limit = min(max(request.limit or 100, 1), 1000)
        return jpb.ListResponse(jobs=jobs, next_after_id=jobs[-1].id if len(jobs) == limit else "")

    @unary
    async def Cancel(self, request: jpb.CancelRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        caller = current_identity.get()
        return await self.manager.cancel(caller.user, request.job_id, request.reason, admin=caller.admin)

    @streaming
    async def Watch(self, request: jpb.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[jpb.WatchResponse]:
        caller = current_identity.get()
        async for item in self.manager.watch(caller.user, request.job_id, request.from_seq, admin=caller.admin):
            yield item


    async def Report(self, request_iterator: AsyncIterator[jpb.ReportRequest], context: grpc.aio.ServicerContext
                     ) -> jpb.ReportResponse:
        """Progress from a running job; authenticated by its job-scoped token, not a user's."""
        accepted = 0
        job: tuple[str, int] | None = None
        try:
            async for request in request_iterator:
                if job is None:
                    job = self.manager.check_report_token(request.token)
                elif request.token and request.token != self.manager.report_token(*job):
                    fail(Code.INVALID_ARGUMENT, "one report stream serves one job attempt")
                reports = [dict(r.values) for r in request.reports]
                if reports:
                    await self.manager.report(*job, reports)
                    accepted += len(reports)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, "Report", exc)
        return jpb.ReportResponse(accepted=accepted)


class SiteServicer(site_pb2_grpc.SiteServicer):
    def __init__(self, info: site_pb2.InfoResponse):
        self.info = info

    @unary
    async def Info(self, request: site_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> site_pb2.InfoResponse:
        response = site_pb2.InfoResponse()
        response.CopyFrom(self.info)
        response.caller = current_identity.get().user   # empty for an anonymous caller
        response.version = park.__version__
        return response


class PackagesServicer(packages_pb2_grpc.PackagesServicer):
    """Wheel uploads for install jobs, and the list of what the site has."""

    def __init__(self, manager: JobManager, uploads: Path, max_bytes: int):
        self.manager = manager
        self.uploads = uploads
        self.max_bytes = max_bytes

    async def Upload(self, request_iterator: AsyncIterator[ppb.UploadRequest], context: grpc.aio.ServicerContext
                     ) -> ppb.PackageRef:
        caller = current_identity.get()
        self.uploads.mkdir(parents=True, exist_ok=True)
        target = self.uploads / secrets.token_hex(16)
        try:
            header = await self._receive(request_iterator, target)
            job = await self.manager.install(caller.user, header.job_id, header.sha256, target, header.filename)
            result = json.loads(job.result_json)
            return ppb.PackageRef(name=result["name"], version=result["version"], sha256=result["sha256"])
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, "Upload", exc)
        finally:
            target.unlink(missing_ok=True)

    async def _receive(self, requests: AsyncIterator[ppb.UploadRequest], target: Path) -> ppb.UploadHeader:
        header: ppb.UploadHeader | None = None
        digest, size = hashlib.sha256(), 0
        with open(target, "wb") as out:
            async for request in requests:
                if header is None:
                    if not request.HasField("header"):
                        fail(Code.INVALID_ARGUMENT, "an upload starts with its header (job id, file name, sha256)")
                    header = request.header
                    if header.size > self.max_bytes:
                        fail(Code.RESOURCE_EXHAUSTED, f"a wheel may be at most {self.max_bytes} bytes")
                    continue
                size += len(request.data)
                if size > self.max_bytes:
                    fail(Code.RESOURCE_EXHAUSTED, f"a wheel may be at most {self.max_bytes} bytes")
                digest.update(request.data)
                out.write(request.data)
        if header is None:
            fail(Code.INVALID_ARGUMENT, "empty upload: send a header, then the wheel's bytes")
        if digest.hexdigest() != header.sha256 or size != header.size:
            fail(Code.INVALID_ARGUMENT, f"the upload is damaged: {size} bytes with sha256 {digest.hexdigest()[:12]}..., "
                                        f"the header says {header.size} bytes with {header.sha256[:12]}...")
        return header

    @unary
    async def List(self, request: ppb.ListPackagesRequest, context: grpc.aio.ServicerContext) -> ppb.PackageList:
        refs = await asyncio.to_thread(self.manager.packages.list)
        return ppb.PackageList(packages=[ppb.PackageRef(name=r.name, version=r.version, sha256=r.sha256)
                                         for r in refs])


class FederationServicer(federation_pb2_grpc.FederationServicer):
    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    @streaming
    async def Subscribe(self, request_iterator: AsyncIterator[fpb.SubscribeRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[fpb.SubscribeResponse]:
        async for item in self.publisher.serve(current_identity.get().peer, request_iterator):
            yield item


class FilesServicer(files_pb2_grpc.FilesServicer):
    """Job outputs, read by whoever holds a token with the `files.read` scope of the path."""

    def __init__(self, files_root: Path, store: Store):
        self.files_root = files_root
        self.store = store

    @streaming
    async def Read(self, request: fipb.ReadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[fipb.Chunk]:
        identity = current_identity.get()
        if identity.token is None:
            fail(Code.PERMISSION_DENIED, "reading files needs a token with the files.read scope of the path")
        transfer.authorize_read(identity.token, request.path)
        real = transfer.resolve_path(self.files_root, request.path)
        known = await self._recorded_sha256(request.path)
        async for offset, data, size, sha256 in transfer.read_chunks(real, request.offset, known_sha256=known,
                                                                     within=self.files_root):
            yield fipb.Chunk(offset=offset, data=data, size=size, sha256=sha256)

    async def _recorded_sha256(self, path: str) -> str | None:
        """The digest the job recorded for this output when it completed: saves hashing it again."""
        _, job_id, *name = transfer.split_path(path)
        job = (await self.store.get_many([job_id])).get(job_id)
        for output in job.outputs if job is not None else ():
            if output.name == "/".join(name):
                return output.sha256
        return None
