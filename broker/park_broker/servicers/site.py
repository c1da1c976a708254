"""The `Site` service: what a broker says about itself (public)."""
from __future__ import annotations

import grpc

import park
from park._proto import site_pb2, site_pb2_grpc
from park_broker.auth.policy import current_identity
from park_broker.servicers.boundary import unary


class SiteServicer(site_pb2_grpc.SiteServicer):
    def __init__(self, info: site_pb2.InfoResponse):
        self.info = info

    @unary
    async def Info(self, request: site_pb2.InfoRequest, context: grpc.aio.ServicerContext
                   ) -> site_pb2.InfoResponse:
        response = site_pb2.InfoResponse()
        response.CopyFrom(self.info)
        response.caller = current_identity.get().user   # empty for an anonymous caller
        response.version = park.__version__
        return response
