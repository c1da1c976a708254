"""`park.install_service`: put the scientist's own package on a site.

The wheel is built here with the standard machinery (park.wheels) and declared
to the broker as an install job at once, so the returned handle's `iscompleted`
can gate later jobs without the script waiting. The upload itself runs in the
background: 1 MiB chunks with the wheel's sha256, retried while the broker is
unreachable, skipped when the broker already has this exact wheel (a memo hit).
`service.flush()`, the end of a `with` block and the interpreter's exit wait for
uploads as they wait for submissions.
"""
from __future__ import annotations

import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path

import grpc

from park._proto import jobs_pb2 as jpb
from park._proto import packages_pb2 as ppb
from park._proto import packages_pb2_grpc
from park.api import queue_spec, spec_for
from park.job import Job
from park.service import Service, default_service
from park.wheels import build_wheel, sha256_file

__all__ = ["install_service", "CHUNK"]

CHUNK = 1 << 20
RETRY_FOR = 60.0


def install_service(module_or_path: types.ModuleType | str | Path, service: Service | None = None, *,
                    site_wide: bool = False) -> Job:
    """Build a wheel of the project a module (or directory) belongs to, and install it at `service`
    (default: the enclosing `with`). Returns the install job; `requires=["name==version"]` uses it.

    The package is yours: your jobs' `requires=` find it, other users' do not (they have their own
    namespace). `site_wide=True` (admins only) publishes it for every user of the site."""
    service = default_service(service)
    out = Path(tempfile.mkdtemp(prefix="park-install-"))
    wheel = build_wheel(module_or_path, out)
    digest = sha256_file(wheel)
    name, version = wheel.name.split("-")[:2]
    spec = spec_for(service, None, "output", f"install {name} {version}")
    spec.install.CopyFrom(jpb.Install(name=name, version=version, sha256=digest, filename=wheel.name,
                                      site_wide=site_wide))
    job = queue_spec(service, spec)
    service.background(lambda: _upload(service, job, wheel, digest), f"upload of {wheel.name}")
    return job


def _upload(service: Service, job: Job, wheel: Path, digest: str) -> None:
    try:
        if job.acknowledged().memo_hit:
            return     # the site has this exact wheel already
        stub = packages_pb2_grpc.PackagesStub(service.channel)
        deadline = time.monotonic() + RETRY_FOR
        while True:
            try:
                stub.Upload(_chunks(job.id, wheel, digest), timeout=600)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise service.error(exc, f"uploading {wheel.name}") from None
                time.sleep(1.0)
    finally:
        wheel.unlink(missing_ok=True)
        wheel.parent.rmdir()


def _chunks(job_id: str, wheel: Path, digest: str) -> Iterator[ppb.UploadRequest]:
    yield ppb.UploadRequest(header=ppb.UploadHeader(job_id=job_id, filename=wheel.name, sha256=digest,
                                                    size=wheel.stat().st_size))
    with open(wheel, "rb") as f:
        while chunk := f.read(CHUNK):
            yield ppb.UploadRequest(data=chunk)

