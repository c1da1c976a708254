"""The sites a broker federates with: the peers file and peer identification.

    DIR/peers.toml          [peers.NAME] address = "HOST:PORT"
    DIR/peers/NAME.crt      the peer's TLS certificate (pinned)

A peer is known by its certificate, never by the name it claims: a caller is
the peer NAME only if the TLS client certificate it presented (verified by the
handshake against the pinned certificates) is byte-for-byte NAME's. The
certificate names the peer's Ed25519 identity key (site.py), whose key id is
what delegated tokens for that peer are bound to (`confirm`).
"""
from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import grpc
import tomli_w
from cryptography import x509

from park import certificates, tokens
from park.config import replace_file
from park.wire import InvalidInput, check_site
from park_broker.site import SiteError, check_name_and_address


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
    """The peers of a site, as read at start-up (`park-broker peers add` needs a restart)."""

    def __init__(self, peers: dict[str, Peer]):
        self.peers = peers
        self._by_cert = {_normal(p.certificate): p for p in peers.values()}

    @classmethod
    def load(cls, directory: Path) -> PeerTable:
        path = directory / "peers.toml"
        if not path.exists():
            return cls({})
        try:
            data = tomllib.loads(path.read_text())
            peers = {}
            for name, entry in data.get("peers", {}).items():
                pem = (directory / "peers" / f"{check_site(name)}.crt").read_bytes()
                peers[name] = Peer(name, str(entry["address"]), pem, tokens.key_id(identity_key(pem)))
        except (tomllib.TOMLDecodeError, KeyError, OSError, InvalidInput) as exc:
            raise SiteError(f"{path} is not a valid peers file: {exc}") from None
        return cls(peers)

    def bundle(self) -> bytes | None:
        """The pinned certificates, as the roots that client certificates must chain to."""
        return b"".join(p.certificate for p in self.peers.values()) or None

    def caller(self, context: grpc.aio.ServicerContext) -> Peer | None:
        """The peer whose verified TLS client certificate the caller presented, if any."""
        certs = (context.auth_context() or {}).get("x509_pem_cert") or []
        for pem in certs:
            try:
                peer = self._by_cert.get(_normal(pem))
            except ValueError:
                continue
            if peer is not None:
                return peer
        return None


def remove_peer(directory: Path, name: str) -> None:
    """Forget peer `name` (its pinned certificate too); takes effect at the broker's next start."""
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
