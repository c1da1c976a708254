"""Unit and property tests of park.tokens: scope algebra, issuing, attenuation, wire text."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from park import tokens
from park.tokens import Scope, TokenError, covers, parse_scope

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0
ALICE = Ed25519PrivateKey.generate()
BOB = Ed25519PrivateKey.generate()
CAROL = Ed25519PrivateKey.generate()
ROOTS = {"alice": [ALICE.public_key().public_bytes_raw()]}


def kid(key: Ed25519PrivateKey) -> str:
    return tokens.key_id(key.public_key())


def check(token, presenter=None, now=NOW):
    return tokens.verify(token, audience="sns", trusted_root_keys=ROOTS,
                         presenter_key_id=kid(presenter) if presenter else None, now=now)


segments = st.lists(st.text(alphabet="abcjohnat0._-", min_size=1, max_size=6)
                    .filter(lambda s: s not in (".", "..")), min_size=0, max_size=4)
path_scopes = st.builds(lambda action, segs, d: Scope(action, tuple(segs), d or not segs),
                        st.sampled_from(sorted(tokens.PATH_ACTIONS)), segments, st.booleans())
scopes = st.one_of(path_scopes, st.sampled_from(sorted(tokens.PLAIN_ACTIONS)).map(Scope))


@given(scopes)
def test_scope_text_round_trips(scope):
    assert parse_scope(str(scope)) == scope


@given(path_scopes, path_scopes)
def test_string_prefix_never_grants_without_segment_prefix(granted, wanted):
    if covers(granted, wanted):
        assert wanted.segments[:len(granted.segments)] == granted.segments


@given(st.sampled_from(["/john", "/john/"]), st.text(alphabet="abnx", min_size=1, max_size=5))
def test_john_never_covers_a_longer_name(prefix, suffix):
    assert not covers(parse_scope("files.read:" + prefix), parse_scope(f"files.read:/john{suffix}/x"))


@given(scopes, scopes, scopes)
def test_coverage_is_reflexive_and_transitive(a, b, c):
    assert covers(a, a)
    if covers(a, b) and covers(b, c):
        assert covers(a, c)


def test_directory_covers_everything_below_it():
    assert covers(parse_scope("files.read:/a/"), parse_scope("files.read:/a/b/c"))
    assert covers(parse_scope("files.read:/"), parse_scope("files.read:/a/b/"))
    assert not covers(parse_scope("files.read:/a/b"), parse_scope("files.read:/a/b/c"))
    assert not covers(parse_scope("files.read:/a/"), parse_scope("jobs.read:/a/b"))
    assert not covers(parse_scope("admin"), parse_scope("jobs.submit"))


@settings(max_examples=60, deadline=None)
@given(st.lists(scopes, min_size=1, max_size=3), st.lists(scopes, min_size=1, max_size=3))
def test_attenuation_can_only_narrow(parent_scopes, child_scopes):
    root = tokens.issue(ALICE, subject="alice", audience="sns", scopes=[str(s) for s in parent_scopes],
                        confirm=kid(BOB), max_depth=1, now=NOW)
    try:
        child = tokens.attenuate(root, BOB, confirm=kid(CAROL), scopes=[str(s) for s in child_scopes], now=NOW)
    except TokenError as e:
        assert e.kind == "invalid_argument"
        assert "is not covered by the parent token" in str(e)
        return
    granted = check(child, presenter=CAROL).scopes
    assert all(any(covers(p, g) for p in parent_scopes) for g in granted)


@settings(max_examples=30, deadline=None)
@given(st.lists(scopes, min_size=1, max_size=4), st.sampled_from(["", kid(BOB)]))
def test_encode_decode_round_trip(token_scopes, confirm):
    token = tokens.issue(ALICE, subject="alice", audience="sns", scopes=[str(s) for s in token_scopes],
                         confirm=confirm, now=NOW)
    text = tokens.encode(token)
    assert text.isascii() and "=" not in text
    assert tokens.decode(text) == token


def test_session_token_defaults():
    token = tokens.issue(ALICE, subject="alice", audience="sns", now=NOW)
    verified = check(token)
    assert verified.expires == NOW + tokens.SESSION_LIFETIME
    assert verified.confirm == ""
    assert [str(s) for s in verified.scopes] == list(tokens.SESSION_SCOPES)
    assert verified.root_key_id == kid(ALICE)


def test_delegated_token_defaults_to_one_hour():
    token = tokens.issue(ALICE, subject="alice", audience="sns", scopes=["jobs.submit"], confirm=kid(BOB), now=NOW)
    assert check(token, presenter=BOB).expires == NOW + tokens.DELEGATED_LIFETIME


@pytest.mark.parametrize(("confirm", "lifetime", "fragment"), [
    ("", 601, "lifetime 601 s of a bearer session token must be in (0, 600]"),
    ("x" * 64, 60, "confirm must be a key id"),
    (kid(BOB), tokens.MAX_LIFETIME + 1, "lifetime 21601 s of a delegated token of broad scope (one scoped to a single job or file may live longer) must be in (0, 21600]"),
    (kid(BOB), 0, "must be in (0, 21600]"),
], ids=["bearer-too-long", "confirm-not-a-key-id", "delegated-too-long", "zero-lifetime"])
def test_issue_refuses_bad_requests(confirm, lifetime, fragment):
    with pytest.raises(TokenError) as info:
        tokens.issue(ALICE, subject="alice", audience="sns", confirm=confirm, lifetime=lifetime, now=NOW)
    assert info.value.kind == "invalid_argument"
    assert fragment in str(info.value)


def test_attenuated_chain_verifies_and_narrows():
    root = tokens.issue(ALICE, subject="alice", audience="sns", scopes=["files.read:/alice/"],
                        confirm=kid(BOB), max_depth=2, now=NOW)
    child = tokens.attenuate(root, BOB, confirm=kid(CAROL), scopes=["files.read:/alice/j1/out"], lifetime=60,
                             now=NOW + 10)
    verified = check(child, presenter=CAROL, now=NOW + 20)
    assert [str(s) for s in verified.scopes] == ["files.read:/alice/j1/out"]
    assert verified.expires == NOW + 70
    assert len(verified.link_ids) == 2 and verified.link_ids[0] == tokens.link_id(root.links[0])


@pytest.mark.parametrize(("signer", "kwargs", "fragment"), [
    (CAROL, {}, "this token is confirmed to key"),
    (BOB, {"scopes": ["files.read:/alice/"]}, "is not covered by the parent token"),
    (BOB, {"max_depth": 1}, "max_depth must be below the parent's 1"),
    (BOB, {"lifetime": 7200}, "would expire after its parent"),
    (BOB, {"confirm": ""}, "only link 0 may be a bearer link"),
])
def test_attenuate_refuses_anything_but_narrowing(signer, kwargs, fragment):
    root = tokens.issue(ALICE, subject="alice", audience="sns", scopes=["files.read:/alice/j1/"],
                        confirm=kid(BOB), max_depth=1, now=NOW)
    with pytest.raises(TokenError) as info:
        tokens.attenuate(root, signer, **{"confirm": kid(CAROL), **kwargs}, now=NOW)
    assert info.value.kind == "invalid_argument"
    assert fragment in str(info.value)


def test_attenuate_refuses_exhausted_depth():
    root = tokens.issue(ALICE, subject="alice", audience="sns", confirm=kid(BOB), scopes=["jobs.submit"], now=NOW)
    with pytest.raises(TokenError, match="max_depth must be below the parent's 0"):
        tokens.attenuate(root, BOB, confirm=kid(CAROL), now=NOW)


def test_attenuate_refuses_bearer_token():
    with pytest.raises(TokenError, match="a bearer token cannot be extended"):
        tokens.attenuate(tokens.issue(ALICE, subject="alice", audience="sns", now=NOW), BOB, confirm=kid(CAROL))


def test_public_key_text_round_trips():
    raw = ALICE.public_key().public_bytes_raw()
    text = tokens.format_public_key(raw)
    assert text.startswith("ed25519:") and len(text) == 51
    assert tokens.parse_public_key(text + " alice@laptop") == raw
    assert tokens.key_id(raw) == kid(ALICE) and len(kid(ALICE)) == 64


@pytest.mark.parametrize("text", ["", "ed25519:", "rsa:AAAA", "ed25519:" + "A" * 42, "ed25519:" + "%" * 43])
def test_parse_public_key_refuses_garbage(text):
    with pytest.raises(TokenError, match="a public key looks like"):
        tokens.parse_public_key(text)


@pytest.mark.parametrize("text", ["jobs.submit:/x", "admin:", "files.read:/a/b\\c", "files.read:/a b", "x" * 2000])
def test_parse_scope_refuses(text):
    with pytest.raises(TokenError) as info:
        parse_scope(text)
    assert info.value.kind == "invalid_argument"


def test_a_delegated_token_scoped_to_one_job_or_file_may_outlive_the_broad_limit() -> None:
    week = 7 * 24 * 3600
    for scope in ("files.read:/alice/" + "a" * 26 + "/output", "jobs.read:/" + "a" * 26):
        token = tokens.issue(ALICE, subject="alice", audience="sns", scopes=[scope], confirm=kid(BOB), lifetime=week)
        assert tokens.verify(token, audience="sns", trusted_root_keys=ROOTS, presenter_key_id=kid(BOB)).lifetime == week
    for broad in ("files.read:/alice/", "jobs.read:/"):
        with pytest.raises(tokens.TokenError, match="broad scope"):
            tokens.issue(ALICE, subject="alice", audience="sns", scopes=[broad], confirm=kid(BOB), lifetime=week)
    with pytest.raises(tokens.TokenError, match="must be in"):
        tokens.issue(ALICE, subject="alice", audience="sns", scopes=["jobs.read:/" + "a" * 26], confirm=kid(BOB),
                     lifetime=tokens.MAX_NARROW_LIFETIME + 1)
