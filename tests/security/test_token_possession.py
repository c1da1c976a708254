"""Proof of possession and revocation: who may present a token, and which links are dead."""
from __future__ import annotations

import pytest

from park import tokens

pytestmark = pytest.mark.timeout(10)


def test_delegated_token_without_confirm_key_refused(kit):
    kit.refused(kit.root(), "bound to key", presenter=kit.carol)


def test_delegated_token_with_no_proof_refused(kit):
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(kit.root(), audience="sns", trusted_root_keys=kit.roots, presenter_key_id=None, now=kit.now)
    assert info.value.kind == "unauthenticated"
    assert "the caller did not prove possession of it" in str(info.value)


def test_delegated_token_with_confirm_key_accepted(kit):
    assert kit.verify(kit.root(), presenter=kit.bob).confirm == kit.kid(kit.bob)


def test_revoked_ancestor_refused(kit):
    root = kit.root()
    token = kit.extend(root, kit.bob)
    kit.refused(token, "link 0: revoked", revoked=frozenset({tokens.link_id(root.links[0])}))


def test_revoked_last_link_refused(kit):
    token = kit.extend(kit.root(), kit.bob)
    kit.refused(token, "link 1: revoked", revoked=frozenset({tokens.link_id(token.links[1])}))


def test_error_messages_never_contain_token_or_key_material(kit):
    token = kit.root()
    text = tokens.encode(token)
    with pytest.raises(tokens.TokenError) as info:
        kit.verify(text, presenter=kit.carol)
    message = str(info.value)
    assert text[:16] not in message
    assert kit.alice.public_key().public_bytes_raw().hex() not in message
    assert token.links[0].signature.hex()[:16] not in message
