"""The client configuration file: named services.

`$PARK_CONFIG`, else `~/.config/park/config.toml`:

    [services.sns]
    address = "sns.example.org:7701"
    cert = "/home/me/.config/park/sns.crt"     # relative paths are from this file's directory

Park's TOML files (this one and the broker's site, users and peers files) are
written with tomli-w, which quotes keys TOML would otherwise read as dotted
paths, and replaced whole with `replace_file`.
"""
from __future__ import annotations

import os
import secrets
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from park.wire import InvalidInput, check_site
from park.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    address: str
    cert: Path


def config_path() -> Path:
    env = os.environ.get("PARK_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "park" / "config.toml"


def load_services(path: Path | None = None) -> dict[str, ServiceEntry]:
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    services = {}
    for name, entry in data.get("services", {}).items():
        if not isinstance(entry, dict) or "address" not in entry or "cert" not in entry:
            raise ConfigError(f"{path}: [services.{name}] needs address = \"HOST:PORT\" and cert = \"FILE\"")
        services[name] = ServiceEntry(name, str(entry["address"]), (path.parent / str(entry["cert"])).resolve())
    return services


def add_service(name: str, address: str, cert: Path, path: Path | None = None) -> Path:
    """Add or replace [services.NAME]; keeps the other entries."""
    try:
        check_site(name)
    except InvalidInput as exc:
        raise ConfigError(str(exc)) from None
    if not cert.is_file():
        raise ConfigError(f"certificate {cert} does not exist")
    path = path or config_path()
    services = load_services(path)
    services[name] = ServiceEntry(name, address, cert.resolve())
    return _write_services(path, services)


def remove_service(name: str, path: Path | None = None) -> Path:
    """Forget [services.NAME]; ConfigError if there is none."""
    path = path or config_path()
    services = load_services(path)
    if services.pop(name, None) is None:
        raise ConfigError(f"no service named {name!r} in {path} (known: {', '.join(sorted(services)) or 'none'})")
    return _write_services(path, services)


def _write_services(path: Path, services: dict[str, ServiceEntry]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, tomli_w.dumps({"services": {
        s.name: {"address": s.address, "cert": str(s.cert)} for s in services.values()}}))
    return path


def sync_directory(directory: Path) -> None:
    """fsync a directory: what a rename or a new file in it did survives a crash only after this."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` by `text` at once: a reader, or a crash, sees the old file or the new, never part of one.

    `mode` None keeps the permission bits of the file replaced; a new file gets the umask's.
    """
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            pass
    # A name of its own, so that two writers never share a temporary file; in the same
    # directory, so that os.replace is a rename within one file system.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created 0600 when a mode is given, so that a private file is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
