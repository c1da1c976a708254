"""The scheduler's index and verdicts, without a broker."""
from __future__ import annotations

from park.conditions import Atom, AtomKey, State
from park_broker.core.scheduler import Scheduler, Verdict


def key(job: str, kind: str = "completed") -> AtomKey:
    return AtomKey("sns", job * 26, kind)


def atom(job: str, kind: str = "completed") -> Atom:
    return Atom(key(job, kind))


def test_no_condition_starts_at_once() -> None:
    d = Scheduler().add("j", None, {})
    assert d is not None and d.verdict is Verdict.START


def test_waits_then_starts_when_both_complete() -> None:
    s = Scheduler()
    assert s.add("j", atom("a") & atom("b"), {}) is None
    assert "j" in s and s.pending_atoms() == {key("a"), key("b")}
    assert s.resolve_all({key("a"): State.READY}) == []
    [d] = s.resolve_all({key("b"): State.READY})
    assert d.verdict is Verdict.START and "j" not in s and s.pending_atoms() == set()


def test_cancelled_atom_cancels_with_cause() -> None:
    s = Scheduler()
    s.add("j", atom("a") & atom("b"), {})
    [d] = s.resolve_all({key("a"): State.CANCELLED})
    assert d.verdict is Verdict.CANCEL and d.atoms == (key("a"),)
    assert s.pending_atoms() == set(), "a decided job must leave the index"


def test_never_holds_is_detected() -> None:
    s = Scheduler()
    s.add("j", atom("a") & ~atom("b"), {})
    [d] = s.resolve_all({key("b"): State.READY})
    assert d.verdict is Verdict.NEVER and d.atoms == (key("b"),)


def test_not_of_pending_is_ready_at_submission() -> None:
    d = Scheduler().add("j", ~atom("x"), {})
    assert d is not None and d.verdict is Verdict.START


def test_or_survives_one_cancelled_side() -> None:
    s = Scheduler()
    s.add("j", atom("a") | atom("b"), {})
    assert s.resolve_all({key("a"): State.CANCELLED}) == []
    [d] = s.resolve_all({key("b"): State.READY})
    assert d.verdict is Verdict.START


def test_resolution_touches_only_dependents() -> None:
    s = Scheduler()
    for i in range(1000):
        s.add(f"w{i}", atom("z"), {})
    s.add("target", atom("a"), {})
    [d] = s.resolve_all({key("a"): State.READY})
    assert d.job_id == "target" and len(s) == 1000


def test_remove_unindexes() -> None:
    s = Scheduler()
    s.add("j", atom("a"), {})
    assert s.remove("j") is True and s.remove("j") is False
    assert s.resolve_all({key("a"): State.READY}) == []


def test_an_atom_indexes_one_job_or_several_as_they_come_and_go() -> None:
    """An atom awaited by one job indexes its id alone, by several a set: either way each still waits."""
    s = Scheduler()
    s.add("j1", atom("a"), {})
    assert s.waiting_on(key("a")) == {"j1"}
    s.add("j2", atom("a") & atom("b"), {})
    s.add("j3", atom("a"), {})
    assert s.waiting_on(key("a")) == {"j1", "j2", "j3"}
    assert s.remove("j1") and s.remove("j3")
    assert s.waiting_on(key("a")) == {"j2"} and s.pending_atoms() == {key("a"), key("b")}
    assert s.remove("j2") and s.pending_atoms() == set() and s.waiting_on(key("a")) == set()
    s.add("k1", atom("c"), {})
    s.add("k2", atom("c"), {})
    assert sorted(d.job_id for d in s.resolve_all({key("c"): State.READY})) == ["k1", "k2"]
    assert len(s) == 0 and s.pending_atoms() == set()


def test_atoms_resolved_before_a_job_arrives_count_for_its_verdict() -> None:
    s = Scheduler()
    assert s.add("j", atom("a") & atom("b") & ~atom("c"), {key("a"): State.READY}) is None
    assert s.pending_atoms() == {key("b"), key("c")}
    [d] = s.resolve_all({key("b"): State.READY})
    assert d.verdict is Verdict.START and d.atoms == (key("a"), key("b"))


def test_a_verdict_waits_for_the_rest_of_a_transition_a_peer_brings_in_parts() -> None:
    """A peer answers atoms asked in different requests in different messages: the job's completion may arrive
    before its `finished`. `x & ~y` must not start on the first part; it is decided once both are in (never,
    as when they come together), while a condition with no other atom of that job is decided at once."""
    completed, finished = AtomKey("cluster", "j" * 26, "completed"), AtomKey("cluster", "j" * 26, "finished")
    other = AtomKey("cluster", "k" * 26, "completed")
    s = Scheduler()
    assert s.add("split", Atom(completed) & ~Atom(finished), {}) is None
    assert s.add("plain", Atom(completed) | Atom(other), {}) is None
    assert s.add("improved", Atom(completed) & ~Atom(AtomKey("cluster", "j" * 26, "improved", "chisq < 1")), {}) is None
    first = s.resolve_all({completed: State.READY})
    assert [(d.job_id, d.verdict) for d in first] == [("plain", Verdict.START)]
    assert [(d.job_id, d.verdict) for d in s.resolve_all({finished: State.READY})] == [("split", Verdict.NEVER)]
    assert "improved" in s   # its improved(...) atom, of the same ended job, is still to come
    together = Scheduler()
    together.add("split", Atom(completed) & ~Atom(finished), {})
    assert [(d.job_id, d.verdict) for d in together.resolve_all({completed: State.READY, finished: State.READY})] \
        == [("split", Verdict.NEVER)]
