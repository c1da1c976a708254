"""Propagation latency (issue 4): a job completes at site A -> its dependent at site B starts.

    python bench/federation.py [--pairs 600] [--workers 4] [--modes chain waves] [--stagger 0.002]
                               [--settle 0.2] [--no-anchor] [--site-root /var/tmp] [--no-trace]

Two real brokers, `sns` and `cluster`, on loopback (`park-broker init`; the caller, with a fresh
ed25519 key in PARK_KEY_FILE, is their user; each is pinned as the other's peer; `serve --workers W
--python-path bench/`, through bench/federation_trace.py, which only adds timestamps, unless
--no-trace). Every job runs `bench_federation_tasks:link`, which stamps time.time() as its first and
its last statement; latency of a pair = the dependent's first stamp - its upstream's last (one clock).

- chain: N+1 jobs alternating sns, cluster, sns, ...; each waits on the one before
  (`when=prev.iscompleted`): N cross-site pairs, half each way, one propagation at a time, and B
  always has a free worker. All are submitted first (each acknowledged before its dependent is
  submitted at the other site); the first job then waits for a flag file, created once all are in.
- waves: N/W waves of W pairs: W jobs at sns, the k-th ending k*stagger s after the wave's flag,
  each with a dependent at cluster, so several propagations overlap but each dependent has a free
  worker (W per broker); the flag is created --settle s after the wave is acknowledged, and the next
  wave starts when its dependents are done. An anchor pair (an sns job running until the end, on
  one extra sns worker, and its dependent at cluster) keeps the Subscribe stream open between
  waves; --no-anchor shows what reopening it costs.
Dask, same run: LocalCluster(n_workers=W, threads_per_worker=1), same function, chain (each task takes
the previous result) and waves (B takes A's result); the flag is created once the scheduler has them all.

With tracing each Park pair is split by the brokers' event times (stamped at the decision, before
the commit) and the trace points: A job end -> A `completed` event -> A commit durable -> A
publisher builds the update (forward + store read) -> B receives it (gRPC, TLS) -> B `queued`
event -> B commit durable -> B `started` event (a worker loop takes it) -> B job's first statement.
Every process started is stopped by pid. Goal (issue 4): p50 <= 5 ms, p99 <= 20 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import park
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from park import tokens
from park._proto import jobs_pb2 as jpb
from park.agent_client import default_subject
from park.signer import read_private_key, write_private_key

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
from bench_federation_tasks import link

TARGET = "bench_federation_tasks:link"
CLI = [sys.executable, "-m", "park_broker.cli"]
STEPS = ["A: job end -> completed event", "A: completed -> commit durable", "A: durable -> update built",
         "A->B: update built -> received", "B: received -> queued event", "B: queued -> commit durable",
         "B: durable -> started event", "B: started event -> job's 1st stmt"]


def pct(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), statistics.quantiles(xs, n=100, method="inclusive")[98], max(xs)


def ms(xs: list[float], sep: str = " | ") -> str:
    return sep.join(f"{v * 1e3:.2f}" for v in pct(xs))


class Site:
    def __init__(self, root: Path, name: str):
        with socket.socket() as sock:   # a free port for the peer listener, which the other site must know
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.name, self.dir, self.proc = name, root / name, None
        self.trace = root / f"{name}.trace.json"
        key = tokens.format_public_key(read_private_key(Path(os.environ["PARK_KEY_FILE"]), None).public_key())
        subprocess.run([*CLI, "init", str(self.dir), "--site", name], check=True, capture_output=True)
        subprocess.run([*CLI, "users", "add", str(self.dir), default_subject(), "--key", key, "--allow",
                        "submit,upload"], check=True, capture_output=True)

    def pin(self, other: Site) -> None:
        subprocess.run([*CLI, "peers", "add", str(self.dir), other.name, "--address", f"127.0.0.1:{other.port}",
                        "--cert", str(other.dir / "tls.crt")], check=True, capture_output=True)

    def start(self, workers: int, trace: bool) -> None:
        launcher = [sys.executable, str(BENCH_DIR / "federation_trace.py"), str(self.trace)] if trace else CLI
        self.log = open(self.dir / "broker.log", "ab")  # noqa: SIM115 - open for the broker's life
        self.proc = subprocess.Popen([*launcher, "--log-level", "WARNING", "serve", str(self.dir), "--listen",
                                      "127.0.0.1:0", "--peer-listen", f"127.0.0.1:{self.port}", "--workers",
                                      str(workers), "--python-path", str(BENCH_DIR), "--grace", "1",
                                      "--cpus", str(workers),   # as many running jobs as workers
                                      # root never runs jobs as itself: they run as nobody then
                                      *(["--default-unix-user", "nobody"] if os.geteuid() == 0 else [])],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def service(self) -> park.Service:
        deadline = time.monotonic() + 60
        while not (self.dir / "serve.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker {self.name} did not start; see {self.dir / 'broker.log'}")
            time.sleep(0.05)
        return park.Service(json.loads((self.dir / "serve.json").read_text())["address"], self.dir / "tls.crt")

    def stop(self) -> None:   # SIGTERM: a clean stop, so that the trace is written; SIGKILL after 30 s
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill(), self.proc.wait()


def events_of(service: park.Service) -> dict[str, dict[str, jpb.Event]]:
    """Every event of the caller's jobs at a site: job id -> kind -> Event."""
    out: dict[str, dict[str, jpb.Event]] = {}
    stream = service.jobs_stub.Watch(jpb.WatchRequest(from_seq=0), timeout=120)
    for item in stream:
        if item.HasField("progress"):   # caught up
            break
        for event in item.events:
            out.setdefault(event.job_id, {})[event.WhichOneof("kind")] = event
    stream.cancel()
    return out


def run_park(args: argparse.Namespace, root: Path, mode: str) -> tuple[list[float], list[list[float]]]:
    """Latencies (s) of every pair, and with tracing the steps of each (see STEPS)."""
    sns, cluster = Site(root / mode, "sns"), Site(root / mode, "cluster")   # `init` makes root / mode
    sns.pin(cluster), cluster.pin(sns)
    try:
        anchored = mode == "waves" and args.anchor
        sns.start(args.workers + anchored, args.trace)   # the anchor's upstream job holds a worker at sns
        cluster.start(args.workers, args.trace)
        svc = {"sns": sns.service(), "cluster": cluster.service()}
        pairs: list[tuple[park.Job, park.Job]] = []
        flag = root / mode / "go"
        if mode == "chain":
            prev = None
            for k in range(args.pairs + 1):
                with svc["sns" if k % 2 == 0 else "cluster"]:
                    job = park.submit(TARGET, k, gate="" if prev else str(flag), memo=False,
                                      when=prev.iscompleted if prev else None)
                job.acknowledged(60)
                if prev is not None:
                    pairs.append((prev, job))
                prev = job
            flag.touch()
            prev.result(timeout=600)
        else:
            if anchored:   # a dependent at cluster waiting all along keeps the stream to sns open
                with svc["sns"]:
                    anchor = park.submit(TARGET, -1, gate=str(root / mode / "end"), poll=0.5, memo=False)
                anchor.acknowledged(60)
                with svc["cluster"]:
                    anchored_job = park.submit(TARGET, -1, when=anchor.iscompleted, memo=False)
            for w in range(-(-args.pairs // args.workers)):
                flag = root / mode / f"go-{w}"
                with svc["sns"]:
                    ups = [park.submit(TARGET, w * 100 + k, delay=k * args.stagger, gate=str(flag), memo=False)
                           for k in range(args.workers)]
                [up.acknowledged(60) for up in ups]
                with svc["cluster"]:
                    downs = [park.submit(TARGET, w * 100 + k, when=up.iscompleted, memo=False)
                             for k, up in enumerate(ups)]
                [down.acknowledged(60) for down in downs]
                time.sleep(args.settle)
                flag.touch()
                [down.result(timeout=120) for down in downs]
                pairs += zip(ups, downs)
            (root / mode / "end").touch()
            if anchored:
                anchored_job.result(timeout=60)
        ev = {name: events_of(s) for name, s in svc.items()}
    finally:
        for s in (sns, cluster):
            s.stop()
    traces: dict[str, dict[tuple[str, str], float]] = {s.name: {} for s in (sns, cluster) if s.trace.exists()}
    for name, trace in traces.items():
        for point, job_id, t in reversed(json.loads((root / mode / f"{name}.trace.json").read_text())):
            trace[(point, job_id)] = t   # the first time of each point
    lat, steps, subs = [], [], []
    for a, b in pairs:
        ea, eb = ev[a.site][a.id], ev[b.site][b.id]
        end = json.loads(ea["completed"].completed.result_json)["end"]
        start = json.loads(eb["completed"].completed.result_json)["start"]
        assert eb["submitted"].time < ea["completed"].time, "a dependent was submitted after its upstream ended"
        lat.append(start - end)
        if a.site in traces and b.site in traces:
            ta, tb = traces[a.site], traces[b.site]
            marks = [end, ea["completed"].time, ta[("committed_completed", a.id)], ta[("sent", a.id)],
                     tb[("received", a.id)], eb["queued"].time, tb[("committed_queued", b.id)],
                     eb["started"].time, start]
            steps.append([y - x for x, y in pairwise(marks)])
            subs.append((tb[("watch", a.id)], ta[("asked", a.id)], ta[("committed_completed", a.id)]))
    if subs:
        late = sum(asked > done for _, asked, done in subs)
        print(f"park {mode}: subscribing, B asks -> A accepts the token: p50/p99/max "
              f"{ms([x[1] - x[0] for x in subs], '/')} ms; atom asked for only after its job's completion "
              f"was committed: {late} of {len(subs)} pairs")
    return lat, steps


def run_dask(args: argparse.Namespace, root: Path, mode: str) -> list[float]:
    from distributed import Client, Future, LocalCluster
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as client:
        client.wait_for_workers(args.workers)

        def release(flag: Path, futures: list[Future]) -> None:   # once the scheduler holds every task
            keys = [f.key for f in futures]
            while not client.run_on_scheduler(lambda dask_scheduler: all(k in dask_scheduler.tasks for k in keys)):
                time.sleep(0.01)
            flag.touch()

        lat: list[float] = []
        if mode == "chain":
            futs = [client.submit(link, 0, gate=str(root / "dask-go"), pure=False)]
            for k in range(1, args.pairs + 1):
                futs.append(client.submit(link, k, futs[-1], pure=False))
            release(root / "dask-go", futs)
            res = client.gather(futs)
            lat = [b["start"] - a["end"] for a, b in pairwise(res)]
        else:
            for w in range(-(-args.pairs // args.workers)):
                flag = root / f"dask-go-{w}"
                ups = [client.submit(link, k, delay=k * args.stagger, gate=str(flag), pure=False)
                       for k in range(args.workers)]
                downs = [client.submit(link, k, up, pure=False) for k, up in enumerate(ups)]
                release(flag, ups + downs)
                res_up, res_down = client.gather(ups), client.gather(downs)
                lat += [b["start"] - a["end"] for a, b in zip(res_up, res_down)]
    return lat


def facts(site_root: Path) -> str:
    import dask
    import grpc
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(site_root)], check=False, capture_output=True,
                        text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; {cpu}, {os.cpu_count()} cores; "
            f"load {os.getloadavg()[0]:.2f}; Python {platform.python_version()}, grpcio {grpc.__version__}, "
            f"dask {dask.__version__}; commit {commit} (+ working tree); site root {site_root} ({fs})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=600)
    p.add_argument("--workers", type=int, default=4, help="workers of each broker and of the Dask cluster")
    p.add_argument("--modes", nargs="+", choices=["chain", "waves"], default=["chain", "waves"])
    p.add_argument("--stagger", type=float, default=0.002, help="waves: seconds between completions in a wave")
    p.add_argument("--settle", type=float, default=0.2, help="waves: seconds from submission to the flag")
    p.add_argument("--no-anchor", dest="anchor", action="store_false", help="waves: no anchor pair")
    p.add_argument("--site-root", type=Path, default=Path("/var/tmp"))
    p.add_argument("--no-trace", dest="trace", action="store_false")
    p.add_argument("--skip-dask", action="store_true")
    args = p.parse_args()
    print(facts(args.site_root), flush=True)
    with tempfile.TemporaryDirectory(prefix="park-bench-fed-", dir=args.site_root) as tmp:
        root = Path(tmp)
        write_private_key(root / "user.key", Ed25519PrivateKey.generate(), None)
        os.environ["PARK_KEY_FILE"] = str(root / "user.key")
        os.environ.pop("PARK_AUTH_SOCK", None), os.environ.pop("PARK_KEY_PASSPHRASE", None)
        rows = []
        for mode in args.modes:
            t0 = time.monotonic()
            lat, steps = run_park(args, root, mode)
            print(f"park {mode}: {len(lat)} pairs in {time.monotonic() - t0:.1f} s", flush=True)
            dlat = [] if args.skip_dask else run_dask(args, root, mode)
            rows.append((mode, lat, dlat, steps))
        print(f"load at the end {os.getloadavg()[0]:.2f}\n")
        print("| mode | system | pairs | p50 ms | p99 ms | max ms |\n|---|---|---:|---:|---:|---:|")
        for mode, lat, dlat, _ in rows:
            for system, xs in (("park", lat), ("dask", dlat)):
                print(f"| {mode} | {system} | {len(xs)} | {ms(xs)} |" if xs else "", end="\n" if xs else "")
        for mode, lat, dlat, _ in rows:
            if dlat:
                ratio = [a / b for a, b in zip(pct(lat), pct(dlat))]
                print(f"{mode}: park/dask p50 {ratio[0]:.1f}x, p99 {ratio[1]:.1f}x, max {ratio[2]:.1f}x")
        for mode, lat, _, steps in rows:
            if steps:
                print(f"\n{mode}: where Park's time goes ({len(steps)} pairs; ms)\n"
                      "| step | p50 | p99 | max | mean | share of mean |\n|---|---:|---:|---:|---:|---:|")
                total = sum(sum(s) for s in steps) / len(steps)
                for i, name in enumerate(STEPS):
                    col = [s[i] for s in steps]
                    mean = sum(col) / len(col)
                    print(f"| {name} | {ms(col)} | {mean * 1e3:.2f} | {mean / total:.0%} |")
                print(f"| total | {ms([sum(s) for s in steps])} | {total * 1e3:.2f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
