"""Park's capability tokens: format, issuing, attenuation and verification (DESIGN §6).

A token is a chain of links (`park.v1.Token`). Link 0 is signed by a key the
site has registered for the subject; every later link is signed by the key the
previous link names in `confirm`, and may only narrow: scopes covered by the
parent's, the same audience and subject, an expiry no later, a strictly
smaller `max_depth`. The one algorithm is Ed25519, fixed by `version`; there is
no algorithm field to confuse. A link's id (sha256 of the link) is its
revocation id, and the next link's `parent`.

Everything here is a pure function of its arguments and an injectable clock
(`now=`, unix seconds; default `time.time()`). Nothing here logs, and no
error message ever contains token bytes or key material: only key ids, which
are hashes of public keys, and short prefixes of link ids.

Errors are `TokenError` with a `kind`: "unauthenticated" (missing, malformed,
expired, badly signed, revoked, wrong audience, not held by the presenter),
"permission_denied" (a valid token without the scope asked for) or
"invalid_argument" (a bad request to build a token or a malformed scope).
Scopes, and `TokenError` itself, are park.scopes' (re-exported here).
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from park._proto import tokens_pb2 as pb
from park.scopes import (MAX_SCOPE_LENGTH, MAX_SCOPES, PATH_ACTIONS, PLAIN_ACTIONS, Scope, TokenError, covers, narrow,
                         parse_scope)
from park.scopes import bad_request as _bad_request
from park.scopes import covered as _covered
from park.scopes import parse_scopes as _parse_scopes
from park.scopes import refuse as _fail

__all__ = [
    "TokenError", "Scope", "Verified", "parse_scope", "covers", "key_id", "link_id",
    "PLAIN_ACTIONS", "PATH_ACTIONS", "MAX_SCOPES", "MAX_SCOPE_LENGTH",
    "format_public_key", "parse_public_key", "issue", "attenuate", "verify", "encode", "decode",
    "sign_link", "site_audience", "claims_of", "VERSION", "MAX_DEPTH", "BACKDATE", "SESSION_LIFETIME", "DELEGATED_LIFETIME",
    "MAX_LIFETIME", "MAX_NARROW_LIFETIME", "SESSION_SCOPES", "narrow",
]

# 2: the audience names the site's identity key as well as its name (`site_audience`); tokens of
# format 1 named the site alone, so one handed to an impostor of that name worked at the real site.
VERSION = 2
MAX_DEPTH = 5
BACKDATE = 60
SESSION_LIFETIME = 10 * 60
DELEGATED_LIFETIME = 60 * 60
MAX_LIFETIME = 6 * 60 * 60            # a delegated token of broad scope
# A delegated token scoped to one job or one file (`narrow`) may live this long, for jobs that wait
# days in a facility's queue; each site accepts at most its own `--max-delegation` (default 7 days).
MAX_NARROW_LIFETIME = 30 * 24 * 60 * 60
MAX_TOKEN_CHARS = 16 * 1024
# What a session token carries unless asked for less; the broker's users file
# still decides which of these a user really has.
SESSION_SCOPES = ("jobs.submit", "jobs.read:/", "files.read:/", "packages.upload", "admin")


RootKeys = Mapping[str, Sequence[bytes]] | Callable[[str], Iterable[bytes]]

_SUBJECT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_AUDIENCE = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_PUBLIC_KEY_PREFIX = "ed25519:"


# --- keys and links -----------------------------------------------------------

def _raw(public_key: bytes | Ed25519PublicKey) -> bytes:
    return public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()


def key_id(public_key: bytes | Ed25519PublicKey) -> str:
    """sha256 hex of a raw 32-byte Ed25519 public key: how tokens name keys."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def format_public_key(public_key: bytes | Ed25519PublicKey) -> str:
    """The one text form of a public key (`ed25519:<base64url>`), e.g. for `users add --key`."""
    return _PUBLIC_KEY_PREFIX + base64.urlsafe_b64encode(_raw(public_key)).rstrip(b"=").decode()


def parse_public_key(text: str) -> bytes:
    """Inverse of `format_public_key`; anything after the first space (a comment) is ignored."""
    word = text.strip().split(" ", 1)[0]
    body = word.removeprefix(_PUBLIC_KEY_PREFIX)
    raw = _b64decode(body) if word.startswith(_PUBLIC_KEY_PREFIX) and _B64URL.fullmatch(body) else None
    if raw is None or len(raw) != 32:
        _bad_request("a public key looks like 'ed25519:' followed by 43 base64url characters")
    return raw


def link_id(link: pb.Link) -> str:
    """sha256 hex of the link, rebuilt from its three fields so that unknown
    fields smuggled into a link cannot change its revocation id."""
    canonical = pb.Link(claims=link.claims, signature=link.signature, signer_key=link.signer_key)
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


def sign_link(claims: pb.Claims, signer: Ed25519PrivateKey) -> pb.Link:
    """Sign claims as they are. Checks nothing: use `issue` or `attenuate`."""
    data = claims.SerializeToString(deterministic=True)
    return pb.Link(claims=data, signature=signer.sign(data), signer_key=signer.public_key().public_bytes_raw())


def _lifetime_limit(bearer: bool, scopes: Iterable[Scope]) -> int:
    return SESSION_LIFETIME if bearer else MAX_NARROW_LIFETIME if narrow(scopes) else MAX_LIFETIME


def _check_lifetime(lifetime: float | None, bearer: bool, scopes: Iterable[Scope] = ()) -> float:
    limit = _lifetime_limit(bearer, scopes)
    if lifetime is None:
        return SESSION_LIFETIME if bearer else DELEGATED_LIFETIME
    if not 0 < lifetime <= limit:
        kind = "a bearer session token" if bearer else "a delegated token"
        if not bearer and limit == MAX_LIFETIME:
            kind += " of broad scope (one scoped to a single job or file may live longer)"
        _bad_request(f"lifetime {lifetime:g} s of {kind} must be in (0, {limit}]")
    return lifetime


def _check_confirm(confirm: str) -> None:
    if confirm and not _KEY_ID.fullmatch(confirm):
        _bad_request("confirm must be a key id: 64 lowercase hex characters, or empty")


def check_subject(subject: str) -> str:
    """A user name a token can carry; TokenError (invalid_argument) saying what is allowed otherwise."""
    if not _SUBJECT.fullmatch(subject):
        _bad_request("subject must be 1-64 of [A-Za-z0-9_.@-], not starting with '.', '@' or '-'")
    return subject


def site_audience(site: str, identity_key_id: str) -> str:
    """The audience of tokens for site `site` whose identity key has id `identity_key_id`: "NAME:KEYID".

    Both come from the site's certificate that the client pinned (park.certificates), so a token made
    for an impostor that took the site's name names the impostor's key."""
    return f"{site}:{identity_key_id}"


def _wrong_audience(theirs: str, ours: str) -> str:
    site, _, key = theirs.partition(":")
    our_site, _, our_key = ours.partition(":")
    if site == our_site and not key:
        return (f"token names the site {site!r} by name alone, not by its identity key too: upgrade the Park client "
                "that made it")
    if site == our_site and key != our_key:
        return (f"token is for a site named {site!r} with identity key {key[:12] or '(none)'}..., but this site's key "
                f"is {our_key[:12]}...: the client pinned another site's certificate under this name")
    return f"token is for audience {theirs!r}, not {ours!r}"


def issue(signer: Ed25519PrivateKey, *, subject: str, audience: str, scopes: Iterable[str] = SESSION_SCOPES,
          lifetime: float | None = None, confirm: str = "", max_depth: int = 0,
          now: float | None = None) -> pb.Token:
    """Make link 0 of a new token, signed by the subject's own key.

    `confirm` empty makes a bearer session token (10 minutes at most, the
    default); a key id makes a delegated token only that key may use or extend
    (1 hour by default, 6 hours at most). `not_before` is backdated 60 s.
    """
    check_subject(subject)
    if not _AUDIENCE.fullmatch(audience):
        _bad_request("audience must be a site name: 1-253 of [A-Za-z0-9_.:-]")
    _check_confirm(confirm)
    if not 0 <= max_depth <= MAX_DEPTH:
        _bad_request(f"max_depth must be in [0, {MAX_DEPTH}]")
    parsed = _parse_scopes(scopes)
    seconds = _check_lifetime(lifetime, bearer=not confirm, scopes=parsed)
    t = time.time() if now is None else now
    claims = pb.Claims(version=VERSION, issuer=key_id(signer.public_key()), subject=subject, audience=audience,
                       scopes=[str(s) for s in parsed], not_before=int(t) - BACKDATE, expires=int(t + seconds),
                       id=secrets.token_hex(16), max_depth=max_depth, confirm=confirm)
    return pb.Token(links=[sign_link(claims, signer)])


def attenuate(token: pb.Token, signer: Ed25519PrivateKey, *, confirm: str, scopes: Iterable[str] | None = None,
              lifetime: float | None = None, max_depth: int | None = None, now: float | None = None) -> pb.Token:
    """Append a link that hands a narrower token to the holder of key `confirm`.

    Only the key the last link confirms can sign it. Defaults keep the parent's
    scopes and expiry and lower `max_depth` by one. Asking for more than the
    parent holds is refused, never silently trimmed.
    """
    if not token.links:
        _bad_request("cannot attenuate an empty token")
    last = token.links[-1]
    parent = _parse_claims(len(token.links) - 1, last.claims)
    if not parent.confirm:
        _bad_request("a bearer token cannot be extended")
    if key_id(signer.public_key()) != parent.confirm:
        _bad_request(f"this token is confirmed to key {parent.confirm[:12]}..., not the signer's")
    if not confirm:
        _bad_request("only link 0 may be a bearer link: a later link needs a confirm key")
    _check_confirm(confirm)
    depth = parent.max_depth - 1 if max_depth is None else max_depth
    if not 0 <= depth < parent.max_depth:
        _bad_request(f"max_depth must be below the parent's {parent.max_depth}")
    parent_scopes = [parse_scope(s) for s in parent.scopes]
    parsed = _parse_scopes(parent.scopes if scopes is None else scopes)
    for s in parsed:
        if not _covered(parent_scopes, s):
            _bad_request(f"scope {str(s)!r} is not covered by the parent token")
    t = time.time() if now is None else now
    expires = parent.expires if lifetime is None else int(t + _check_lifetime(lifetime, bearer=False, scopes=parsed))
    if expires > parent.expires:
        _bad_request("the new link would expire after its parent")
    claims = pb.Claims(version=VERSION, issuer=parent.confirm, subject=parent.subject, audience=parent.audience,
                       scopes=[str(s) for s in parsed], not_before=int(t) - BACKDATE, expires=expires,
                       id=secrets.token_hex(16), max_depth=depth, parent=link_id(last), confirm=confirm)
    return pb.Token(links=[*token.links, sign_link(claims, signer)])


# --- wire text ------------------------------------------------------------------

def _b64decode(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def claims_of(token: pb.Token | str) -> pb.Claims:
    """The last link's claims, unverified: what a holder needs to ask for a like token (audience, scopes,
    confirm, expiry). TokenError("unauthenticated") if it is not a token at all."""
    if isinstance(token, str):
        token = decode(token)
    if not token.links:
        _fail("token has no links")
    return _parse_claims(len(token.links) - 1, token.links[-1].claims)


def encode(token: pb.Token) -> str:
    """Compact ASCII form for gRPC metadata: unpadded base64url of the serialized Token."""
    return base64.urlsafe_b64encode(token.SerializeToString(deterministic=True)).rstrip(b"=").decode()


def decode(text: str) -> pb.Token:
    """Inverse of `encode`; anything else is TokenError("unauthenticated")."""
    if not text:
        _fail("no token")
    if len(text) > MAX_TOKEN_CHARS:
        _fail(f"token longer than {MAX_TOKEN_CHARS} characters")
    data = _b64decode(text) if _B64URL.fullmatch(text) else None
    if data is None:
        _fail("malformed token: not base64url")
    token = pb.Token()
    try:
        token.ParseFromString(data)
    except DecodeError:
        _fail("malformed token: not a park.v1.Token")
    return token


def subject_of(text: str) -> str | None:
    """The subject a token's first link names, unverified; None when `text` is not a token. For a
    site that must refuse a token carried in someone else's submission before it ever presents it."""
    try:
        token = decode(text)
        return pb.Claims.FromString(token.links[0].claims).subject if token.links else None
    except (TokenError, DecodeError):
        return None


# --- verification ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified chain grants: the last link's scopes, for its subject, until `expires`."""

    subject: str
    audience: str
    scopes: tuple[Scope, ...]
    expires: int
    link_ids: tuple[str, ...]
    root_key_id: str
    confirm: str
    lifetime: int = 0      # the longest any of its links was issued for, in seconds

    def allows(self, scope: str | Scope) -> bool:
        return _covered(self.scopes, parse_scope(scope) if isinstance(scope, str) else scope)

    def require(self, scope: str | Scope) -> None:
        """Raise TokenError("permission_denied") unless the token grants `scope`."""
        if not self.allows(scope):
            raise TokenError("permission_denied", f"the token does not grant {str(scope)!r}")


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def _parse_claims(i: int, data: bytes) -> pb.Claims:
    claims = pb.Claims()
    try:
        claims.ParseFromString(data)
    except DecodeError:
        _fail(f"link {i}: claims are not a park.v1.Claims message")
    if claims.version == 1:
        _fail(f"link {i}: token format 1 names its site by name alone and is no longer accepted: upgrade the "
              "Park client (and park-agent) that made it")
    if claims.version != VERSION:
        _fail(f"link {i}: unsupported token version {claims.version}")
    return claims


def _root_keys(trusted: RootKeys, subject: str) -> Iterable[bytes]:
    return trusted(subject) if callable(trusted) else trusted.get(subject, ())


def _check_signature(i: int, link: pb.Link, claims: pb.Claims, prev: pb.Claims | None, trusted: RootKeys) -> None:
    if len(link.signature) != 64:
        _fail(f"link {i}: signature is {len(link.signature)} bytes, expected 64")
    if len(link.signer_key) != 32 or key_id(link.signer_key) != claims.issuer:
        _fail(f"link {i}: the signer key does not match the issuer")
    if prev is None:
        if link.signer_key not in set(_root_keys(trusted, claims.subject)):
            _fail(f"link 0: not signed by a key registered for subject {claims.subject!r}")
    elif not prev.confirm:
        _fail(f"link {i}: extends a bearer link")
    elif claims.issuer != prev.confirm:
        _fail(f"link {i}: not signed by the key that link {i - 1} confirms")
    try:
        _public_key(link.signer_key).verify(link.signature, link.claims)
    except (InvalidSignature, ValueError):  # ValueError: bytes that are no curve point
        _fail(f"link {i}: bad signature")


def _check_narrowing(i: int, claims: pb.Claims, prev: pb.Claims, prev_id: str, root_depth: int,
                     prev_scopes: tuple[Scope, ...], scopes: tuple[Scope, ...]) -> None:
    if claims.parent != prev_id:
        _fail(f"link {i}: does not follow link {i - 1} (links reordered, removed or inserted)")
    if i > root_depth:
        _fail(f"link {i}: chain depth {i} exceeds max_depth {root_depth} of link 0")
    if claims.max_depth >= prev.max_depth:
        _fail(f"link {i}: max_depth {claims.max_depth} is not below its parent's {prev.max_depth}")
    if not claims.confirm:
        _fail(f"link {i}: only link 0 may be a bearer link")
    if claims.subject != prev.subject:
        _fail(f"link {i}: changes the subject")
    if claims.audience != prev.audience:
        _fail(f"link {i}: changes the audience")
    if claims.expires > prev.expires:
        _fail(f"link {i}: expires after its parent")
    for s in scopes:
        if not _covered(prev_scopes, s):
            _fail(f"link {i}: widens scope {str(s)!r} beyond its parent")


def _check_time(i: int, claims: pb.Claims, scopes: tuple[Scope, ...], t: float) -> None:
    limit = _lifetime_limit(not claims.confirm, scopes)
    if claims.expires - claims.not_before > limit + BACKDATE:
        _fail(f"link {i}: lifetime longer than {limit} s")
    if t < claims.not_before:
        _fail(f"link {i}: token not valid yet")
    if t >= claims.expires:  # no grace: the second of expiry is already too late
        _fail(f"link {i}: token expired")


def verify(token: pb.Token | str, *, audience: str, trusted_root_keys: RootKeys, presenter_key_id: str | None,
           revoked: Container[str] = frozenset(), now: float | None = None) -> Verified:
    """Check a whole chain for this site and caller, or raise TokenError("unauthenticated").

    `trusted_root_keys` maps a subject to the raw public keys registered for it
    (a mapping or a callable). `presenter_key_id` is the key id the caller
    proved possession of (e.g. its TLS client certificate), or None; a token
    whose last link names a `confirm` key is refused unless they match.
    Every link is checked against `revoked` (a container of link ids).
    """
    t = time.time() if now is None else now
    if isinstance(token, str):
        token = decode(token)
    links = token.links
    if not links:
        _fail("token has no links")
    if len(links) > MAX_DEPTH + 1:
        _fail(f"chain of {len(links)} links is longer than {MAX_DEPTH + 1}")
    prev: pb.Claims | None = None
    prev_scopes: tuple[Scope, ...] = ()
    ids: list[str] = []
    root_depth, root_key, longest = 0, "", 0
    for i, link in enumerate(links):
        claims = _parse_claims(i, link.claims)
        _check_signature(i, link, claims, prev, trusted_root_keys)
        try:
            scopes = _parse_scopes(claims.scopes)
        except TokenError as e:
            _fail(f"link {i}: {e.message}")
        if not claims.id:
            _fail(f"link {i}: has no id")
        if prev is None:
            if claims.parent:
                _fail("link 0: has a parent (links reordered or removed)")
            if claims.max_depth > MAX_DEPTH:
                _fail(f"link 0: max_depth {claims.max_depth} exceeds the limit {MAX_DEPTH}")
            root_depth, root_key = claims.max_depth, claims.issuer
        else:
            _check_narrowing(i, claims, prev, ids[-1], root_depth, prev_scopes, scopes)
        _check_time(i, claims, scopes, t)
        longest = max(longest, claims.expires - claims.not_before - BACKDATE)
        ids.append(link_id(link))
        if ids[-1] in revoked:
            _fail(f"link {i}: revoked (id {ids[-1][:12]}...)")
        prev, prev_scopes = claims, scopes
    assert prev is not None
    if prev.audience != audience:
        _fail(_wrong_audience(prev.audience, audience))
    if prev.confirm and presenter_key_id != prev.confirm:
        _fail(f"token is bound to key {prev.confirm[:12]}... and the caller did not prove possession of it")
    return Verified(subject=prev.subject, audience=prev.audience, scopes=prev_scopes, expires=prev.expires,
                    link_ids=tuple(ids), root_key_id=root_key, confirm=prev.confirm, lifetime=longest)
