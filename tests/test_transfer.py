"""Site-to-site transfer (DESIGN §7, park_broker.transfer) over a real TLS gRPC server.

Streams are broken by a TCP proxy that aborts connections mid-transfer; the
fetch must resume and finish with the right digest, and must leave nothing
under the final name (and no part file) whenever it fails.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park import tokens
from park._proto import files_pb2
from park_broker.errors import BrokerError, Code
from park_broker.site import SiteConfig, init_site
from park_broker.transfer.download import Downloader, RetryPolicy, TransferFailed, fetch
from park_broker.transfer.part_file import STAGE, PartFile
from park_broker.transfer.source import authorize_read, read_chunks, resolve_path
from transfer_harness import FilesServicer, serving

T = TypeVar("T")
MiB = 1 << 20
JOB = "a" * 26
PATH = f"/alice/{JOB}/out.bin"
FAST = RetryPolicy(max_retries=3, initial=0.01, maximum=0.05)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path) -> SiteConfig:
    return init_site(tmp_path / "sns", "sns")


def put(site: SiteConfig, path: str, size: int) -> tuple[Path, bytes]:
    real = site.files_root / path.lstrip("/")
    real.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    real.write_bytes(data)
    return real, data


def dest(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "cluster" / "files" / "alice" / ("b" * 26)
    directory.mkdir(parents=True)
    return directory / ".out.bin.part", directory / "out.bin"


def assert_nothing_left(part: Path, final: Path) -> None:
    assert not final.exists() and not part.exists()
    assert list(final.parent.iterdir()) == []


# --- resume, change, tampering -----------------------------------------------------------

@pytest.mark.timeout(60)
def test_fetch_resumes_after_repeated_cuts(site: SiteConfig, tmp_path: Path) -> None:
    _, data = put(site, PATH, 6 * MiB + 12345)
    part, final = dest(tmp_path)
    seen: list[tuple[int, int]] = []

    async def body() -> tuple[int, str]:
        # Bytes through the proxy per connection; the third cut comes before a whole 1 MiB chunk.
        budgets = [int(1.5 * MiB), int(2.2 * MiB), 300_000, int(2.5 * MiB)]
        async with serving(site, FilesServicer(site.files_root), budgets=budgets) as s:
            result = await fetch(s.opener(PATH), part, final, on_progress=lambda d, n: seen.append((d, n)))
            assert s.proxy is not None and s.proxy.cuts == 4
            offsets = [o for _, o in s.servicer.calls]
            assert len(offsets) == 5 and offsets[0] == 0 and offsets == sorted(offsets)
            assert len(set(offsets)) >= 3 and offsets[-1] < len(data)
            return result

    size, digest = run(body())
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert final.read_bytes() == data and not part.exists()
    assert seen[-1] == (len(data), len(data)) and all(n == len(data) for _, n in seen)


@pytest.mark.timeout(30)
def test_source_changing_between_resumes_fails(site: SiteConfig, tmp_path: Path) -> None:
    real, _ = put(site, PATH, 3 * MiB)
    part, final = dest(tmp_path)

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root), budgets=[int(1.5 * MiB)]) as s:
            plain = s.opener(PATH)

            def open_stream(offset: int) -> grpc.aio.UnaryStreamCall:
                if offset:  # the source is rewritten (same size) while the fetch is away
                    tmp = real.with_name(".new")
                    tmp.write_bytes(os.urandom(3 * MiB))
                    tmp.replace(real)
                return plain(offset)
            try:
                await fetch(open_stream, part, final)
            finally:
                assert [o for _, o in s.servicer.calls] == [0, MiB]

    with pytest.raises(TransferFailed) as info:
        run(body())
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "changed between resumed reads" in info.value.message
    assert_nothing_left(part, final)


@pytest.mark.timeout(30)
def test_tampered_digest_fails_and_keeps_nothing(site: SiteConfig, tmp_path: Path) -> None:
    put(site, PATH, 2 * MiB + 7)
    part, final = dest(tmp_path)

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root, sha256="0" * 64), budgets=[MiB]) as s:
            await fetch(s.opener(PATH), part, final)

    with pytest.raises(TransferFailed) as info:
        run(body())
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "sha256 mismatch" in info.value.message and "0" * 64 in info.value.message
    assert_nothing_left(part, final)


# --- resuming what a stopped broker left ------------------------------------------------------

@pytest.mark.timeout(30)
def test_cancelled_fetch_keeps_its_part_and_a_new_fetch_resumes(site: SiteConfig, tmp_path: Path) -> None:
    _, data = put(site, PATH, 4 * MiB)
    part, final = dest(tmp_path)

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root)) as s:
            task: asyncio.Task[tuple[int, str]]

            def stop_early(done: int, size: int) -> None:
                if done >= MiB:
                    task.cancel()
            task = asyncio.create_task(fetch(s.opener(PATH), part, final, on_progress=stop_early))
            with pytest.raises(asyncio.CancelledError):
                await task
            assert part.stat().st_size >= MiB and not final.exists()
            left = part.stat().st_size
            assert await fetch(s.opener(PATH), part, final) == (len(data), hashlib.sha256(data).hexdigest())
            assert s.servicer.calls[-1] == (PATH, left)   # resumed, not restarted

    run(body())
    assert final.read_bytes() == data and not part.exists()


@pytest.mark.timeout(30)
def test_stale_part_files_are_handled(site: SiteConfig, tmp_path: Path) -> None:
    _, data = put(site, PATH, MiB + 3)
    part, final = dest(tmp_path)

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root)) as s:
            part.write_bytes(os.urandom(2 * MiB))   # longer than the source: start over
            assert await fetch(s.opener(PATH), part, final) == (len(data), hashlib.sha256(data).hexdigest())
            final.unlink()
            part.write_bytes(b"x" * 1000)           # same length prefix, wrong bytes: digest fails
            with pytest.raises(TransferFailed, match="sha256 mismatch"):
                await fetch(s.opener(PATH), part, final)
            assert_nothing_left(part, final)

    run(body())


def test_part_file_keeps_every_byte_whichever_way_it_is_written(tmp_path: Path) -> None:
    """Direct (staged) writes, page-cache tails and a flush at an unaligned offset all land in order."""
    data = os.urandom(3 * STAGE + 5000)
    pieces = [STAGE // 2, STAGE // 2, 700, STAGE, 1, STAGE - 1]   # then the rest after a reopen
    f = PartFile(tmp_path / ".x.part")
    at = 0
    for n in pieces:
        f.append(data[at:at + n])
        f.hash_update(data[at:at + n])
        at += n
        if n == 700:
            f.flush()   # a broken stream: the stage goes through the page cache
            assert (tmp_path / ".x.part").stat().st_size == at
    f.flush()
    f.close()
    again = PartFile(tmp_path / ".x.part")   # a resumed fetch re-hashes what is there
    assert again.length == at and again.hash.hexdigest() == hashlib.sha256(data[:at]).hexdigest()
    again.append(data[at:])
    again.hash_update(data[at:])
    again.sync()
    assert (tmp_path / ".x.part").read_bytes() == data
    assert again.hash.hexdigest() == hashlib.sha256(data).hexdigest() and again.length == len(data)


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_unreachable_source_gives_up_with_unavailable(site: SiteConfig, tmp_path: Path) -> None:
    put(site, PATH, 10)
    part, final = dest(tmp_path)

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root)) as s:
            await s.server.stop(None)
            downloader = Downloader(s.opener(PATH), part, final, policy=FAST)
            with pytest.raises(TransferFailed) as info:
                await downloader.run()
            assert info.value.code is Code.UNAVAILABLE and "gave up after 3 attempts" in info.value.message
            assert downloader.attempts == 4

    run(body())
    assert_nothing_left(part, final)


BAD_PATHS = [
    ("/../x", grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
    ("/../../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    ("/a/%2e%2e/b", grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    ("/a//b", grpc.StatusCode.INVALID_ARGUMENT, "''"),
    (f"/alice/{JOB}/./out.bin", grpc.StatusCode.INVALID_ARGUMENT, "'.'"),
    (f"/alice/{JOB}\\..\\x/out.bin", grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    (f"/alice/{JOB}/out.bin\x00", grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    (f"alice/{JOB}/out.bin", grpc.StatusCode.INVALID_ARGUMENT, "must start with '/'"),
    (f"/alice/{JOB}", grpc.StatusCode.INVALID_ARGUMENT, "must name a file"),
    (f"/alice/{JOB}/missing", grpc.StatusCode.NOT_FOUND, "no file"),
    (f"/alice/{JOB}/escape", grpc.StatusCode.NOT_FOUND, "no file"),        # symlink to a file outside
    (f"/alice/{'e' * 26}/secret", grpc.StatusCode.NOT_FOUND, "no file"),   # job dir linked outside
    (f"/alice/{'d' * 26}/out.bin", grpc.StatusCode.NOT_FOUND, "no file"),  # a directory
    (f"/alice/{JOB}/fifo", grpc.StatusCode.NOT_FOUND, "no file"),
]


@pytest.mark.timeout(30)
def test_bad_paths_are_refused_with_the_right_code(site: SiteConfig, tmp_path: Path) -> None:
    put(site, PATH, 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("top secret")
    job_dir = site.files_root / "alice" / JOB
    (job_dir / "escape").symlink_to(outside / "secret")
    (site.files_root / "alice" / ("e" * 26)).symlink_to(outside)
    (site.files_root / "alice" / ("d" * 26) / "out.bin").mkdir(parents=True)
    os.mkfifo(job_dir / "fifo")
    twin = site.files_root / "alice" / ("m" * 26)
    twin.symlink_to(JOB)   # a memo hit: the job directory links to its sibling

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root)) as s:
            for path, code, fragment in BAD_PATHS:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in s.stub.Read(files_pb2.ReadRequest(path=path)):
                        pass
                assert (path, info.value.code()) == (path, code)
                assert fragment in (info.value.details() or ""), (path, info.value.details())
            chunks = [c async for c in s.stub.Read(files_pb2.ReadRequest(path=f"/alice/{'m' * 26}/out.bin"))]
            assert [len(c.data) for c in chunks] == [100]

    run(body())
    assert resolve_path(site.files_root, f"/alice/{'m' * 26}/out.bin") == (job_dir / "out.bin").resolve()


@pytest.mark.timeout(30)
def test_offsets(site: SiteConfig, tmp_path: Path) -> None:
    real, data = put(site, PATH, 3 * MiB + 1)
    put(site, f"/alice/{JOB}/empty", 0)
    digest = hashlib.sha256(data).hexdigest()

    async def read(s_stub: object, path: str, offset: int) -> list[files_pb2.Chunk]:
        return [c async for c in s_stub.Read(files_pb2.ReadRequest(path=path, offset=offset))]  # type: ignore[attr-defined]

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root)) as s:
            for offset in (len(data) + 1, -1):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await read(s.stub, PATH, offset)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "outside the file" in (info.value.details() or "")
            end = await read(s.stub, PATH, len(data))   # nothing left, but size and digest still
            assert [(c.offset, c.data, c.size, c.sha256) for c in end] == [(len(data), b"", len(data), digest)]
            tail = await read(s.stub, PATH, 2 * MiB + 5)
            assert [c.offset for c in tail] == [2 * MiB + 5] and tail[0].data == data[2 * MiB + 5:]
            assert (tail[0].size, tail[0].sha256) == (len(data), digest)
            part, final = dest(tmp_path)
            assert await fetch(s.opener(f"/alice/{JOB}/empty"), part, final) == (0, hashlib.sha256().hexdigest())
            assert final.read_bytes() == b""
        with pytest.raises(BrokerError) as outside:
            async for _ in read_chunks(real, 0, within=tmp_path / "elsewhere"):
                pass
        assert outside.value.code is Code.NOT_FOUND

    run(body())


# --- tokens ------------------------------------------------------------------------------

class Keys:
    def __init__(self) -> None:
        self.users = {name: Ed25519PrivateKey.generate() for name in ("alice", "john", "bob")}
        self.cluster = Ed25519PrivateKey.generate()   # the destination broker

    def roots(self) -> dict[str, list[bytes]]:
        return {n: [k.public_key().public_bytes_raw()] for n, k in self.users.items()}

    def verify(self, token: object) -> tokens.Verified:
        return tokens.verify(token, audience="sns", trusted_root_keys=self.roots(),  # type: ignore[arg-type]
                             presenter_key_id=tokens.key_id(self.cluster.public_key()))

    def delegated(self, user: str, scopes: list[str]) -> tokens.Verified:
        return self.verify(tokens.issue(self.users[user], subject=user, audience="sns", scopes=scopes,
                                        confirm=tokens.key_id(self.cluster.public_key()), max_depth=1))


def denied(verified: tokens.Verified, path: str, fragment: str, code: Code = Code.PERMISSION_DENIED) -> None:
    with pytest.raises(BrokerError) as info:
        authorize_read(verified, path)
    assert info.value.code is code
    assert fragment in info.value.message


def test_authorize_read() -> None:
    keys = Keys()
    authorize_read(keys.delegated("alice", [f"files.read:{PATH}"]), PATH)
    authorize_read(keys.delegated("alice", ["files.read:/alice/"]), PATH)
    denied(keys.delegated("alice", ["jobs.submit", f"jobs.read:/{JOB}"]), PATH, "does not grant")
    denied(keys.delegated("alice", [f"files.read:/alice/{JOB}/other"]), PATH, "does not grant")
    denied(keys.delegated("john", ["files.read:/john/"]), f"/johnathan/{JOB}/out.bin", "does not grant")
    denied(keys.delegated("john", ["files.read:/john"]), f"/johnathan/{JOB}/out.bin", "does not grant")
    denied(keys.delegated("bob", ["files.read:/alice/"]), PATH, "cannot delegate files of 'alice'")
    denied(keys.delegated("bob", ["files.read:/"]), PATH, "cannot delegate files of 'alice'")
    denied(keys.delegated("alice", ["files.read:/"]), "/alice/../x/y", "plain file name", Code.INVALID_ARGUMENT)
    # An attenuated chain narrows to one file; the broker holding it may pass on no more.
    broker2 = Ed25519PrivateKey.generate()
    root = tokens.issue(keys.users["alice"], subject="alice", audience="sns", scopes=["files.read:/alice/"],
                        confirm=tokens.key_id(broker2.public_key()), max_depth=2)
    narrowed = tokens.attenuate(root, broker2, confirm=tokens.key_id(keys.cluster.public_key()),
                                scopes=[f"files.read:{PATH}"])
    authorize_read(keys.verify(narrowed), PATH)
    denied(keys.verify(narrowed), f"/alice/{JOB}/other", "does not grant")


@pytest.mark.timeout(30)
def test_fetch_without_permission_fails_at_once(site: SiteConfig, tmp_path: Path) -> None:
    put(site, PATH, 2 * MiB)
    keys = Keys()
    part, final = dest(tmp_path)
    wrong = tokens.encode(tokens.issue(keys.users["alice"], subject="alice", audience="sns",
                                       scopes=[f"files.read:/alice/{JOB}/other"],
                                       confirm=tokens.key_id(keys.cluster.public_key())))
    right = tokens.encode(tokens.issue(keys.users["alice"], subject="alice", audience="sns",
                                       scopes=[f"files.read:/alice/{JOB}/"],
                                       confirm=tokens.key_id(keys.cluster.public_key())))

    async def body() -> None:
        async with serving(site, FilesServicer(site.files_root, verifier=keys.verify)) as s:
            for token, code, fragment in ((wrong, Code.PERMISSION_DENIED, "does not grant"),
                                          ("", Code.UNAUTHENTICATED, "no token"),
                                          (right[:-8], Code.UNAUTHENTICATED, "")):
                downloader = Downloader(s.opener(PATH, token), part, final, policy=FAST)
                with pytest.raises(TransferFailed) as info:
                    await downloader.run()
                assert info.value.code is code and fragment in info.value.message
                assert downloader.attempts == 1
                assert_nothing_left(part, final)
            assert (await fetch(s.opener(PATH, right), part, final))[0] == 2 * MiB

    run(body())


def test_a_link_to_another_users_file_is_not_found(site: SiteConfig) -> None:
    """A job of alice's can make links in its directory; none of them reaches bob's files."""
    bob_real, _ = put(site, f"/bob/{'b' * 26}/output", 10)
    alice_dir = site.files_root / "alice" / JOB
    alice_dir.mkdir(parents=True, exist_ok=True)
    (alice_dir / "stolen").symlink_to(Path("..") / ".." / "bob" / ("b" * 26) / "output")
    (alice_dir / "absolute").symlink_to(bob_real)
    (site.files_root / "alice" / ("c" * 26)).symlink_to(Path("..") / "bob" / ("b" * 26))   # a forged "memo hit"
    for path in (f"/alice/{JOB}/stolen", f"/alice/{JOB}/absolute", f"/alice/{'c' * 26}/output"):
        with pytest.raises(BrokerError) as info:
            resolve_path(site.files_root, path)
        assert info.value.code is Code.NOT_FOUND and "no file" in info.value.message
    assert resolve_path(site.files_root, f"/bob/{'b' * 26}/output") == bob_real.resolve()
