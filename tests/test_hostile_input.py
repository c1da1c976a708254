"""Hostile input (issue: "Every bad input gets the right status"): request bytes that do not decode,
specs built to break the checks, forged report tokens. Each is refused with the status that names the
fault, on its own; the broker logs no traceback and keeps serving."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import park
from park._proto import jobs_pb2 as jpb

pytestmark = pytest.mark.timeout(90)

METHODS = ["/park.v1.Jobs/SubmitMany", "/park.v1.Jobs/Get", "/park.v1.Jobs/List", "/park.v1.Jobs/Cancel",
           "/park.v1.Jobs/Why", "/park.v1.Site/Info", "/park.v1.Packages/List", "/grpc.health.v1.Health/Check"]
STREAMING = ["/park.v1.Jobs/Watch", "/park.v1.Files/Read"]
GARBAGE = b"\xff\xff\xff\xff\x0f"   # a field header with an impossible length


def _raw_channel(broker) -> grpc.Channel:  # type: ignore[no-untyped-def]
    service = broker.service()
    return service.channel


@pytest.mark.parametrize("method", METHODS + STREAMING)
def test_request_bytes_that_do_not_decode_are_invalid_argument(broker, method: str) -> None:  # type: ignore[no-untyped-def]
    channel = _raw_channel(broker)
    if method in STREAMING:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(GARBAGE, timeout=10))
    else:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(GARBAGE, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "is not a valid park.v1." in (info.value.details() or "") or "grpc.health" in (info.value.details() or "")
    assert "Traceback" not in broker.log()


def test_a_report_stream_that_does_not_decode_is_invalid_argument(broker) -> None:  # type: ignore[no-untyped-def]
    call = _raw_channel(broker).stream_unary("/park.v1.Jobs/Report", request_serializer=None,
                                             response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        call(iter([GARBAGE]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in broker.log()


@pytest.mark.parametrize("token", ["a" * 26 + ".٣." + "0" * 64, "a" * 26 + "." + "9" * 5000 + "." + "0" * 64,
                                   "..", "a" * 26 + ".1.zz", "ü" * 10])
def test_forged_report_tokens_are_unauthenticated(service: park.Service, broker, token: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        service.jobs_stub.Report(iter([jpb.ReportRequest(token=token, reports=[jpb.Improved(values={"x": 1})])]),
                                 timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for any job attempt" in (info.value.details() or "")
    assert "Traceback" not in broker.log()


def test_health_watch_streams_the_serving_status(broker) -> None:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(_raw_channel(broker))
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="park.v1.Jobs"), timeout=10)
    first = next(iter(stream))
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()


def _call(args: str = "[]", kwargs: str = "{}", **fields: object) -> jpb.JobSpec:
    return jpb.JobSpec(id=park.service.new_job_id(), no_memo=True,
                       call=jpb.PythonCall(target="park_test_tasks:add", args_json=args, kwargs_json=kwargs),
                       **fields)  # type: ignore[arg-type]


def _race(until: str, contestant: str) -> jpb.JobSpec:
    return jpb.JobSpec(id=park.service.new_job_id(), race=jpb.Race(contestants=[contestant], until=until))


HOSTILE = {
    "deeply nested args": (lambda c: _call(args="[" * 50_000 + "]" * 50_000), "nested too deeply"),
    "deeply nested kwargs": (lambda c: _call(kwargs='{"a":' * 3000 + "1" + "}" * 3000), "nested too deeply"),
    "NaN": (lambda c: _call(args="[NaN, 1]"), "not a JSON number"),
    "Infinity": (lambda c: _call(args="[Infinity, 1]"), "not a JSON number"),
    "1e400": (lambda c: _call(args="[1e400, 1]"), "too large for a float"),
    "lone surrogate": (lambda c: _call(args='["\\ud800", 1]'), "lone surrogate"),
    "400-digit number in until": (lambda c: _race("chisq < " + "9" * 400, c), "too large for a float"),
    "NUL in until": (lambda c: _race("chisq\x00 < 1", c), "is not valid"),
    "300-character requires": (lambda c: _call(requires=["a" * 300 + "==1.0"]), "longer than"),
}


def test_hostile_specs_fail_alone_and_the_rest_of_the_batch_is_admitted(service: park.Service, broker) -> None:  # type: ignore[no-untyped-def]
    with service:
        contestant = park.submit("park_test_tasks:add", 1, 1)
    contestant.wait(timeout=30)
    good = [_call(args="[2, 3]"), _call(args="[4, 5]")]
    bad = {name: make(contestant.id) for name, (make, _) in HOSTILE.items()}
    results = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[good[0], *bad.values(), good[1]]),
                                           timeout=30).results
    by_id = {r.id: r for r in results}
    for name, spec in bad.items():
        result = by_id[spec.id]
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (name, result.message)
        assert HOSTILE[name][1] in result.message, (name, result.message)
    assert [service.job(g.id).result(timeout=30) for g in good] == [5, 9]
    assert "Traceback" not in broker.log()


def test_a_batch_stream_name_longer_than_any_client_sends_is_invalid_argument(service: park.Service, broker) -> None:  # type: ignore[no-untyped-def]
    """The fields that order a client's batches in flight (core.arrivals): the broker remembers stream names
    for a while, so one longer than any client sends is refused, and nothing of its batch is kept."""
    spec = _call(args="[1, 2]")
    with pytest.raises(grpc.RpcError) as refused:
        service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec], stream=b"x" * 65, number=1), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64 bytes" in (refused.value.details() or "")
    with pytest.raises(park.ServiceError, match="NOT_FOUND"):
        service.job(spec.id).record()
    [result] = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec], stream=b"x" * 64, number=1),
                                            timeout=30).results
    assert result.code == 0 and service.job(spec.id).result(timeout=30) == 3
    assert "Traceback" not in broker.log()
