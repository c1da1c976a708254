"""The `Packages` service: wheel uploads for install jobs, and what the site has."""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from park._proto import packages_pb2 as ppb
from park._proto import packages_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.packages.installs import Installs
from park_broker.packages.store import PackageStore
from park_broker.errors import Code, fail
from park_broker.servicers.boundary import abort, unary


class PackagesServicer(packages_pb2_grpc.PackagesServicer):
    """Wheel uploads for install jobs, and the list of what the site has."""

    def __init__(self, installs: Installs, packages: PackageStore, uploads: Path, max_bytes: int):
        self.installs = installs
        self.packages = packages
        self.uploads = uploads
        self.max_bytes = max_bytes

    async def Upload(self, request_iterator: AsyncIterator[ppb.UploadRequest], context: grpc.aio.ServicerContext
                     ) -> ppb.PackageRef:
        caller = current_identity.get()
        self.uploads.mkdir(parents=True, exist_ok=True)
        target = self.uploads / secrets.token_hex(16)
        try:
            header = await self._receive(request_iterator, target)
            job = await self.installs.install(caller.user, header.job_id, header.sha256, target, header.filename)
            result = json.loads(job.result_json)
            return ppb.PackageRef(name=result["name"], version=result["version"], sha256=result["sha256"])
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await abort(context, "Upload", exc)
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
        caller = current_identity.get()
        # What the caller can require: their own and site-wide packages; an admin sees every user's.
        refs = await asyncio.to_thread(self.packages.list, None if caller.admin else caller.user)
        return ppb.PackageList(packages=[ppb.PackageRef(name=r.name, version=r.version, sha256=r.sha256,
                                                        owner=r.owner) for r in refs])
