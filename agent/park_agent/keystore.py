"""Where a user's identity key is kept between logins: the system keyring, or an encrypted file.

`park-agent keygen` creates the key in the keyring when a real backend exists,
else in `<key dir>/id_ed25519`, PKCS8 encrypted with a passphrase, mode 0600.
The public half always goes to `<key dir>/id_ed25519.pub`, so that `pubkey`
needs neither passphrase nor agent. The key dir is `$PARK_KEY_DIR`, else
`~/.config/park/keys/`.

A keyring backend that stores nothing (`keyring.backends.null`, or `fail`,
which keyring picks when it finds no backend) is never trusted with a key, and
a write to any keyring is read back before the key counts as stored.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keyring
import keyring.errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park import tokens
from park.signer import KeyFileError, read_private_key, write_private_key

__all__ = ["KeyStore", "KeyStoreError", "keyring_problem", "default_key_dir", "Store"]

KEYRING_SERVICE = "park"
_USELESS_BACKENDS = ("keyring.backends.null", "keyring.backends.fail")
Store = Literal["auto", "keyring", "file"]


class KeyStoreError(Exception):
    """The key cannot be created, found or read; the message says what to do."""


def default_key_dir() -> Path:
    return Path(os.environ.get("PARK_KEY_DIR") or Path.home() / ".config" / "park" / "keys")


def keyring_problem() -> str | None:
    """Why the configured keyring backend cannot hold a key, or None if it can."""
    backend = keyring.get_keyring()
    # A chainer is only as good as the backends inside it.
    inner = getattr(backend, "backends", None)
    candidates = list(inner) if isinstance(inner, list) else [backend]
    if any(type(b).__module__ not in _USELESS_BACKENDS for b in candidates):
        return None
    name = f"{type(backend).__module__}.{type(backend).__qualname__}"
    return f"keyring backend {name} stores nothing"


@dataclass(frozen=True, slots=True)
class KeyStore:
    directory: Path
    name: str = "id_ed25519"

    @property
    def private_path(self) -> Path:
        return self.directory / self.name

    @property
    def public_path(self) -> Path:
        return self.directory / f"{self.name}.pub"

    @property
    def _keyring_user(self) -> str:
        return str(self.private_path.absolute())

    def create(self, *, store: Store, comment: str, passphrase: Callable[[], str]) -> tuple[Ed25519PrivateKey, str]:
        """Make and keep a new key; returns it and a phrase saying where it went.

        `passphrase` is asked only when the key goes to a file, and must not be empty.
        """
        if self.public_path.exists() or self.private_path.exists():
            raise KeyStoreError(f"a key already exists in {self.directory}; refusing to overwrite it")
        problem = keyring_problem()
        if store == "keyring" and problem:
            raise KeyStoreError(f"{problem}; use --store file")
        key = Ed25519PrivateKey.generate()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if store == "file" or problem:
            secret = passphrase()
            if not secret:
                raise KeyStoreError("an empty passphrase would leave the key file unprotected")
            try:
                write_private_key(self.private_path, key, secret)
            except KeyFileError as e:
                raise KeyStoreError(str(e)) from None
            where = f"encrypted file {self.private_path}" + (f" ({problem})" if problem else "")
        else:
            self._to_keyring(key)
            where = f"keyring ({type(keyring.get_keyring()).__name__})"
        self.public_path.write_text(f"{tokens.format_public_key(key.public_key())} {comment}".rstrip() + "\n")
        return key, where

    def _to_keyring(self, key: Ed25519PrivateKey) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        try:
            keyring.set_password(KEYRING_SERVICE, self._keyring_user, pem)
            stored = keyring.get_password(KEYRING_SERVICE, self._keyring_user)
        except keyring.errors.KeyringError as e:
            raise KeyStoreError(f"the keyring refused the key: {type(e).__name__}") from None
        if stored != pem:
            raise KeyStoreError("the keyring did not give the key back; it cannot be trusted with keys")

    def load(self, passphrase: Callable[[str], str]) -> Ed25519PrivateKey:
        """The stored key; `passphrase(prompt)` is asked only for an encrypted file."""
        if self.private_path.exists():
            try:
                key = read_private_key(self.private_path, passphrase(f"Passphrase for {self.private_path}: "))
            except KeyFileError as e:
                raise KeyStoreError(str(e)) from None
        elif self.public_path.exists():
            key = self._from_keyring()
        else:
            raise KeyStoreError(f"no key in {self.directory}; create one with: park-agent keygen")
        if self.public_path.exists() and tokens.key_id(key.public_key()) != self.public_key_id():
            raise KeyStoreError(f"{self.public_path} does not belong to the stored private key")
        return key

    def _from_keyring(self) -> Ed25519PrivateKey:
        problem = keyring_problem()
        if problem:
            raise KeyStoreError(f"the key is in a keyring, but {problem}")
        try:
            pem = keyring.get_password(KEYRING_SERVICE, self._keyring_user)
        except keyring.errors.KeyringError as e:
            raise KeyStoreError(f"the keyring refused to give the key: {type(e).__name__}") from None
        if pem is None:
            raise KeyStoreError(f"the keyring has no key for {self.private_path}")
        try:
            key = serialization.load_pem_private_key(pem.encode(), None)
        except (ValueError, TypeError):
            raise KeyStoreError("the keyring entry is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError("the keyring holds something other than an Ed25519 key")
        return key

    def public_line(self) -> str:
        try:
            return self.public_path.read_text().strip()
        except FileNotFoundError:
            raise KeyStoreError(f"no public key at {self.public_path}; create one with: park-agent keygen") from None

    def public_key_id(self) -> str:
        return tokens.key_id(tokens.parse_public_key(self.public_line()))

    def comment(self) -> str:
        return self.public_line().partition(" ")[2]
