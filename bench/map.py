"""A large `park.map` on one broker: submission rate, completion rate, broker memory, and what a group costs.

    python bench/map.py --items 100000 --workers 2

Runs the same N trivial jobs (`bench_tasks.noop(i)`) twice on fresh brokers
(site in the default temporary directory, durable as always):
- **plain**: N `park.submit` calls, no group;
- **map**: one `park.map` over N items, plus one job gated on `group.iscompleted`
  and one on `group.at_least(N // 2)`.
For each it prints the seconds until every submission was acknowledged
(submissions/s), until the last job ended (jobs/s), the broker's peak RSS
(VmHWM) and CPU seconds (utime + stime from /proc). The broker CPU the map run
spends beyond the plain run, divided by N, is what a group costs per member
change: counting the member, the group's progress event and the record it
rewrites, and judging the counting atoms that wait on it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import park  # noqa: E402
from throughput import Broker, watch_until_done  # noqa: E402

TARGET = "bench_tasks:noop"


def broker_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in bytes) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak


def run(shape: str, items: int, workers: int, root: Path) -> dict[str, float]:
    broker = Broker(workers, root)
    try:
        service = park.Service(broker.address, broker.directory / "tls.crt")
        service.info
        # One Watch stream counts the terminal events: the members (and the map's group and two gated jobs).
        expected = items + (3 if shape == "map" else 0)
        done, outcome = threading.Event(), dict[str, int]()
        threading.Thread(target=watch_until_done, args=(service, expected, done, outcome), daemon=True).start()
        start = time.perf_counter()
        with service:
            if shape == "map":
                group = park.map(TARGET, range(items))
                park.submit(TARGET, -1, when=group.iscompleted)
                park.submit(TARGET, -2, when=group.at_least(items // 2))
            else:
                for i in range(items):
                    park.submit(TARGET, i)
        acknowledged = time.perf_counter() - start
        if not done.wait(3600) or outcome.get("completed") != expected:
            raise RuntimeError(f"{shape}: expected {expected} completed jobs, got {outcome}")
        elapsed = time.perf_counter() - start
        cpu, peak = broker_usage(broker.proc.pid)
        service.close()
    finally:
        broker.close()
    return {"acknowledged": acknowledged, "elapsed": elapsed, "cpu": cpu, "rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--site-root", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR).stdout.strip()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, {args.items} items, {args.workers} workers")
    results = {shape: run(shape, args.items, args.workers, args.site_root) for shape in ("plain", "map")}
    for shape, r in results.items():
        print(f"{shape:5}: acknowledged in {r['acknowledged']:.1f} s ({args.items / r['acknowledged']:,.0f} "
              f"submissions/s), done in {r['elapsed']:.1f} s ({args.items / r['elapsed']:,.0f} jobs/s), "
              f"broker peak RSS {r['rss'] / 2**20:,.0f} MiB, broker CPU {r['cpu']:.1f} s")
    extra = results["map"]["cpu"] - results["plain"]["cpu"]
    print(f"group cost per member change: {extra / args.items * 1e6:.0f} us of broker CPU "
          f"({results['plain']['cpu'] / args.items * 1e6:.0f} us per plain job); load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
