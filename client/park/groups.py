"""Groups of jobs (`park.map`): one job per item, and conditions on how many of them completed.

A `JobGroup` is a proxy for a group job at the members' site (DESIGN §2,
Groups) and for its members. Its conditions are counting atoms
(park.counting), one atom however many members there are, so a map of
100,000 items gates a later job as cheaply as one job does.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from park._proto import jobs_pb2 as jpb
from park.conditions import Atom
from park.job import Job

__all__ = ["JobGroup"]

_READERS = 8     # member records read at once by results()


class JobGroup:
    """The jobs `park.map` submitted, in item order (`.jobs`), and conditions on them."""

    def __init__(self, group: Job, jobs: list[Job]):
        self.group = group      # the group job: `park watch` and `park jobs` show it with its counts
        self.jobs = jobs

    def __repr__(self) -> str:
        return f"<park.JobGroup {self.group.site}/jobs/{self.group.id} of {len(self.jobs)}>"

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __getitem__(self, index: int) -> Job:
        return self.jobs[index]

    @property
    def id(self) -> str:
        return self.group.id

    @property
    def site(self) -> str:
        return self.group.site

    # -- conditions ------------------------------------------------------------------

    @property
    def iscompleted(self) -> Atom:
        """Ready when every member completed; cancelled as soon as one failed or was cancelled."""
        return self.at_least(len(self.jobs))

    @property
    def isfinished(self) -> Atom:
        """Ready when every member reached a terminal state, however it ended."""
        return self.group._atom("count", f"finished>={len(self.jobs)}")

    @property
    def any_completed(self) -> Atom:
        """Ready when at least one member completed; cancelled once none can."""
        return self.at_least(1)

    def at_least(self, k: int) -> Atom:
        """Ready when `k` members completed; cancelled once too few of them can still complete."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self.jobs):
            raise ValueError(f"at_least({k!r}): a whole number from 1 to the group's {len(self.jobs)} members")
        return self.group._atom("count", f"completed>={k}")

    # -- state ---------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many members joined, completed, failed and were cancelled so far, and the group's size."""
        counts = self.group.record().group
        return {"size": counts.size, "joined": counts.joined, "completed": counts.completed,
                "failed": counts.failed, "cancelled": counts.cancelled}

    @property
    def state(self) -> str:
        """'waiting' while members run; then 'completed' (every member did) or 'failed'."""
        return self.group.state

    def wait(self, timeout: float | None = None) -> str:
        """Block until every member has ended; returns 'completed', 'failed' or 'cancelled'."""
        return self.group.wait(timeout)

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every member's return value, in item order, once all have ended; raises the first member's
        JobFailed or JobCancelled, in item order, if one did not complete."""
        self.wait(timeout)
        with ThreadPoolExecutor(_READERS, thread_name_prefix="park-results") as pool:
            records = list(pool.map(Job.record, self.jobs))
        return [job.outcome(record) for job, record in zip(self.jobs, records)]

    def cancel(self, reason: str = "") -> str:
        """Cancel the members that have not ended, and the group; returns the group's state afterwards."""
        return self.group.cancel(reason)


def counts_line(counts: jpb.GroupCounts) -> str:
    """'3/10 completed, 1 failed' (park jobs, park watch)."""
    parts = [f"{counts.completed}/{counts.size} completed"]
    parts += [f"{n} {what}" for n, what in ((counts.failed, "failed"), (counts.cancelled, "cancelled")) if n]
    if counts.joined < counts.size:
        parts.append(f"{counts.joined} joined")
    return ", ".join(parts)
