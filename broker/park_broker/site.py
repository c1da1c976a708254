"""A broker's state directory: its identity, TLS material and configuration.

    DIR/site.toml        site name and default listen address
    DIR/identity.key     Ed25519 key (PKCS8 PEM, 0600): the site's identity for tokens
    DIR/tls.key          ECDSA P-256 key (0600) for TLS
    DIR/tls.crt          self-signed certificate; clients and peers pin it
    DIR/park.db          the job store (store.py)
    DIR/files/           job outputs: files/<owner>/<job>/

TLS uses P-256 because gRPC's TLS stack does not negotiate Ed25519 certificates
(handshake fails with NO_COMMON_SIGNATURE_ALGORITHMS). The certificate carries
the Ed25519 identity key as a URI subject-alternative name,
`urn:park:ed25519:<hex>`, so whoever pins the certificate also learns the key
that delegated tokens are bound to.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from park import certificates
from park.certificates import IDENTITY_URI_PREFIX
from park.config import replace_file
from park.wire import InvalidInput, check_site

DEFAULT_LISTEN = "127.0.0.1:7701"


@dataclass(slots=True)
class SiteInfo:
    """The site as its jobs see it while it serves: its name, file store and where to reach it."""

    name: str
    files_root: Path
    address: str = ""        # where jobs reach the broker to report progress; set once bound
    cert_path: str = ""
    max_walltime: float = 0.0   # seconds an attempt may run at most (serve --max-walltime); 0: no limit
    resources: Resources = field(default_factory=lambda: Resources(float(os.cpu_count() or 1), physical_memory()))


@dataclass(frozen=True, slots=True)
class Resources:
    """What a site has for jobs (`serve --cpus --memory --gpus`), or what a job asks for."""

    cpus: float
    memory: int = 0        # bytes; a task asking 0 is not counted against the site's memory
    gpus: int = 0

    def describe(self) -> str:
        return f"{self.cpus:g} cpus, {self.memory / 2**30:.1f} GiB of memory and {self.gpus} gpus"


def physical_memory() -> int:
    """This host's memory in bytes (what `serve --memory` defaults to)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SiteError(RuntimeError):
    """The state directory is missing, incomplete or unsafe; the text says how to fix it."""


@dataclass(frozen=True, slots=True)
class SiteConfig:
    directory: Path
    name: str
    listen: str

    @property
    def db_path(self) -> Path:
        return self.directory / "park.db"

    @property
    def files_root(self) -> Path:
        return self.directory / "files"

    @property
    def cert_path(self) -> Path:
        return self.directory / "tls.crt"

    def tls_key(self) -> bytes:
        return _read_private(self.directory / "tls.key")

    def certificate(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def audience(self) -> str:
        """What tokens for this site name (park.tokens.site_audience): its name and identity key's id."""
        return certificates.audience(self.certificate())

    def identity_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key(_read_private(self.directory / "identity.key"), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key


def _read_private(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SiteError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return path.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def check_name_and_address(name: str, address: str, what: str) -> None:
    """A site name and a HOST:PORT, as the command line takes them; SiteError says what is wrong."""
    try:
        check_site(name)
    except InvalidInput as exc:
        raise SiteError(str(exc)) from None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SiteError(f"{what} {address!r} must be HOST:PORT")


def init_site(directory: Path, name: str, listen: str = DEFAULT_LISTEN) -> SiteConfig:
    """Create a new state directory. Refuses to overwrite an existing site."""
    check_name_and_address(name, listen, "listen address")
    if (directory / "site.toml").exists():
        raise SiteError(f"{directory} already holds a site; choose an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "files").mkdir(exist_ok=True)

    identity = ed25519.Ed25519PrivateKey.generate()
    tls_key = ec.generate_private_key(ec.SECP256R1())
    _write_private(directory / "identity.key", identity.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_private(directory / "tls.key", tls_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    raw = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    names: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost"),
                                     x509.UniformResourceIdentifier(IDENTITY_URI_PREFIX + raw.hex())]
    for h in {listen.rpartition(":")[0].strip("[]"), "127.0.0.1", "::1", socket.gethostname()}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if h and x509.DNSName(h) not in names:
                names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Park site")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(tls_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(tls_key, hashes.SHA256()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Written last and whole: a directory holds a site only once it holds everything else.
    replace_file(directory / "site.toml", tomli_w.dumps({"site": name, "listen": listen}))
    return load_site(directory)


def load_site(directory: Path) -> SiteConfig:
    path = directory / "site.toml"
    if not path.exists():
        raise SiteError(f"{directory} is not a Park site; create one with: park-broker init {directory} --site NAME")
    try:
        data = tomllib.loads(path.read_text())
        config = SiteConfig(directory=directory.resolve(), name=check_site(data["site"]),
                            listen=str(data.get("listen", DEFAULT_LISTEN)))
    except (tomllib.TOMLDecodeError, KeyError, InvalidInput) as exc:
        raise SiteError(f"{path} is not a valid site file: {exc}") from None
    for required in ("identity.key", "tls.key", "tls.crt"):
        if not (directory / required).exists():
            raise SiteError(f"{directory / required} is missing; the site directory is incomplete")
    config.files_root.mkdir(exist_ok=True)
    return config



# Made private here; the keys are not: a key others could read is refused (_read_private), not quietly fixed.
PRIVATE_FILES = ("users.toml", "revoked.txt", "park.db", "park.db-wal", "park.db-shm")


def protect_state(site: SiteConfig, *, shared: bool) -> None:
    """Keep the state directory the broker's: its keys, database and users file readable by the broker
    alone. With `shared` (jobs run as other Unix accounts) the directory and the file store can be
    traversed but not listed, so those accounts reach their own job directories, the packages and the
    certificate their reports use by path, and nothing else of the site's."""
    os.chmod(site.directory, 0o711 if shared else 0o700)
    os.chmod(site.files_root, 0o711)
    for name in PRIVATE_FILES:
        path = site.directory / name
        if path.exists():
            os.chmod(path, 0o600)
    os.chmod(site.cert_path, 0o644)


def lock_site(directory: Path) -> int:
    """Hold the site directory for one serving broker: an exclusive lock on DIR/broker.lock, which
    holds the server's pid. Returns the lock's descriptor (keep it open while serving); the lock goes
    with the process, however it ends. SiteError naming the holder if another broker serves DIR."""
    path = directory / "broker.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SiteError(f"site directory {directory} is already served by another broker (pid {holder}); "
                        "stop it first: one broker serves a site directory at a time") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
