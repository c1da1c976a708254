"""The package store (broker side) and wheel building (client side), without any transport.

Sample projects are written into temporary directories and built into real
wheels with `park.wheels.build_wheel`; bad wheels are made by hand with
`zipfile`, since no build tool would make them.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from park.wheels import WheelError, build_wheel, distribution_versions, sha256_file
from park_broker.errors import Code
from park_broker.packages.store import Limits, PackageError, PackageRef, PackageStore, installed_versions

pytestmark = pytest.mark.timeout(120)

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "mymodel"
version = "{version}"

[tool.setuptools]
packages = ["mymodel"]
"""


def write_project(directory: Path, version: str, body: str = "") -> Path:
    (directory / "mymodel").mkdir(parents=True)
    (directory / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    (directory / "mymodel" / "__init__.py").write_text(f"__version__ = {version!r}\n{body}")
    return directory


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding real wheels of mymodel 1.0 and 1.1."""
    house = tmp_path_factory.mktemp("wheelhouse")
    for version in ("1.0", "1.1"):
        project = write_project(tmp_path_factory.mktemp(f"mymodel-{version}"), version)
        build_wheel(project, house)
    return house


def wheel_of(house: Path, version: str) -> Path:
    return house / f"mymodel-{version}-py3-none-any.whl"


def install(store: PackageStore, wheel: Path) -> PackageRef:
    return store.install_wheel(wheel, sha256_file(wheel))


def leftovers(root: Path) -> list[Path]:
    """Everything under the store's root except its (empty) staging and site-wide directories."""
    return sorted(p for p in root.rglob("*") if p not in (root / ".staging", root / "@site"))


def imported_version(path: Path, tmp_path: Path) -> str:
    code = f"import sys; sys.path.insert(0, {str(path)!r}); import mymodel; print(mymodel.__version__)"
    # -I: no PYTHONPATH, no user site, no current directory: only `path` can provide mymodel.
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_two_versions_side_by_side(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    old, new = install(store, wheel_of(wheelhouse, "1.0")), install(store, wheel_of(wheelhouse, "1.1"))
    assert [(r.name, r.version) for r in store.list()] == [("mymodel", "1.0"), ("mymodel", "1.1")]
    assert store.resolve(["mymodel==1.0"], "alice") == [tmp_path / "packages" / "@site" / "mymodel" / "1.0"]
    assert store.resolve(["MyModel==1.1.0"], "alice") == [tmp_path / "packages" / "@site" / "mymodel" / "1.1"]  # normalized
    assert imported_version(store.resolve(["mymodel==1.0"], "alice")[0], tmp_path) == "1.0"
    assert imported_version(store.resolve(["mymodel==1.1"], "alice")[0], tmp_path) == "1.1"
    assert installed_versions(store.resolve(["mymodel==1.1"], "alice")) == {"mymodel": "1.1"}
    assert (old.sha256, new.sha256) == (sha256_file(wheel_of(wheelhouse, "1.0")), sha256_file(wheel_of(wheelhouse, "1.1")))
    kept = old.path / ".park-wheel" / wheel_of(wheelhouse, "1.0").name
    assert kept.read_bytes() == wheel_of(wheelhouse, "1.0").read_bytes()


def test_identical_reinstall_is_a_no_op(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    first = install(store, wheel_of(wheelhouse, "1.0"))
    record = first.path / ".park-wheel.json"
    before = record.stat().st_mtime_ns
    assert install(store, wheel_of(wheelhouse, "1.0")) == first
    assert record.stat().st_mtime_ns == before
    assert list((tmp_path / "packages" / ".staging").iterdir()) == []


def test_different_bytes_for_an_installed_version_are_refused(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    original = install(store, wheel_of(wheelhouse, "1.0"))
    changed = build_wheel(write_project(tmp_path / "changed", "1.0", body="FIXED = True\n"), tmp_path / "out")
    with pytest.raises(PackageError) as err:
        install(store, changed)
    assert (err.value.kind, err.value.code) == ("conflict", Code.FAILED_PRECONDITION)
    assert "mymodel 1.0 is already installed" in err.value.message and "bump the version" in err.value.message
    assert store.list() == [original]
    assert imported_version(original.path, tmp_path) == "1.0"


def _zip(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _evil(meta_version: str = "1.0", **extra: bytes) -> dict[str, bytes]:
    return {"evil/__init__.py": b"", "evil-1.0.dist-info/METADATA": f"Name: evil\nVersion: {meta_version}\n".encode(),
            "evil-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            "evil-1.0.dist-info/RECORD": b"", **extra}


EVIL = "evil-1.0-py3-none-any.whl"
BAD_WHEELS = {
    "not a zip": (lambda d: _write(d / EVIL, b"this is not a zip"), "is not a valid wheel"),
    "path traversal": (lambda d: _zip(d / EVIL, _evil(**{"../evil.py": b"x"})), "'../evil.py' is not a plain relative"),
    "absolute member": (lambda d: _zip(d / EVIL, _evil(**{"/tmp/evil.py": b"x"})), "'/tmp/evil.py' is not a plain"),
    "backslash": (lambda d: _zip(d / EVIL, _evil(**{"evil\\..\\x.py": b"x"})), "is not a plain relative path"),
    "symlink": (lambda d: _zip(d / EVIL, _evil(), symlink="evil/link"), "'evil/link' is a symbolic link"),
    "metadata version": (lambda d: _zip(d / EVIL, _evil(meta_version="2.0")), "its METADATA says evil 2.0"),
    "no metadata": (lambda d: _zip(d / EVIL, {"evil/__init__.py": b""}), "exactly one .dist-info directory, not 0"),
    "zip bomb": (lambda d: _zip(d / EVIL, _evil(**{"evil/zeros.bin": bytes(3 << 20)})), "compressed more than 200:1"),
    "bad file name": (lambda d: _zip(d / "evil.zip", _evil()), "is not a wheel file name"),
}


@pytest.mark.parametrize("case", BAD_WHEELS)
def test_bad_wheels_are_refused_and_leave_nothing(case: str, tmp_path: Path) -> None:
    make, fragment = BAD_WHEELS[case]
    wheel = make(tmp_path)
    store = PackageStore(tmp_path / "packages", None)
    with pytest.raises(PackageError) as err:
        install(store, wheel)
    assert (err.value.kind, err.value.code) == ("invalid", Code.INVALID_ARGUMENT)
    assert fragment in err.value.message
    assert leftovers(tmp_path / "packages") == [] and store.list() == []


def test_wrong_digest_and_renamed_wheel_are_refused(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    real = wheel_of(wheelhouse, "1.0")
    with pytest.raises(PackageError, match="sha256 is [0-9a-f]{64}, but the upload said 0{64}") as err:
        store.install_wheel(real, "0" * 64)
    assert err.value.kind == "invalid"
    renamed = shutil.copy(real, tmp_path / "othermodel-1.0-py3-none-any.whl")
    with pytest.raises(PackageError, match="its dist-info directory says mymodel 1.0, its file name othermodel 1.0"):
        install(store, Path(renamed))
    with pytest.raises(PackageError, match="its dist-info directory says mymodel 1.0, its file name mymodel 2.0"):
        store.install_wheel(real, sha256_file(real), filename="mymodel-2.0-py3-none-any.whl")
    assert leftovers(tmp_path / "packages") == []


def test_resolve_names_what_the_site_has(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    install(store, wheel_of(wheelhouse, "1.1"))
    install(store, wheel_of(wheelhouse, "1.0"))
    with pytest.raises(PackageError) as err:
        store.resolve(["mymodel==2.0", "other==1"], "alice")
    assert (err.value.kind, err.value.code) == ("missing", Code.FAILED_PRECONDITION)
    assert "mymodel==2.0 (this site has 1.0, 1.1 of mymodel)" in err.value.message
    assert "other==1 (this site has no version of other)" in err.value.message
    with pytest.raises(PackageError, match="mymodel is pinned twice, to 1.0 and 1.1"):
        store.resolve(["mymodel==1.0", "MyModel==1.1"], "alice")


@pytest.mark.parametrize("requirement", ["mymodel>=1.0", "mymodel", "mymodel==1.*", "mymodel[fast]==1.0",
                                         "mymodel==1.0; python_version > '3'", "mymodel ~= 1.0", "not a requirement"])
def test_only_exact_pins_are_accepted(requirement: str, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", None)
    with pytest.raises(PackageError, match="must be an exact pin like 'name==1.2'") as err:
        store.resolve([requirement], "alice")
    assert err.value.kind == "invalid"


def test_implicit_install_from_a_wheelhouse_happens_once(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", str(wheelhouse))
    installs: list[str] = []
    real_install = store._install_locked

    def counting(*args: object, **kwargs: object) -> object:
        installs.append(str(args[1]))
        return real_install(*args, **kwargs)  # type: ignore[arg-type]

    store._install_locked = counting  # type: ignore[method-assign]
    barrier = threading.Barrier(2)
    results: list[list[Path]] = []

    def ask() -> None:
        barrier.wait()
        results.append(store.ensure(["mymodel==1.1"], "alice"))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert results == [[tmp_path / "packages" / "@site" / "mymodel" / "1.1"]] * 2
    assert installs == ["mymodel-1.1-py3-none-any.whl"]
    assert store.ensure(["mymodel==1.1"], "alice") == results[0] and len(installs) == 1
    assert imported_version(results[0][0], tmp_path) == "1.1"
    with pytest.raises(PackageError, match=r"or from its package index: mymodel==9\.0 \(this site has 1\.1 of"):
        store.ensure(["mymodel==9.0"], "alice")
    assert [(r.name, r.version) for r in store.list()] == [("mymodel", "1.1")]
    assert list((tmp_path / "packages" / ".staging").iterdir()) == []


def test_build_wheel_reports_what_is_wrong(tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.py"
    lonely.write_text("X = 1\n")
    spec = importlib.util.spec_from_file_location("lonely", lonely)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(WheelError, match="module lonely .* is not part of a project: no pyproject.toml or setup.py"):
        build_wheel(module, tmp_path / "out")
    import grpc
    with pytest.raises(WheelError, match="module grpc is installed in .*-packages, not part of a source project"):
        build_wheel(grpc, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                           'backend-path = ["."]\n')
    (broken / "backend.py").write_text("def build_wheel(*a, **k):\n    raise RuntimeError('deliberate-failure-7')\n")
    with pytest.raises(WheelError, match="(?s)building a wheel of .*broken failed.*deliberate-failure-7"):
        build_wheel(broken, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_distribution_versions_pin_a_real_distribution() -> None:
    versions = distribution_versions("grpc.aio")
    assert versions["grpcio"] == importlib.metadata.version("grpcio")
    assert versions["typing-extensions"] == importlib.metadata.version("typing_extensions")
    assert "grpcio-tools" not in versions  # only behind grpcio's "protobuf" extra
    assert all(v == importlib.metadata.version(n) and Version(v) for n, v in versions.items())
    assert distribution_versions("os") == {}


def test_size_limits_refuse_before_unpacking(tmp_path: Path) -> None:
    wheel = _zip(tmp_path / EVIL, _evil(**{"evil/data.bin": bytes(range(256)) * 8}))
    tight = PackageStore(tmp_path / "packages", None, limits=Limits(max_unpacked_bytes=1000))
    with pytest.raises(PackageError, match=f"{EVIL} unpacks to more than 1000 bytes"):
        install(tight, wheel)
    few = PackageStore(tmp_path / "packages", None, limits=Limits(max_members=3))
    with pytest.raises(PackageError, match=f"{EVIL} has 5 members; the limit is 3"):
        install(few, wheel)
    small = PackageStore(tmp_path / "packages", None, limits=Limits(max_wheel_bytes=100))
    with pytest.raises(PackageError, match="the wheel is larger than 100 bytes"):
        install(small, wheel)
    assert leftovers(tmp_path / "packages") == []


def test_a_pin_the_index_lacks_is_not_fetched_again_at_once(wheelhouse: Path, tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages", str(wheelhouse))
    calls: list[tuple[str, str]] = []
    real_fetch = store._fetch_and_install

    def counting(name: str, version: str) -> None:
        calls.append((name, version))
        real_fetch(name, version)

    store._fetch_and_install = counting  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(PackageError, match=r"mymodel==7 \(this site has no version of mymodel\)") as err:
            store.ensure(["mymodel==7"], "alice")
        assert err.value.kind == "missing"
    assert calls == [("mymodel", "7")]


def test_packages_belong_to_their_uploader_and_site_wide_ones_to_everyone(wheelhouse: Path, tmp_path: Path) -> None:
    """Nobody takes a name before its author, nor shadows another user's package: each user has a namespace,
    `requires=` resolves the owner's own package first, then a site-wide one."""
    store = PackageStore(tmp_path / "packages", None)
    one = wheel_of(wheelhouse, "1.0")
    mine = store.install_wheel(one, sha256_file(one), owner="alice")
    assert mine.owner == "alice" and store.resolve(["mymodel==1.0"], "alice") == [mine.path]
    with pytest.raises(PackageError) as err:
        store.resolve(["mymodel==1.0"], "bob")
    assert err.value.kind == "missing" and "no version of mymodel" in err.value.message
    # Bob's own mymodel==1.0, other bytes: no conflict with alice's, and his jobs get his.
    other = tmp_path / "other"
    bobs_wheel = build_wheel(write_project(other, "1.0", body="BOB = 1\n"), tmp_path / "bobs")
    bobs = store.install_wheel(bobs_wheel, sha256_file(bobs_wheel), owner="bob")
    assert bobs.sha256 != mine.sha256 and store.resolve(["mymodel==1.0"], "bob") == [bobs.path]
    # Published site-wide (by an admin): everyone may use it; an owner's own still comes first.
    site = store.install_wheel(wheel_of(wheelhouse, "1.1"), sha256_file(wheel_of(wheelhouse, "1.1")))
    assert site.owner == "" and store.resolve(["mymodel==1.1"], "bob") == [site.path]
    assert [(r.owner, r.version) for r in store.list("alice")] == [("alice", "1.0"), ("", "1.1")]
    assert {(r.owner, r.version) for r in store.list()} == {("alice", "1.0"), ("bob", "1.0"), ("", "1.1")}


def test_a_store_of_the_layout_before_namespaces_is_kept_site_wide(wheelhouse: Path, tmp_path: Path) -> None:
    root = tmp_path / "packages"
    ref = PackageStore(root, None).install_wheel(wheel_of(wheelhouse, "1.0"), sha256_file(wheel_of(wheelhouse, "1.0")))
    os.rename(ref.path.parent, root / "mymodel")   # where the earlier layout kept it
    store = PackageStore(root, None)
    assert store.resolve(["mymodel==1.0"], "anyone") == [root / "@site" / "mymodel" / "1.0"]
