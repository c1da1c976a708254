"""Site-to-site transfer (issue 15): fetch a large file over TLS gRPC, against `scp` over a loopback sshd.

    python bench/transfer.py [--size-mib 1024] [--repeat 3] [--chunk 1048576] [--streams N] [--dir DIR]
                             [--hash-at-source] [--no-tune]

Makes a temporary site (park_broker.site.init_site: P-256 TLS key and
certificate) with one file of `--size-mib` MiB of os.urandom bytes, and serves
it from a separate process (`--serve`, the test-only Files servicer of
tests/transfer_harness.py, built from park_broker.transfer.source) on 127.0.0.1:0 over
TLS, so that source and destination each have their own process and event loop,
as two brokers would. It also starts its own `sshd` (Debian's openssh-server)
on a free loopback port, with a throwaway host key and user key and its own
config in the temporary directory; without /usr/sbin/sshd the scp rows are
skipped with a message. Then, alternating, `--repeat` times:

- park: `park_broker.transfer.fetch` through a TLS channel into a part file in
  the destination directory: sha256 verified, fsync, rename. The source knows
  the digest from the job's record (as a broker does), unless
  `--hash-at-source`, which makes it hash the file on every read.
- scp: `scp` of the same file into the same directory through the sshd (its
  default cipher), and `scp+`: the same followed by an fsync of the copy and a
  sha256 of it, which is what park's fetch guarantees.
- sha256: hashing the file once in this process (hashlib), a bound for any
  transfer that checks a digest on one core.

Both processes call `park_broker.transfer.tune_allocator()` unless `--no-tune`.

Both read the source from the page cache (it is read once beforehand; dropping
caches needs root and is not done). Prints MB/s (10^6 bytes/s) per run, the
medians, and park/scp.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from park._proto import files_pb2, files_pb2_grpc
from park_broker.site import init_site, load_site
from park_broker.transfer.download import fetch
from park_broker.transfer.source import CHUNK_SIZE
from park_broker.transfer.tuning import tune_allocator
import loopback_sshd
from loopback_sshd import LoopbackSshd
from transfer_harness import CLIENT_OPTIONS, SERVER_OPTIONS, FilesServicer

JOB = "a" * 26
PATH = f"/alice/{JOB}/big.bin"
# Flow control: let one stream have several chunks in flight (BDP probing may grow it further).
WINDOW = [("grpc.http2.lookahead_bytes", 16 * 1024 * 1024)]


async def serve(site_dir: Path, chunk: int, digest: str | None) -> None:
    site = load_site(site_dir)
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *WINDOW])
    known = {PATH: digest} if digest else None
    files_pb2_grpc.add_FilesServicer_to_server(FilesServicer(site.files_root, chunk=chunk, known=known), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(site.tls_key(), site.certificate())]))
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def park_fetch(port: int, cert: bytes, part: Path, final: Path) -> tuple[float, int, str]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(cert),
                                       options=[*CLIENT_OPTIONS, *WINDOW]) as channel:
        stub = files_pb2_grpc.FilesStub(channel)
        await channel.channel_ready()
        t0 = time.perf_counter()
        size, digest = await fetch(lambda offset: stub.Read(files_pb2.ReadRequest(path=PATH, offset=offset)),
                                   part, final)
        return time.perf_counter() - t0, size, digest


def timed_scp(sshd: LoopbackSshd, src: Path, dst: Path, verify: bool) -> float:
    """scp, and with `verify` an fsync and a sha256 of the copy: what a fetch guarantees."""
    t0 = time.perf_counter()
    sshd.scp(src, dst)
    if verify:
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - t0


def timed_sha256(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return time.perf_counter() - t0


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 16 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def commit() -> str:
    run = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return run.stdout.strip() or "not a git checkout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=CHUNK_SIZE, help="bytes per Chunk message")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temporary site and copies")
    parser.add_argument("--hash-at-source", action="store_true", help="the source hashes the file on every read")
    parser.add_argument("--no-tune", action="store_true", help="leave glibc's allocator at its defaults")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--digest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.no_tune:
        tune_allocator()
    if args.serve:
        asyncio.run(serve(args.serve, args.chunk, args.digest or None))
        return 0

    size = args.size_mib << 20
    no_sshd = loopback_sshd.missing()
    if no_sshd:
        print(f"scp rows skipped: {no_sshd}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="park-bench-transfer-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        sshd = None if no_sshd else stack.enter_context(LoopbackSshd(work / "sshd"))
        site = init_site(work / "sns", "sns")
        src = site.files_root / PATH.lstrip("/")
        src.parent.mkdir(parents=True)
        digest = make_file(src, size)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)   # into the page cache
        out = work / "cluster" / "files" / "alice" / ("b" * 26)
        out.mkdir(parents=True)
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(out)], check=False, capture_output=True, text=True).stdout.strip()
        print(f"machine: {machine()}\ncommit: {commit()}\nfile: {size} bytes in {work} ({fs}), chunk {args.chunk} bytes, "
              f"{'hashed at the source on every read' if args.hash_at_source else 'digest known at the source'}, "
              f"allocator {'default' if args.no_tune else 'tuned'}")
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(site.directory), "--chunk",
                                   str(args.chunk), "--digest", "" if args.hash_at_source else digest,
                                   *(["--no-tune"] if args.no_tune else [])],
                                  stdout=subprocess.PIPE, text=True)
        rates: dict[str, list[float]] = {"park": [], "sha256": [], **({"scp": [], "scp+": []} if sshd else {})}
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            for i in range(args.repeat):
                if sshd is not None:
                    for verify in (False, True):
                        seconds = timed_scp(sshd, src, out / "copy.bin", verify)
                        rates["scp+" if verify else "scp"].append(size / seconds / 1e6)
                        (out / "copy.bin").unlink()
                rates["sha256"].append(size / timed_sha256(src) / 1e6)
                seconds, got_size, got = asyncio.run(
                    park_fetch(port, site.certificate(), out / ".big.bin.part", out / "big.bin"))
                if (got_size, got) != (size, digest):
                    raise SystemExit(f"run {i}: fetched {got_size} bytes with sha256 {got}, expected {digest}")
                (out / "big.bin").unlink()
                rates["park"].append(size / seconds / 1e6)
                print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in rates.items()), flush=True)
        finally:
            server.terminate()
            server.wait(10)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\nmedian of {args.repeat}: " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in med.items()))
        if sshd is not None:
            print(f"park/scp = {med['park'] / med['scp']:.2f} (goal >= 1, aim 1.5), "
                  f"park/(scp+fsync+sha256) = {med['park'] / med['scp+']:.2f}")
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        shutil.rmtree(work / "cluster", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
