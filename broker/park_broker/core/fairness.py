"""Which queued job runs next: priorities within a user's jobs, fairness between users, quotas.

`FairQueue` holds the tasks the dispatcher has ready but not yet handed to the
executor. It hands them over while the executor has room (`capacity`: its
worker slots; None for one that queues for itself, as Dask does) and while
their user is under the running quota. Among one user's tasks the highest
`priority` goes first (then the oldest); between users it takes turns, so one
user's ten thousand queued jobs delay another user's one job by at most one
turn. A quota over running jobs (`users set --max-running`) holds a user's
further tasks here until one of theirs ends; the quota over unfinished jobs
(`--max-waiting`) is checked at submission.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from park_broker.execution.base import Task


@dataclass(frozen=True, slots=True)
class Limits:
    """A user's quotas at a site; 0 is no limit."""

    max_running: int = 0   # jobs of theirs running at once (more wait, queued)
    max_waiting: int = 0   # jobs of theirs waiting or queued (a submission over it is refused)


NO_LIMITS = Limits()


class FairQueue:
    def __init__(self, submit: Callable[[Task], None], capacity: int | None,
                 limits: Callable[[str], Limits] = lambda owner: NO_LIMITS):
        self._submit = submit
        self.capacity = capacity
        self._limits = limits
        self._held: dict[str, list[tuple[int, int, Task]]] = {}   # owner -> heap of (-priority, order, task)
        self._turns: deque[str] = deque()                         # owners with held tasks, in turn order
        self._order = itertools.count()
        self._where: dict[str, int] = {}                           # held job id -> the attempt held
        self._dropped: set[tuple[str, int]] = set()                # held, then dropped: skipped when popped
        self.running: dict[str, int] = {}                          # owner -> tasks handed over, not yet ended
        self._in_flight = 0

    def add(self, task: Task, priority: int) -> None:
        if task.owner not in self._held:
            self._held[task.owner] = []
            self._turns.append(task.owner)
        heapq.heappush(self._held[task.owner], (-priority, next(self._order), task))
        self._where[task.job_id] = task.attempt
        self.pump()

    def ended(self, owner: str) -> None:
        """A task handed over ended (finished, or stopped): its slot and its user's turn are free again."""
        if self.running.get(owner, 0) > 0:
            self.running[owner] -= 1
            self._in_flight -= 1
        self.pump()

    def drop(self, job_id: str) -> bool:
        """Forget a held task of `job_id` (lazily: O(1) now, skipped when its turn comes); whether there was one."""
        attempt = self._where.pop(job_id, None)
        if attempt is None:
            return False
        self._dropped.add((job_id, attempt))
        return True

    def pump(self) -> None:
        """Hand over tasks while there is room, taking turns between users under their quotas."""
        skipped = 0
        while self._turns and (self.capacity is None or self._in_flight < self.capacity):
            owner = self._turns[0]
            heap = self._held.get(owner)
            while heap and (heap[0][2].job_id, heap[0][2].attempt) in self._dropped:
                dropped = heapq.heappop(heap)[2]
                self._dropped.discard((dropped.job_id, dropped.attempt))
            if not heap:
                self._turns.popleft()
                self._held.pop(owner, None)
                continue
            cap = self._limits(owner).max_running
            if cap and self.running.get(owner, 0) >= cap:
                self._turns.rotate(-1)   # at their quota: the next user's turn
                skipped += 1
                if skipped >= len(self._turns):
                    return                # everyone left is at their quota
                continue
            skipped = 0
            _, _, task = heapq.heappop(heap)
            del self._where[task.job_id]
            self._turns.rotate(-1)
            self.running[owner] = self.running.get(owner, 0) + 1
            self._in_flight += 1
            self._submit(task)
