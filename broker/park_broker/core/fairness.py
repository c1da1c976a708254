"""Which queued job runs next: priorities within a user's jobs, fairness between users, quotas, resources.

`FairQueue` holds the tasks the dispatcher has ready but not yet handed to the
executor. It hands them over while the executor has room (`capacity`: its
worker slots; None for one that queues for itself, as Dask does), while the
site has the resources a task asks for (`Resources`: cpus, memory, gpus; it
gives a task its own GPUs, through `CUDA_VISIBLE_DEVICES`), and while its user
is under the running quota. Among one user's tasks the highest `priority` goes
first (then the oldest); between users it takes turns, so one user's ten
thousand queued jobs delay another user's one job by at most one turn. A quota
over running jobs (`users set --max-running`) holds a user's further tasks here
until one of theirs ends; the quota over waiting jobs (`--max-waiting`) is
checked at submission.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from park_broker.execution.base import Task
from park_broker.site import Resources


@dataclass(frozen=True, slots=True)
class Limits:
    """A user's quotas at a site; 0 is no limit."""

    max_running: int = 0   # jobs of theirs running at once (more wait, queued)
    max_waiting: int = 0   # jobs of theirs waiting or queued (a submission over it is refused)


NO_LIMITS = Limits()


class FairQueue:
    def __init__(self, submit: Callable[[Task], None], capacity: int | None, totals: Resources | None = None,
                 limits: Callable[[str], Limits] = lambda owner: NO_LIMITS):
        self._submit = submit
        self.capacity = capacity
        self._limits = limits
        self._held: dict[str, list[tuple[int, int, Task]]] = {}   # owner -> heap of (-priority, order, task)
        self._turns: deque[str] = deque()                         # owners with held tasks, in turn order
        self._order = itertools.count()
        self._where: dict[str, int] = {}                           # held job id -> the attempt held
        self._dropped: set[tuple[str, int]] = set()                # held, then dropped: skipped when popped
        self._given: dict[str, Task] = {}                          # job id -> the task handed over, running
        self.running: dict[str, int] = {}                          # owner -> tasks handed over, not yet ended
        self._totals = totals
        if totals is not None:
            self._cpus, self._memory, self._free_gpus = totals.cpus, totals.memory, set(range(totals.gpus))

    def add(self, task: Task, priority: int) -> None:
        if task.owner not in self._held:
            self._held[task.owner] = []
            self._turns.append(task.owner)
        heapq.heappush(self._held[task.owner], (-priority, next(self._order), task))
        self._where[task.job_id] = task.attempt
        self.pump()

    def ended(self, job_id: str) -> None:
        """A task handed over ended (finished, or stopped): its slot, resources and turn are free again."""
        task = self._given.pop(job_id, None)
        if task is None:
            return
        self.running[task.owner] -= 1
        if self._totals is not None:
            self._cpus += task.cpus
            self._memory += task.memory_limit
            self._free_gpus.update(int(g) for g in task.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g)
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
        idle = 0   # owners in a row whose next task could not go now
        while self._turns and idle < len(self._turns) and (self.capacity is None or len(self._given) < self.capacity):
            owner = self._turns[0]
            heap = self._held[owner]
            while heap and (heap[0][2].job_id, heap[0][2].attempt) in self._dropped:
                dropped = heapq.heappop(heap)[2]
                self._dropped.discard((dropped.job_id, dropped.attempt))
            if not heap:
                self._turns.popleft()
                del self._held[owner]
                continue
            self._turns.rotate(-1)
            cap = self._limits(owner).max_running
            task = heap[0][2]
            if (cap and self.running.get(owner, 0) >= cap) or not self._fits(task):
                idle += 1
                continue
            idle = 0
            heapq.heappop(heap)
            del self._where[task.job_id]
            self._hand_over(task)

    def _fits(self, task: Task) -> bool:
        return self._totals is None or (task.cpus <= self._cpus + 1e-9 and task.memory_limit <= self._memory
                                        and task.gpus <= len(self._free_gpus))

    def _hand_over(self, task: Task) -> None:
        if self._totals is not None:
            self._cpus -= task.cpus
            self._memory -= task.memory_limit
            if task.gpus:
                gpus = sorted(self._free_gpus)[:task.gpus]
                self._free_gpus.difference_update(gpus)
                task = dataclasses.replace(task, env={**task.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))})
        self._given[task.job_id] = task
        self.running[task.owner] = self.running.get(task.owner, 0) + 1
        self._submit(task)
