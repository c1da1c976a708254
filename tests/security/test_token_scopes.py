"""Scopes inside tokens: strict paths, segment-wise matching, narrowing only."""
from __future__ import annotations

import pytest

from park import tokens

pytestmark = pytest.mark.timeout(10)


def test_widened_child_scope_refused(kit):
    token = kit.extend(kit.root(scopes=["files.read:/alice/j1/"]), kit.bob, scopes=["files.read:/alice/"])
    kit.refused(token, "link 1: widens scope 'files.read:/alice/' beyond its parent")


def test_child_adding_new_action_refused(kit):
    token = kit.extend(kit.root(), kit.bob, scopes=["files.read:/alice/j1/", "jobs.submit"])
    kit.refused(token, "link 1: widens scope 'jobs.submit' beyond its parent")


def test_john_does_not_grant_johnathan(kit):
    token = tokens.issue(kit.alice, subject="alice", audience="sns", scopes=["files.read:/john"], now=kit.now)
    verified = kit.verify(token)
    with pytest.raises(tokens.TokenError) as info:
        verified.require("files.read:/johnathan")
    assert info.value.kind == "permission_denied"
    assert "does not grant 'files.read:/johnathan'" in str(info.value)


def test_john_directory_does_not_grant_johnathan_files(kit):
    token = tokens.issue(kit.alice, subject="alice", audience="sns", scopes=["files.read:/john/"], now=kit.now)
    with pytest.raises(tokens.TokenError) as info:
        kit.verify(token).require("files.read:/johnathan/j1/output")
    assert info.value.kind == "permission_denied"
    assert "does not grant 'files.read:/johnathan/j1/output'" in str(info.value)


def test_dotdot_scope_in_token_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice/../bob/"]),
                "link 0: scope 'files.read:/alice/../bob/': '..' segment")


def test_percent_encoded_dotdot_scope_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice/%2e%2e/bob/"]), "percent-encoding is not allowed")


def test_uppercase_percent_encoded_dot_scope_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice/%2E/x"]), "percent-encoding is not allowed")


def test_single_dot_segment_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice/./x"]), "'.' segment")


def test_empty_segment_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice//x"]), "empty path segment")


def test_nul_in_scope_refused(kit):
    kit.refused(kit.root(scopes=["files.read:/alice/x\x00y"]), "contains NUL")


def test_path_scope_without_path_refused(kit):
    kit.refused(kit.root(scopes=["files.read"]), "files.read needs a path")


def test_path_scope_with_empty_path_refused(kit):
    kit.refused(kit.root(scopes=["jobs.read:"]), "jobs.read needs a path")


def test_relative_path_scope_refused(kit):
    kit.refused(kit.root(scopes=["files.read:alice/j1/output"]), "the path must be absolute")


def test_unknown_action_refused(kit):
    kit.refused(kit.root(scopes=["files.write:/alice/"]), "unknown action 'files.write'")


def test_issue_refuses_dotdot_scope(kit):
    with pytest.raises(tokens.TokenError) as info:
        tokens.issue(kit.alice, subject="alice", audience="sns", scopes=["files.read:/a/../b"], now=kit.now)
    assert info.value.kind == "invalid_argument"
    assert "'..' segment" in str(info.value)


def test_valid_token_without_scope_is_permission_denied(kit):
    token = tokens.issue(kit.alice, subject="alice", audience="sns", scopes=["jobs.read:/abc"], now=kit.now)
    with pytest.raises(tokens.TokenError) as info:
        kit.verify(token).require("jobs.submit")
    assert info.value.kind == "permission_denied"
    assert "does not grant 'jobs.submit'" in str(info.value)
