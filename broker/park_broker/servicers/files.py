"""The `Files` service: job outputs, read by whoever holds a token with the path's `files.read` scope."""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.core.store import Store
from park_broker.errors import BrokerError, Code, fail
from park_broker.servicers.boundary import streaming
from park_broker.transfer import source


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


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
        source.authorize_read(identity.token, request.path)
        try:
            real = source.resolve_path(self.files_root, request.path)
        except BrokerError as exc:
            if exc.code != Code.NOT_FOUND or not await self._left_nothing(request.path):
                raise
            if request.offset != 0:
                fail(Code.INVALID_ARGUMENT, f"offset {request.offset} is outside the file (size 0 bytes)")
            yield fipb.Chunk(offset=0, data=b"", size=0, sha256=EMPTY_SHA256)
            return
        known = await self._recorded_sha256(request.path)
        within = source.owner_root(self.files_root, request.path)
        async for offset, data, size, sha256 in source.read_chunks(real, request.offset, known_sha256=known,
                                                                     within=within):
            yield fipb.Chunk(offset=offset, data=data, size=size, sha256=sha256)

    async def _left_nothing(self, path: str) -> bool:
        """Whether `path` is a log of a job whose last attempt wrote nothing, so it has no directory
        (core.attempts): its logs are empty files, not missing ones."""
        owner, job_id, *name = source.split_path(path)
        if name not in (["stdout.log"], ["stderr.log"]):
            return False
        job = (await self.store.get_many([job_id])).get(job_id)
        return job is not None and job.owner == owner and job.left_nothing

    async def _recorded_sha256(self, path: str) -> str | None:
        """The digest the job recorded for this output when it completed: saves hashing it again."""
        _, job_id, *name = source.split_path(path)
        job = (await self.store.get_many([job_id])).get(job_id)
        for output in job.outputs if job is not None else ():
            if output.name == "/".join(name):
                return output.sha256
        return None
