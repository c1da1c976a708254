"""Shared fixtures for the security suite.

`start_agent` and `agent_process` (from tests/agent_harness.py) run real agents.
`kit` crafts token chains link by link, bypassing the checks of `issue` and
`attenuate`, so that each test can build exactly the malformed or malicious
chain it names and see the verifier refuse it.
"""
from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park import tokens
from park._proto import tokens_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent_harness import agent_process, start_agent  # noqa: E402,F401  (fixtures for test_agent_*)

T0 = 1_800_000_000.0


@dataclass
class TokenKit:
    """Alice is the user (registered at site "sns"); bob and carol are brokers."""

    alice: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    bob: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    carol: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    now: float = T0

    @staticmethod
    def kid(key: Ed25519PrivateKey) -> str:
        return tokens.key_id(key.public_key())

    @property
    def roots(self) -> dict[str, list[bytes]]:
        return {"alice": [self.alice.public_key().public_bytes_raw()]}

    def root(self, signer: Ed25519PrivateKey | None = None, **overrides: object) -> pb.Token:
        """Link 0: a delegated token from alice to bob unless overridden."""
        signer = signer or self.alice
        fields: dict[str, object] = dict(
            version=tokens.VERSION, issuer=self.kid(signer), subject="alice", audience="sns",
            scopes=["files.read:/alice/"], not_before=int(self.now) - 60, expires=int(self.now) + 3600,
            id=secrets.token_hex(16), max_depth=2, confirm=self.kid(self.bob))
        fields.update(overrides)
        return pb.Token(links=[tokens.sign_link(pb.Claims(**fields), signer)])

    def extend(self, token: pb.Token, signer: Ed25519PrivateKey, **overrides: object) -> pb.Token:
        """Append a link that copies its parent's claims, one level deeper, unless overridden."""
        parent = pb.Claims.FromString(token.links[-1].claims)
        fields: dict[str, object] = dict(
            version=parent.version, issuer=self.kid(signer), subject=parent.subject, audience=parent.audience,
            scopes=list(parent.scopes), not_before=parent.not_before, expires=parent.expires,
            id=secrets.token_hex(16), max_depth=max(parent.max_depth - 1, 0),
            parent=tokens.link_id(token.links[-1]), confirm=self.kid(self.carol))
        fields.update(overrides)
        return pb.Token(links=[*token.links, tokens.sign_link(pb.Claims(**fields), signer)])

    def verify(self, token: pb.Token | str, *, presenter: Ed25519PrivateKey | None = None,
               audience: str = "sns", revoked: frozenset[str] = frozenset(), now: float | None = None,
               ) -> tokens.Verified:
        """Verify as site "sns"; the presenter defaults to the holder of the last confirm key."""
        if presenter is None and isinstance(token, pb.Token) and token.links:
            last = pb.Claims.FromString(token.links[-1].claims).confirm
            presenter_id: str | None = last or None
        else:
            presenter_id = self.kid(presenter) if presenter else None
        return tokens.verify(token, audience=audience, trusted_root_keys=self.roots,
                             presenter_key_id=presenter_id, revoked=revoked,
                             now=self.now if now is None else now)

    def refused(self, token: pb.Token | str, fragment: str, kind: str = "unauthenticated",
                **kwargs: object) -> None:
        with pytest.raises(tokens.TokenError) as info:
            self.verify(token, **kwargs)  # type: ignore[arg-type]
        assert info.value.kind == kind
        assert fragment in str(info.value)


@pytest.fixture
def kit() -> TokenKit:
    return TokenKit()
