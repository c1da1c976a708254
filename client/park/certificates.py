"""What a Park site certificate says: the site's name and its Ed25519 identity key.

`park-broker init` makes a self-signed certificate whose common name is the
site's name and which carries the site's identity key as the URI
subject-alternative name `urn:park:ed25519:<hex>`. Whoever pins the
certificate (a client's `park services add`, a peer's `park-broker peers add`)
so learns both, and the audience of every token meant for that site is the
pair (`audience`): a token handed to an impostor that calls itself by the same
name names the impostor's key, and the real site refuses it.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from park import tokens

IDENTITY_URI_PREFIX = "urn:park:ed25519:"


class CertificateError(ValueError):
    """Not a Park site certificate; the text says why."""


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None


def site_name(pem: bytes) -> str:
    names = _load(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CertificateError("it names no site (no common name); use the tls.crt of a Park site")
    return str(names[0].value)


def identity_key(pem: bytes) -> bytes:
    """The raw 32-byte Ed25519 identity key the certificate carries."""
    try:
        names = _load(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(IDENTITY_URI_PREFIX):
            try:
                key = bytes.fromhex(uri[len(IDENTITY_URI_PREFIX):])
            except ValueError:
                break
            if len(key) == 32:
                return key
    raise CertificateError("it names no Park identity key (was it made by park-broker init?)")


def audience(pem: bytes) -> str:
    """The audience of tokens for the site this certificate is: `tokens.site_audience(name, key id)`."""
    return tokens.site_audience(site_name(pem), tokens.key_id(identity_key(pem)))
