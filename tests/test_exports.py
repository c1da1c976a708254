"""The public surface is small and pinned: changing it is a decision, not an accident."""
from __future__ import annotations

import park
from park._proto import federation_pb2, files_pb2, jobs_pb2, packages_pb2, site_pb2
from park_broker.auth.policy import POLICY


def test_park_exports_exactly_the_documented_names() -> None:
    assert sorted(park.__all__) == sorted([
        "Condition", "ConfigError", "Credentials", "CurrentJob", "ExpressionError", "Job", "JobCancelled", "JobEvent", "JobFailed", "JobGroup", "MemoReport", "PackageInfo",
        "NoServiceError", "ParkError", "Race", "ResultFile", "Service", "ServiceError", "State", "SubmitError",
        "credentials", "current_job", "fetch_url", "install_service", "job", "map", "race", "remote_service", "renew", "report", "run", "submit",
    ])
    for name in park.__all__:
        assert hasattr(park, name), name


def test_policy_covers_exactly_the_served_methods() -> None:
    served = {f"/park.v1.{svc.name}/{m.name}"
              for module in (federation_pb2, files_pb2, jobs_pb2, packages_pb2, site_pb2) for svc in module.DESCRIPTOR.services_by_name.values()
              for m in svc.methods}
    health = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
    reflection = {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
    assert set(POLICY) == served | health | reflection
