"""Progress conditions and races with real job processes: park.report, job.improved, park.race."""
from __future__ import annotations

import ast
import sys
import time
import warnings
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import park
from harness import alive  # type: ignore[import-not-found]
from park._proto import jobs_pb2 as jpb
from park.expressions import Expression, ExpressionError

pytestmark = pytest.mark.timeout(90)


# -- the expression language ------------------------------------------------------

ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.USub, ast.UAdd, ast.Not, ast.BinOp,
           ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq,
           ast.NotEq, ast.Call, ast.Name, ast.Load, ast.Constant)

atoms = st.sampled_from(["chisq", "step", "1", "2.5", "1e308", "0", "'s'", "True", "None", "__import__",
                         "open", "x.__class__", "x[0]", "[1]", "{}", "abs", "f", "eval", "b'x'"])
unary = st.sampled_from(["-", "+", "not ", "~", "lambda: ", "*", "await "])
binary = st.sampled_from([" + ", " - ", " * ", " / ", " ** ", " < ", " <= ", " == ", " != ", " and ", " or ",
                          " % ", " // ", " @ ", " if 1 else ", " is ", " in ", ".", "; ", " := "])
calls = st.sampled_from(["abs", "min", "max", "sqrt", "log", "exp", "eval", "getattr", "__import__", "open",
                         "print", "x.y"])
hostile = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(unary, inner).map("".join),
        st.tuples(inner, binary, inner).map("".join),
        st.tuples(calls, st.lists(inner, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        inner.map(lambda e: f"({e})")),
    max_leaves=8)


def _only_whitelisted(source: str) -> bool:
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED):
            return False
        if isinstance(node, ast.Constant) and type(node.value) not in (int, float):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and
                                               node.func.id in {"abs", "min", "max", "sqrt", "log", "exp"}):
            return False
    return True


@given(hostile, st.dictionaries(st.sampled_from(["chisq", "step", "x", "f"]),
                                st.floats(allow_nan=False, allow_infinity=False)))
@settings(max_examples=400, deadline=None)
def test_hostile_expressions_never_run_anything_outside_the_language(source: str, values: dict) -> None:  # type: ignore[type-arg]
    events: list[str] = []
    try:
        expr = Expression(source)
    except ExpressionError:
        return  # refused: nothing evaluated
    # Accepted only if every node is in the whitelist (arity errors aside, caught above).
    assert _only_whitelisted(source), source
    hook_active = True

    def audit(event: str, _args: object) -> None:
        if hook_active and event in ("exec", "import", "open", "os.system", "subprocess.Popen", "compile"):
            events.append(event)

    sys.addaudithook(audit)
    try:
        result = expr.evaluate(values)    # never raises, whatever the values
    finally:
        hook_active = False
    assert isinstance(result, bool)
    assert events == []


@pytest.mark.parametrize("source, fragment", [
    ("__import__('os').system('true')", "is not allowed"),
    ("chisq.__class__", "is not allowed"),
    ("(lambda: 1)()", "is not allowed"),
    ("'a' < 'b'", "is not allowed"),
    ("max(chisq)", "takes 2 to 16 arguments"),
    ("abs", "is a function"),
    ("x" * 501, "the limit is 500"),
    ("-" * 40 + "1", "nested deeper"),
    ("chisq <", "is not valid"),
])
def test_refused_expressions_say_why(source: str, fragment: str) -> None:
    with pytest.raises(ExpressionError, match=fragment):
        Expression(source)


@pytest.mark.parametrize("source, values, expected", [
    ("chisq < 1.2 and step > 10", {"chisq": 1.0, "step": 11}, True),
    ("chisq < 1.2 and step > 10", {"chisq": 1.0}, False),          # not reported yet: not yet
    ("1 / (step - 3) > 0", {"step": 3}, False),                    # division by zero: not yet
    ("10 ** 10 ** 10 > chisq", {"chisq": 1}, False),               # overflow: not yet, and fast
    ("log(chisq) < 0", {"chisq": -1}, False),                      # domain error: not yet
    ("(-8) ** 0.5 < 1", {}, False),                                # complex: not yet
    ("abs(min(a, b) - max(a, b)) < sqrt(exp(0))", {"a": 1, "b": 1.5}, True),
    ("0 < chisq <= 2", {"chisq": 2}, True),
])
def test_evaluation(source: str, values: dict, expected: bool) -> None:  # type: ignore[type-arg]
    assert Expression(source).evaluate(values) is expected


# -- with a broker -------------------------------------------------------------------

def test_improved_gates_a_dependent_while_the_reporter_runs(service: park.Service, tmp_path: Path) -> None:
    marker = tmp_path / "dependent-started"
    with service:
        fit = park.submit("park_test_tasks:fit", [3.0, 2.0, 0.9, 0.8], 0.05, wait_for=str(marker))
        dependent = park.submit("park_test_tasks:touch", str(marker), when=fit.improved("chisq < 1.0"))
    # The fit only finishes once the dependent has started: it must have started mid-run.
    assert fit.result(timeout=60) == {"chisq": 0.8, "steps": 4}
    assert dependent.result(timeout=30) == str(marker)
    started = next(e for e in dependent.events() if e.kind == "started")
    finished = next(e for e in fit.events() if e.kind == "completed")
    assert started.seq < finished.seq
    improved = [e.detail["values"] for e in fit.history() if e.kind == "improved"]
    assert [v["chisq"] for v in improved] == [3.0, 2.0, 0.9, 0.8], "every report is recorded, in order"
    assert fit.record().progress["chisq"] == 0.8


def test_improved_registered_after_the_report_is_ready_at_once(service: park.Service) -> None:
    with service:
        fit = park.submit("park_test_tasks:fit", [0.5, 5.0], 0.3)
    fit.wait(timeout=30)
    with service:
        later = park.submit("park_test_tasks:noop", when=fit.improved("chisq < 1"))
        never = park.submit("park_test_tasks:noop", when=fit.improved("chisq < 0.1"))
    assert later.wait(timeout=30) == "completed"
    assert never.wait(timeout=30) == "cancelled"
    assert fit.improved("chisq < 1").ready is True
    assert fit.improved("chisq < 0.1").cancelled is True


def test_final_result_can_satisfy_improved(service: park.Service) -> None:
    with service:
        job = park.submit("park_test_tasks:result_only", 0.3)
        after = park.submit("park_test_tasks:noop", when=job.improved("chisq < 1"))
    assert after.wait(timeout=30) == "completed"


def test_race_middle_wins_and_losers_are_terminated(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = new_broker(workers=3).start().service()
    slow = [5.0] * 200
    with service:
        fits = [park.submit("park_test_tasks:fit", slow, 0.05, marker=str(tmp_path / "0.pid")),
                park.submit("park_test_tasks:fit", [4.0, 3.0, 1.1, 1.0, 0.9], 0.2, marker=str(tmp_path / "1.pid")),
                park.submit("park_test_tasks:fit", slow, 0.05, marker=str(tmp_path / "2.pid"))]
        race = park.race(fits, until="chisq < 1.2")
        after = park.submit("park_test_tasks:noop", when=race.iscompleted)
    assert race.result(timeout=60) == {"chisq": 1.1, "step": 2.0}
    decided = time.monotonic()
    assert race.winner is fits[1]
    # A loser may not have started yet when the race was decided (then it never does); those that did
    # must be gone within a second.
    pids = [int((tmp_path / f"{i}.pid").read_text()) for i in (0, 2) if (tmp_path / f"{i}.pid").exists()]
    while any(alive(p) for p in pids) and time.monotonic() - decided < 1.0:
        time.sleep(0.01)
    assert not any(alive(p) for p in pids), "losers must be terminated within a second"
    time.sleep(0.5)
    assert not any((tmp_path / f"{i}.pid").exists() and int((tmp_path / f"{i}.pid").read_text()) not in pids
                   for i in (0, 2)), "a loser that had not started never does"
    for loser in (fits[0], fits[2]):
        cause = loser.record().cause
        assert cause.kind == jpb.Cause.KIND_RACE_LOST and fits[1].id in cause.message
    assert fits[1].wait(timeout=30) == "completed", "the winner runs on"
    assert after.wait(timeout=30) == "completed"


def test_race_where_none_wins_is_cancelled(service: park.Service) -> None:
    with service:
        fits = [park.submit("park_test_tasks:fit", [3.0, 2.0], 0.05, memo=False) for _ in range(3)]
        race = park.race(fits, until="chisq < 1")
        after = park.submit("park_test_tasks:noop", when=race.iscompleted)
    with pytest.raises(park.JobCancelled):
        race.result(timeout=60)
    assert after.wait(timeout=30) == "cancelled"
    assert all(f.wait(timeout=30) == "completed" for f in fits)


def test_race_without_until_is_won_by_the_first_to_complete(service: park.Service) -> None:
    with service:
        jobs = [park.submit("park_test_tasks:sleep", 30), park.submit("park_test_tasks:result_only", 2.0)]
        race = park.race(jobs)
    assert race.result(timeout=60) == {"chisq": 2.0}
    assert race.winner is jobs[1]
    assert jobs[0].wait(timeout=30) == "cancelled"


def test_reports_of_a_job_that_is_then_cancelled(service: park.Service, tmp_path: Path) -> None:
    with service:
        fit = park.submit("park_test_tasks:fit", [3.0] * 400, 0.05, marker=str(tmp_path / "pid"))
        waiting = park.submit("park_test_tasks:noop", when=fit.improved("chisq < 1"))
    deadline = time.monotonic() + 30
    while not any(e.kind == "improved" for e in fit.history()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fit.cancel()
    assert waiting.wait(timeout=30) == "cancelled"
    assert "improved" in waiting.record().cause.message
    reports = [e for e in fit.history() if e.kind == "improved"]
    assert reports and all(r.seq < fit.history()[-1].seq for r in reports)
    assert fit.history()[-1].kind == "cancelled"


def test_a_local_python_call_reports_over_its_workers_socket(service: park.Service) -> None:
    with service:
        job = park.submit("park_test_tasks:report_without_network", 0.5)
        after = park.submit("park_test_tasks:noop", when=job.improved("chisq < 1"))
    assert after.wait(timeout=30) == "completed"
    assert [e.detail["values"] for e in job.history() if e.kind == "improved"] == [{"chisq": 0.5}]


def test_command_line_jobs_report_too(service: park.Service) -> None:
    with service:
        cmd = park.run([sys.executable, "-c", "import park; park.report(loss=0.25)"])
        after = park.submit("park_test_tasks:noop", when=cmd.improved("loss < 0.5"))
    assert after.wait(timeout=30) == "completed"


def test_report_token_is_checked(service: park.Service) -> None:
    forged = iter([jpb.ReportRequest(token="a" * 26 + ".1." + "0" * 64, reports=[jpb.Improved(values={"x": 1})])])
    with pytest.raises(grpc.RpcError) as info:
        service.jobs_stub.Report(forged, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for any job attempt" in info.value.details()


def test_report_outside_a_job_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARK_REPORT_TOKEN", raising=False)
    monkeypatch.setattr("park.progress._warned_outside", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        park.report(x=1)
        park.report(x=2)
    assert [str(w.message) for w in caught] == ["park.report() outside a Park job does nothing"]


def test_bad_improved_expression_fails_at_the_submitting_line(service: park.Service) -> None:
    with service:
        job = park.submit("park_test_tasks:noop")
        with pytest.raises(park.ExpressionError, match="is not allowed"):
            job.improved("os.system('x')")
