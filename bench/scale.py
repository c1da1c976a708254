"""One broker holding a million waiting jobs (issue 15): its memory, its submission rate, one release.

    python bench/scale.py [--jobs 1000000] [--fan 100] [--site-root DIR] [--profile SECONDS]

One `park-broker serve --local-only --workers 2` in a new site (bench/throughput.py's `Broker`),
and one client (`park.Service`, whose sender thread batches submissions 1,000 to a `SubmitMany`):

- `hold`: a job that runs `sleep` for a day, and `gate`: a job that runs until a file appears.
  The broker is stopped at the end, not the jobs cancelled (a million cancellations is another benchmark).
- `--jobs` jobs of `bench_tasks.noop(i)`: the first `--fan` wait on `gate.iscompleted`, the next
  1,000 on `hold.iscompleted`, and every later job i on job i - 1,000 (each waits on a job that has
  not completed, as in a long workflow submitted at once).
- submissions/s: jobs acknowledged by the broker per second of client wall time, from the first
  `park.submit` until `Service.flush` returns; the broker's CPU time over the same span (from
  /proc) says how much of it was the broker's.
- RSS: the broker's VmRSS and VmHWM (/proc/PID/status) once every job is acknowledged, and the
  size of its database.
- release: the gate's file is created; the gate completes, and the `--fan` jobs waiting on it are
  queued, run and complete. The broker time of the release is read from the broker's own event
  log (the `time` each Event carries, stamped by the broker when it decides a transition): from
  the gate's Completed event to the last Queued event of its dependents (the atom resolved and
  every verdict made), and to the first Started event (the verdicts committed, fsync included,
  and the first dependent handed to a worker: the dispatcher releases only committed jobs).

`--profile SECONDS` runs `py-spy record` on the broker for that long from the first submission
(py-spy must be installed) and writes its collapsed stacks (`--format raw`) into the site directory. The machine, commit
and load averages are printed; nothing is deleted until the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import park  # noqa: E402
from throughput import Broker, machine_facts  # noqa: E402

TARGET = "bench_tasks:noop"
STRIDE = 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def event_times(job: park.Job, kind: str) -> list[float]:
    return [e.time for e in job.history() if e.kind == kind]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--fan", type=int, default=100, help="jobs waiting on the atom that is released")
    parser.add_argument("--site-root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the broker for this many seconds")
    args = parser.parse_args()
    if args.jobs < args.fan + STRIDE:
        parser.error(f"--jobs must be at least --fan + {STRIDE}")
    for key, value in machine_facts(args.site_root):
        print(f"{key}: {value}")
    print(f"load average at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    broker = Broker(2, args.site_root)   # as root, its jobs run as nobody
    gate_file = Path(tempfile.mkdtemp(prefix="park-scale-gate-")) / "open"
    gate_file.parent.chmod(0o755)
    spy = None
    try:
        service = park.Service(broker.address, broker.directory / "tls.crt")
        service.info   # connected before the clock starts
        pid = broker.proc.pid
        with service:
            hold = park.run(["sleep", "86400"], label="hold")
            gate = park.run(["sh", "-c", f"while [ ! -e {gate_file} ]; do sleep 0.01; done"], label="gate")
        if args.profile:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(args.profile)),
                                    "--rate", "20", "--format", "raw", "--output", str(broker.directory / "profile.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        fanned: list[park.Job] = []
        window: list[park.Job] = []   # the last STRIDE jobs: what the next ones wait on
        cpu0, t0, client0 = cpu_seconds(pid), time.perf_counter(), time.process_time()
        with service:
            for i in range(args.jobs):
                if i < args.fan:
                    fanned.append(park.submit(TARGET, i, when=gate.iscompleted))
                    continue
                k = i - args.fan
                when = hold.iscompleted if k < STRIDE else window[k % STRIDE].iscompleted
                job = park.submit(TARGET, i, when=when)
                if k < STRIDE:
                    window.append(job)
                else:
                    window[k % STRIDE] = job
                if i % 100_000 == 0 and i:
                    print(f"  {i} submitted, {i / (time.perf_counter() - t0):.0f}/s, broker RSS "
                          f"{memory(pid)['VmRSS'] / 2**20:.0f} MiB", flush=True)
        seconds, broker_cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        client_cpu = time.process_time() - client0
        mem = memory(pid)
        db = sum(f.stat().st_size for f in broker.directory.glob("*.db*"))
        print(f"\n{args.jobs} waiting jobs acknowledged in {seconds:.1f} s: {args.jobs / seconds:.0f} submissions/s; "
              f"broker CPU {broker_cpu:.1f} s ({broker_cpu / args.jobs * 1e6:.0f} us/job), "
              f"client CPU {client_cpu:.1f} s ({client_cpu / args.jobs * 1e6:.0f} us/job)")
        print(f"broker RSS {mem['VmRSS'] / 2**20:.0f} MiB (peak {mem['VmHWM'] / 2**20:.0f} MiB), "
              f"database {db / 2**20:.0f} MiB", flush=True)

        gate_file.touch()
        for job in fanned:
            job.wait(timeout=120)
        done = event_times(gate, "completed")
        queued = [t for job in fanned for t in event_times(job, "queued")]
        states = {job.state for job in fanned}
        if len(done) != 1 or len(queued) != args.fan or states != {"completed"}:
            print(f"gate: {gate.state}, {gate.record()}")
            raise SystemExit(f"release went wrong: gate completed {len(done)} times, {len(queued)} of "
                             f"{args.fan} queued, states {states}")
        started = min(t for job in fanned for t in event_times(job, "started"))
        print(f"release of one atom with {args.fan} waiting jobs, in broker time from the gate's Completed event: "
              f"all {args.fan} decided (last Queued event) after {(max(queued) - done[0]) * 1e3:.1f} ms, "
              f"committed and dispatched (first Started event) after {(started - done[0]) * 1e3:.1f} ms")
        print(f"broker RSS after the release {memory(pid)['VmRSS'] / 2**20:.0f} MiB")
        service.close()
    finally:
        if spy is not None:
            spy.wait()
            print(f"profile: {broker.directory / 'profile.txt'}")
        broker.close()
        shutil.rmtree(gate_file.parent, ignore_errors=True)
        if not args.profile:
            shutil.rmtree(broker.directory.parent, ignore_errors=True)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
