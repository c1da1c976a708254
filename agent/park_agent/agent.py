"""The agent proper: the keys it holds and the requests it answers, without transport.

`Agent.handle` takes one parsed `AgentRequest` and returns its `AgentResponse`;
`park_agent.server` only moves frames. Guarantees kept here:

- a private key goes in (Add) and never comes out: no response carries it, no
  log line names more than its key id;
- only token requests are signed, and the claims are built by
  `park.signer.LocalSigner` from the parsed fields, never from caller bytes;
- a key added with a lifetime is forgotten when it runs out (checked against
  the injected clock before every request, and by a timer);
- a key added with `confirm` is used only after the askpass program says yes,
  and only if it is still held and the agent still unlocked afterwards;
- while locked, List shows nothing and every request but Unlock fails; wrong
  unlock passphrases are answered one at a time, each more slowly.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park import tokens
from park._proto import agent_pb2 as apb
from park.agent_client import IssuedToken
from park.signer import LocalSigner
from park_agent import askpass
from park_agent.protocol import error_response

__all__ = ["Agent", "HeldKey"]

log = logging.getLogger(__name__)

MAX_UNLOCK_DELAY = 10.0
_E = apb.AgentErrorCode


@dataclass(eq=False, kw_only=True)
class HeldKey:
    signer: LocalSigner
    comment: str
    expires: float | None
    confirm: bool


@dataclass(frozen=True, slots=True)
class _LockSecret:
    salt: bytes
    digest: bytes

    @staticmethod
    def derive(passphrase: str, salt: bytes) -> bytes:
        return hashlib.scrypt(passphrase.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)


class Agent:
    """One user's keys. Not thread-safe: run it on one event loop."""

    def __init__(self, *, subject: str, clock: Callable[[], float] = time.time,
                 confirm: Callable[[str], Awaitable[bool]] = askpass.confirm,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, unlock_delay: float = 0.5) -> None:
        self.subject = subject
        self._clock = clock
        self._confirm = confirm
        self._sleep = sleep
        self._unlock_delay = unlock_delay
        self._keys: dict[str, HeldKey] = {}
        self._lock: _LockSecret | None = None
        self._failed_unlocks = 0
        self._unlocking = asyncio.Lock()

    @property
    def locked(self) -> bool:
        return self._lock is not None

    def wipe(self) -> None:
        """Forget every key (SIGUSR1)."""
        self._keys.clear()
        log.info("all keys wiped")

    def _purge_expired(self) -> None:
        now = self._clock()
        for kid in [k for k, held in self._keys.items() if held.expires is not None and held.expires <= now]:
            del self._keys[kid]
            log.info("key lifetime over, key forgotten", extra={"key_id": kid})

    async def handle(self, request: apb.AgentRequest) -> apb.AgentResponse:
        kind = request.WhichOneof("request")
        self._purge_expired()
        log.debug("request", extra={"request": kind})
        if kind == "unlock":
            return await self._unlock(request.unlock.passphrase)
        if kind == "list":
            return self._list()
        if self.locked:
            return error_response(_E.AGENT_ERROR_CODE_LOCKED, "the agent is locked")
        if kind == "add":
            return self._add(request.add)
        if kind == "remove":
            return self._remove(request.remove)
        if kind == "lock":
            return self._do_lock(request.lock.passphrase)
        if kind == "stop":  # the server stops once this reply is sent
            return apb.AgentResponse(ok=apb.AgentOk())
        if kind == "issue_session":
            r = request.issue_session
            return await self._sign(r.key_id, f"a session token for {r.audience!r}",
                                    lambda s: s.session_token(r.audience, scopes=r.scopes,
                                                              subject=r.subject or self.subject, now=self._clock()))
        if kind == "delegate":
            d = request.delegate
            return await self._sign(d.key_id, f"a token for {d.audience!r} delegated to key {d.confirm[:12]}",
                                    lambda s: s.delegate(d.audience, scopes=d.scopes, confirm=d.confirm,
                                                         lifetime=d.lifetime_seconds, max_depth=d.max_depth,
                                                         subject=d.subject or self.subject, now=self._clock()))
        return error_response(_E.AGENT_ERROR_CODE_UNKNOWN_REQUEST, "unknown request type")

    def _list(self) -> apb.AgentResponse:
        if self.locked:
            return apb.AgentResponse(list=apb.AgentListResponse(locked=True))
        keys = [apb.AgentKey(key_id=kid, comment=h.comment, expires=int(h.expires or 0), confirm=h.confirm,
                             public_key=h.signer.key.public_key().public_bytes_raw())
                for kid, h in self._keys.items()]
        return apb.AgentResponse(list=apb.AgentListResponse(keys=keys))

    def _add(self, req: apb.AgentAddRequest) -> apb.AgentResponse:
        if len(req.private_key) != 32:
            return error_response(_E.AGENT_ERROR_CODE_INVALID_ARGUMENT, "private_key must be 32 raw bytes")
        signer = LocalSigner(key=Ed25519PrivateKey.from_private_bytes(req.private_key), subject=self.subject)
        lifetime = req.lifetime_seconds
        self._keys[signer.key_id] = HeldKey(signer=signer, comment=req.comment, confirm=req.confirm,
                                            expires=self._clock() + lifetime if lifetime else None)
        if lifetime:
            asyncio.get_running_loop().call_later(lifetime, self._purge_expired)
        log.info("key added", extra={"key_id": signer.key_id, "lifetime": lifetime, "confirm": req.confirm})
        return apb.AgentResponse(ok=apb.AgentOk(key_id=signer.key_id))

    def _remove(self, req: apb.AgentRemoveRequest) -> apb.AgentResponse:
        if req.all:
            self._keys.clear()
        elif self._keys.pop(req.key_id, None) is None:
            return error_response(_E.AGENT_ERROR_CODE_UNKNOWN_KEY, f"no key {req.key_id[:12]!r} in the agent")
        return apb.AgentResponse(ok=apb.AgentOk(key_id=req.key_id))

    def _do_lock(self, passphrase: str) -> apb.AgentResponse:
        if not passphrase:
            return error_response(_E.AGENT_ERROR_CODE_INVALID_ARGUMENT, "an empty passphrase cannot lock the agent")
        salt = os.urandom(16)
        self._lock = _LockSecret(salt, _LockSecret.derive(passphrase, salt))
        log.info("agent locked")
        return apb.AgentResponse(ok=apb.AgentOk())

    async def _unlock(self, passphrase: str) -> apb.AgentResponse:
        # One attempt at a time, so that parallel guesses queue behind each delay.
        async with self._unlocking:
            if self._lock is None:
                return error_response(_E.AGENT_ERROR_CODE_INVALID_ARGUMENT, "the agent is not locked")
            if passphrase and hmac.compare_digest(_LockSecret.derive(passphrase, self._lock.salt),
                                                  self._lock.digest):
                self._lock = None
                self._failed_unlocks = 0
                log.info("agent unlocked")
                return apb.AgentResponse(ok=apb.AgentOk())
            self._failed_unlocks += 1
            delay = min(self._unlock_delay * 2 ** (self._failed_unlocks - 1), MAX_UNLOCK_DELAY)
            log.warning("wrong unlock passphrase", extra={"failures": self._failed_unlocks, "delay": delay})
            await self._sleep(delay)
            return error_response(_E.AGENT_ERROR_CODE_BAD_PASSPHRASE, "wrong passphrase")

    async def _sign(self, key_id: str, what: str,
                    make: Callable[[LocalSigner], IssuedToken]) -> apb.AgentResponse:
        if not self._keys:
            return error_response(_E.AGENT_ERROR_CODE_NO_KEYS, "the agent holds no keys (add one: park-agent add)")
        kid = key_id or next(iter(self._keys))
        held = self._keys.get(kid)
        if held is None:
            return error_response(_E.AGENT_ERROR_CODE_UNKNOWN_KEY, f"no key {kid[:12]!r} in the agent")
        try:
            issued = make(held.signer)
        except tokens.TokenError as e:
            return error_response(_E.AGENT_ERROR_CODE_INVALID_ARGUMENT, e.message)
        # Signed first so that the user is only ever asked about a valid request;
        # the token is dropped unless the answer is yes.
        if held.confirm:
            if not await self._confirm(f"Allow park-agent to sign {what} with key {kid[:12]} ({held.comment})?"):
                log.info("use of key refused by the user", extra={"key_id": kid})
                return error_response(_E.AGENT_ERROR_CODE_DENIED, f"use of key {kid[:12]} was not confirmed")
            # The world may have changed while the question was open.
            self._purge_expired()
            if self.locked or self._keys.get(kid) is not held:
                return error_response(_E.AGENT_ERROR_CODE_LOCKED if self.locked else _E.AGENT_ERROR_CODE_UNKNOWN_KEY,
                                      "the key was locked or removed while awaiting confirmation")
        log.info("token signed", extra={"key_id": kid, "expires": issued.expires})
        return apb.AgentResponse(token=apb.AgentTokenResponse(token=issued.token, expires=issued.expires,
                                                              key_id=issued.key_id))
