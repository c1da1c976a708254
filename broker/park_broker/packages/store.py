"""The site's package store: uploaded and index-fetched wheels, one directory per (namespace, name, version).

Layout, under `<state>/packages/`:

    <ns>/<name>/<version>/                   `pip install --no-deps --target` of one wheel; first on sys.path
    <ns>/<name>/<version>/.park-wheel.json   the record: file name, sha256, size, where it came from
    <ns>/<name>/<version>/.park-wheel/*.whl  the exact bytes that were installed
    .staging/                                work directories; never visible under a package name

`<name>` is the PEP 503 normalized name and `<version>` the PEP 440 normalized
version, so two versions of one package coexist and a job picks one by pin.

Packages have owners. `<ns>` is `~<user>` for what a user uploaded, and
`@site` for what is there for everyone: what an admin published site-wide and
what the site installed from its own package index. A job's `requires=`
resolves its owner's own packages first, then site-wide ones, so nobody can
take a name before its author, or shadow another user's package: every user
has a `mymodel==1.0` of their own to upload. (A store of the layout before
namespaces, `<name>/<version>/` at the top, is moved under `@site` on open:
those packages were everyone's.)

Guarantees:
- Nothing half-installed is ever visible: a wheel is copied (and hashed while
  copying, so the bytes checked are the bytes installed), checked, installed
  into a staging directory and only then renamed into place in one step. A
  version directory without its record is ignored. Every failure removes its
  staging directory, so a refused wheel leaves nothing behind.
- A wheel is refused before pip sees it unless its digest matches, it is a zip
  whose members are plain relative paths (no absolute paths, `..`, backslashes,
  NUL or symlinks) within the size limits, and its file name, dist-info
  directory and METADATA agree on name and version.
- A (name, version) is immutable: the same bytes again are a no-op, other bytes
  are refused with a message saying to bump the version.
- Each pin is installed at most once even when several threads ask at once
  (a lock per pin); methods are synchronous and safe to call from threads.
  One PackageStore per root at a time: opening one clears the staging area.
- A pin the index lacks is not asked for again for `ABSENT_TTL` seconds, so
  repeated submissions of an unmeetable job do not each run pip.

This module never imports grpc: failures are `PackageError`s, which are
`BrokerError`s, so the servicer maps them like every other domain error.
"""
from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, canonicalize_version, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from park.config import sync_directory
from park_broker.errors import BrokerError, Code

log = logging.getLogger(__name__)

RECORD_FILE = ".park-wheel.json"
WHEEL_DIR = ".park-wheel"
STAGING_DIR = ".staging"
SITE_WIDE = "@site"
ABSENT_TTL = 60.0
_PIP_TIMEOUT = 600.0  # seconds; a wheel install is local work, so this only catches a hung pip
_SHA256 = re.compile(r"[0-9a-f]{64}")

Kind = Literal["invalid", "conflict", "missing"]
_CODE_OF: dict[Kind, Code] = {
    "invalid": Code.INVALID_ARGUMENT,  # the caller sent something that can never be installed
    "conflict": Code.FAILED_PRECONDITION,  # the site already has other bytes under that version
    "missing": Code.FAILED_PRECONDITION,  # the site cannot meet a pin, even from its index
}


MAX_PIN_LENGTH = 200

class PackageError(BrokerError):
    """A package could not be installed or resolved; `kind` says why, the message how to fix it."""

    def __init__(self, kind: Kind, message: str):
        super().__init__(_CODE_OF[kind], message)
        self.kind = kind


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps that keep a hostile wheel from filling the disk (zip bombs included)."""

    max_wheel_bytes: int = 256 << 20
    max_unpacked_bytes: int = 512 << 20
    max_members: int = 20_000
    max_ratio: int = 200  # uncompressed/compressed, for members past `ratio_floor`
    ratio_floor: int = 1 << 20


@dataclass(frozen=True, slots=True)
class PackageRef:
    name: str  # PEP 503 normalized
    version: str  # PEP 440 normalized
    sha256: str  # of the wheel file that was installed
    path: Path  # the install directory: put it first on sys.path
    owner: str = ""  # the user whose upload it is; "" for a site-wide package


def namespace(owner: str) -> str:
    """Where `owner`'s packages live ("" for site-wide)."""
    return f"~{owner}" if owner else SITE_WIDE


class PackageStore:
    """All packages of one site. `index` is a wheelhouse directory, an index URL, or None."""

    def __init__(self, root: Path, index: str | None = None, *, limits: Limits = Limits()):
        self.root = root
        self.index = index
        self.limits = limits
        self._staging = root / STAGING_DIR
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._absent: dict[tuple[str, str], float] = {}  # pin -> monotonic time the index lacked it
        self._staging.mkdir(parents=True, exist_ok=True)
        (root / SITE_WIDE).mkdir(exist_ok=True)
        for legacy in sorted(root.iterdir()):
            if legacy.is_dir() and not legacy.name.startswith((".", "@", "~")):
                os.rename(legacy, root / SITE_WIDE / legacy.name)
                log.info("package %s moved to the site-wide namespace", legacy.name)
        for leftover in self._staging.iterdir():
            # Only an interrupted install leaves work here, and it was never visible: drop it.
            log.warning("removing interrupted package install", extra={"path": str(leftover)})
            shutil.rmtree(leftover, ignore_errors=True)

    # -- installing ---------------------------------------------------------------------------

    def install_wheel(self, data_path: Path, expected_sha256: str, filename: str | None = None, *,
                      owner: str = "") -> PackageRef:
        """Install the wheel at `data_path` (named `filename`, default its own name) as `owner`'s
        ("" for site-wide).

        Returns the new ref, or the existing one when the same bytes are already
        installed. Raises PackageError("invalid") for a bad wheel or digest and
        PackageError("conflict") for other bytes under an installed version; in
        every failure nothing is left under the root.
        """
        filename = filename if filename is not None else data_path.name
        name, version = parse_wheel_name(filename)
        expected = expected_sha256.lower()
        if not _SHA256.fullmatch(expected):
            raise PackageError("invalid", "the wheel's sha256 must be 64 hexadecimal digits")
        with self._lock(owner, name, version):
            work = Path(tempfile.mkdtemp(dir=self._staging))
            try:
                return self._install_locked(data_path, filename, owner, name, version, expected, work,
                                            source="upload")
            finally:
                shutil.rmtree(work, ignore_errors=True)

    def _install_locked(self, data_path: Path, filename: str, owner: str, name: str, version: str,
                        expected: str | None, work: Path, *, source: str) -> PackageRef:
        # The copy is what gets checked and installed, so the caller's file changing later cannot matter.
        wheel = work / filename
        actual, size = _copy_hashing(data_path, wheel, self.limits.max_wheel_bytes)
        if expected is not None and not hmac.compare_digest(actual, expected):
            raise PackageError("invalid", f"{filename}: sha256 is {actual}, but the upload said {expected}")
        existing = self._installed(owner, name, version)
        if existing is not None:
            return _same_or_conflict(existing, actual)
        _check_wheel(wheel, name, version, self.limits)
        tree = work / "tree"
        _pip(["install", "--no-deps", "--no-index", "--no-warn-script-location", "--target", str(tree), str(wheel)],
             what=f"could not install {filename}")
        found = installed_versions([tree])
        if found.get(name) is None or Version(found[name]) != Version(version):
            raise PackageError("invalid", f"{filename} installed no distribution {name} {version}")
        (tree / WHEEL_DIR).mkdir()
        wheel.rename(tree / WHEEL_DIR / filename)
        record = {"name": name, "version": version, "sha256": actual, "size": size, "filename": filename,
                  "source": source, "installed_at": time.time()}
        (tree / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        _fsync_tree(tree)  # so that what the rename reveals has reached the disk
        final = self.root / namespace(owner) / name / version
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tree, final)  # atomic; fails rather than merging if another process got there first
        except OSError:
            winner = self._installed(owner, name, version)
            if winner is None:
                raise
            return _same_or_conflict(winner, actual)
        sync_directory(final.parent)
        log.info("installed package %s %s for %s", name, version, owner or "the whole site",
                 extra={"package": name, "version": version, "sha256": actual, "source": source, "owner": owner})
        return PackageRef(name, version, actual, final, owner)

    def ensure(self, requires: builtins.list[str], owner: str) -> builtins.list[Path]:
        """`resolve` for `owner`, after installing site-wide from the site's index any pin the site lacks.

        Each missing pin is fetched and installed once, even when several threads
        ask at once. Raises PackageError("missing") when the index has no wheel
        for a pin either, listing the versions the site has.
        """
        pins = parse_pins(requires)
        if self.index is not None:
            for name, version in pins:
                if self._visible(owner, name, version) is None:
                    with self._lock("", name, version):
                        # Another thread may have installed it, or just learnt that the index lacks it.
                        if self._installed("", name, version) is None and not self._recently_absent(name, version):
                            self._fetch_and_install(name, version)
        return self._resolve_pins(pins, owner)

    def _fetch_and_install(self, name: str, version: str) -> None:
        assert self.index is not None
        work = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            download = work / "download"
            where = ["--index-url", self.index] if _is_url(self.index) else ["--no-index", "--find-links", self.index]
            try:
                _pip(["download", "--no-deps", "--only-binary=:all:", "--dest", str(download), *where,
                      f"{name}=={version}"], what=f"no wheel for {name}=={version}", isolated=not _is_url(self.index))
            except PackageError as e:
                log.info("package index cannot provide", extra={"package": name, "version": version, "detail": str(e)})
                self._absent[(name, version)] = time.monotonic()
                return  # resolve() then reports it missing, with what the site has
            wheels = sorted(download.glob("*.whl"))
            if len(wheels) != 1 or not _same_pin(parse_wheel_name(wheels[0].name), (name, version)):
                raise PackageError("invalid", f"the package index gave {[w.name for w in wheels]} for {name}=={version}")
            # No digest to compare: the site's own index is trusted; the wheel is still checked.
            self._install_locked(wheels[0], wheels[0].name, "", name, version, None, work, source=self.index)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _recently_absent(self, name: str, version: str) -> bool:
        since = self._absent.get((name, version))
        return since is not None and time.monotonic() - since < ABSENT_TTL

    # -- reading ------------------------------------------------------------------------------

    def resolve(self, requires: builtins.list[str], owner: str) -> builtins.list[Path]:
        """The install directories of `owner`'s (else site-wide) packages for exact pins `name==version`, in
        order, without installing.

        Raises PackageError("invalid") for anything but an exact pin and
        PackageError("missing") naming every unmet pin and the versions the site has.
        """
        return self._resolve_pins(parse_pins(requires), owner)

    def _resolve_pins(self, pins: builtins.list[tuple[str, str]], owner: str) -> builtins.list[Path]:
        paths: builtins.list[Path] = []
        missing: builtins.list[str] = []
        for name, version in pins:
            ref = self._visible(owner, name, version)
            if ref is not None:
                paths.append(ref.path)
                continue
            have = [r.version for r in self.list(owner) if r.name == name]
            missing.append(f"{name}=={version} (this site has {', '.join(have) if have else 'no version'} of {name})")
        if missing:
            hint = " or from its package index" if self.index is not None else ""
            raise PackageError("missing", f"requirements not available on this site{hint}: " + "; ".join(missing)
                               + ". Pin a version the site has, or upload it with park.install_service")
        return paths

    def _visible(self, owner: str, name: str, version: str) -> PackageRef | None:
        """What `requires=` of a job of `owner` gets for a pin: their own package, else the site-wide one."""
        return (self._installed(owner, name, version) if owner else None) or self._installed("", name, version)

    def _installed(self, owner: str, name: str, version: str) -> PackageRef | None:
        wanted = Version(version)
        for ref in self._refs_of(self.root / namespace(owner) / name, owner):
            if Version(ref.version) == wanted:  # "1.0" and "1.0.0" are one version
                return ref
        return None

    def _refs_of(self, name_dir: Path, owner: str) -> builtins.list[PackageRef]:
        refs = []
        for version_dir in sorted(name_dir.iterdir()) if name_dir.is_dir() else []:
            try:
                record = json.loads((version_dir / RECORD_FILE).read_text())
                refs.append(PackageRef(record["name"], record["version"], record["sha256"], version_dir, owner))
            except (OSError, ValueError, KeyError) as e:
                # Not ours, or damaged by hand: never offer it to a job, but keep it for the operator to inspect.
                log.warning("ignoring package directory without a valid record",
                            extra={"path": str(version_dir), "error": repr(e)})
        return sorted(refs, key=lambda r: Version(r.version))

    def _lock(self, owner: str, name: str, version: str) -> threading.Lock:
        key = (owner, name, canonicalize_version(version))
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # `builtins.list` in this class's annotations: a type checker would read `list` as this method.
    def list(self, owner: str | None = None) -> builtins.list[PackageRef]:  # noqa: A003 -- the RPC's name
        """The packages `owner` can require (their own, then site-wide ones), or every user's for None; each
        namespace by name then version."""
        spaces = [d for d in sorted(self.root.iterdir()) if d.name.startswith(("~", "@"))] if owner is None else [
            self.root / namespace(owner), self.root / SITE_WIDE] if owner else [self.root / SITE_WIDE]
        refs: builtins.list[PackageRef] = []
        for space in spaces:
            who = space.name[1:] if space.name.startswith("~") else ""
            for name_dir in sorted(space.iterdir()) if space.is_dir() else []:
                refs.extend(self._refs_of(name_dir, who))
        return refs


def installed_versions(dist_dirs: list[Path]) -> dict[str, str]:
    """Normalized name -> exact version of every distribution in `dist_dirs`; the first dir wins, as on sys.path."""
    found: dict[str, str] = {}
    for directory in dist_dirs:
        for dist in metadata.distributions(path=[str(directory)]):
            found.setdefault(canonicalize_name(dist.metadata["Name"] or ""), dist.version)
    found.pop("", None)
    return found


def parse_pins(requires: list[str]) -> list[tuple[str, str]]:
    """(normalized name, normalized version) of each exact pin; PackageError("invalid") for anything else."""
    pins: dict[str, str] = {}
    for text in requires:
        if len(text) > MAX_PIN_LENGTH:   # name and version become directory names
            raise PackageError("invalid", f"requirement {text[:60]!r}... is longer than {MAX_PIN_LENGTH} characters")
        try:
            req = Requirement(text)
            specs = list(req.specifier)
            if req.url or req.extras or req.marker or len(specs) != 1 or specs[0].operator != "==" \
                    or "*" in specs[0].version:
                raise InvalidRequirement
            version = str(Version(specs[0].version))
        except (InvalidRequirement, InvalidVersion):
            raise PackageError("invalid", f"requirement {text!r} must be an exact pin like 'name==1.2' "
                                          "(no ranges, wildcards, extras, markers or URLs)") from None
        name = canonicalize_name(req.name)
        if pins.setdefault(name, version) != version:
            raise PackageError("invalid", f"{name} is pinned twice, to {pins[name]} and {version}")
    return list(pins.items())


def parse_wheel_name(filename: str) -> tuple[str, str]:
    """(normalized name, normalized version) a wheel's file name declares."""
    if "/" in filename or "\\" in filename or "\0" in filename:
        raise PackageError("invalid", "the wheel's file name must be a plain name, not a path")
    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion) as e:
        raise PackageError("invalid", f"{filename!r} is not a wheel file name (PEP 427): {e}") from None
    return str(name), str(version)


def _same_pin(a: tuple[str, str], b: tuple[str, str]) -> bool:
    return a[0] == b[0] and Version(a[1]) == Version(b[1])


def _same_or_conflict(existing: PackageRef, sha256: str) -> PackageRef:
    if hmac.compare_digest(existing.sha256, sha256):
        return existing
    raise PackageError("conflict", f"{existing.name} {existing.version} is already installed on this site with "
                                   f"different contents (sha256 {existing.sha256[:12]}…); a version never changes "
                                   "once installed: bump the version and upload again")


def _check_wheel(wheel: Path, name: str, version: str, limits: Limits) -> None:
    """Refuse anything pip should not be asked to unpack; see the module docstring."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
            _check_members(infos, wheel.name, limits)
            dist_infos = {i.filename.split("/", 1)[0] for i in infos if i.filename.split("/", 1)[0].endswith(".dist-info")}
            if len(dist_infos) != 1:
                raise PackageError("invalid", f"{wheel.name} must hold exactly one .dist-info directory, "
                                              f"not {len(dist_infos)}")
            dist_info = dist_infos.pop()
            dname, _, dversion = dist_info.removesuffix(".dist-info").partition("-")
            meta_info = zf.getinfo(f"{dist_info}/METADATA")
            if meta_info.file_size > 1 << 20:
                raise PackageError("invalid", f"{wheel.name}: METADATA is larger than 1 MiB")
            meta = HeaderParser().parsestr(zf.read(meta_info).decode("utf-8", "replace"))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, NotImplementedError, ValueError) as e:
        raise PackageError("invalid", f"{wheel.name} is not a valid wheel (a zip with METADATA): {e}") from None
    claimed = {"file name": (name, version), "dist-info directory": (dname, dversion),
               "METADATA": (meta.get("Name", ""), meta.get("Version", ""))}
    for where, (n, v) in claimed.items():
        try:
            same = canonicalize_name(n) == name and Version(v) == Version(version)
        except InvalidVersion:
            same = False
        if not same:
            raise PackageError("invalid", f"{wheel.name}: its {where} says {n} {v}, its file name {name} {version}")


def _check_members(infos: list[zipfile.ZipInfo], label: str, limits: Limits) -> None:
    if len(infos) > limits.max_members:
        raise PackageError("invalid", f"{label} has {len(infos)} members; the limit is {limits.max_members}")
    total = 0
    seen: set[str] = set()
    for info in infos:
        member = info.filename
        parts = member.rstrip("/").split("/")
        if (not member or member.startswith("/") or "\\" in member or "\0" in member or re.match(r"[A-Za-z]:", member)
                or any(p in ("", ".", "..") for p in parts)):
            raise PackageError("invalid", f"{label}: member {member!r} is not a plain relative path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PackageError("invalid", f"{label}: member {member!r} is a symbolic link")
        if member in seen:
            raise PackageError("invalid", f"{label}: member {member!r} appears twice")
        seen.add(member)
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise PackageError("invalid", f"{label} unpacks to more than {limits.max_unpacked_bytes} bytes")
        if info.file_size > limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise PackageError("invalid", f"{label}: member {member!r} is compressed more than "
                                          f"{limits.max_ratio}:1 (a zip bomb?)")


def _copy_hashing(src: Path, dst: Path, max_bytes: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            while chunk := fin.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise PackageError("invalid", f"the wheel is larger than {max_bytes} bytes")
                digest.update(chunk)
                fout.write(chunk)
    except OSError as e:
        raise PackageError("invalid", f"cannot read the wheel: {e.strerror}") from None
    return digest.hexdigest(), size


def _pip(args: list[str], *, what: str, isolated: bool = True) -> None:
    # --isolated: ignore the broker user's pip config and PIP_* variables, which could point
    # installs at another index; a URL index keeps them, since proxies and certificates live there.
    cmd = [sys.executable, "-m", "pip", *args[:1], "--disable-pip-version-check", "--no-input",
           *(["--isolated"] if isolated else []), *args[1:]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PackageError("invalid", f"{what}: pip did not finish in {_PIP_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise PackageError("invalid", f"{what}: pip said:\n{tail}")


def _is_url(index: str) -> bool:
    return re.match(r"[a-z][a-z0-9+.-]*://", index) is not None


def _fsync_tree(top: Path) -> None:
    for dirpath, _, filenames in os.walk(top):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(dirpath))
