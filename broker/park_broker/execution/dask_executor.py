"""The Dask executor: runs jobs on an existing `dask.distributed` cluster.

`park-broker serve DIR --executor dask://HOST:PORT` connects an asynchronous
`distributed.Client` to the scheduler at HOST:PORT. Every task becomes one Dask
task (`park_broker.execution.dask_task.run`) that runs the job in a child process
on a worker, with the same attempt directory, output capture and result storage
as the local executor; the broker moves a current attempt's directory into
place. The broker keeps the only record of jobs; Dask only runs them. A warm
child process serves one user's jobs only.

Submissions are batched: the tasks handed over in one turn of the event loop
(one release of queued jobs) go to the scheduler as one `Client.map` per set
of resources, one graph update rather than one per job.

Each run is its own Dask task group, and the scheduler assigns it to a worker
at once. Dask holds the tasks of a large group back on the scheduler
(root-task queuing, `distributed.scheduler.worker-saturation`: about one task
per worker thread is sent ahead), so that tasks whose results other tasks
consume do not fill the workers' memory faster than it is freed; between two
short tasks a worker then waits for a round trip to the scheduler, which took
a third of the throughput of trivial jobs. A Park job's result is a small
outcome dict that nothing in Dask consumes and that is released as soon as the
broker has it, so that protection buys nothing here. A run's key is the
one-element tuple `dask_task.dask_key(name)`: Dask names a tuple key's group
after its first element, unique per run (a group is forgotten when its tasks
are), and its prefix, from which Dask keeps duration statistics for good, after
the leading words of that name, `park`, the same for every run. What it costs:
a waiting task's spec (about 2 KB) waits on the worker it was assigned to
rather than on the scheduler, and a worker that joins later gets waiting tasks
by Dask's work stealing rather than from the scheduler's queue.

Signals, and where they come from:
- started and finished: the Dask task itself announces both (`Worker.log_event`
  on a topic of this broker's own), when a worker begins to execute it and
  when its child process has answered; the second event carries the outcome
  dict `run_task` returned. The broker subscribes to that topic, so outcomes
  are pushed to it as they happen, batched on the scheduler's stream, instead
  of being gathered one future at a time. A Dask future has no "running" state
  of its own, and only the worker knows when a task leaves its queue. Both
  events travel on one worker's stream and then on this client's stream, in
  order, and ahead of the scheduler's own report that the task is done.
- what Dask does itself: every run also waits for its future's state (a
  wait without a gather). A future that ends without a finished event of
  ours (an exception from Dask such as `KilledWorker`, a cancellation outside
  Park, a worker that never sent the event) is settled from the future: its
  exception is a failed outcome, a result is gathered as the outcome.
- worker death: the scheduler's `remove-worker` event (topic `all`) fails every
  task that had started on that worker, at once; Dask's own re-run of such a
  task, if one begins, is terminated. A worker that dies never leaves a job hanging.
- cancel: a task not yet sent is dropped from the batch; one that has not
  started is dropped with `Client.cancel`; a running one is stopped by
  `Client.run(dask_task.terminate, ...)` on its worker, which SIGTERMs the
  child's process group and SIGKILLs it after the grace period.

When the broker goes away (stop, or kill -9), its client's futures are released:
the scheduler drops queued tasks, and running ones notice they were released and
terminate their child (see `dask_task`). A broker that starts first kills, on
every worker, any attempt its site's previous broker left there (its tasks' keys
name the site), and only then does recovery re-run them, as with the local
executor.

Facility deployment. Workers need Park installed (the same version as the
broker: they import `park_broker.execution.dask_task` and the jobs import `park`), the
site's file store mounted at the same path as on the broker host (attempt
directories, results, `--python-path` and package directories, and the site
certificate that progress reports use), and a network route to the broker's
client port (progress reports are gRPC calls to it). With `dask-jobqueue` on
Slurm (PBSCluster is the same on PBS)::

    # dask-park.py, run once on a login node, kept alive (tmux, a systemd user unit)
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(queue="regular", account="proj123", cores=8, processes=8,
                           memory="32GB", walltime="04:00:00",
                           job_script_prologue=["source /opt/park/venv/bin/activate"],
                           scheduler_options={"host": "0.0.0.0", "port": 8786})
    cluster.adapt(minimum_jobs=1, maximum_jobs=20)
    input(f"scheduler at {cluster.scheduler_address}; Enter stops it")

    park-broker serve /gpfs/park/site --listen 0.0.0.0:7443 --executor dask://login1:8786

Use one thread per worker process (`processes == cores`): each Park job takes
one worker thread while it runs.

Isolation. Every job runs as the account the Dask workers run as, whoever
submitted it: the broker cannot switch accounts on another host, so the users
file's `unix_user` mappings are not applied (`serve` and `park status` say so).
A warm child process still serves one user's jobs only, and a job's directory
is its own, but users of one cluster can reach each other's files through the
workers' account. For a site shared by users who must not, run a Dask cluster
per account (one broker each), or use the local executor on a root broker.
Resources a job asks for map onto Dask worker resources; start workers with
`--resources "cpus=8,gpus=1,memory=32e9"` for jobs that ask for them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import distributed

from park_broker.execution import dask_task
from park_broker.execution.base import FinishedCallback, Outcome, StartedCallback, Task
from park_broker.site import SiteError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 20.0


@dataclass(slots=True)
class _Run:
    """One submitted attempt: the task, its Dask future, and the worker it started on."""
    task: Task
    future: Any = None               # distributed.Future, once its batch has gone to the scheduler
    waiter: asyncio.Task[None] | None = None
    worker: str = ""                 # set by the started event


_DEFAULT_NEEDS = {"cpus": 1.0, "memory": 0, "gpus": 0}


class DaskExecutor:
    """Runs tasks on the Dask scheduler at `address`; see the module docstring."""

    def __init__(self, address: str, site: str, *, python_path: list[str] | None = None, grace: float = 5.0):
        self.address = address
        self.python_path = list(python_path or [])
        self.grace = grace
        self.site = site   # names this site's tasks among those of every broker sharing the cluster
        self.session = uuid.uuid4().hex[:12]
        self.topic = f"park-{self.session}"   # the started and finished events of its tasks
        self._client: Any = None        # distributed.Client, asynchronous
        self._runs: dict[str, _Run] = {}     # Dask key -> run
        self._keys: dict[str, str] = {}      # job id -> Dask key of its current attempt
        # Submitted in this turn of the loop, not yet sent: resources asked -> [(key, payload)].
        self._batch: dict[tuple[tuple[str, float], ...], list[tuple[str, dict[str, Any]]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._on_started: StartedCallback | None = None
        self._on_finished: FinishedCallback | None = None
        self._declared: frozenset[str] = frozenset()   # the resources some worker of the cluster declares

    async def start(self, on_started: StartedCallback, on_finished: FinishedCallback) -> None:
        self._on_started, self._on_finished = on_started, on_finished
        try:
            self._client = await distributed.Client(self.address, asynchronous=True, timeout=CONNECT_TIMEOUT,
                                                    set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SiteError(f"cannot reach the Dask scheduler at {self.address}: {exc}") from exc
        self._client.subscribe_topic(self.topic, self._on_event)
        self._client.subscribe_topic("all", self._on_cluster_event)
        await self._learn_resources()
        stale = await self._client.run(dask_task.kill_stale, f"park-{self.site}-", self.session, on_error="ignore")
        if killed := sum(n for n in stale.values() if isinstance(n, int)):
            log.warning("killed %d attempts left running on the Dask cluster by this site's previous broker", killed)
        log.info("running jobs on the Dask scheduler at %s", self.address)

    def submit(self, task: Task) -> None:
        key = f"park-{self.site}-{task.job_id}-{task.attempt}-{self.session}"
        payload = {"key": key, "topic": self.topic, "grace": self.grace, "python_path": self.python_path,
                   # what `run_task` reads, and what `dask_task` picks a warm process and a time limit by
                   "task": {**task.message(), "owner": task.owner, "python_path": task.python_path,
                            "timeout": task.timeout}}
        # A job that asks for resources runs on a worker that declares them (`dask worker --resources
        # "cpus=8,gpus=1,memory=32e9"`), and holds them while it runs. Where workers count a resource
        # every job asks for its share (a job that says nothing takes one cpu); where none does, a job
        # that needs no more than the default asks nothing, and runs anywhere.
        wants = {"cpus": task.cpus, "memory": task.memory_limit, "gpus": task.gpus}
        asked = tuple((name, float(amount)) for name, amount in wants.items()
                      if amount and (name in self._declared or amount != _DEFAULT_NEEDS[name]))
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._send_batch)
        self._batch.setdefault(asked, []).append((key, payload))
        self._runs[key] = _Run(task)
        self._keys[task.job_id] = key

    def capacity(self) -> int | None:
        return None   # the scheduler queues (and an adaptive cluster scales on what it sees queued)

    def cancel(self, job_id: str) -> None:
        key = self._keys.pop(job_id, None)
        run = self._runs.pop(key, None) if key is not None else None
        if run is None:
            return
        log.info("cancelling job", extra={"job_id": job_id, "dask_key": key, "worker": run.worker or "-"})
        if run.future is None:   # still in this turn's batch, which skips runs it no longer holds
            return
        if run.waiter is not None:
            run.waiter.cancel()
        self._spawn(self._client.cancel([run.future], force=True))
        if run.worker:
            self._spawn(self._terminate(run.worker, [key]))
        # Not started yet (as far as we know): if it starts anyway, its started event arrives for a
        # key we no longer hold, and `_on_event` terminates it.

    async def close(self) -> None:
        self._batch.clear()
        running: dict[str, list[str]] = {}
        for key, run in self._runs.items():
            if run.worker:
                running.setdefault(run.worker, []).append(key)
            if run.waiter is not None:
                run.waiter.cancel()
        self._runs.clear()
        self._keys.clear()
        if self._client is None:
            return
        # Stop running jobs now, rather than when their workers notice the client has gone.
        await asyncio.gather(*(self._terminate(w, keys) for w, keys in running.items()))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # Unsubscribe first: else the scheduler tries to tell this closing client that it is closing.
        for topic in (self.topic, "all"):
            self._client.unsubscribe_topic(topic)
        await self._client.close()

    def _send_batch(self) -> None:
        """Send this turn's submissions: one graph update per set of resources asked."""
        batch, self._batch = self._batch, {}
        loop = asyncio.get_running_loop()
        for asked, entries in batch.items():
            entries = [(key, payload) for key, payload in entries if key in self._runs]
            if not entries:
                continue
            futures = self._client.map(dask_task.run, [payload for _, payload in entries],
                                       key=[dask_task.dask_key(key) for key, _ in entries], pure=False,
                                       resources=dict(asked) or None)
            for (key, _), future in zip(entries, futures):
                run = self._runs[key]
                run.future = future
                run.waiter = loop.create_task(self._wait(key, run), name=f"park-dask-{key}")

    # -- callbacks from Dask --------------------------------------------------------

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A task of ours began to run on a worker, or its job ended there (the message has its outcome)."""
        _, message = event
        key, worker = message["key"], message["worker"]
        run = self._runs.get(key)
        if "outcome" in message:
            if run is not None:   # else cancelled, or already failed (its worker died): nothing to report
                self._settle(key, _outcome(message["outcome"]))
            return
        if run is None:   # cancelled, or already settled (a worker died): it must not run
            self._spawn(self._terminate(worker, [key]))
            return
        if run.worker:    # Dask re-runs a task whose worker died; that attempt has already failed
            return
        run.worker = worker
        assert self._on_started is not None
        self._on_started(run.task.job_id, run.task.attempt)

    async def _learn_resources(self) -> None:
        identity = await self._client.scheduler.identity(n_workers=-1)
        self._declared = frozenset(name for worker in identity.get("workers", {}).values()
                                   for name in (worker.get("resources") or {}))

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Scheduler events; a removed worker fails the jobs that had started on it; a new one may
        declare resources."""
        _, message = event
        if isinstance(message, dict) and message.get("action") == "add-worker":
            self._spawn(self._learn_resources())
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        gone = message.get("worker", "")
        for key, run in list(self._runs.items()):
            if run.worker == gone:
                how = "left the cluster" if message.get("expected") else "died"
                log.warning("Dask worker %s %s while running job %s", gone, how, run.task.job_id)
                self._settle(key, Outcome(ok=False, error=f"the Dask worker running the job ({gone}) {how}"))
                self._spawn(self._client.cancel([run.future], force=True))

    async def _wait(self, key: str, run: _Run) -> None:
        """Settle a run whose future ended without our finished event (see the module docstring)."""
        # The future's own state, which the scheduler's reports set: waiting on it gathers nothing
        # (`await future` would fetch the result, which the finished event has already brought). Not a
        # public Dask API: a Future has none that waits without fetching, other than a callback thread.
        await run.future._state.wait()
        if self._runs.get(key) is not run:
            return
        try:
            outcome = _outcome(await run.future)
        except concurrent.futures.CancelledError as exc:   # not by us: we stop waiting before we cancel
            outcome = Outcome(ok=False, error=f"the job's Dask task was cancelled outside Park ({exc})"[:4000])
        except Exception as exc:  # noqa: BLE001 - Dask's failure to run the task is the job's failed outcome
            outcome = Outcome(ok=False, error=f"Dask could not run the job: {type(exc).__name__}: {exc}"[:4000])
        self._settle(key, outcome)

    def _settle(self, key: str, outcome: Outcome) -> None:
        """Report the one `finished` of a run (after its `started`) and forget it."""
        run = self._runs.pop(key, None)
        if run is None:
            return
        if run.waiter is not None and run.waiter is not asyncio.current_task():
            run.waiter.cancel()
        run.future.release()   # now, not when the collector breaks the run's cycle with its waiter
        if self._keys.get(run.task.job_id) == key:
            del self._keys[run.task.job_id]
        assert self._on_started is not None and self._on_finished is not None
        if not run.worker:   # the result overtook the started event
            run.worker = "?"
            self._on_started(run.task.job_id, run.task.attempt)
        self._on_finished(run.task.job_id, run.task.attempt, outcome)

    # -- helpers --------------------------------------------------------------------

    async def _terminate(self, worker: str, keys: list[str]) -> None:
        try:
            await self._client.run(dask_task.terminate, keys, self.grace, workers=[worker], on_error="ignore")
        except Exception:   # the worker may be gone, which stops the job as well
            log.warning("could not ask Dask worker %s to terminate %s", worker, keys, exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _outcome(reply: dict[str, Any]) -> Outcome:
    """The outcome dict `dask_task.run` returns (and sends with its finished event), as an Outcome."""
    return Outcome(**{**reply, "outputs": tuple(tuple(o) for o in reply.get("outputs", ()))})
