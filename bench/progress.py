"""Progress reports and races (issue 5): what park.report costs a job, and how fast a race kills its losers.

    python bench/progress.py [--workers 3] [--iterations 20000] [--inner 2500] [--every 1 10 100]
                             [--repeat 3] [--races 20] [--losers cpu|sleep] [--via local|grpc|both] [--watch]

Starts one real broker (`park-broker serve` in a temporary site directory, with a
fresh ed25519 user key in a key file and `users add`, workers importing
bench/bench_progress_tasks.py), then measures:

(a) report throughput. `bench_progress_tasks:spin` runs `--iterations` steps of
    pure-Python work (`--inner` additions each, about 100 us per step here), once
    without reporting and once per `--every` E calling `park.report(step=i, chisq=...)`
    on every E-th step. One job runs at a time; runs alternate and repeat `--repeat`
    times; the medians are shown. The job times its own loop (report calls included;
    the final flush of unsent reports, done by the worker after the function returns,
    is not part of it and is shown separately as "flush tail": loop end -> Completed
    event). Slowdown = median loop time / median baseline - 1 (and the same for the
    fastest runs, the least disturbed on a busy machine); job CPU = CPU time of the job's
    process (its reporting thread included); broker CPU = the broker process's CPU time
    over the job's life; reports/s = reports / loop time; "received" = Improved events
    in the job's history. The bench polls each job's state (`--watch`: waits with
    job.result(), which streams every event live) and then times job.result() on the
    finished job. A last row runs the reporting loop with no work at all
    (`--inner 0`): the most a job can post.

(b) race decision latency. `--races` times: three `contestant` jobs race with
    `until="chisq < 1"`; the middle one waits until the two losers are running, stamps
    time.time() and reports chisq=0.5; the losers (busy-looping, or sleeping, between
    reports every 10 ms: `--losers`) write their pid. From submission a thread polls
    /proc/PID/stat every 1 ms; a loser is dead when its pid is gone or a zombie.
    Latency = last loser's death - winning report stamp. The broker's event times (the
    winner's Improved event, the losers' Cancelled events, stamped when the broker makes
    the change, before its commit) split it into transit, decision and kill. `--via`: the
    contestants' reports go over the local worker's socket (the default path for a Python
    call), or through the gRPC sender thread (what a command-line job uses); `both`
    alternates the two, race by race, and prints a table for each.

Goals (issue 5): a reporting job slows itself by no more than 5 %; < 100 ms from a
winning report to the losers' termination. Every process started is killed by pid at exit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VIA = {"local": "written to the local worker's socket by the reporting thread (the default path)",
       "grpc": "sent by park.progress's gRPC sender thread (as from a command-line job)"}


class Broker:
    """A `park-broker serve` in a temporary site whose one user is the caller, with a key file."""

    def __init__(self, workers: int):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from park import tokens
        from park.agent_client import default_subject
        from park.signer import write_private_key

        self._tmp = tempfile.TemporaryDirectory(prefix="park-bench-progress-")
        root = Path(self._tmp.name)
        root.chmod(0o777)   # the jobs write their pids here, as whichever account they run as
        self.directory = root / "site"
        key = Ed25519PrivateKey.generate()
        write_private_key(root / "user.key", key, None)
        os.environ["PARK_KEY_FILE"] = str(root / "user.key")
        for k in ("PARK_AUTH_SOCK", "PARK_KEY_PASSPHRASE"):
            os.environ.pop(k, None)
        cli = [sys.executable, "-m", "park_broker.cli"]
        subprocess.run([*cli, "init", str(self.directory), "--site", "bench"], check=True, capture_output=True)
        subprocess.run([*cli, "users", "add", str(self.directory), default_subject(), "--key",
                        tokens.format_public_key(key.public_key()), "--allow", "submit,upload"],
                       check=True, capture_output=True)
        self._log = open(root / "broker.log", "wb")  # noqa: SIM115 - open for the broker's life
        self.proc = subprocess.Popen([*cli, "--log-level", "WARNING", "serve", str(self.directory), "--listen",
                                      "127.0.0.1:0", "--workers", str(workers), "--python-path", str(BENCH_DIR),
                                      "--grace", "1", "--cpus", str(workers),   # as many running jobs as workers
                                      # root never runs jobs as itself: they run as nobody then
                                      *(["--default-unix-user", "nobody"] if os.geteuid() == 0 else [])],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (self.directory / "serve.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "broker.log").read_text(errors="replace")
                self.close()
                raise RuntimeError(f"broker did not start:\n{text}")
            time.sleep(0.05)
        self.address = json.loads((self.directory / "serve.json").read_text())["address"]
        self.cert = self.directory / "tls.crt"
        self.workdir = root

    def close(self) -> None:
        """Stop the broker (it kills its workers' process groups), then kill any worker left, by pid."""
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) ==
                   self.proc.pid]
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in workers:
            if not _dead(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        self._tmp.cleanup()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


# -- (a) report throughput -------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def spin(park, args: argparse.Namespace, every: int, inner: int, run: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    before = _cpu_seconds(args.broker_pid)
    job = park.submit("bench_progress_tasks:spin", args.iterations, inner, every, run=run)
    if args.watch:
        job.wait(timeout=600)
    else:                   # poll: no client streams the job's events while it runs
        job.acknowledged()
        while job.state not in ("completed", "failed", "cancelled"):
            time.sleep(0.25)
    broker_cpu = _cpu_seconds(args.broker_pid) - before
    start = time.perf_counter()
    out = job.result(timeout=600)   # the job is over, but Job.wait() replays its whole event stream
    out.update(broker_cpu=broker_cpu, replay=time.perf_counter() - start)
    history = job.history()
    deadline = time.monotonic() + 30
    while not any(e.kind == "completed" for e in history):   # the record is ahead of the committed log
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job.id} is {job.state} but its log has no Completed event after 30 s")
        time.sleep(0.05)
        history = job.history()
    completed = next(e for e in history if e.kind == "completed")
    out["received"] = sum(1 for e in history if e.kind == "improved")
    out["flush_tail"] = completed.time - out["loop_end"]
    return out


def throughput(park, args: argparse.Namespace) -> list[str]:  # type: ignore[no-untyped-def]
    runs: dict[int, list[dict[str, float]]] = {e: [] for e in [0, *args.every]}
    counter = 0
    for _ in range(args.repeat):
        for every, results in runs.items():
            counter += 1
            results.append(spin(park, args, every, args.inner, counter))
    raw = [spin(park, args, 1, 0, counter + 1 + r) for r in range(args.repeat)]
    base = statistics.median(r["elapsed"] for r in runs[0])
    lines = [f"{args.iterations} steps of ~{base / args.iterations * 1e6:.0f} us (--inner {args.inner}); "
             f"medians of {args.repeat} runs; baseline loop times: "
             + ", ".join(f"{r['elapsed']:.3f}" for r in runs[0]) + " s", "",
             ("| report every | reports/job | loop time s | slowdown | slowdown of fastest run | job CPU s "
              "| broker CPU s | reports/s | received | flush tail s | result() after end s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fastest = min(r["elapsed"] for r in runs[0])
    rows = [(0, runs[0]), *((e, runs[e]) for e in args.every), ("1, no work", raw)]
    for every, rs in rows:
        t = statistics.median(r["elapsed"] for r in rs)
        cpu, bcpu = (statistics.median(r[k] for r in rs) for k in ("cpu", "broker_cpu"))
        n = rs[0]["reports"]
        best = min(r["elapsed"] for r in rs)
        slow, slow_best = ((f"{(t / base - 1) * 100:+.1f} %", f"{(best / fastest - 1) * 100:+.1f} %")
                           if every != "1, no work" else ("n/a", "n/a"))
        recv = "/".join(str(r["received"]) for r in rs)
        tail = max(r["flush_tail"] for r in rs)
        replay = statistics.median(r["replay"] for r in rs)
        label = (every if isinstance(every, str) else "never" if every == 0 else
                 f"{every}th step" if every > 1 else "step")
        lines.append(f"| {label} | {n:.0f} | {t:.3f} | {slow} | {slow_best} | {cpu:.3f} | {bcpu:.2f} | {n / t:,.0f} "
                     f"| {recv} | {tail:.2f} | {replay:.3f} |")
    return lines


# -- (b) race decision latency -----------------------------------------------------------

def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _poll_deaths(directory: Path, names: list[str], deaths: dict[str, float], pids: dict[str, int],
                 stop: threading.Event) -> None:
    """Every 1 ms: pick up pid files, note the first moment each pid is dead."""
    while not stop.is_set() and len(deaths) < len(names):
        for name in names:
            if name not in pids and (directory / f"{name}.pid").exists():
                pids[name] = int((directory / f"{name}.pid").read_text())
            if name in pids and name not in deaths and _dead(pids[name]):
                deaths[name] = time.time()
        time.sleep(0.001)


def race_once(park, args: argparse.Namespace, directory: Path,  # type: ignore[no-untyped-def]
              via: str) -> dict[str, float]:
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)   # past the umask: the contestants write here as their own account
    names = ["loser0", "loser2"]
    deaths: dict[str, float] = {}
    pids: dict[str, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_deaths, args=(directory, names, deaths, pids, stop), daemon=True)
    poller.start()
    cpu = args.losers == "cpu"
    jobs = [park.submit("bench_progress_tasks:contestant", role, str(directory), cpu=cpu, grpc=via == "grpc")
            for role in ("loser0", "winner", "loser2")]
    race = park.race(jobs, until="chisq < 1")
    values = race.result(timeout=120)
    assert values["chisq"] == 0.5 and race.winner is jobs[1], (values, race.winner)
    poller.join(10)
    stop.set()
    if len(deaths) < 2:
        raise RuntimeError(f"losers {pids} not dead 10 s after the race was decided")
    for job in jobs:
        job.wait(timeout=60)
    report = float((directory / "winner.time").read_text())
    ends = {j.id: [e.kind for e in j.history()][-3:] for j in (jobs[0], jobs[2])}
    cancelled = max((e.time for j in (jobs[0], jobs[2]) for e in j.history() if e.kind == "cancelled"), default=None)
    if cancelled is None:
        raise RuntimeError(f"no loser was cancelled: {ends}")
    arrived = next(e.time for e in jobs[1].history() if e.kind == "improved" and e.detail["values"]["chisq"] == 0.5)
    transits = [e.time - e.detail["values"]["sent"] for j in jobs for e in j.history() if e.kind == "improved"]
    dead = max(deaths.values())
    return {"latency": dead - report, "transit": arrived - report, "decision": cancelled - arrived,
            "kill": dead - cancelled, "every": max(transits)}


def races(park, args: argparse.Namespace, root: Path) -> list[str]:  # type: ignore[no-untyped-def]
    ways = ["local", "grpc"] if args.via == "both" else [args.via]
    results: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    for i in range(args.races):   # the ways alternate, so that both see the same machine
        for way in ways:
            results[way].append(race_once(park, args, root / f"race{i}-{way}", way))
    lines = []
    for way in ways:
        lines += [(f"{args.races} races, losers {'busy-looping' if args.losers == 'cpu' else 'sleeping'} between "
                   f"reports every 10 ms, reports {VIA[way]}; milliseconds"), "",
                  "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|"]
        for key, label in (("latency", "**winning report -> last loser dead**"),
                           ("transit", "winning report -> its Improved event on the broker"),
                           ("decision", "Improved event -> losers' Cancelled events"),
                           ("kill", "Cancelled events -> last loser dead"),
                           ("every", "slowest report of the race, any contestant: park.report -> Improved event")):
            xs = sorted(r[key] * 1000 for r in results[way])
            p95, p99 = (xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] for q in (0.95, 0.99))
            lines.append(f"| {label} | {statistics.median(xs):.1f} | {p95:.1f} | {p99:.1f} | {xs[-1]:.1f} |")
        lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--inner", type=int, default=2500, help="additions per step (~25 per us here)")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--races", type=int, default=20)
    parser.add_argument("--losers", choices=("cpu", "sleep"), default="cpu")
    parser.add_argument("--via", choices=("local", "grpc", "both"), default="both",
                        help="races: how reports travel (see VIA); both: alternating, a table each")
    parser.add_argument("--watch", action="store_true",
                        help="wait for each throughput job with job.result() (a live Watch of its events) "
                             "instead of polling its state")
    parser.add_argument("--skip", choices=("throughput", "races"), help="leave one part out")
    args = parser.parse_args()
    import park

    broker = Broker(args.workers)
    args.broker_pid = broker.proc.pid
    try:
        service = park.Service(broker.address, broker.cert)
        try:
            print(f"# park bench/progress.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
                  f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
                  f"--workers {args.workers}; park from {Path(park.__file__).parent}", flush=True)
            with service:
                if args.skip != "throughput":
                    print("\n## (a) report throughput\n", *throughput(park, args), sep="\n", flush=True)
                if args.skip != "races":
                    print("\n## (b) race decision latency\n", *races(park, args, broker.workdir), sep="\n")
            print(f"\nload at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        except BaseException:
            print("broker log (tail):\n" + (broker.workdir / "broker.log").read_text(errors="replace")[-6000:],
                  file=sys.stderr)
            raise
        finally:
            service.close()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
