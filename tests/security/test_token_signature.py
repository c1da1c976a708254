"""Signatures and the wire text: nothing altered in transit verifies."""
from __future__ import annotations

import pytest

from park import tokens
from park._proto import tokens_pb2 as pb

pytestmark = pytest.mark.timeout(10)


def _with_link0(token: pb.Token, **fields: bytes) -> pb.Token:
    link = pb.Link()
    link.CopyFrom(token.links[0])
    for name, value in fields.items():
        setattr(link, name, value)
    return pb.Token(links=[link, *token.links[1:]])


def test_truncated_signature_refused(kit):
    token = kit.root()
    kit.refused(_with_link0(token, signature=token.links[0].signature[:63]),
                "link 0: signature is 63 bytes, expected 64")


def test_bit_flipped_signature_refused(kit):
    token = kit.root()
    sig = bytearray(token.links[0].signature)
    sig[10] ^= 0x01
    kit.refused(_with_link0(token, signature=bytes(sig)), "link 0: bad signature")


def test_bit_flipped_claims_refused(kit):
    token = kit.root(scopes=["files.read:/alice/a/"])
    claims = token.links[0].claims.replace(b"/alice/a/", b"/alice/b/")
    kit.refused(_with_link0(token, claims=claims), "link 0: bad signature")


def test_swapped_signer_key_refused(kit):
    token = kit.root()
    kit.refused(_with_link0(token, signer_key=kit.carol.public_key().public_bytes_raw()),
                "link 0: the signer key does not match the issuer")


def test_garbled_token_text_refused(kit):
    kit.refused("not a token!", "malformed token: not base64url")


def test_truncated_token_text_refused(kit):
    text = tokens.encode(kit.root())
    kit.refused(text[:len(text) // 2], "malformed token")


def test_unknown_fields_do_not_change_revocation_id(kit):
    token = kit.root()
    revoked = frozenset({tokens.link_id(token.links[0])})
    padded = pb.Token.FromString(token.SerializeToString())
    padded.links[0].MergeFromString(b"\xa2\x06\x03abc")  # field 100, length-delimited: unknown to Link
    assert padded.links[0].SerializeToString() != token.links[0].SerializeToString()
    kit.refused(padded, "link 0: revoked", revoked=revoked)
