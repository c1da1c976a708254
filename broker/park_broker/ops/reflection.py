"""gRPC server reflection, so `grpcurl -cacert tls.crt HOST:PORT list` works.

Reflection is public (policy.PUBLIC): it reveals the service definitions, which
are in the open-source protos anyway, and no data. It is served under both
names clients look for: `grpc.reflection.v1.ServerReflection` (tried first by
grpcurl >= 1.8.8 and grpc-go tools) and `grpc.reflection.v1alpha.ServerReflection`
(what grpcio-reflection ships). The two protos differ only in their package, so
the v1alpha messages and servicer answer both.

This module never decides who may call reflection; the policy table does.
"""
from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from park._proto import federation_pb2, files_pb2, jobs_pb2, packages_pb2, site_pb2

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = reflection.SERVICE_NAME
METHODS = (f"/{V1}/ServerReflectionInfo", f"/{V1ALPHA}/ServerReflectionInfo")


def broker_services(*, federation: bool) -> list[str]:
    """Full names of the services a broker registers (Federation only when it has users to delegate)."""
    modules = [jobs_pb2, packages_pb2, site_pb2, files_pb2] + ([federation_pb2] if federation else [])
    names = [svc.full_name for module in modules for svc in module.DESCRIPTOR.services_by_name.values()]
    return names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection for `services` (full names, e.g. park.v1.Jobs) on an aio server, before it starts."""
    servicer = reflection.aio.ReflectionServicer([*services, V1ALPHA])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": v1}),))
