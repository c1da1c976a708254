"""Bad input gets the right status code and a message that says what to fix,
and the broker keeps serving and loses nothing."""
from __future__ import annotations

import grpc
import pytest

import park
from park._proto import conditions_pb2 as cpb
from park._proto import jobs_pb2 as jpb
from harness import free_port  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(60)

GOOD_ID = "b" * 26


def _submit_one(service: park.Service, spec: jpb.JobSpec) -> jpb.SubmitResult:
    [result] = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec]), timeout=10).results
    return result


def _call(spec_kwargs: dict) -> jpb.JobSpec:  # type: ignore[type-arg]
    return jpb.JobSpec(**{"id": GOOD_ID, "call": jpb.PythonCall(target="park_test_tasks:noop"), **spec_kwargs})


def _atom(job_id: str, site: str = "sns") -> cpb.ConditionNode:
    return cpb.ConditionNode(atom=cpb.Atom(site=site, job_id=job_id, kind=cpb.ATOM_KIND_COMPLETED))


@pytest.mark.parametrize("spec, code, fragment", [
    (_call({"call": jpb.PythonCall(target="os.system")}), grpc.StatusCode.INVALID_ARGUMENT,
     "must look like 'package.module:function'"),
    (_call({"call": jpb.PythonCall(target="x:y; rm -rf /")}), grpc.StatusCode.INVALID_ARGUMENT, "package.module"),
    (_call({"id": "../../etc/passwd"}), grpc.StatusCode.INVALID_ARGUMENT, "is not a Park job id"),
    (_call({"output_name": "../escape"}), grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    (_call({"output_name": "/etc/passwd"}), grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    (_call({"output_name": "a\0b"}), grpc.StatusCode.INVALID_ARGUMENT, "plain file name"),
    (_call({"output_name": "stdout.log"}), grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
    (_call({"call": jpb.PythonCall(target="m:f", args_json="{not json")}), grpc.StatusCode.INVALID_ARGUMENT,
     "args is not valid JSON"),
    (_call({"call": jpb.PythonCall(target="m:f", kwargs_json="[1]")}), grpc.StatusCode.INVALID_ARGUMENT,
     "kwargs must be a JSON object"),
    (jpb.JobSpec(id=GOOD_ID), grpc.StatusCode.INVALID_ARGUMENT, "needs a Python call, a command line, a race, an install, a fetch or a group"),
    (jpb.JobSpec(id=GOOD_ID, command=jpb.CommandLine(argv=[])), grpc.StatusCode.INVALID_ARGUMENT,
     "at least a program name"),
    (jpb.JobSpec(id=GOOD_ID, command=jpb.CommandLine(argv=["ls", "a\0b"])), grpc.StatusCode.INVALID_ARGUMENT,
     "no NUL"),
    (_call({"when": cpb.Condition(postfix=[cpb.ConditionNode(op=cpb.OP_AND)])}), grpc.StatusCode.INVALID_ARGUMENT,
     "malformed"),
    (_call({"when": cpb.Condition(postfix=[_atom("c" * 26)])}), grpc.StatusCode.NOT_FOUND,
     "which site 'sns' does not have"),
    (_call({"when": cpb.Condition(postfix=[_atom("c" * 26, site="cluster")])}), grpc.StatusCode.FAILED_PRECONDITION,
     "not a peer of 'sns'"),
    (_call({"requires": ["numpy==1.0"]}), grpc.StatusCode.FAILED_PRECONDITION, "numpy"),
    (_call({"requires": ["numpy>=1.0"]}), grpc.StatusCode.INVALID_ARGUMENT, "numpy"),
    (_call({"when": cpb.Condition(postfix=[cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="c" * 26, kind=cpb.ATOM_KIND_IMPROVED, expr="__import__('os')"))])}),
     grpc.StatusCode.INVALID_ARGUMENT, "is not allowed"),
    (jpb.JobSpec(id=GOOD_ID, race=jpb.Race()), grpc.StatusCode.INVALID_ARGUMENT, "1 to 64 contestants"),
    (_call({"retries": 2**32 - 1}), grpc.StatusCode.INVALID_ARGUMENT, "at most 100"),
    (_call({"retry_delay": float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "retry_delay must be"),
    (_call({"retry_delay": -1.0}), grpc.StatusCode.INVALID_ARGUMENT, "retry_delay must be"),
    (_call({"timeout": float("inf")}), grpc.StatusCode.INVALID_ARGUMENT, "timeout must be"),
    (_call({"timeout": -5.0}), grpc.StatusCode.INVALID_ARGUMENT, "timeout must be"),
    (jpb.JobSpec(id=GOOD_ID, race=jpb.Race(contestants=["c" * 26], until="x.y > 1")), grpc.StatusCode.INVALID_ARGUMENT,
     "is not allowed"),
    (jpb.JobSpec(id=GOOD_ID, group=jpb.Group(size=0)), grpc.StatusCode.INVALID_ARGUMENT, "a group has 1 to 1000000 members"),
    (jpb.JobSpec(id=GOOD_ID, group=jpb.Group(size=2**32 - 1)), grpc.StatusCode.INVALID_ARGUMENT, "1 to 1000000 members"),
    (jpb.JobSpec(id=GOOD_ID, group=jpb.Group(size=2), when=cpb.Condition(postfix=[_atom("c" * 26)])),
     grpc.StatusCode.INVALID_ARGUMENT, "a group has no when="),
    (_call({"member_of": "c" * 26}), grpc.StatusCode.NOT_FOUND, "has no group"),
    (_call({"member_of": "../../etc"}), grpc.StatusCode.INVALID_ARGUMENT, "member_of"),
    (_call({"when": cpb.Condition(postfix=[cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="c" * 26, kind=cpb.ATOM_KIND_COUNT, expr="completed>=-1"))])}),
     grpc.StatusCode.INVALID_ARGUMENT, "is not 'completed>=K' or 'finished>=K'"),
    (_call({"when": cpb.Condition(postfix=[cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id="c" * 26, kind=cpb.ATOM_KIND_COMPLETED, expr="completed>=1"))])}),
     grpc.StatusCode.INVALID_ARGUMENT, "take an expression"),
])
def test_bad_specs_are_refused_one_by_one(service: park.Service, spec: jpb.JobSpec, code: grpc.StatusCode,
                                          fragment: str) -> None:
    result = _submit_one(service, spec)
    assert result.code == code.value[0], result.message
    assert fragment in result.message
    # The broker keeps serving, and a good job in the same batch is not affected.
    good = jpb.JobSpec(id="d" * 26, call=jpb.PythonCall(target="park_test_tasks:add", args_json="[1, 2]"))
    response = service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=[spec, good]), timeout=10)
    assert response.results[0].code == code.value[0]
    assert response.results[1].code == 0
    assert service.job("d" * 26).result(timeout=30) == 3


def _rpc_error(fn, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (jpb.Job, jpb.ListResponse)):
            list(result)
    return info.value


def test_unknown_job_is_not_found(service: park.Service) -> None:
    for method, request in [(service.jobs_stub.Get, jpb.GetRequest(job_id="e" * 26)),
                            (service.jobs_stub.Cancel, jpb.CancelRequest(job_id="e" * 26))]:
        err = _rpc_error(method, request, timeout=10)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "has no job eeee" in err.details()
    err = _rpc_error(service.jobs_stub.Watch, jpb.WatchRequest(job_id="e" * 26), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_path_as_job_id_is_invalid(service: park.Service) -> None:
    err = _rpc_error(service.jobs_stub.Get, jpb.GetRequest(job_id="../../../etc/passwd"), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a Park job id" in err.details()


def test_oversize_message_is_resource_exhausted(service: park.Service) -> None:
    huge = jpb.JobSpec(id=GOOD_ID, call=jpb.PythonCall(target="m:f", args_json="[" + "1," * (9 << 20) + "1]"))
    err = _rpc_error(service.jobs_stub.SubmitMany, jpb.SubmitManyRequest(jobs=[huge]), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the transport limit, the spec limit speaks instead.
    big = jpb.JobSpec(id=GOOD_ID, call=jpb.PythonCall(target="m:f", args_json="[" + "1," * (1 << 20) + "1]"))
    assert "larger than" in _submit_one(service, big).message


def test_too_many_jobs_in_one_batch(service: park.Service) -> None:
    specs = [jpb.JobSpec(id=GOOD_ID, call=jpb.PythonCall(target="m:f"))] * 10_001
    err = _rpc_error(service.jobs_stub.SubmitMany, jpb.SubmitManyRequest(jobs=specs), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 10000 jobs" in err.details()


def test_bad_watch_and_list_arguments(service: park.Service) -> None:
    err = _rpc_error(service.jobs_stub.Watch, jpb.WatchRequest(from_seq=-5), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "from_seq" in err.details()
    err = _rpc_error(service.jobs_stub.List, jpb.ListRequest(states=[42]), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown job state 42" in err.details()


def test_unknown_method_is_refused_by_policy(broker, service: park.Service) -> None:  # type: ignore[no-untyped-def]
    channel = service._channel
    method = channel.unary_unary("/park.v1.Jobs/DropAllTables", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
    err = _rpc_error(method, b"", timeout=10)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and "not served here" in err.details()


def test_client_side_checks_fail_at_the_submitting_line(service: park.Service) -> None:
    with service:
        with pytest.raises(ValueError, match="package.module:function"):
            park.submit("not a callable")
        with pytest.raises(TypeError, match="JSON-able"):
            park.submit("park_test_tasks:add", object(), 1)
        with pytest.raises(TypeError, match="when= takes a condition"):
            park.submit("park_test_tasks:noop", when=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="plain file name"):
            park.submit("park_test_tasks:noop", output="../x")
        with pytest.raises(TypeError, match="list of strings"):
            park.run("ls -l")  # type: ignore[arg-type]


def test_refused_submission_surfaces_on_flush_and_on_the_job(service: park.Service) -> None:
    with pytest.raises(park.SubmitError, match="numpy") as info:
        with service:
            job = park.submit("park_test_tasks:noop", requires=["numpy==1.0"])
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(park.SubmitError, match="numpy"):
        job.wait(timeout=10)


def test_connection_mistakes_say_what_to_check(new_broker) -> None:  # type: ignore[no-untyped-def]
    broker, stranger = new_broker("sns").start(), new_broker("other")
    wrong_cert = park.Service(broker.address, stranger.cert)
    with pytest.raises(park.ServiceError) as tls:
        wrong_cert.info
    assert tls.value.code == "UNAVAILABLE"
    assert (f"the TLS handshake with site other at {broker.address} failed: it is not the broker whose "
            f"certificate is pinned ({stranger.cert})") in tls.value.message
    peer_port = park.Service(broker.peer_address, broker.cert)
    with pytest.raises(park.ServiceError, match="or it is a site's peer port"):
        with peer_port:
            park.submit("park_test_tasks:noop")
    nobody = park.Service(f"127.0.0.1:{free_port()}", broker.cert)
    with pytest.raises(park.ServiceError, match="nothing answers at site sns at 127.0.0.1:.*client port"):
        nobody.info
    for service in (wrong_cert, peer_port, nobody):
        service.close()
