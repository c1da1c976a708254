"""Federation width (issue 15): ten brokers on one machine, each waiting on all the others.

    python bench/federation_width.py [--brokers 10] [--atoms 10000] [--workers 2] [--site-root /var/tmp]

`--brokers` real brokers on loopback (bench/federation.py's `Site`: `park-broker init`, the caller
as their user with a fresh ed25519 key in PARK_KEY_FILE, every broker pinned as every other's peer).
Each broker gets `--atoms / --brokers` source jobs (`bench_federation_tasks:link`, held by a flag
file until everything is submitted); each source has one dependent, at another broker, waiting on
`source.iscompleted`: the dependents of broker i's sources go round-robin to every other broker, so
each ordered pair of brokers carries about atoms / (brokers * (brokers - 1)) atoms, all at once.

Checked: every dependent is queued exactly once and completes, every source completes once (each
broker's own event log, read with one Watch from the start); and each broker's peer port has at
most one TCP connection from each other broker while the atoms are waited for (/proc/net/tcp:
one stream per peer pair).
Printed: propagation per atom, from the source's Completed event at its broker to the dependent's
Queued event at its broker (both stamped by the brokers when they decide, one clock), p50/p99/max;
the same from the source job's last statement to the dependent job's first (worker queueing
included); and each broker's CPU time from the flag to the last completion, and in all.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import park  # noqa: E402
from federation import TARGET, Site, facts  # noqa: E402
from park._proto import jobs_pb2 as jpb  # noqa: E402
from park.signer import write_private_key  # noqa: E402

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Log:
    """One broker's events of the caller's jobs, from one Watch stream, until `expected` jobs are terminal."""

    def __init__(self, service: park.Service, expected: set[str]):
        self.expected, self.times, self.counts = expected, dict[tuple[str, str], float](), Counter[tuple[str, str]]()
        self.results: dict[str, str] = {}   # job id -> result_json of its Completed event
        self.done, self.error = threading.Event(), ""
        self._stream = service.jobs_stub.Watch(jpb.WatchRequest(from_seq=0))
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        left = set(self.expected)
        try:
            for item in self._stream:
                for ev in item.events:
                    kind = ev.WhichOneof("kind") or "?"
                    self.counts[(ev.job_id, kind)] += 1
                    self.times.setdefault((ev.job_id, kind), ev.time)
                    if kind == "completed":
                        self.results[ev.job_id] = ev.completed.result_json
                    if kind in TERMINAL:
                        left.discard(ev.job_id)
                if not left:
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self._stream.cancel()
            self.done.set()


def peer_connections(ports: dict[str, int]) -> dict[str, int]:
    """Established TCP connections into each broker's peer port (loopback, IPv4 or IPv6)."""
    by_port = {port: name for name, port in ports.items()}
    out = dict.fromkeys(ports, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            port = int(local.rsplit(":", 1)[1], 16)
            if state == "01" and port in by_port:
                out[by_port[port]] += 1
    return out


def pct(xs: list[float]) -> str:
    p99 = statistics.quantiles(xs, n=100, method="inclusive")[98]
    return f"p50 {statistics.median(xs) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(xs) * 1e3:.1f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", type=int, default=10)
    p.add_argument("--atoms", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2, help="local workers of each broker")
    p.add_argument("--site-root", type=Path, default=Path("/var/tmp"))
    args = p.parse_args()
    print(facts(args.site_root), flush=True)
    with tempfile.TemporaryDirectory(prefix="park-bench-width-", dir=args.site_root) as tmp:
        root = Path(tmp)
        root.chmod(0o755)   # the jobs, as whichever account they run as, look for the flag file here
        write_private_key(root / "user.key", Ed25519PrivateKey.generate(), None)
        os.environ["PARK_KEY_FILE"] = str(root / "user.key")
        os.environ.pop("PARK_AUTH_SOCK", None), os.environ.pop("PARK_KEY_PASSPHRASE", None)
        sites = [Site(root, f"s{i}") for i in range(args.brokers)]
        for a in sites:
            for b in sites:
                if a is not b:
                    a.pin(b)
        try:
            for s in sites:
                s.start(args.workers, trace=False)
            svc = {s.name: s.service() for s in sites}
            flag = root / "go"
            t0 = time.monotonic()
            sources: list[park.Job] = []
            for i, s in enumerate(sites):
                with svc[s.name]:
                    sources += [park.submit(TARGET, i * args.atoms + k, gate=str(flag), poll=0.005, memo=False)
                                for k in range(args.atoms // args.brokers)]
            pairs: list[tuple[park.Job, park.Job]] = []
            for k, src in enumerate(sources):
                i = int(src.site[1:])
                j = (i + 1 + k % (args.brokers - 1)) % args.brokers
                with svc[sites[j].name]:
                    pairs.append((src, park.submit(TARGET, -k - 1, when=src.iscompleted, memo=False)))
            for s in svc.values():
                s.flush()
            print(f"{len(sources)} sources and {len(pairs)} dependents at {args.brokers} brokers acknowledged in "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
            time.sleep(2)   # the dependents' brokers subscribe to their atoms
            expected: dict[str, set[str]] = {s.name: set() for s in sites}
            for src, dep in pairs:
                expected[src.site].add(src.id)
                expected[dep.site].add(dep.id)
            conns = peer_connections({s.name: s.port for s in sites})   # while every atom is waited for
            cpu0 = {s.name: cpu_seconds(s.proc.pid) for s in sites}
            t1 = time.monotonic()
            flag.touch()
            logs = {name: Log(svc[name], expected[name]) for name in svc}
            for log in logs.values():
                log.done.wait(600)
            seconds = time.monotonic() - t1
            cpu = {s.name: cpu_seconds(s.proc.pid) - cpu0[s.name] for s in sites}
            total = {s.name: cpu_seconds(s.proc.pid) for s in sites}
            queued_counts, broker_lat, job_lat = Counter[int](), [], []
            for src, dep in pairs:
                a, b = logs[src.site], logs[dep.site]
                queued_counts[b.counts[(dep.id, "queued")]] += 1
                if (src.id, "completed") in a.times and (dep.id, "queued") in b.times:
                    broker_lat.append(b.times[(dep.id, "queued")] - a.times[(src.id, "completed")])
                if src.id in a.results and dep.id in b.results:
                    job_lat.append(json.loads(b.results[dep.id])["start"] - json.loads(a.results[src.id])["end"])
            completed = sum(logs[d.site].counts[(d.id, "completed")] == 1 for _, d in pairs)
            src_completed = sum(logs[s_.site].counts[(s_.id, "completed")] == 1 for s_, _ in pairs)
            errors = {n: log.error for n, log in logs.items() if log.error or not log.done.is_set()}
        finally:
            for s in sites:
                s.stop()
    print(f"released {len(pairs)} cross-site atoms; all terminal after {seconds:.1f} s")
    print(f"sources completed once: {src_completed} of {len(pairs)}; dependents completed once: {completed}; "
          f"times each dependent was queued: {dict(sorted(queued_counts.items()))}")
    print(f"TCP connections into each broker's peer port: {conns} (at most {args.brokers - 1} each: one per peer)")
    if broker_lat:
        print(f"propagation, source Completed event -> dependent Queued event ({len(broker_lat)} atoms): "
              f"{pct(broker_lat)}")
    if job_lat:
        print(f"source job's last statement -> dependent job's first (worker queueing included): {pct(job_lat)}")
    print("broker CPU seconds from the flag to the end (and since start): " +
          ", ".join(f"{n} {cpu[n]:.1f} ({total[n]:.1f})" for n in cpu))
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = (not errors and completed == src_completed == len(pairs) and set(queued_counts) == {1}
          and all(c <= args.brokers - 1 for c in conns.values()))
    if errors:
        print(f"streams that failed or did not finish: {errors}")
    print("all resolved, none twice" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
