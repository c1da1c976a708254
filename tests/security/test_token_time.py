"""Token validity windows: 60 s backdated not_before for skew, no grace at expiry."""
from __future__ import annotations

import pytest

from park import tokens

pytestmark = pytest.mark.timeout(10)


def _session(kit):
    return tokens.issue(kit.alice, subject="alice", audience="sns", now=kit.now)


def test_expired_token_refused(kit):
    kit.refused(_session(kit), "link 0: token expired", now=kit.now + tokens.SESSION_LIFETIME + 3600)


def test_token_exactly_at_expiry_is_expired(kit):
    kit.refused(_session(kit), "link 0: token expired", now=kit.now + tokens.SESSION_LIFETIME)


def test_token_one_second_before_expiry_accepted(kit):
    assert kit.verify(_session(kit), now=kit.now + tokens.SESSION_LIFETIME - 1).subject == "alice"


def test_not_yet_valid_token_refused(kit):
    kit.refused(_session(kit), "link 0: token not valid yet", now=kit.now - tokens.BACKDATE - 1)


def test_backdate_accepts_verifier_clock_60s_behind(kit):
    assert kit.verify(_session(kit), now=kit.now - tokens.BACKDATE).subject == "alice"


def test_link_lifetime_over_six_hours_refused(kit):
    token = kit.root(expires=int(kit.now) + tokens.MAX_LIFETIME + 3600)
    kit.refused(token, "link 0: lifetime longer than 21600 s")


def test_bearer_link_lifetime_over_ten_minutes_refused(kit):
    token = kit.root(confirm="", max_depth=0, expires=int(kit.now) + 3600)
    kit.refused(token, "link 0: lifetime longer than 600 s")
