"""The client configuration file: named services.

`$PARK_CONFIG`, else `~/.config/park/config.toml`:

    [services.sns]
    address = "sns.example.org:7701"
    cert = "/home/me/.config/park/sns.crt"     # relative paths are from this file's directory
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

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
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON string quoting is valid TOML basic-string quoting.
    text = "".join(f"[services.{s.name}]\naddress = {json.dumps(s.address)}\ncert = {json.dumps(str(s.cert))}\n\n"
                   for s in services.values())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
