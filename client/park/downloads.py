"""Getting a job's files back to the laptop: outputs, logs, any file of its directory (`Files.Read`).

`fetch` streams one file of a job's directory at its site into a local file,
with the caller's own session token. It resumes an interrupted download from
what `<dest>.part` holds, checks the whole file's size and sha256 (the broker
states them in the stream's first message, and for a recorded output they must
also match what the job recorded), and only then renames it into place, so a
file at `dest` is always whole and verified. `read_from` reads what a file
holds from an offset on, unverified, for showing a log as it grows.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import grpc

from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park.connection import Connection
from park.errors import ServiceError

Progress = Callable[[int, int], None]   # (bytes so far, size of the whole file)


def file_path(owner: str, job_id: str, name: str) -> str:
    """The path `Files.Read` takes for file `name` of a job's directory."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not the name of a file in a job's directory")
    return f"/{owner}/{job_id}/{name}"


def read_from(service: Connection, path: str, offset: int) -> bytes:
    """What `path` holds from byte `offset` to its end now: one read of a file that may still grow (a running
    job's log), without a digest (`no_digest`: the site does not hash the whole file for each look). Nothing
    if the file is shorter than `offset` now. ServiceError on a refusal."""
    data = bytearray()
    try:
        for chunk in files_pb2_grpc.FilesStub(service.channel).Read(
                fipb.ReadRequest(path=path, offset=offset, no_digest=True), timeout=None):
            if chunk.data:
                if chunk.offset != offset + len(data):
                    raise ServiceError("DATA_LOSS", f"reading {path}: a chunk at {chunk.offset}, expected "
                                                    f"{offset + len(data)}")
                data += chunk.data
    except grpc.RpcError as exc:
        raise service.error(exc, f"reading {path}") from None
    return bytes(data)


def fetch(service: Connection, path: str, dest: Path, *, sha256: str = "", size: int = -1,
          progress: Progress | None = None) -> Path:
    """Download `path` from `service` to `dest` (resuming `dest.part`), verified; returns `dest`.

    `sha256`/`size`: what the job recorded for an output, checked as well. ServiceError on a refusal or
    a mismatch (the partial file is then removed: it cannot be trusted to resume from)."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    offset = 0
    if part.exists():
        with open(part, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                offset += len(block)
    stub = files_pb2_grpc.FilesStub(service.channel)
    whole_size, whole_sha = -1, ""
    try:
        with open(part, "ab") as out:
            for chunk in stub.Read(fipb.ReadRequest(path=path, offset=offset), timeout=None):
                if whole_size < 0:
                    whole_size, whole_sha = chunk.size, chunk.sha256
                    if offset > whole_size:   # the file is not the one the partial download was of
                        raise ServiceError("DATA_LOSS", f"{dest.name}.part is longer than {path} at the site")
                if chunk.data:
                    if chunk.offset != offset:
                        raise ServiceError("DATA_LOSS", f"reading {path}: a chunk at {chunk.offset}, expected {offset}")
                    out.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    if progress is not None:
                        progress(offset, whole_size)
            out.flush()
            os.fsync(out.fileno())
    except grpc.RpcError as exc:
        raise service.error(exc, f"reading {path}") from None
    got = digest.hexdigest()
    wanted = [(whole_sha, whole_size, "the site says")] + ([(sha256, size, "the job recorded")] if sha256 else [])
    for sha, length, who in wanted:
        if got != sha or offset != length:
            part.unlink(missing_ok=True)
            raise ServiceError("DATA_LOSS", f"{path}: got {offset} bytes with sha256 {got[:12]}..., but {who} "
                                            f"{length} bytes with {sha[:12]}...; downloaded again, it may match")
    os.replace(part, dest)
    return dest
