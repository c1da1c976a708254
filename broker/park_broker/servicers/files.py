"""The `Files` service: job outputs and logs (a running job's too), read by whoever holds a token with the
path's `files.read` scope."""
from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.core.store import Store
from park_broker.errors import BrokerError, Code, fail
from park_broker.execution.worker import LOGS
from park_broker.servicers.boundary import streaming
from park_broker.transfer import source


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class FilesServicer(files_pb2_grpc.FilesServicer):
    """Job outputs, read by whoever holds a token with the `files.read` scope of the path."""

    def __init__(self, files_root: Path, store: Store, running_dir: Callable[[str, str], str | None]):
        self.files_root = files_root
        self.store = store
        self.running_dir = running_dir   # core.dispatch: where a job's current attempt runs, by (job, owner)

    @streaming
    async def Read(self, request: fipb.ReadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[fipb.Chunk]:
        identity = current_identity.get()
        if identity.token is None:
            fail(Code.PERMISSION_DENIED, "reading files needs a token with the files.read scope of the path")
        source.authorize_read(identity.token, request.path)
        within = source.owner_root(self.files_root, request.path)
        chunks: AsyncIterator[tuple[int, bytes, int, str]] | None = None
        if (running := self._running_log(request.path)) == "":   # its attempt waits its turn: no log yet
            yield _empty(request.offset, request.no_digest)
            return
        if running is not None:
            try:   # opened before the first item
                chunks = source.read_chunks(Path(running), request.offset, within=within,
                                            digest=not request.no_digest)
                first = await anext(chunks)
            except BrokerError as exc:
                if exc.code != Code.NOT_FOUND:
                    raise
                chunks = None
                # Still running: the log is not made yet (its worker starts), so it is empty. Else the attempt
                # ended meanwhile and its logs moved with its directory.
                if self._running_log(request.path) == running:
                    yield _empty(request.offset, request.no_digest)
                    return
            else:
                yield fipb.Chunk(offset=first[0], data=first[1], size=first[2], sha256=first[3])
        if chunks is None:
            try:
                real = source.resolve_path(self.files_root, request.path)
            except BrokerError as exc:
                if exc.code != Code.NOT_FOUND or not await self._left_nothing(request.path):
                    raise
                yield _empty(request.offset, request.no_digest)
                return
            known = None if request.no_digest else await self._recorded_sha256(request.path)
            chunks = source.read_chunks(real, request.offset, known_sha256=known, within=within,
                                        digest=not request.no_digest)
        async for offset, data, size, sha256 in chunks:
            yield fipb.Chunk(offset=offset, data=data, size=size, sha256=sha256)

    def _running_log(self, path: str) -> str | None:
        """Where a log of a job still running here is: in its current attempt's directory, which becomes the
        job's only when the attempt ends (core.attempts). A read of it is the prefix written so far. "": the
        job's attempt waits its turn; None: the job has no attempt here."""
        owner, job_id, *name = source.split_path(path)
        if len(name) != 1 or name[0] not in LOGS:
            return None
        work = self.running_dir(job_id, owner)
        return os.path.join(work, name[0]) if work else work

    async def _left_nothing(self, path: str) -> bool:
        """Whether `path` is a log of a job whose last attempt wrote nothing, so it has no directory
        (core.attempts): its logs are empty files, not missing ones."""
        owner, job_id, *name = source.split_path(path)
        if len(name) != 1 or name[0] not in LOGS:
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


def _empty(offset: int, no_digest: bool) -> fipb.Chunk:
    """The one chunk of an empty file, or INVALID_ARGUMENT for an offset beyond it (unless `no_digest`, as
    in `source.read_chunks`)."""
    if offset < 0 or (offset > 0 and not no_digest):
        fail(Code.INVALID_ARGUMENT, f"offset {offset} is outside the file (size 0 bytes)")
    return fipb.Chunk(offset=0, data=b"", size=0, sha256="" if no_digest else EMPTY_SHA256)
