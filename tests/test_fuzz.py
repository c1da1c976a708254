"""A seeded, bounded fuzz of every method the broker serves, as its reflection lists them: random bytes,
and well-formed messages full of hostile values (huge and NUL-laden strings, path tricks, unknown ids,
extreme numbers, unknown enum values, long repeated fields), with a user's token and with none.

It fails on any UNKNOWN or INTERNAL status, on a traceback in the broker's log, and if the broker does not
serve a normal job afterwards (DESIGN §10: no request, however hostile, produces UNKNOWN or INTERNAL or a
traceback in the log)."""
from __future__ import annotations

import math
import random
import time
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2  # noqa: F401 - registers the health service's descriptors
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import park
from park._proto import federation_pb2, files_pb2, jobs_pb2, packages_pb2, site_pb2  # noqa: F401 - descriptors

pytestmark = pytest.mark.timeout(150)

SECONDS = 25.0
SEED = 20261201
STRINGS = ["", "a" * 26, "sns", "../../etc/passwd", "/etc/shadow", "/alice/" + "a" * 26 + "/output", "%2e%2e/x",
           "\x00", "a\x00b", "x" * 70_000, "ü" * 5000, "park://sns/files/../../x", "chisq < " + "9" * 400,
           "__import__('os')", "[" * 5000, "Bearer x", "m:f", "park_test_tasks:add", "💥", "-1", "1e400"]
INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 7, 10**9]
FLOATS = [0.0, -0.0, 1.0, math.inf, -math.inf, math.nan, 1e308, 5e-324]


class _Fuzzer:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def message(self, descriptor: Descriptor, depth: int = 0) -> Any:
        msg = message_factory.GetMessageClass(descriptor)()
        for field in descriptor.fields:
            if field.containing_oneof is not None and self.rng.random() < 0.6:
                continue
            if self.rng.random() < 0.3:
                continue
            if field.is_repeated:
                count = self.rng.choice([0, 1, 2, 3, 200])
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    target = getattr(msg, field.name)
                    for _ in range(min(count, 20)):
                        key_field, value_field = field.message_type.fields
                        key = self.scalar(key_field)
                        if value_field.message_type is not None:
                            target[key].CopyFrom(self.message(value_field.message_type, depth + 1))
                        else:
                            target[key] = self.scalar(value_field)
                    continue
                for _ in range(count if depth < 2 else min(count, 2)):
                    if field.message_type is not None:
                        if depth < 4:
                            getattr(msg, field.name).add().CopyFrom(self.message(field.message_type, depth + 1))
                    else:
                        getattr(msg, field.name).append(self.scalar(field))
            elif field.message_type is not None:
                if depth < 4:
                    getattr(msg, field.name).CopyFrom(self.message(field.message_type, depth + 1))
            else:
                setattr(msg, field.name, self.scalar(field))
        return msg

    def scalar(self, field: FieldDescriptor) -> Any:
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.rng.choice(STRINGS)
        if t == FieldDescriptor.TYPE_BYTES:
            return self.rng.randbytes(self.rng.choice([0, 1, 32, 5000]))
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice(FLOATS)
        if t == FieldDescriptor.TYPE_ENUM:
            return self.rng.choice([v.number for v in field.enum_type.values] + [99, -5])
        value = self.rng.choice(INTS)
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return abs(value) % 2**32
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return abs(value) % 2**64
        if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
            return max(-(2**31), min(2**31 - 1, value))
        return value

    def requests(self, method: MethodDescriptor) -> list[bytes]:
        count = self.rng.choice([1, 1, 2, 3]) if method.client_streaming else 1
        out = []
        for _ in range(count):
            if self.rng.random() < 0.25:
                out.append(self.rng.randbytes(self.rng.choice([1, 5, 64, 3000])))
            else:
                out.append(self.message(method.input_type).SerializeToString())
        return out


def _served(channel: grpc.Channel) -> list[MethodDescriptor]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    pool = descriptor_pool.Default()
    names = [s.name for s in reply.list_services_response.service]
    assert "park.v1.Jobs" in names and "grpc.health.v1.Health" in names, names
    return [m for name in names for m in pool.FindServiceByName(name).methods]


def _call(channel: grpc.Channel, method: MethodDescriptor, requests: list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[(method.client_streaming, method.server_streaming)](path, request_serializer=None,
                                                                       response_deserializer=None)
    arg: Any = iter(requests) if method.client_streaming else requests[0]
    try:
        if method.server_streaming:
            stream = call(arg, timeout=1.5)
            for i, _ in enumerate(stream):
                if i >= 5:
                    stream.cancel()
                    break
        else:
            call(arg, timeout=3)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _anonymous(broker) -> grpc.Channel:  # type: ignore[no-untyped-def]
    return grpc.secure_channel(broker.address, grpc.ssl_channel_credentials(broker.cert.read_bytes()))


def test_no_request_gets_unknown_or_internal_or_a_traceback(broker) -> None:  # type: ignore[no-untyped-def]
    service = broker.service()
    anonymous = _anonymous(broker)
    methods = _served(service.channel)
    rng = random.Random(SEED)
    fuzz = _Fuzzer(rng)
    seen: dict[tuple[str, str], int] = {}
    bad: list[str] = []
    deadline = time.monotonic() + SECONDS
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        for method in methods:
            for who, channel in (("user", service.channel), ("anonymous", anonymous)):
                requests = fuzz.requests(method)
                code = _call(channel, method, requests)
                seen[(method.full_name, code.name)] = seen.get((method.full_name, code.name), 0) + 1
                if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                    bad.append(f"{method.full_name} ({who}) -> {code.name}: {[r[:80] for r in requests]}")
    anonymous.close()
    assert rounds >= 2, "the fuzz ran too few rounds to mean anything"
    assert not bad, "requests answered UNKNOWN or INTERNAL:\n" + "\n".join(bad[:20])
    log = broker.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    # Still serving: a normal job runs.
    with service:
        job = park.submit("park_test_tasks:add", 2, 2, memo=False)
    assert job.result(timeout=30) == 4
