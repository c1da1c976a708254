"""Throughput of trivial Python jobs: one Park broker against dask.distributed, same machine, same run.

    python bench/throughput.py [--jobs 2000] [--workers 2] [--width 100] [--repeat 3] [--site-root DIR]
                               [--executor local|dask|both]

Two shapes, each of `--jobs` calls of `bench_tasks.noop`:

- independent: no job waits on another;
- dag: layers of `--width` jobs; every job of a layer waits on two jobs of the
  layer before it (Park: `when=a.iscompleted & b.iscompleted`; Dask:
  `client.submit(noop, a, b)`).

Park: every measurement starts a fresh `park-broker serve --local-only` with
`--workers W` local workers, in a new site directory under `--site-root`
(SQLite in WAL mode with synchronous=FULL, so every commit is fsynced: the
broker is durable while measured, unless that directory is on tmpfs, which the
printed facts show). Workers create files for every job, so put `--site-root`
on a file system without heavy create/delete churn (see docs/benchmarks.md).
The clock runs from the first `park.submit` until a single Watch stream over
all of the caller's jobs has delivered a terminal event for every job; broker
start-up is not timed.

With `--executor dask` the broker runs its jobs on Dask instead (`--executor
dask://...`, park_broker.execution.dask_executor) on a fresh LocalCluster like the one
plain Dask gets, started before the broker and not timed; `both` measures Park
on each executor. The table then has a column per Park executor.

Dask: every measurement starts a fresh `LocalCluster(n_workers=W,
threads_per_worker=1, processes=True)` and waits for its workers (not timed);
the clock runs from the first `client.submit` / `client.map` (with `pure=False`)
until `client.gather` of every future returns.

Each run also prints the CPU time per job of every process of the benchmark
(this one, with the client and, for Dask, the scheduler; the broker and its
workers, or the Dask workers), read from /proc: how much of the machine each
system needed, a figure that moves less with the machine's load than the rate.

Each (system, shape) is measured `--repeat` times, Park and Dask runs
alternating; the table shows the median rate in jobs/s and the ratio park/dask.
A run that fails (a refused submission, a job that did not complete) is
reported, left out of the median, and makes the exit status 1. The machine
facts and load averages are printed with it: on a shared machine, compare runs
only at a similar load.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import distributed
import grpc

import park
from park._proto import jobs_pb2

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # Dask pickles `noop` by reference; its spawned workers inherit sys.path.

from bench_tasks import noop  # noqa: E402

TARGET = "bench_tasks:noop"
SHAPES = ("independent", "dag")
TERMINAL = frozenset({"completed", "failed", "cancelled"})


def dag_edges(jobs: int, width: int) -> list[tuple[int, int] | None]:
    """For each job index, the two jobs of the previous layer it waits on (None in the first layer)."""
    edges: list[tuple[int, int] | None] = []
    for i in range(jobs):
        layer, pos = divmod(i, width)
        if layer == 0:
            edges.append(None)
        else:
            base = (layer - 1) * width
            edges.append((base + pos, base + (pos + 1) % width))
    return edges


# -- Park ----------------------------------------------------------------------------


class Broker:
    """A `park-broker serve` subprocess in a new site directory under `root`."""

    def __init__(self, workers: int, root: Path, executor: str = "local"):
        self.directory = Path(tempfile.mkdtemp(dir=root)) / "bench"
        self.directory.parent.chmod(0o711)   # the jobs' account reaches its job directories through it
        subprocess.run([sys.executable, "-m", "park_broker.cli", "init", str(self.directory), "--site", "bench"],
                       check=True, capture_output=True)
        self._log = open(self.directory / "broker.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "park_broker.cli", "--log-level", "WARNING", "serve", str(self.directory),
             "--listen", "127.0.0.1:0", "--local-only", "--workers", str(workers),
             "--python-path", str(BENCH_DIR), "--executor", executor,
             # A broker run as root never runs jobs as root.
             *(["--default-unix-user", "nobody"] if os.geteuid() == 0 else [])],
            stdout=self._log, stderr=subprocess.STDOUT)
        serve_file = self.directory / "serve.json"
        deadline = time.monotonic() + 60
        while not serve_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "broker.log").read_text(errors="replace")
                self.close()
                raise RuntimeError(f"broker did not start:\n{log}")
            time.sleep(0.05)
        self.address: str = json.loads(serve_file.read_text())["address"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def watch_until_done(service: park.Service, expected: int, done: threading.Event,
                      outcome: dict[str, int]) -> None:
    """Count terminal events on one Watch stream over all the caller's jobs; set `done` at `expected`."""
    stream = service.jobs_stub.Watch(jobs_pb2.WatchRequest(from_seq=0))
    try:
        for response in stream:
            for event in response.events:
                kind = event.WhichOneof("kind")
                if kind in TERMINAL:
                    outcome[kind] = outcome.get(kind, 0) + 1
            if sum(outcome.values()) >= expected:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            outcome["watch_error"] = 1
    finally:
        stream.cancel()
        done.set()


@dataclass(frozen=True)
class Run:
    """One timed run: its wall time, and the CPU time every process of the benchmark used meanwhile (this
    one, the client, and all it started: a broker and its workers, or a Dask cluster)."""

    seconds: float
    cpu: float


def tree_cpu() -> float:
    """User and system CPU seconds of this process and its descendants now (from /proc; a process that
    ended meanwhile is not counted, and none does during a run: brokers, workers and clusters live on)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            times[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    mine, grew = {os.getpid()}, True
    while grew:   # until no further descendant turns up
        grew = False
        for pid, parent in parents.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return sum(times[pid] for pid in mine if pid in times)


def run_park(shape: str, jobs: int, workers: int, width: int, timeout: float, root: Path,
             executor: str = "local") -> Run:
    """Seconds from the first submit until every job's terminal event has been watched."""
    if executor == "dask":   # Park on Dask: the cluster, like the broker, is started before the clock
        with _cluster(workers) as cluster:
            address = cluster.scheduler_address.removeprefix("tcp://")
            return _run_park(shape, jobs, workers, width, timeout, Broker(workers, root, f"dask://{address}"))
    return _run_park(shape, jobs, workers, width, timeout, Broker(workers, root))


def _run_park(shape: str, jobs: int, workers: int, width: int, timeout: float, broker: Broker) -> Run:
    try:
        service = park.Service(broker.address, broker.directory / "tls.crt")
        try:
            service.info  # connect and fetch the site's identity before the clock starts
            done, outcome = threading.Event(), dict[str, int]()
            watcher = threading.Thread(target=watch_until_done, args=(service, jobs, done, outcome), daemon=True)
            watcher.start()
            edges = dag_edges(jobs, width) if shape == "dag" else [None] * jobs
            cpu, start = tree_cpu(), time.perf_counter()
            with service:
                submitted: list[park.Job] = []
                for i, edge in enumerate(edges):
                    when = None if edge is None else submitted[edge[0]].iscompleted & submitted[edge[1]].iscompleted
                    submitted.append(park.submit(TARGET, i, when=when))
            if not done.wait(timeout):
                raise TimeoutError(f"park {shape}: not finished after {timeout} s ({outcome})")
            elapsed, cpu = time.perf_counter() - start, tree_cpu() - cpu
            watcher.join()
        finally:
            service.close()
    finally:
        broker.close()
    if outcome.get("completed") != jobs:
        raise RuntimeError(f"park {shape}: expected {jobs} completed jobs, got {outcome}")
    return Run(elapsed, cpu)


# -- Dask ----------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(workers: int) -> Iterator[distributed.LocalCluster]:
    """A fresh LocalCluster of `workers` one-thread worker processes, its workers up."""
    # silence_logs: a closing cluster's workers log heartbeat errors that say nothing about the run.
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.CRITICAL) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(workers)
        yield cluster


def run_dask(shape: str, jobs: int, workers: int, width: int) -> Run:
    """Seconds from the first submit until every result has been gathered, on a fresh LocalCluster."""
    with _cluster(workers) as cluster, distributed.Client(cluster) as client:
        cpu, start = tree_cpu(), time.perf_counter()
        if shape == "independent":
            futures = client.map(noop, range(jobs), pure=False)
        else:
            futures = []
            for i, edge in enumerate(dag_edges(jobs, width)):
                deps = () if edge is None else (futures[edge[0]], futures[edge[1]])
                futures.append(client.submit(noop, i, *deps, pure=False))
        client.gather(futures)
        return Run(time.perf_counter() - start, tree_cpu() - cpu)


# -- report --------------------------------------------------------------------------


def _commit() -> str:
    """The checked-out commit of the tree park is imported from, "-dirty" with uncommitted changes."""
    described = subprocess.run(["git", "-C", str(Path(park.__file__).parent), "describe", "--always", "--dirty"],
                               capture_output=True, text=True)
    return described.stdout.strip() or "unknown (not a git checkout)"


def filesystem_of(path: Path) -> str:
    """The type of the file system holding `path` (the longest mount point above it)."""
    path = path.resolve()
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best):
            best, kind = mount, fstype
    return f"{kind} ({path})"


def machine_facts(site_root: Path) -> list[tuple[str, str]]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("cpu", model),
        ("cores", str(os.cpu_count())),
        ("os", platform.platform()),
        ("python", platform.python_version()),
        ("grpcio", grpc.__version__),
        ("dask / distributed", f"{dask.__version__} / {distributed.__version__}"),
        ("park", f"{park.__version__} at {_commit()}"),
        ("broker sites on", filesystem_of(site_root)),
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def timed_run(label: str, jobs: int, fn: Callable[[], Run]) -> Run | None:
    """One run of `fn`, or None if it failed; prints its rate and CPU time per job either way."""
    try:
        run = fn()
    except (park.ParkError, RuntimeError, TimeoutError) as exc:
        print(f"  {label:<24} FAILED: {exc}", flush=True)
        return None
    print(f"  {label:<24} {run.seconds:7.2f} s  {jobs / run.seconds:8.1f} jobs/s  "
          f"{run.cpu / jobs * 1e3:6.3f} ms CPU/job", flush=True)
    return run


def summary(values: list[float | None], digits: int = 0) -> tuple[str, float | None]:
    """The median of the successful runs' values, as a table cell and a number."""
    ok = [v for v in values if v is not None]
    if not ok:
        return "all runs failed", None
    median = statistics.median(ok)
    failed = len(values) - len(ok)
    return f"{median:.{digits}f}" + (f" ({failed} of {len(values)} runs failed)" if failed else ""), median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per shape (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both systems (default 2)")
    parser.add_argument("--width", type=int, default=100, help="jobs per DAG layer (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one Park run may take")
    parser.add_argument("--executor", choices=["local", "dask", "both"], default="local",
                        help="the executor(s) Park runs its jobs on (default local)")
    parser.add_argument("--site-root", type=Path, help="where the brokers' site directories go "
                                                        "(default: the system's temporary directory)")
    args = parser.parse_args()
    if args.jobs < 1 or args.workers < 1 or args.width < 2 or args.repeat < 1:
        parser.error("--jobs, --workers, --repeat must be >= 1 and --width >= 2")

    # Site directories are deleted only at the end: deleting a run's thousands of files makes
    # creating files slow for a minute afterwards on some file systems (ext4 skips recently
    # deleted inodes), which would slow the next run's workers.
    with tempfile.TemporaryDirectory(prefix="park-bench-", dir=args.site_root) as root:
        os.chmod(root, 0o711)   # the jobs' account (when run as root) reaches its job directories through it
        return _measure(args, Path(root))


def _measure(args: argparse.Namespace, root: Path) -> int:
    for key, value in machine_facts(root):
        print(f"{key:<20} {value}")
    print(f"{'jobs / workers':<20} {args.jobs} / {args.workers}; dag: {-(-args.jobs // args.width)} layers "
          f"of {args.width}\n", flush=True)

    executors = ["local", "dask"] if args.executor == "both" else [args.executor]
    systems = [f"park-{e}" for e in executors] + ["dask"]
    runs: dict[tuple[str, str], list[Run | None]] = {(system, shape): [] for system in systems for shape in SHAPES}
    # Park and Dask alternate, so that a change in the machine's load affects both alike; each run
    # has the machine to itself (its broker or cluster is started before and stopped after it).
    for shape in SHAPES:
        for i in range(1, args.repeat + 1):
            for executor in executors:
                runs[f"park-{executor}", shape].append(timed_run(
                    f"park-{executor} {shape} run {i}", args.jobs,
                    functools.partial(run_park, shape, args.jobs, args.workers, args.width, args.timeout, root,
                                      executor)))
            runs["dask", shape].append(timed_run(
                f"dask {shape} run {i}", args.jobs,
                functools.partial(run_dask, shape, args.jobs, args.workers, args.width)))

    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    parks = [f"park-{e}" for e in executors]
    print(f"median of {args.repeat} runs")
    # The rate is what the issue compares; the CPU time per job (every process of the run) says how much of the
    # machine each system needed for it, and moves less with the machine's load.
    for what, value, digits, higher_is_better in (("jobs/s", lambda r: args.jobs / r.seconds, 0, True),
                                                  ("ms CPU/job", lambda r: r.cpu / args.jobs * 1e3, 3, False)):
        print(f"\n| shape | " + " | ".join(f"{p} {what}" for p in parks) + f" | dask {what} | " +
              " | ".join(f"{p}/dask" if higher_is_better else f"dask/{p}" for p in parks) + " |")
        print("|---|" + "---:|" * (2 * len(parks) + 1))
        for shape in SHAPES:
            cells = {system: summary([None if r is None else value(r) for r in runs[system, shape]], digits)
                     for system in systems}
            d = cells["dask"][1]
            ratios = [f"{cells[p][1] / d if higher_is_better else d / cells[p][1]:.2f}"
                      if cells[p][1] and d else "-" for p in parks]
            print(f"| {shape} | " + " | ".join(cells[p][0] for p in parks) + f" | {cells['dask'][0]} | " +
                  " | ".join(ratios) + " |")
    return 1 if any(r is None for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
