"""Audience: exactly one site, compared byte for byte, fixed along the chain."""
from __future__ import annotations

import pytest

from park import tokens

pytestmark = pytest.mark.timeout(10)


def test_wrong_audience_refused(kit):
    token = tokens.issue(kit.alice, subject="alice", audience="cluster", now=kit.now)
    kit.refused(token, "token is for audience 'cluster', not 'sns'")


def test_audience_differing_only_in_case_refused(kit):
    token = tokens.issue(kit.alice, subject="alice", audience="SNS", now=kit.now)
    kit.refused(token, "token is for audience 'SNS', not 'sns'")


def test_wildcard_audience_is_not_special(kit):
    kit.refused(kit.root(audience="*"), "token is for audience '*', not 'sns'")


def test_issue_refuses_wildcard_audience(kit):
    with pytest.raises(tokens.TokenError) as info:
        tokens.issue(kit.alice, subject="alice", audience="*", now=kit.now)
    assert info.value.kind == "invalid_argument"
    assert "audience must be a site name" in str(info.value)


def test_child_link_changing_audience_refused(kit):
    token = kit.extend(kit.root(), kit.bob, audience="cluster")
    kit.refused(token, "link 1: changes the audience", audience="cluster")
