"""The `Jobs` service: submission, reading, cancelling, watching and progress reports.

Each method takes the caller from `policy.current_identity`, calls the
transport-free job lifecycle, and leaves status codes to `boundary`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from park._proto import jobs_pb2 as jpb
from park._proto import jobs_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.core.lifecycle import Lifecycle
from park_broker.core.queries import event_without_tokens, without_tokens
from park_broker.errors import Code, fail
from park_broker.servicers.boundary import abort, status_for, streaming, unary


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, core: Lifecycle):
        self.core = core

    @unary
    async def SubmitMany(self, request: jpb.SubmitManyRequest, context: grpc.aio.ServicerContext
                         ) -> jpb.SubmitManyResponse:
        caller = current_identity.get()
        submissions = await self.core.submissions.submit_many(caller.user, list(request.jobs), caller.permissions,
                                                              stream=request.stream, number=request.number,
                                                              after=request.after)
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
    async def Credentials(self, request: jpb.CredentialsRequest, context: grpc.aio.ServicerContext
                          ) -> jpb.CredentialsList:
        if request.within_seconds < 0:
            fail(Code.INVALID_ARGUMENT, "within_seconds must be 0 (all) or more")
        held = self.core.credentials.held(current_identity.get().user, float(request.within_seconds))
        return jpb.CredentialsList(credentials=held)

    @unary
    async def Renew(self, request: jpb.RenewRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        return without_tokens(await self.core.credentials.renew(current_identity.get().user, request))

    @unary
    async def Why(self, request: jpb.GetRequest, context: grpc.aio.ServicerContext) -> jpb.MemoReport:
        return await self.core.queries.why(current_identity.get().user, request.job_id)

    @unary
    async def Get(self, request: jpb.GetRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        caller = current_identity.get()
        job = without_tokens(await self.core.queries.get(caller.user, request.job_id, admin=caller.admin))
        job.memo_hit = job.id != request.job_id     # asked by the id of a submission another job answered
        return job

    @unary
    async def List(self, request: jpb.ListRequest, context: grpc.aio.ServicerContext) -> jpb.ListResponse:
        caller = current_identity.get()
        jobs = await self.core.queries.list(caller.user, request.states, request.after_id, request.limit,
                                            admin=caller.admin)
        limit = min(max(request.limit or 100, 1), 1000)
        return jpb.ListResponse(jobs=[without_tokens(j) for j in jobs],
                                next_after_id=jobs[-1].id if len(jobs) == limit else "")

    @unary
    async def Cancel(self, request: jpb.CancelRequest, context: grpc.aio.ServicerContext) -> jpb.Job:
        caller = current_identity.get()
        job = await self.core.transitions.cancel(caller.user, request.job_id, request.reason, admin=caller.admin)
        return without_tokens(jpb.Job.FromString(job.SerializeToString()))   # the record others still read

    @streaming
    async def Watch(self, request: jpb.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[jpb.WatchResponse]:
        caller = current_identity.get()
        async for item in self.core.queries.watch(caller.user, request.job_id, request.from_seq, admin=caller.admin):
            shown = [event_without_tokens(event) for event in item.events]
            yield item if all(s is e for s, e in zip(shown, item.events)) else jpb.WatchResponse(events=shown)


    async def Report(self, request_iterator: AsyncIterator[jpb.ReportRequest], context: grpc.aio.ServicerContext
                     ) -> jpb.ReportResponse:
        """Progress from a running job; authenticated by its job-scoped token, not a user's."""
        accepted = 0
        job: tuple[str, int] | None = None
        try:
            async for request in request_iterator:
                if job is None:
                    job = self.core.tokens.check(request.token)
                elif request.token and request.token != self.core.tokens.issue(*job):
                    fail(Code.INVALID_ARGUMENT, "one report stream serves one job attempt")
                reports = [dict(r.values) for r in request.reports]
                if reports:
                    await self.core.progress.report(*job, reports)
                    accepted += len(reports)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort(context, "Report", exc)
        return jpb.ReportResponse(accepted=accepted)
