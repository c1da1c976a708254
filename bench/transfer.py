"""Site-to-site transfer (issue 4): fetch a large file over TLS gRPC, against `cp` of the same file.

    python bench/transfer.py [--size-mib 1024] [--repeat 3] [--chunk 1048576] [--dir DIR] [--hash-at-source]
                             [--no-tune]

Makes a temporary site (park_broker.site.init_site: P-256 TLS key and
certificate) with one file of `--size-mib` MiB of os.urandom bytes, and serves
it from a separate process (`--serve`, the test-only Files servicer of
tests/transfer_harness.py, built from park_broker.transfer.download) on 127.0.0.1:0 over
TLS, so that source and destination each have their own process and event loop,
as two brokers would. Then, alternating, `--repeat` times:

- park: `park_broker.transfer.fetch` through a TLS channel into a part file in
  the destination directory: sha256 on both sides, fsync, rename. The source
  knows the digest from the job's record (as a broker does), unless
  `--hash-at-source`, which makes it hash the file on every read.
- cp: `cp SRC DST` of the same file into the same directory, and the same
  followed by an fsync of the copy (`cp+fsync`), since fetch fsyncs.
- sha256: hashing the file once in this process (hashlib), a bound for any
  transfer that checks a digest on one core.

Both processes call `park_broker.transfer.tune_allocator()` unless `--no-tune`.

Both read the source from the page cache (it is read once beforehand; dropping
caches needs root and is not done). Prints MB/s (10^6 bytes/s) per run, the
medians, and park/cp.
"""
from __future__ import annotations

import argparse
import asyncio
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

from park._proto import files_pb2, files_pb2_grpc
from park_broker.site import init_site, load_site
from park_broker.transfer.download import fetch
from park_broker.transfer.source import CHUNK_SIZE
from park_broker.transfer.tuning import tune_allocator
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


def timed_cp(src: Path, dst: Path, sync: bool) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if sync:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
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
            f"grpcio {grpc.__version__}, load average {os.getloadavg()[0]:.1f}")


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
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="park-bench-transfer-") as tmp:
        work = Path(tmp)
        site = init_site(work / "sns", "sns")
        src = site.files_root / PATH.lstrip("/")
        src.parent.mkdir(parents=True)
        digest = make_file(src, size)
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)   # into the page cache
        out = work / "cluster" / "files" / "alice" / ("b" * 26)
        out.mkdir(parents=True)
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(out)], check=False, capture_output=True, text=True).stdout.strip()
        print(f"machine: {machine()}\nfile: {size} bytes in {work} ({fs}), chunk {args.chunk} bytes, "
              f"{'hashed at the source on every read' if args.hash_at_source else 'digest known at the source'}, "
              f"allocator {'default' if args.no_tune else 'tuned'}")
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(site.directory), "--chunk",
                                   str(args.chunk), "--digest", "" if args.hash_at_source else digest,
                                   *(["--no-tune"] if args.no_tune else [])],
                                  stdout=subprocess.PIPE, text=True)
        rates: dict[str, list[float]] = {"park": [], "cp": [], "cp+fsync": [], "sha256": []}
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            for i in range(args.repeat):
                for sync in (False, True):
                    seconds = timed_cp(src, out / "copy.bin", sync)
                    rates["cp+fsync" if sync else "cp"].append(size / seconds / 1e6)
                    (out / "copy.bin").unlink()
                rates["sha256"].append(size / timed_sha256(src) / 1e6)
                seconds, got_size, got = asyncio.run(
                    park_fetch(port, site.certificate(), out / ".big.bin.part", out / "big.bin"))
                if (got_size, got) != (size, digest):
                    raise SystemExit(f"run {i}: fetched {got_size} bytes with sha256 {got}, expected {digest}")
                (out / "big.bin").unlink()
                rates["park"].append(size / seconds / 1e6)
                print(f"run {i + 1}: park {rates['park'][-1]:.0f} MB/s, cp {rates['cp'][-1]:.0f} MB/s, "
                      f"cp+fsync {rates['cp+fsync'][-1]:.0f} MB/s, sha256 {rates['sha256'][-1]:.0f} MB/s", flush=True)
        finally:
            server.terminate()
            server.wait(10)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\nmedian of {args.repeat}: park {med['park']:.0f} MB/s, cp {med['cp']:.0f} MB/s, "
              f"cp+fsync {med['cp+fsync']:.0f} MB/s, sha256 {med['sha256']:.0f} MB/s")
        print(f"park/cp = {med['park'] / med['cp']:.2f}, park/(cp+fsync) = {med['park'] / med['cp+fsync']:.2f} "
              f"(goal: park/cp >= 0.5)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        shutil.rmtree(work / "cluster", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
