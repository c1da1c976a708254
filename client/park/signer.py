"""Keys held in this process: private key files, and signing tokens with a key.

`LocalSigner` turns a token request (audience, scopes, lifetime, confirm key)
into a signed token with `park.tokens`; park-agent wraps one around each key
it holds, and robots or CI jobs, where no agent runs, build one from
`$PARK_KEY_FILE` (`LocalSigner.from_env()`) and get the same tokens.

Key files are PKCS8 PEM, encrypted with a passphrase or, for robots only,
not. This is the one place that reads or writes them, and it refuses a file
that its owner's group or others could open, or that someone else owns. No
message here contains a key or a passphrase.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park import tokens
from park._proto import tokens_pb2 as pb
from park.agent_client import IssuedToken, default_subject

__all__ = ["KeyFileError", "LocalSigner", "read_private_key", "write_private_key"]

MAX_KEY_FILE = 16 * 1024


class KeyFileError(Exception):
    """A key file is missing, unsafe, unreadable, or the passphrase is wrong."""


def write_private_key(path: Path, key: Ed25519PrivateKey, passphrase: str | None) -> None:
    """Create `path` (mode 0600, never overwriting) holding `key`, encrypted unless passphrase is None."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption())
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"run: chmod 600 {path}")
    if st.st_uid != os.geteuid():
        raise KeyFileError(f"{path} is owned by uid {st.st_uid}, not by you")


def read_private_key(path: Path, passphrase: str | None) -> Ed25519PrivateKey:
    """Load an Ed25519 key from a PKCS8 PEM file that only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}") from None
    except OSError as e:
        raise KeyFileError(f"cannot open {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        # Checked on the open descriptor, so a swapped file cannot slip in between.
        _check_private(path, os.fstat(f.fileno()))
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError:
        needs = "is encrypted: a passphrase is needed" if not passphrase else "is not encrypted"
        raise KeyFileError(f"{path} {needs}") from None
    except ValueError:
        raise KeyFileError(f"cannot decrypt {path}: wrong passphrase or not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


@dataclass(frozen=True, slots=True, eq=False)
class LocalSigner:
    """Signs token requests with a key in this process; same interface as AgentClient."""

    key: Ed25519PrivateKey
    subject: str

    @property
    def key_id(self) -> str:
        return tokens.key_id(self.key.public_key())

    @classmethod
    def from_env(cls) -> LocalSigner:
        """The robot/CI source: `$PARK_KEY_FILE`, decrypted with `$PARK_KEY_PASSPHRASE` if set."""
        path = os.environ.get("PARK_KEY_FILE")
        if not path:
            raise KeyFileError("PARK_KEY_FILE is not set")
        key = read_private_key(Path(path), os.environ.get("PARK_KEY_PASSPHRASE"))
        return cls(key=key, subject=default_subject())

    def _issued(self, token: pb.Token) -> IssuedToken:
        claims = pb.Claims.FromString(token.links[0].claims)
        return IssuedToken(token=tokens.encode(token), expires=claims.expires, key_id=claims.issuer)

    def session_token(self, audience: str, *, scopes: Iterable[str] = (), subject: str | None = None,
                      now: float | None = None) -> IssuedToken:
        """A bearer session token for `audience`; empty scopes mean `tokens.SESSION_SCOPES`."""
        token = tokens.issue(self.key, subject=subject or self.subject, audience=audience,
                             scopes=tuple(scopes) or tokens.SESSION_SCOPES, now=now)
        return self._issued(token)

    def delegate(self, audience: str, *, scopes: Iterable[str], confirm: str, lifetime: int = 0,
                 max_depth: int = 0, subject: str | None = None, now: float | None = None) -> IssuedToken:
        """A token only the holder of key `confirm` may use; lifetime 0 means the 1-hour default."""
        if not confirm:
            raise tokens.TokenError("invalid_argument", "a delegated token needs a confirm key id")
        token = tokens.issue(self.key, subject=subject or self.subject, audience=audience, scopes=scopes,
                             lifetime=lifetime or None, confirm=confirm, max_depth=max_depth, now=now)
        return self._issued(token)
