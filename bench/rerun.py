"""Cost of rerunning a finished workflow: every job a memo hit, in one batched round trip per service.

    python bench/rerun.py [--jobs 1000] [--width 50] [--repeat 5] [--site-root DIR]

A layered workflow of `--jobs` calls of `bench_tasks.noop(layer, i)` (every job
of a layer waits on two jobs of the layer before it) runs once to completion
on a fresh `park-broker serve --local-only`. Then the same script is
"rerun" `--repeat` times, each time by a new client connection (a new
`park.Service`, as a new process would have): the clock runs from the
connection's creation until the end of the `with` block has flushed every
submission and each job is acknowledged, and every job must come back a memo
hit. The table shows seconds per rerun and the number of SubmitMany calls it
took (counted by a client interceptor). Goal (issue 6): at most 0.5 s for
1,000 jobs on loopback.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

import park
from park._proto import jobs_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Broker  # noqa: E402  (the same broker harness)


class _Count(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        if details.method.endswith("/SubmitMany"):
            self.calls += 1
        return continuation(details, request)


def workflow(service: park.Service, jobs: int, width: int) -> list[park.Job]:
    submitted: list[park.Job] = []
    with service:
        layer = [park.submit("bench_tasks:noop", 0, i) for i in range(width)]
        submitted += layer
        depth = 1
        while len(submitted) < jobs:
            layer = [park.submit("bench_tasks:noop", depth, i,
                                 when=layer[i].iscompleted & layer[(i + 1) % width].iscompleted)
                     for i in range(min(width, jobs - len(submitted)))]
            submitted += layer
            depth += 1
    return submitted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--site-root", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, grpc {grpc.__version__}, load {os.getloadavg()[0]:.1f}")
    broker = Broker(args.workers, args.site_root)
    try:
        first = park.Service(broker.address, broker.directory / "tls.crt")
        start = time.monotonic()
        jobs = workflow(first, args.jobs, args.width)
        assert all(j.wait(timeout=600) == "completed" for j in jobs[-args.width:])
        print(f"first run: {len(jobs)} jobs ran in {time.monotonic() - start:.2f} s")
        first.close()
        times, calls = [], []
        for _ in range(args.repeat):
            count = _Count()
            t0 = time.monotonic()
            service = park.Service(broker.address, broker.directory / "tls.crt")
            service._channel = grpc.intercept_channel(service._channel, count)
            service.jobs_stub = jobs_pb2_grpc.JobsStub(service._channel)
            rerun = workflow(service, args.jobs, args.width)
            hits = sum(j.memo_hit for j in rerun)
            times.append(time.monotonic() - t0)
            calls.append(count.calls)
            service.close()
            if hits != len(rerun):
                print(f"FAILED: only {hits} of {len(rerun)} jobs were memo hits")
                return 1
        print(f"rerun of {args.jobs} jobs: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}), SubmitMany calls per rerun: {calls}; goal <= 0.5 s")
        return 0
    finally:
        broker.close()


if __name__ == "__main__":
    raise SystemExit(main())
