"""The sites a broker federates with: the peers file and peer identification.

    DIR/peers.toml          [peers.NAME] address = "HOST:PORT"
    DIR/peers/NAME.crt      the peer's TLS certificate (pinned)

A peer is known by its certificate, never by the name it claims: a caller is
the peer NAME only if the TLS client certificate it presented (verified by the
handshake against the pinned certificates) is byte-for-byte NAME's. The
certificate names the peer's Ed25519 identity key (site.py), whose key id is
what delegated tokens for that peer are bound to (`confirm`).

`park-broker peers add/remove` edit the files; a running broker takes the
change up (`PeerTable.reload`, called by the server when the file changes or
on SIGHUP): the peer port's TLS handshakes trust the new set of certificates
from the next connection on (gRPC's dynamic server credentials).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import tomli_w
from cryptography import x509

from park import certificates, tokens
from park.config import replace_file
from park.wire import InvalidInput, check_site
from park_broker.site import SiteError, check_name_and_address

log = logging.getLogger(__name__)

RELOAD_EVERY = 1.0    # seconds between looks at the peers file


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    address: str
    certificate: bytes      # PEM
    key_id: str             # of the Ed25519 identity key its certificate names


def identity_key(pem: bytes) -> bytes:
    """The raw Ed25519 identity key a Park site certificate carries."""
    try:
        return certificates.identity_key(pem)
    except certificates.CertificateError as exc:
        raise SiteError(f"not a Park site certificate: {exc}") from None


def _normal(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).tbs_certificate_bytes


class PeerTable:
    """The peers of a site: read at start-up, and again by `reload` while the broker runs."""

    def __init__(self, peers: dict[str, Peer]):
        self._generation = itertools.count(1)
        self._set(peers)

    def _set(self, peers: dict[str, Peer]) -> None:
        # One reference, replaced whole: gRPC's TLS threads read it while the event loop reloads.
        self._state = (dict(peers), {_normal(p.certificate): p for p in peers.values()}, next(self._generation))

    @property
    def peers(self) -> dict[str, Peer]:
        return self._state[0]

    @classmethod
    def load(cls, directory: Path) -> PeerTable:
        return cls(_read(directory))

    def reload(self, directory: Path) -> tuple[set[str], set[str]]:
        """Take up the peers file as it is now: (peers added or changed, peers removed or changed). A file
        that cannot be read raises SiteError and changes nothing."""
        new, old = _read(directory), self.peers
        if new == old:
            return set(), set()
        self._set(new)
        changed = {n for n in new.keys() & old.keys() if new[n] != old[n]}
        return (new.keys() - old.keys()) | changed, (old.keys() - new.keys()) | changed

    def server_credentials(self, tls_key: bytes, certificate: bytes) -> grpc.ServerCredentials:
        """For the peer port: a client must present a pinned certificate; which ones are pinned is
        asked at each new connection, so a reload needs no restart."""
        def config() -> grpc.ServerCertificateConfiguration:
            # With no peers yet, only this site's own certificate is trusted: no one else holds its key.
            roots = b"".join(p.certificate for p in self.peers.values()) or certificate
            return grpc.ssl_server_certificate_configuration([(tls_key, certificate)], root_certificates=roots)

        served = [self._state[2]]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if served[0] == self._state[2]:
                return None    # unchanged
            served[0] = self._state[2]
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)

    def caller(self, context: grpc.aio.ServicerContext) -> Peer | None:
        """The peer whose verified TLS client certificate the caller presented, if any."""
        by_cert = self._state[1]
        certs = (context.auth_context() or {}).get("x509_pem_cert") or []
        for pem in certs:
            try:
                peer = by_cert.get(_normal(pem))
            except ValueError:
                continue
            if peer is not None:
                return peer
        return None


async def follow(directory: Path, table: PeerTable, on_change: Callable[[], None], wake: asyncio.Event) -> None:
    """Reload `table` whenever the peers file changes, or at once when `wake` is set (SIGHUP), then call
    `on_change`; a file that cannot be read is logged and the peers as they were stay in force."""
    seen = _stamp(directory)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), RELOAD_EVERY)
        woken, now = wake.is_set(), _stamp(directory)
        wake.clear()
        if now == seen and not woken:
            continue
        seen = now
        try:
            added, removed = table.reload(directory)
        except SiteError as exc:
            log.error("%s; the peers as they were stay in force until it is fixed", exc)
            continue
        if added or removed:
            log.info("peers changed: %s added, %s removed; now %s", ", ".join(sorted(added - removed)) or "none",
                     ", ".join(sorted(removed - added)) or "none", ", ".join(sorted(table.peers)) or "none")
            on_change()


def _stamp(directory: Path) -> tuple[int, ...]:
    stamps = []
    for path in (directory / "peers.toml", directory / "peers"):
        try:
            st = path.stat()
            stamps += [st.st_mtime_ns, st.st_size, st.st_ino]
        except FileNotFoundError:
            stamps += [0, 0, 0]
    return tuple(stamps)


def _read(directory: Path) -> dict[str, Peer]:
    path = directory / "peers.toml"
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
        peers = {}
        for name, entry in data.get("peers", {}).items():
            pem = (directory / "peers" / f"{check_site(name)}.crt").read_bytes()
            peers[name] = Peer(name, str(entry["address"]), pem, tokens.key_id(identity_key(pem)))
    except (tomllib.TOMLDecodeError, KeyError, OSError, InvalidInput, ValueError) as exc:
        raise SiteError(f"{path} is not a valid peers file: {exc}") from None
    return peers


def remove_peer(directory: Path, name: str) -> None:
    """Forget peer `name` (its pinned certificate too); a running broker takes it up at once."""
    path = directory / "peers.toml"
    table = PeerTable.load(directory)
    if name not in table.peers:
        raise SiteError(f"site has no peer {name!r} (peers: {', '.join(sorted(table.peers)) or 'none'})")
    data = tomllib.loads(path.read_text())
    del data["peers"][name]
    replace_file(path, tomli_w.dumps(data))
    (directory / "peers" / f"{name}.crt").unlink(missing_ok=True)


def add_peer(directory: Path, name: str, address: str, cert: Path) -> Peer:
    check_name_and_address(name, address, "peer address")
    pem = cert.read_bytes()
    key = identity_key(pem)
    (directory / "peers").mkdir(exist_ok=True)
    shutil.copyfile(cert, directory / "peers" / f"{name}.crt")
    path = directory / "peers.toml"
    try:
        data = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"{path} is not a valid peers file: {exc}") from None
    entries = {**data.get("peers", {}), name: {"address": address}}
    data["peers"] = dict(sorted(entries.items()))
    replace_file(path, tomli_w.dumps(data))
    return Peer(name, address, pem, tokens.key_id(key))
