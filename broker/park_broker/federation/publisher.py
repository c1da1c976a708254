"""The publishing end of `Federation.Subscribe`: serving a peer that waits on this site's jobs.

Each atom a peer asks for comes with a delegated token, checked here (audience
this site, scope `jobs.read:/<job>`, subject the job's owner, confirm the
peer's key as proven by its TLS certificate); a refused atom is answered with
`AtomRefused`, never silently dropped. Resolved atoms are reported once, in the
order of this site's event sequence, then every later resolution as its event
is committed, with progress marks every `PROGRESS_EVERY` seconds.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from park import tokens
from park._proto import federation_pb2 as fpb
from park.wire import InvalidInput, atom_from_proto, atom_to_proto
from park.conditions import AtomKey, State
from park_broker.auth.users import Authority
from park_broker.core.events import EventHub, Subscription
from park_broker.errors import BrokerError, Code
from park_broker.federation.peers import Peer

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
MAX_ATOMS_PER_STREAM = 100_000
_WIRE_STATE = {State.READY: fpb.ATOM_STATE_READY, State.CANCELLED: fpb.ATOM_STATE_CANCELLED}


class Publisher:
    """Serves Subscribe streams; `states` gives an atom's (state, resolving seq, job owner)
    or raises BrokerError (NOT_FOUND) for a job this site does not have."""

    def __init__(self, site: str, authority: Authority, hub: EventHub,
                 states: Callable[[AtomKey], Awaitable[tuple[State, int, str]]]):
        self.site = site
        self.authority = authority
        self.hub = hub
        self.states = states

    async def serve(self, peer: Peer, requests: AsyncIterator[fpb.SubscribeRequest]
                    ) -> AsyncIterator[fpb.SubscribeResponse]:
        """Reports flow through one queue, handled by this one loop, so they leave in sequence order."""
        work: asyncio.Queue[_Work] = asyncio.Queue()
        watched: dict[str, set[AtomKey]] = {}          # job id -> atoms of it this peer still waits on
        sub = self.hub.subscribe()
        feeders = [asyncio.create_task(self._read(peer, requests, watched, work)),
                   asyncio.create_task(_forward(sub, work))]
        try:
            while True:
                try:
                    item = await asyncio.wait_for(work.get(), PROGRESS_EVERY)
                except TimeoutError:
                    yield fpb.SubscribeResponse(progress=self.hub.head)
                    continue
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, fpb.SubscribeResponse):
                    yield item
                    continue
                if item is _REFRESH:   # the hub dropped us for lagging: look at every watched atom afresh
                    self.hub.unsubscribe(sub)
                    sub = self.hub.subscribe()
                    feeders.append(asyncio.create_task(_forward(sub, work)))
                    keys = [k for ks in watched.values() for k in ks]
                else:
                    keys = list(item) if isinstance(item, list) else list(watched.get(item, ()))
                for seq, key, state in sorted(await self._resolved(keys, watched)):
                    yield _update(key, state, seq)
        finally:
            for feeder in feeders:
                feeder.cancel()
            self.hub.unsubscribe(sub)

    async def _read(self, peer: Peer, requests: AsyncIterator[fpb.SubscribeRequest],
                    watched: dict[str, set[AtomKey]], work: asyncio.Queue[_Work]) -> None:
        count = 0
        try:
            async for request in requests:
                admitted = []
                for item in request.atoms:
                    count += 1
                    try:
                        if count > MAX_ATOMS_PER_STREAM:
                            raise BrokerError(Code.RESOURCE_EXHAUSTED, f"at most {MAX_ATOMS_PER_STREAM} atoms a stream")
                        key = self._admit(item)
                        _, _, owner = await self.states(key)
                        self._check_token(item.token, peer, key, owner)
                    except BrokerError as exc:
                        work.put_nowait(fpb.SubscribeResponse(refused=fpb.AtomRefused(
                            atom=item.atom, code=grpc.StatusCode[exc.code.name].value[0], message=exc.message)))
                        continue
                    admitted.append(key)
                # Watched, then checked, with no wait in between: a resolution committed from here on
                # is queued after this check, and one committed before it is found by it.
                for key in admitted:
                    watched.setdefault(key.job_id, set()).add(key)
                work.put_nowait(admitted)
        except Exception as exc:  # noqa: BLE001 - handed to the stream, which ends with it
            work.put_nowait(exc)

    async def _resolved(self, keys: list[AtomKey], watched: dict[str, set[AtomKey]]
                        ) -> list[tuple[int, AtomKey, State]]:
        """The atoms among `keys` that have resolved, each taken out of `watched` (so reported once)."""
        found = []
        for key in keys:
            state, seq, _ = await self.states(key)
            if state is not State.PENDING and key in watched.get(key.job_id, ()):
                _forget(watched, key)
                found.append((seq, key, state))
        return found

    def _admit(self, item: fpb.WatchAtom) -> AtomKey:
        try:
            key = atom_from_proto(item.atom)
        except InvalidInput as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, str(exc)) from None
        if key.site != self.site:
            raise BrokerError(Code.INVALID_ARGUMENT, f"atom names site {key.site!r}; this is {self.site!r}")
        return key

    def _check_token(self, token: str, peer: Peer, key: AtomKey, owner: str) -> None:
        try:
            verified = self.authority.verify(token, peer.key_id)
        except tokens.TokenError as exc:
            raise BrokerError(Code.UNAUTHENTICATED, f"token for {key}: {exc.message}") from None
        if verified.subject != owner or not verified.allows(f"jobs.read:/{key.job_id}"):
            raise BrokerError(Code.PERMISSION_DENIED, f"the token does not let {peer.name} read job {key.job_id}")


_REFRESH = object()
# What the serve loop handles: a response to send, atoms to check, a job that changed, or the end.
_Work = Any


async def _forward(sub: Subscription, work: asyncio.Queue[_Work]) -> None:
    """Committed changes, as the ids of the jobs they touch, into the serve loop's queue."""
    while not (sub.overflowed and sub.queue.empty()):
        work.put_nowait((await sub.queue.get()).event.job_id)
    work.put_nowait(_REFRESH)


def _forget(watched: dict[str, set[AtomKey]], key: AtomKey) -> None:
    keys = watched.get(key.job_id)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del watched[key.job_id]


def _update(key: AtomKey, state: State, seq: int) -> fpb.SubscribeResponse:
    return fpb.SubscribeResponse(update=fpb.AtomUpdate(atom=atom_to_proto(key), state=_WIRE_STATE[state], seq=seq))
