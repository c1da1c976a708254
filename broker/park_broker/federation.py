"""Condition state between sites: the two ends of `Federation.Subscribe`.

`Publisher` serves a peer that waits on this site's jobs. Each atom it asks
for comes with a delegated token, checked here (audience this site, scope
`jobs.read:/<job>`, subject the job's owner, confirm the peer's key as proven
by its TLS certificate); a refused atom is answered with `AtomRefused`, never
silently dropped. Resolved atoms are reported once, in the order of this site's
event sequence, then every later resolution as its event is committed.

`PeerLinks` is the subscriber: one stream per peer, carrying every remote atom
some waiting job needs. It reconnects with backoff after any failure and sends
every still-pending atom again with the last sequence number it saw; atoms
resolve once and for ever, so what it receives after a reconnect is exactly
what it missed. A peer that is down delays its dependents; it never cancels them.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from park import tokens
from park._proto import federation_pb2 as fpb
from park._proto import federation_pb2_grpc
from park._wire import InvalidInput, atom_from_proto, atom_to_proto
from park.conditions import AtomKey, State
from park_broker.errors import BrokerError, Code
from park_broker.events import EventHub, Subscription
from park_broker.metrics import PeerStatus
from park_broker.peers import Peer
from park_broker.users import Authority

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
BACKOFF = (0.1, 5.0)
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


@dataclass
class _Link:
    peer: Peer
    atoms: dict[AtomKey, str] = field(default_factory=dict)        # pending atom -> its token
    sending: asyncio.Queue[fpb.WatchAtom] | None = None
    last_seq: int = 0
    task: asyncio.Task[None] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    last_message: float = 0.0    # time.monotonic() of the last message from the peer


class PeerLinks:
    """The subscriber side: one stream per peer; see the module docstring."""

    def __init__(self, peers: dict[str, Peer], credentials: grpc.ChannelCredentials, options: list[tuple[str, int]],
                 on_resolved: Callable[[AtomKey, State, str], None]):
        self._links = {name: _Link(peer) for name, peer in peers.items()}
        self._credentials = credentials
        self._options = options
        self._on_resolved = on_resolved
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, site: str) -> grpc.aio.Channel:
        """A mutual-TLS channel to a peer, for calls other than the subscription (file reads)."""
        if site not in self._channels:
            self._channels[site] = grpc.aio.secure_channel(self._links[site].peer.address, self._credentials,
                                                           options=self._options)
        return self._channels[site]

    def peer_status(self) -> list[PeerStatus]:
        """Each peer's stream as metrics see it: last sequence number, connected, atoms pending, silence."""
        now = time.monotonic()
        return [PeerStatus(link.peer.name, link.last_seq, link.connected.is_set(), len(link.atoms),
                           now - link.last_message if link.last_message else None)
                for link in self._links.values()]

    def knows(self, site: str) -> bool:
        return site in self._links

    def watch(self, key: AtomKey, token: str) -> None:
        """Ask the peer holding `key` for its resolution (once; re-asked after reconnects)."""
        link = self._links[key.site]
        if key in link.atoms:
            return
        link.atoms[key] = token
        if link.task is None:
            link.task = asyncio.get_running_loop().create_task(self._run(link), name=f"park-peer-{link.peer.name}")
        elif link.sending is not None:
            link.sending.put_nowait(fpb.WatchAtom(atom=atom_to_proto(key), token=token))

    async def close(self) -> None:
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def _run(self, link: _Link) -> None:
        """Keep the peer's stream open, idle or not (atoms come and go); back off only after failures."""
        delay = BACKOFF[0]
        while True:
            writer: asyncio.Task[None] | None = None
            try:
                async with grpc.aio.secure_channel(link.peer.address, self._credentials, options=self._options) as ch:
                    call = federation_pb2_grpc.FederationStub(ch).Subscribe()
                    link.sending = asyncio.Queue()
                    await call.write(fpb.SubscribeRequest(after_seq=link.last_seq, atoms=[
                        fpb.WatchAtom(atom=atom_to_proto(k), token=t) for k, t in link.atoms.items()]))
                    writer = asyncio.create_task(self._write(call, link.sending))
                    async for response in call:
                        delay = BACKOFF[0]
                        link.connected.set()
                        link.last_message = time.monotonic()
                        self._receive(link, response)
            except grpc.aio.AioRpcError as exc:
                log.info("stream to peer %s broke (%s); retrying in %.1f s", link.peer.name, exc.code().name, delay)
            finally:
                if writer is not None:
                    writer.cancel()
            link.connected.clear()
            link.sending = None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF[1])

    @staticmethod
    async def _write(call: grpc.aio.StreamStreamCall, sending: asyncio.Queue[fpb.WatchAtom]) -> None:
        """Atoms asked for while the stream is open, batched."""
        while True:
            more = [await sending.get()]
            while not sending.empty() and len(more) < 1000:
                more.append(sending.get_nowait())
            await call.write(fpb.SubscribeRequest(atoms=more))

    def _receive(self, link: _Link, response: fpb.SubscribeResponse) -> None:
        which = response.WhichOneof("item")
        if which == "progress":
            link.last_seq = max(link.last_seq, response.progress)
            return
        item = response.update if which == "update" else response.refused
        try:
            key = atom_from_proto(item.atom)
        except InvalidInput:
            log.warning("peer %s sent a malformed atom; ignored", link.peer.name)
            return
        if link.atoms.pop(key, None) is None:
            return   # not (or no longer) asked for: applying it twice must never happen
        if which == "update":
            link.last_seq = max(link.last_seq, response.update.seq)
            state = State.READY if response.update.state == fpb.ATOM_STATE_READY else State.CANCELLED
            self._on_resolved(key, state, "")
        else:
            log.warning("peer %s refused atom %s: %s", link.peer.name, key, response.refused.message)
            self._on_resolved(key, State.CANCELLED, f"site {key.site} refused to report {key}: "
                                                    f"{response.refused.message}")


