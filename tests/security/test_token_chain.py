"""Chain structure: parent hashes, confirm-key signers, depth limits, narrowing expiry."""
from __future__ import annotations

import pytest

from park import tokens
from park._proto import tokens_pb2 as pb

pytestmark = pytest.mark.timeout(10)


def _three_links(kit):
    return kit.extend(kit.extend(kit.root(), kit.bob, confirm=kit.kid(kit.carol)), kit.carol,
                      confirm=kit.kid(kit.bob))


def test_three_link_chain_accepted(kit):
    assert len(kit.verify(_three_links(kit)).link_ids) == 3


def test_child_expiry_later_than_parent_refused(kit):
    root = kit.root()
    token = kit.extend(root, kit.bob, expires=pb.Claims.FromString(root.links[0].claims).expires + 1)
    kit.refused(token, "link 1: expires after its parent")


def test_depth_over_max_depth_refused(kit):
    token = kit.extend(kit.extend(kit.root(max_depth=1), kit.bob, max_depth=0), kit.carol)
    kit.refused(token, "link 2: chain depth 2 exceeds max_depth 1 of link 0")


def test_child_not_lowering_max_depth_refused(kit):
    token = kit.extend(kit.root(max_depth=2), kit.bob, max_depth=2)
    kit.refused(token, "link 1: max_depth 2 is not below its parent's 2")


def test_root_max_depth_over_hard_cap_refused(kit):
    kit.refused(kit.root(max_depth=6), "link 0: max_depth 6 exceeds the limit 5")


def test_chain_longer_than_hard_cap_refused(kit):
    token = kit.root(max_depth=5)
    for _ in range(6):
        token = kit.extend(token, kit.bob, confirm=kit.kid(kit.bob))
    kit.refused(token, "chain of 7 links is longer than 6")


def test_reordered_links_refused(kit):
    token = _three_links(kit)
    swapped = pb.Token(links=[token.links[0], token.links[2], token.links[1]])
    kit.refused(swapped, "link 1: not signed by the key that link 0 confirms")


def test_removed_middle_link_refused(kit):
    token = kit.extend(kit.extend(kit.root(), kit.bob, confirm=kit.kid(kit.bob)), kit.bob)
    removed = pb.Token(links=[token.links[0], token.links[2]])
    kit.refused(removed, "link 1: does not follow link 0")


def test_removed_root_link_refused(kit):
    token = kit.extend(kit.root(), kit.bob)
    kit.refused(pb.Token(links=token.links[1:]), "link 0: not signed by a key registered for subject 'alice'")


def test_inserted_link_refused(kit):
    token = kit.extend(kit.root(), kit.bob, confirm=kit.kid(kit.bob))
    stray = kit.extend(kit.root(), kit.bob, confirm=kit.kid(kit.bob)).links[1]
    inserted = pb.Token(links=[token.links[0], stray, token.links[1]])
    kit.refused(inserted, "link 1: does not follow link 0")


def test_child_signed_by_unconfirmed_key_refused(kit):
    kit.refused(kit.extend(kit.root(), kit.carol), "link 1: not signed by the key that link 0 confirms")


def test_extending_bearer_token_refused(kit):
    session = tokens.issue(kit.alice, subject="alice", audience="sns", now=kit.now)
    kit.refused(kit.extend(session, kit.bob), "link 1: extends a bearer link")


def test_bearer_child_link_refused(kit):
    kit.refused(kit.extend(kit.root(), kit.bob, confirm=""), "link 1: only link 0 may be a bearer link")


def test_child_changing_subject_refused(kit):
    kit.refused(kit.extend(kit.root(), kit.bob, subject="mallory"), "link 1: changes the subject")


def test_foreign_root_key_refused(kit):
    kit.refused(kit.root(signer=kit.carol), "link 0: not signed by a key registered for subject 'alice'")


def test_root_claiming_another_subject_refused(kit):
    kit.refused(kit.root(subject="bob"), "link 0: not signed by a key registered for subject 'bob'")


def test_unknown_version_refused(kit):
    kit.refused(kit.root(version=3), "link 0: unsupported token version 3")


def test_the_format_before_audiences_named_keys_is_refused_with_a_message_to_upgrade(kit):
    kit.refused(kit.root(version=1), "link 0: token format 1 names its site by name alone")


def test_empty_token_refused(kit):
    kit.refused(pb.Token(), "token has no links")
