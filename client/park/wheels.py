"""The client's side of packages: build a wheel of a local project, and name exact versions.

- `build_wheel` finds the project a module belongs to (or takes a project
  directory) and builds it with the standard machinery, `pip wheel`, never by
  zipping files by hand. It returns one wheel in `out_dir` or raises
  `WheelError` saying what to fix; nothing else is left in `out_dir`.
- `distribution_versions` names the distribution that provides a module and the
  exact installed versions of it and of everything it requires, recursively,
  for memo keys (DESIGN §4). It reads `importlib.metadata` only and never imports
  the module.
- `sha256_file` is the digest an upload carries.

This module never talks to a broker; `park.install_service` does, with what it returns.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from packaging.markers import UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from park.errors import ParkError

PROJECT_FILES = ("pyproject.toml", "setup.py")
_BUILD_TIMEOUT = 900.0  # seconds; an isolated build may have to download its backend
_INSTALLED_DIRS = {"site-packages", "dist-packages"}


_NOT_SOURCE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".git", ".venv", "*.pyc")


class WheelError(ParkError):
    """A wheel could not be built: the module is not part of a project, or the build failed."""


def build_wheel(module_or_path: types.ModuleType | str | Path, out_dir: str | Path) -> Path:
    """Build a wheel of the project that `module_or_path` is (a directory) or belongs to (a module).

    Tries without build isolation first (fast, offline, uses the backend
    installed here), then with it (pip fetches the backend the project names).
    Returns the path of the wheel in `out_dir`. Raises WheelError with the tail
    of pip's output when both fail.
    """
    project = find_project(module_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for isolation in (["--no-build-isolation"], []):
        # A fresh directory per attempt, so the wheel found is the one this build made. The project is
        # built from a clean copy: the build leaves nothing in it, and leftovers of earlier builds
        # (build/, *.egg-info) cannot change the wheel, so an unchanged project rebuilds byte for byte.
        with tempfile.TemporaryDirectory(prefix="park-wheel-") as tmp:
            source = Path(tmp) / "src"
            shutil.copytree(project, source, ignore=_NOT_SOURCE)
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--no-input",
                   *isolation, "--wheel-dir", tmp, str(source)]
            try:
                # A fixed timestamp makes the wheel's bytes depend on its content only, so
                # rebuilding an unchanged project gives the same digest (and a memo hit).
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT,
                                      stdin=subprocess.DEVNULL, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
            except subprocess.TimeoutExpired:
                failures.append(f"{' '.join(isolation) or 'isolated'}: timed out after {_BUILD_TIMEOUT:.0f} s")
                continue
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode == 0 and len(wheels) == 1:
                target = out / wheels[0].name
                shutil.move(wheels[0], target)  # replaces an older build of the same name
                return target
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            failures.append(f"{' '.join(isolation) or 'isolated'} (exit {proc.returncode}, "
                            f"{len(wheels)} wheels):\n{tail}")
    raise WheelError(f"building a wheel of {project} failed:\n" + "\n---\n".join(failures))


def find_project(module_or_path: types.ModuleType | str | Path) -> Path:
    """The directory holding pyproject.toml or setup.py for a module object, or the given project directory."""
    if isinstance(module_or_path, types.ModuleType):
        return _project_of_module(module_or_path)
    path = Path(module_or_path).resolve()
    if not path.is_dir() or not any((path / f).is_file() for f in PROJECT_FILES):
        raise WheelError(f"{path} is not a project directory: it has no {' or '.join(PROJECT_FILES)}")
    return path


def _project_of_module(module: types.ModuleType) -> Path:
    file = getattr(module, "__file__", None)
    locations = [Path(file).parent] if file else [Path(p) for p in getattr(module, "__path__", [])]
    if not locations:
        raise WheelError(f"module {module.__name__} has no file (built in or frozen), so it is not part of a project")
    start = locations[0].resolve()
    for directory in (start, *start.parents):
        if directory.name in _INSTALLED_DIRS:
            # Walking further would find whatever project the environment happens to live in.
            raise WheelError(f"module {module.__name__} is installed in {directory}, not part of a source project; "
                             "pass the project directory instead")
        if any((directory / f).is_file() for f in PROJECT_FILES):
            return directory
    raise WheelError(f"module {module.__name__} ({start}) is not part of a project: no "
                     f"{' or '.join(PROJECT_FILES)} in its directory or any parent")


def sha256_file(path: str | Path) -> str:
    """Lowercase hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def distribution_versions(module_name: str) -> dict[str, str]:
    """Normalized name -> exact installed version of the distribution providing `module_name` and its requirements.

    Requirements are followed recursively; those whose environment markers do
    not hold here (other platforms, extras not asked for) and those not
    installed are left out. A module no installed distribution provides (the
    standard library, a script beside the caller) gives `{}`. Computed once per
    module per process: call `clear_caches()` after installing distributions.
    """
    return dict(_versions(module_name.partition(".")[0]))


def _versions_uncached(top_level: str) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for dist_name in _top_level_map().get(top_level, []):
        for name, version in _walk(dist_name):
            found.setdefault(name, version)
    return tuple(sorted(found.items()))


_versions = functools.lru_cache(maxsize=None)(_versions_uncached)


@functools.lru_cache(maxsize=1)
def _top_level_map() -> dict[str, list[str]]:
    # packages_distributions() reads every installed distribution's file list: do it once.
    return metadata.packages_distributions()


def clear_caches() -> None:
    """Forget what `distribution_versions` learnt, e.g. after installing into this environment."""
    _versions.cache_clear()
    _top_level_map.cache_clear()


def _walk(root: str) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    stack = [(root, frozenset[str]())]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or unmet requirement: nothing installed to pin
        seen.add(key)
        yield key, dist.version
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue  # a broken METADATA line in someone else's package; pip skips it too
            if req.marker is None or _marker_holds(req, extras):
                stack.append((req.name, frozenset(req.extras)))


def _marker_holds(req: Requirement, extras: frozenset[str]) -> bool:
    assert req.marker is not None
    try:
        return any(req.marker.evaluate({"extra": extra}) for extra in (*extras, ""))
    except UndefinedEnvironmentName:
        return False
