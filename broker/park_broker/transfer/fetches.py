"""Fetch jobs: the destination broker pulls a file from a peer site into the job's directory.

A fetch is network work, so the broker runs it itself rather than through an
executor, and reports to the state machine exactly as an executor does:
`started`, then one `finished` for the attempt. The job's directory appears
only when the file is complete and verified (transfer.download); a broken
stream resumes, and a restarted broker resumes from the part file, since the
work directory has the same name on every attempt.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from park._proto import files_pb2 as fipb
from park._proto import files_pb2_grpc
from park._proto import jobs_pb2 as jpb
from park_broker.errors import BrokerError
from park_broker.execution.base import FinishedCallback, Outcome, StartedCallback
from park_broker.transfer import download


class Fetches:
    def __init__(self, source_of: Callable[[jpb.JobSpec], tuple[str, str]],
                 channel: Callable[[str], grpc.aio.Channel], on_started: StartedCallback,
                 on_finished: FinishedCallback, hand_over: Callable[[str, Path], None],
                 meter: Callable[[], download.Progress] | None = None):
        self._source_of = source_of     # (site, path) a fetch job reads
        self._channel = channel         # a mutual-TLS channel to a peer site
        self._on_started = on_started
        self._on_finished = on_finished
        self._hand_over = hand_over     # (owner, directory): a fetched file becomes the owner's account's
        self._meter = meter             # a progress callback per fetch, for the metrics
        self._running: dict[str, asyncio.Task[None]] = {}

    def start(self, job: jpb.Job) -> None:
        attempt = job.attempts + 1
        self._on_started(job.id, attempt)
        self._running[job.id] = asyncio.get_running_loop().create_task(self._fetch(job, attempt))

    def cancel(self, job_id: str) -> None:
        task = self._running.pop(job_id, None)
        if task is not None:
            task.cancel()

    async def _fetch(self, job: jpb.Job, attempt: int) -> None:
        site, path = self._source_of(job.spec)
        final_dir = Path(job.directory)
        work = final_dir.parent / f".{job.id}.attempt-fetch"
        name = job.spec.output_name
        metadata = (("authorization", f"Bearer {job.spec.fetch.token}"),)

        def open_stream(offset: int) -> AsyncIterator[fipb.Chunk]:
            return files_pb2_grpc.FilesStub(channel).Read(fipb.ReadRequest(path=path, offset=offset),
                                                        metadata=metadata)
        try:
            channel = self._channel(site)   # BrokerError if the site is no longer a peer
            # The broker writes here itself, so no job may have had a hand in this directory: it is the
            # broker's until complete, and only then handed over to the account the owner's jobs run as.
            work.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            work.mkdir(mode=0o700, exist_ok=True)
            meter = self._meter() if self._meter is not None else None
            transfer = download.fetch(open_stream, work / f".{name}.part", work / name, on_progress=meter)
            size, sha = await asyncio.wait_for(transfer, job.spec.timeout or None)
            await asyncio.to_thread(_replace_dir, work, final_dir)
            await asyncio.to_thread(self._hand_over, job.owner, final_dir)
            outcome = Outcome(ok=True, outputs=((name, str(final_dir / name), size, sha),))
        except BrokerError as exc:
            outcome = Outcome(ok=False, error=f"fetching {job.spec.fetch.url}: {exc.message}")
        except TimeoutError:   # what it had received stays in its part file: a retry resumes from there
            outcome = Outcome(ok=False, error=f"timed out after {job.spec.timeout:g} s")
        finally:
            self._running.pop(job.id, None)
        self._on_finished(job.id, attempt, outcome)


def _replace_dir(work: Path, final: Path) -> None:
    """Move a finished attempt's directory into place (a stale one from an unrecorded attempt goes)."""
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    os.rename(work, final)
