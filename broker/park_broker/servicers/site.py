"""The `Site` service: what a broker says about itself (public), and its peers' streams (operators).

`Peers` puts together what the two ends of federation know: the subscriber side
(federation.links, this site's stream to each peer) and the publisher side
(federation.publisher, each peer's stream to this site). It names peers and
addresses only: certificates, keys and the grants atoms are asked with stay in
the broker.
"""
from __future__ import annotations

import grpc

import park
from park._proto import site_pb2, site_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.federation.links import PeerLinks
from park_broker.federation.publisher import Publisher
from park_broker.servicers.boundary import unary


class SiteServicer(site_pb2_grpc.SiteServicer):
    def __init__(self, info: site_pb2.InfoResponse, links: PeerLinks | None = None,
                 publisher: Publisher | None = None):
        self.info = info
        self.links = links            # None (and publisher None): a local-only site, which has no peers
        self.publisher = publisher

    @unary
    async def Info(self, request: site_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> site_pb2.InfoResponse:
        response = site_pb2.InfoResponse()
        response.CopyFrom(self.info)
        caller = current_identity.get()
        response.caller = caller.user   # empty for an anonymous caller
        response.permissions.extend(sorted(caller.permissions))
        response.version = park.__version__
        return response

    @unary
    async def Peers(self, request: site_pb2.PeersRequest, context: grpc.aio.ServicerContext
                    ) -> site_pb2.PeersResponse:
        subscribers = self.publisher.subscribers() if self.publisher is not None else {}
        response = site_pb2.PeersResponse()
        for status in sorted(self.links.peer_status() if self.links is not None else [], key=lambda s: s.peer):
            inbound = subscribers.get(status.peer)
            response.peers.add(
                name=status.peer, address=status.address, state=status.state, since=status.since,
                last_error=status.last_error, last_seq=status.last_seq, atoms_pending=status.pending_atoms,
                atoms_received=status.atoms_received,
                idle_seconds=-1 if status.idle_seconds is None else status.idle_seconds,
                subscribed=inbound is not None, subscribed_since=inbound.since if inbound else 0.0,
                atoms_watched=inbound.atoms_watched if inbound else 0)
        return response
