"""The `Federation` service: peers' Subscribe streams, served by the publisher."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from park._proto import federation_pb2 as fpb
from park._proto import federation_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.federation.publisher import Publisher
from park_broker.servicers.boundary import streaming


class FederationServicer(federation_pb2_grpc.FederationServicer):
    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    @streaming
    async def Subscribe(self, request_iterator: AsyncIterator[fpb.SubscribeRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[fpb.SubscribeResponse]:
        async for item in self.publisher.serve(current_identity.get().peer, request_iterator):
            yield item
