"""The subscribing end of `Federation.Subscribe`: remote atoms this site's waiting jobs need.

`PeerLinks` keeps one stream per peer, carrying every remote atom some waiting
job needs. Peers come and go while the broker runs (`update`): a removed peer's
atoms stay asked for, unsent, until it is added again. It reconnects with backoff after any failure and sends every
still-pending atom again with the last sequence number it saw; atoms resolve
once and for ever, so what it receives after a reconnect is exactly what it
missed. A peer that is down delays its dependents; it never cancels them.
Nor does a grant that expired: the peer refuses the atom as `expired`, the
jobs that wait on it say they need fresh credentials, and a renewed grant
(`watch` again) asks for it anew. A grant refused for any other reason (revoked,
never valid) cancels the atom.

Each stream's state (open or not and since when, why it last broke, atoms
received) is kept for operators (`peer_status`).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from park._proto import conditions_pb2 as cpb
from park._proto import federation_pb2 as fpb
from park._proto import federation_pb2_grpc
from park.wire import InvalidInput, atom_from_proto, atom_to_proto
from park.conditions import AtomKey, State
from park_broker.errors import BrokerError, Code
from park_broker.federation.peers import Peer

log = logging.getLogger(__name__)

BACKOFF = (0.1, 5.0)


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What the subscriber side knows about one peer's stream."""

    peer: str
    last_seq: int                 # the peer's sequence number as of its last message (updates and progress)
    connected: bool               # the stream is open (opened when a job first waits on the peer, kept open)
    pending_atoms: int            # remote atoms still waited for
    idle_seconds: float | None    # since the peer's last message; None when not known
    address: str = ""
    wanted: bool = False          # a stream is kept (some job waited on the peer); False: none opened yet
    since: float = 0.0            # time.time() the stream last opened or broke; 0: neither yet
    last_error: str = ""          # why it last broke or failed to open, in words; "" if it never did
    atoms_received: int = 0       # resolutions received since the broker started

    @property
    def state(self) -> str:
        """One word for the stream: connected, connecting, down (see last_error) or idle (never needed)."""
        if self.connected:
            return "connected"
        if not self.wanted:
            return "idle"
        return "down" if self.last_error else "connecting"


@dataclass
class _Link:
    name: str
    peer: Peer | None             # None: not (or no longer) a peer; its atoms wait for it to be added
    atoms: dict[AtomKey, str] = field(default_factory=dict)        # pending atom -> its token
    sending: asyncio.Queue[fpb.WatchAtom] | None = None
    last_seq: int = 0
    task: asyncio.Task[None] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    last_message: float = 0.0    # time.monotonic() of the last message from the peer
    since: float = 0.0           # time.time() the stream last opened or broke
    last_error: str = ""
    received: int = 0            # atoms resolved by the peer's updates and refusals


class PeerLinks:
    """The subscriber side: one stream per peer; see the module docstring."""

    def __init__(self, peers: dict[str, Peer], tls_key: bytes, certificate: bytes, options: list[tuple[str, int]],
                 on_resolved: Callable[[dict[AtomKey, State], str], None]):
        self._links = {name: _Link(name, peer) for name, peer in peers.items()}
        self._identity = (tls_key, certificate)
        self._options = options
        self._on_resolved = on_resolved
        # (atom, why): its grant expired; set by the lifecycle, whose waiting jobs then ask for renewal
        self.on_expired: Callable[[AtomKey, str], None] = lambda key, why: None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _secure_channel(self, peer: Peer) -> grpc.aio.Channel:
        # Our certificate is our identity; the peer's pinned certificate is the only root we trust for it.
        tls_key, certificate = self._identity
        credentials = grpc.ssl_channel_credentials(root_certificates=peer.certificate, private_key=tls_key,
                                                   certificate_chain=certificate)
        return grpc.aio.secure_channel(peer.address, credentials, options=self._options)

    def channel(self, site: str) -> grpc.aio.Channel:
        """A mutual-TLS channel to a peer, for calls other than the subscription (file reads)."""
        link = self._links.get(site)
        if link is None or link.peer is None:
            raise BrokerError(Code.FAILED_PRECONDITION, f"site {site!r} is not a peer of this site (any more)")
        if site not in self._channels:
            self._channels[site] = self._secure_channel(link.peer)
        return self._channels[site]

    def update(self, peers: dict[str, Peer]) -> None:
        """The peers are now `peers`: streams to removed or changed peers close; atoms still asked of a
        changed or new peer are asked on a new stream; a removed peer's wait until it is back."""
        for name in self._links.keys() | peers.keys():
            link = self._links.setdefault(name, _Link(name, None))
            peer = peers.get(name)
            if link.peer == peer:
                continue
            if link.task is not None:
                link.task.cancel()
                link.task = None
            channel = self._channels.pop(name, None)
            if channel is not None:
                asyncio.get_running_loop().create_task(channel.close())
            link.peer, link.sending, link.last_seq = peer, None, 0
            link.since, link.last_error = 0.0, ""
            link.connected.clear()
            if peer is None and link.atoms:
                log.warning("site %s is no longer a peer: %d atoms its jobs wait on wait until it is added again",
                            name, len(link.atoms))
            elif peer is not None and link.atoms:
                link.task = asyncio.get_running_loop().create_task(self._run(link), name=f"park-peer-{name}")

    def peer_status(self) -> list[PeerStatus]:
        """Each peer's stream as metrics and operators (`Site.Peers`) see it: its state and since when, the
        last error, the peer's last sequence number, atoms pending and received, silence."""
        now = time.monotonic()
        return [PeerStatus(name, link.last_seq, link.connected.is_set(), len(link.atoms),
                           now - link.last_message if link.last_message else None, address=link.peer.address,
                           wanted=link.task is not None, since=link.since, last_error=link.last_error,
                           atoms_received=link.received)
                for name, link in self._links.items() if link.peer is not None]

    def watch(self, key: AtomKey, token: str) -> None:
        """Ask the peer holding `key` for its resolution (once; re-asked after reconnects). Asked again for
        an atom still asked for, the token replaces the one it is re-asked with (a renewed grant)."""
        link = self._links.setdefault(key.site, _Link(key.site, None))
        if key in link.atoms:
            link.atoms[key] = token
            return
        link.atoms[key] = token
        if link.peer is None:
            return
        if link.task is None:
            link.task = asyncio.get_running_loop().create_task(self._run(link), name=f"park-peer-{link.name}")
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
        peer = link.peer
        assert peer is not None
        delay = BACKOFF[0]
        while True:
            writer: asyncio.Task[None] | None = None
            try:
                async with self._secure_channel(peer) as ch:
                    call = federation_pb2_grpc.FederationStub(ch).Subscribe()
                    link.sending = asyncio.Queue()
                    await call.write(fpb.SubscribeRequest(after_seq=link.last_seq, atoms=[
                        fpb.WatchAtom(atom=atom_to_proto(k), token=t) for k, t in link.atoms.items()]))
                    writer = asyncio.create_task(self._write(call, link.sending))
                    log.info("subscribed to peer %s at %s (%d atoms, after seq %d)", peer.name,
                             peer.address, len(link.atoms), link.last_seq)
                    async for response in call:
                        delay = BACKOFF[0]
                        if not link.connected.is_set():
                            link.connected.set()
                            link.since = time.time()
                        link.last_message = time.monotonic()
                        self._receive(link, response)
                    link.last_error = "the peer ended the stream"
            except grpc.aio.AioRpcError as exc:
                link.last_error = _in_words(exc)
                log.info("stream to peer %s broke (%s); retrying in %.1f s", peer.name, exc.code().name, delay)
            finally:
                if writer is not None:
                    writer.cancel()
            if link.connected.is_set() or not link.since:
                link.since = time.time()
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
        if which == "refused":
            key = self._asked(link, response.refused.atom)
            if key is None:
                return
            link.received += 1
            if response.refused.expired:
                log.warning("peer %s: the grant for atom %s expired; its jobs wait for a renewed one", link.name,
                            key)
                self.on_expired(key, response.refused.message)
                return
            log.warning("peer %s refused atom %s: %s", link.name, key, response.refused.message)
            self._on_resolved({key: State.CANCELLED}, f"site {key.site} refused to report {key}: "
                                                      f"{response.refused.message}")
            return
        updates = [response.update] if which == "update" else list(response.updates.updates)
        resolved: dict[AtomKey, State] = {}
        for update in updates:
            key = self._asked(link, update.atom)
            if key is not None:
                link.last_seq = max(link.last_seq, update.seq)
                resolved[key] = State.READY if update.state == fpb.ATOM_STATE_READY else State.CANCELLED
        link.received += len(resolved)
        if resolved:   # the atoms one change at the peer resolved, applied together
            self._on_resolved(resolved, "")

    def _asked(self, link: _Link, atom: cpb.Atom) -> AtomKey | None:
        """The atom if it is still asked for, taken off the list: applying it twice must never happen."""
        try:
            key = atom_from_proto(atom)
        except InvalidInput:
            log.warning("peer %s sent a malformed atom; ignored", link.name)
            return None
        return key if link.atoms.pop(key, None) is not None else None


_WORDS = {
    grpc.StatusCode.UNAVAILABLE: "cannot reach it",
    grpc.StatusCode.UNAUTHENTICATED: "it does not accept this site's certificate",
    grpc.StatusCode.PERMISSION_DENIED: "it refused this site",
    grpc.StatusCode.DEADLINE_EXCEEDED: "it did not answer in time",
    grpc.StatusCode.UNIMPLEMENTED: "it does not serve federation (not a Park peer port?)",
    grpc.StatusCode.CANCELLED: "the stream was cancelled",
}


def _in_words(exc: grpc.aio.AioRpcError) -> str:
    """Why a stream broke, for operators: a phrase, then gRPC's own code and first line of detail."""
    detail = next(iter((exc.details() or "").splitlines()), "")[:200]
    phrase = _WORDS.get(exc.code(), "the stream failed")
    return f"{phrase} ({exc.code().name}{': ' + detail if detail else ''})"
