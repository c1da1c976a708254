"""The publishing end of `Federation.Subscribe`: serving a peer that waits on this site's jobs.

Each atom a peer asks for comes with a delegated token, checked here before
anything about the job is revealed (audience this site, the peer's key as
proven by its TLS certificate, scope `jobs.read:/<job>`, then subject the
job's owner); a refused atom is answered with `AtomRefused` on its own, never
silently dropped, and the stream stays up. The tokens of atoms still watched
are checked again whenever who may use the site changes (a revocation, a user
removed) and as each expires, so an open stream never outlives its grants; a
grant that only expired is refused with `expired` set, and the peer's job waits
for its owner to renew it rather than being cancelled.

Order (DESIGN §5): updates leave in this site's sequence order, each built
from the committed change that caused it, never from a later read of the job.
One loop per stream handles, in arrival order, the peer's requests and the
committed changes the event hub hands it; `horizon` is the sequence number of
the last change it has handled. The atoms one change resolved leave in one
message (`AtomUpdates`), so the peer applies them together. A newly asked atom is looked up in the store
(the snapshot): resolved at or before the horizon, it is sent at once (sorted);
resolved after it, it is held in `due` until the change stream reaches that
number, so it leaves between the changes around it; still pending, it is
watched and the change that resolves it sends it. A stream that falls behind
the hub is re-synchronised the same way from the store.

The open streams are kept so that operators can see who is subscribed and to
how many atoms (`subscribers`, for `Site.Peers`): names and counts, never grants.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from park import tokens
from park._proto import federation_pb2 as fpb
from park.conditions import AtomKey, State
from park.wire import InvalidInput, atom_from_proto, atom_to_proto
from park_broker.auth.users import Authority
from park_broker.core.events import EventHub, Subscription
from park_broker.core.store import Change
from park_broker.errors import BrokerError, Code
from park_broker.federation.peers import Peer

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
RECHECK = 1.0     # seconds between looks at whether watched atoms' tokens must be checked again
MAX_ATOMS_PER_STREAM = 100_000
_WIRE_STATE = {State.READY: fpb.ATOM_STATE_READY, State.CANCELLED: fpb.ATOM_STATE_CANCELLED}

# (state, sequence number that resolved it or 0, owner) of each atom asked for; absent: no such job.
AtomStates = Callable[[list[AtomKey]], Awaitable[dict[AtomKey, tuple[State, int, str]]]]
# The state a committed change gives an atom of its job (PENDING: it does not resolve it).
ResolvedBy = Callable[[AtomKey, Change], State]

_REFRESH = object()    # the hub dropped this stream for lagging: re-synchronise from the store


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A peer's subscription to this site, as operators see it."""

    since: float            # time.time() its stream opened
    atoms_watched: int      # atoms of this site's jobs it waits on, not yet resolved


class Publisher:
    """Serves Subscribe streams; see the module docstring."""

    def __init__(self, site: str, authority: Authority, hub: EventHub, states: AtomStates, resolved_by: ResolvedBy):
        self.site = site
        self.authority = authority
        self.hub = hub
        self.states = states
        self.resolved_by = resolved_by
        self._open: set[_Stream] = set()

    def subscribers(self) -> dict[str, Subscriber]:
        """The peers subscribed to this site now, by name (a peer reconnecting may briefly hold two streams)."""
        out: dict[str, Subscriber] = {}
        for stream in self._open:
            watched = sum(len(keys) for keys in stream.watched.values())
            had = out.get(stream.peer.name)
            out[stream.peer.name] = Subscriber(min(stream.opened, had.since), had.atoms_watched + watched) \
                if had else Subscriber(stream.opened, watched)
        return out

    async def serve(self, peer: Peer, requests: AsyncIterator[fpb.SubscribeRequest]
                    ) -> AsyncIterator[fpb.SubscribeResponse]:
        stream = _Stream(self, peer)
        log.info("peer %s subscribed", peer.name)
        self._open.add(stream)
        try:
            async for response in stream.run(requests):
                yield response
        finally:
            self._open.discard(stream)
            log.info("peer %s's subscription ended (%d atoms still watched)", peer.name,
                     sum(len(keys) for keys in stream.watched.values()))

    def check(self, item: fpb.WatchAtom, peer: Peer) -> tuple[AtomKey, str]:
        """The atom asked for and the subject its token speaks for; BrokerError to refuse it."""
        try:
            key = atom_from_proto(item.atom)
        except InvalidInput as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, str(exc)) from None
        if key.site != self.site:
            raise BrokerError(Code.INVALID_ARGUMENT, f"atom names site {key.site!r}; this is {self.site!r}")
        try:
            verified = self.authority.verify(item.token, peer.key_id)
        except tokens.TokenError as exc:
            raise _TokenRefused(f"token for {key}: {exc.message}", _expired(item.token)) from None
        if not verified.allows(f"jobs.read:/{key.job_id}"):
            raise BrokerError(Code.PERMISSION_DENIED, f"the token does not let {peer.name} read job {key.job_id}")
        return key, verified.subject


class _TokenRefused(BrokerError):
    def __init__(self, message: str, expired: bool):
        super().__init__(Code.UNAUTHENTICATED, message)
        self.expired = expired   # only its lifetime ran out: a renewed grant may ask again


def _expired(token: str) -> bool:
    try:
        return tokens.claims_of(token).expires <= time.time()
    except tokens.TokenError:
        return False


class _Stream:
    """One Subscribe stream's state; only `run`'s loop touches it."""

    def __init__(self, publisher: Publisher, peer: Peer):
        self.publisher = publisher
        self.peer = peer
        self.watched: dict[str, set[AtomKey]] = {}        # job id -> atoms of it still pending
        self.grants: dict[AtomKey, str] = {}               # watched atom -> the token it was asked with
        self.checked = (publisher.authority.generation, float("inf"))   # (as of, next expiry) of the grants
        self.due: list[tuple[int, str, AtomKey, State]] = []   # resolved after the horizon, by seq
        self.asked = 0
        self.opened = time.time()

    async def run(self, requests: AsyncIterator[fpb.SubscribeRequest]) -> AsyncIterator[fpb.SubscribeResponse]:
        hub = self.publisher.hub
        work: asyncio.Queue[Any] = asyncio.Queue()
        sub = hub.subscribe()
        horizon = hub.head     # every change after this comes through `sub`
        feeders = [asyncio.create_task(_read(requests, work)), asyncio.create_task(_forward(sub, work))]
        quiet_since = time.monotonic()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(work.get(), RECHECK)
                except TimeoutError:
                    for response in self._recheck():
                        yield response
                    if time.monotonic() - quiet_since >= PROGRESS_EVERY:
                        quiet_since = time.monotonic()
                        yield fpb.SubscribeResponse(progress=hub.head)
                    continue
                quiet_since = time.monotonic()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Change):
                    for response in self._on_change(item):
                        yield response
                    horizon = max(horizon, item.event.seq)
                elif item is _REFRESH:
                    hub.unsubscribe(sub)
                    sub = hub.subscribe()
                    horizon = hub.head
                    feeders.append(asyncio.create_task(_forward(sub, work)))
                    keys = [k for ks in self.watched.values() for k in ks]
                    self.watched.clear()
                    for response in await self._snapshot(keys, horizon):
                        yield response
                else:
                    for response in await self._ask(item, horizon):
                        yield response
        finally:
            for feeder in feeders:
                feeder.cancel()
            hub.unsubscribe(sub)

    def _on_change(self, change: Change) -> list[fpb.SubscribeResponse]:
        seq = change.event.seq
        before = self._release(seq - 1)
        resolved = []
        for key in list(self.watched.get(change.event.job_id, ())):
            state = self.publisher.resolved_by(key, change)
            if state is not State.PENDING:
                self._forget(key)
                resolved.append((seq, str(key), key, state))
        return before + _messages(sorted(resolved + self._due_upto(seq)))

    def _release(self, upto: int) -> list[fpb.SubscribeResponse]:
        return _messages(self._due_upto(upto))

    def _due_upto(self, upto: int) -> list[tuple[int, str, AtomKey, State]]:
        out = []
        while self.due and self.due[0][0] <= upto:
            out.append(heapq.heappop(self.due))
        return out

    async def _ask(self, items: list[fpb.WatchAtom], horizon: int) -> list[fpb.SubscribeResponse]:
        """Check newly asked atoms; answer refusals and what is already resolved, watch the rest."""
        responses: list[fpb.SubscribeResponse] = []
        subjects: dict[AtomKey, str] = {}
        for item in items:
            self.asked += 1
            try:
                if self.asked > MAX_ATOMS_PER_STREAM:
                    raise BrokerError(Code.RESOURCE_EXHAUSTED, f"at most {MAX_ATOMS_PER_STREAM} atoms a stream")
                key, subject = self.publisher.check(item, self.peer)
            except BrokerError as exc:
                responses.append(_refused(item.atom, exc))
                continue
            subjects[key] = subject
            self.grants[key] = item.token
            self._note_expiry(item.token)
        states = await self.publisher.states(list(subjects))
        admitted = []
        for key, subject in subjects.items():
            found = states.get(key)
            if found is None or found[2] != subject:   # the same answer whether absent or another's
                self.grants.pop(key, None)
                responses.append(_refused(atom_to_proto(key), BrokerError(
                    Code.NOT_FOUND, f"site {self.publisher.site!r} has no job {key.job_id} of {subject!r}")))
            else:
                admitted.append(key)
        return responses + self._place(admitted, states, horizon)

    async def _snapshot(self, keys: list[AtomKey], horizon: int) -> list[fpb.SubscribeResponse]:
        return self._place(keys, await self.publisher.states(keys), horizon)

    def _place(self, keys: list[AtomKey], states: dict[AtomKey, tuple[State, int, str]],
               horizon: int) -> list[fpb.SubscribeResponse]:
        """Send resolutions at or before the horizon (in order), hold later ones, watch pending ones."""
        now = []
        for key in keys:
            state, seq, _ = states[key]
            if state is State.PENDING:
                self.watched.setdefault(key.job_id, set()).add(key)
                continue
            self.grants.pop(key, None)
            if seq <= horizon:
                now.append((seq, str(key), key, state))
            else:
                heapq.heappush(self.due, (seq, str(key), key, state))
        return _messages(sorted(now))

    def _note_expiry(self, token: str) -> None:
        try:
            expires = float(tokens.claims_of(token).expires)
        except tokens.TokenError:
            return
        self.checked = (self.checked[0], min(self.checked[1], expires))

    def _recheck(self) -> list[fpb.SubscribeResponse]:
        """Refuse the watched atoms whose tokens no longer hold, once who may use the site changed or a
        token reached its expiry; each distinct token is verified once."""
        generation, next_expiry = self.checked
        now_generation = self.publisher.authority.current_generation()
        if now_generation == generation and time.time() < next_expiry:
            return []
        self.checked = (now_generation, float("inf"))
        verdicts: dict[str, BrokerError | None] = {}
        responses = []
        for keys in list(self.watched.values()):
            for key in list(keys):
                token = self.grants.get(key, "")
                if token not in verdicts:
                    try:
                        self.publisher.check(fpb.WatchAtom(atom=atom_to_proto(key), token=token), self.peer)
                        verdicts[token] = None
                        self._note_expiry(token)
                    except BrokerError as exc:
                        verdicts[token] = exc
                refusal = verdicts[token]
                if refusal is not None:
                    self._forget(key)
                    responses.append(_refused(atom_to_proto(key), refusal))
        return responses

    def _forget(self, key: AtomKey) -> None:
        self.grants.pop(key, None)
        keys = self.watched.get(key.job_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.watched[key.job_id]


async def _read(requests: AsyncIterator[fpb.SubscribeRequest], work: asyncio.Queue[Any]) -> None:
    try:
        async for request in requests:
            work.put_nowait(list(request.atoms))
    except Exception as exc:  # noqa: BLE001 - handed to the stream, which ends with it
        work.put_nowait(exc)


async def _forward(sub: Subscription, work: asyncio.Queue[Any]) -> None:
    """Committed changes into the stream's loop, in sequence order, then _REFRESH if the hub dropped us."""
    while not (sub.overflowed and sub.queue.empty()):
        work.put_nowait(await sub.queue.get())
    work.put_nowait(_REFRESH)


def _refused(atom: Any, exc: BrokerError) -> fpb.SubscribeResponse:
    return fpb.SubscribeResponse(refused=fpb.AtomRefused(
        atom=atom, code=grpc.StatusCode[exc.code.name].value[0], message=exc.message,
        expired=isinstance(exc, _TokenRefused) and exc.expired))


def _update(key: AtomKey, state: State, seq: int) -> fpb.AtomUpdate:
    return fpb.AtomUpdate(atom=atom_to_proto(key), state=_WIRE_STATE[state], seq=seq)


def _messages(resolved: list[tuple[int, str, AtomKey, State]]) -> list[fpb.SubscribeResponse]:
    """Sorted resolutions as messages: one per sequence number, so atoms one change resolved travel together."""
    out = []
    for seq, group in itertools.groupby(resolved, key=lambda r: r[0]):
        updates = [_update(key, state, seq) for _, _, key, state in group]
        out.append(fpb.SubscribeResponse(update=updates[0]) if len(updates) == 1 else
                   fpb.SubscribeResponse(updates=fpb.AtomUpdates(updates=updates)))
    return out
