"""Maps and groups (`park.map`, `park.JobGroup`) on real brokers: counting atoms, three-valued, across sites,
through a crash, memoized per member; and the counting rules themselves."""
from __future__ import annotations

from pathlib import Path

import pytest

import grpc

import park
from harness import federate  # type: ignore[import-not-found]
from park._proto import conditions_pb2 as cpb
from park._proto import jobs_pb2 as jpb
from park.conditions import State
from park.counting import Count, count_state

pytestmark = pytest.mark.timeout(180)


def counts(size: int, joined: int | None = None, completed: int = 0, failed: int = 0,
           cancelled: int = 0) -> jpb.GroupCounts:
    return jpb.GroupCounts(size=size, joined=size if joined is None else joined, completed=completed,
                           failed=failed, cancelled=cancelled)


def test_counting_atoms_follow_the_three_valued_rules() -> None:
    # completed>=K: ready at K, cancelled as soon as too few can still complete.
    assert count_state("completed>=3", counts(3, completed=2)) is State.PENDING
    assert count_state("completed>=3", counts(3, completed=3)) is State.READY
    assert count_state("completed>=3", counts(3, completed=1, failed=1)) is State.CANCELLED
    assert count_state("completed>=2", counts(3, completed=1, failed=1)) is State.PENDING
    assert count_state("completed>=1", counts(3, failed=2, cancelled=1)) is State.CANCELLED
    # Members that have not joined yet may still complete, unless the group has ended.
    assert count_state("completed>=3", counts(3, joined=1, completed=1)) is State.PENDING
    assert count_state("completed>=3", counts(3, joined=1, completed=1), ended=True) is State.CANCELLED
    # finished>=K: however members ended; cancelled only by a group that ended short.
    assert count_state("finished>=3", counts(3, completed=1, failed=1)) is State.PENDING
    assert count_state("finished>=3", counts(3, completed=1, failed=1, cancelled=1)) is State.READY
    assert count_state("finished>=3", counts(3, joined=2, failed=2), ended=True) is State.CANCELLED
    for bad in ("completed>=0", "completed>3", "failed>=1", "completed>=1 ", "finished>=01", "x" * 600):
        with pytest.raises(ValueError, match="is not 'completed>=K'"):
            Count.parse(bad)


def test_a_map_gates_jobs_on_all_and_on_at_least_k_and_reruns_only_the_changed_item(service) -> None:  # type: ignore[no-untyped-def]
    n = 10_000
    with service:
        squares = park.map("park_test_tasks:square", range(n))
        total = park.submit("park_test_tasks:add", 1, 2, when=squares.iscompleted)
        # Higher priority: it must not queue behind the thousands of members still to run.
        early = park.submit("park_test_tasks:add", 3, 4, when=squares.at_least(10), priority=5)
    assert total.result(timeout=150) == 3 and early.result(timeout=10) == 7
    assert squares.state == "completed" and squares.counts()["completed"] == n
    events = squares.group.history()
    tenth = next(e.seq for e in events if e.kind == "group_progress" and e.detail["counts"].get("completed") == 10)
    early_queued = next(e.seq for e in early.history() if e.kind == "queued")
    total_queued = next(e.seq for e in total.history() if e.kind == "queued")
    assert tenth < early_queued < events[-1].seq < total_queued
    assert squares[123].result() == 123 ** 2

    # Rerun with one item changed: every other member is a memo hit, and only the one new job runs.
    with service:
        again = park.map("park_test_tasks:square", [*range(n - 1), -1])
        total_again = park.submit("park_test_tasks:add", 1, 2, when=again.iscompleted)
    assert total_again.result(timeout=60) == 3
    hits = [job.memo_hit for job in again.jobs]
    assert hits.count(False) == 1 and hits[-1] is False
    assert again[-1].result() == 1
    ran = [j for j in service.list_jobs() if j.spec.call.target == "park_test_tasks:square"]
    assert len(ran) == n + 1
    assert not total_again.memo_hit, "one of its inputs changed, so the job gated on the map ran again"

    # The same map again: the last batch holds the last members and the gated job, whose key needs the
    # group's, known only once the last member is in; it is a memo hit of the one above.
    with service:
        same = park.map("park_test_tasks:square", [*range(n - 1), -1])
        total_same = park.submit("park_test_tasks:add", 1, 2, when=same.iscompleted)
    assert all(job.memo_hit for job in same.jobs)
    assert total_same.memo_hit and total_same.record().id == total_again.record().id


def test_a_job_gated_on_a_map_is_reused_when_every_member_is_and_not_otherwise(service) -> None:  # type: ignore[no-untyped-def]
    def workflow(items: list[int], **member: object) -> tuple[park.JobGroup, park.Job, park.Job]:
        with service:   # one batch: the group, its members and the gated jobs together
            group = park.map("park_test_tasks:square", items, **member)
            return group, park.submit("park_test_tasks:add", 1, 1, when=group.iscompleted), \
                park.submit("park_test_tasks:add", 2, 2, when=group.at_least(2))

    first = workflow([1, 2, 3])
    assert first[1].result(timeout=60) == 2 and first[2].result(timeout=60) == 4
    again = workflow([1, 2, 3])
    assert again[1].memo_hit and again[2].memo_hit and again[1].record().id == first[1].record().id
    other_order = workflow([3, 2, 1])   # other work: its members' keys fold in another order
    assert not other_order[1].memo_hit and other_order[1].result(timeout=60) == 2
    unmemoized = workflow([1, 2, 3], memo=False)   # members with no key: the group has none either
    assert not unmemoized[1].memo_hit and unmemoized[1].result(timeout=60) == 2


def test_a_failed_member_cancels_the_groups_iscompleted_at_once(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gate = tmp_path / "gate"
    with service:
        items = park.map("park_test_tasks:fail_on", [1, 2, 3], bad=2, gate=str(gate))
        everything = park.submit("park_test_tasks:add", 0, 0, when=items.iscompleted)
        some = park.submit("park_test_tasks:add", 0, 1, when=items.any_completed)
        two = park.submit("park_test_tasks:add", 0, 2, when=items.at_least(2))
        three = park.submit("park_test_tasks:add", 0, 3, when=items.at_least(3))
        after = park.submit("park_test_tasks:add", 0, 4, when=items.isfinished)
    # Cancelled while the two other members still wait on their gate: it can no longer hold.
    assert everything.wait(timeout=60) == "cancelled" and three.wait(timeout=10) == "cancelled"
    assert items.counts() == {"size": 3, "joined": 3, "completed": 0, "failed": 1, "cancelled": 0}
    assert some.state == "waiting" and two.state == "waiting" and items.state == "waiting"
    with pytest.raises(park.JobCancelled) as cancelled:
        everything.result()
    assert cancelled.value.root_cause is not None
    assert cancelled.value.root_cause.job_id == items[1].id
    assert "ValueError: item 2 is bad" in str(cancelled.value.root_cause)
    gate.write_text("open")
    assert some.result(timeout=60) == 1 and two.result(timeout=60) == 2 and after.result(timeout=60) == 4
    assert items.wait(timeout=30) == "failed"
    assert f"1 of 3 members did not complete (1 failed, 0 cancelled); the first was {items[1].id}" == \
        items.group.record().error
    with pytest.raises(park.JobFailed, match="item 2 is bad"):
        items.results()


def test_cancelling_a_group_cancels_its_members(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with service:
        items = park.map("park_test_tasks:fail_on", [1, 2], bad=0, gate=str(tmp_path / "never"))
        after = park.submit("park_test_tasks:add", 0, 0, when=items.isfinished)
    items.jobs[1].acknowledged()
    assert items.cancel("enough") == "cancelled"
    assert [j.wait(timeout=30) for j in items] == ["cancelled", "cancelled"]
    assert "its group" in items[0].record().cause.message
    assert after.wait(timeout=30) == "cancelled"


def test_a_group_gates_a_job_at_another_site(new_broker) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = new_broker("sns"), new_broker("cluster")
    federate(sns, cluster)
    s, c = sns.service(), cluster.service()
    with s:
        items = park.map("park_test_tasks:square", [1, 2, 3, 4])
        bad = park.map("park_test_tasks:fail_on", [1, 2], bad=1)
    with c:
        fit = park.submit("park_test_tasks:add", 1, 1, when=items.at_least(3) & items.iscompleted)
        never = park.submit("park_test_tasks:add", 1, 1, when=bad.iscompleted)
    assert fit.result(timeout=60) == 2
    assert items.results() == [1, 4, 9, 16], "in item order"
    assert never.wait(timeout=60) == "cancelled"
    assert never.record().cause.atoms[0].job_id == bad.id


def test_a_group_survives_a_broker_killed_mid_map(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    gate = tmp_path / "gate"
    service = broker.service()
    with service:
        first = park.map("park_test_tasks:fail_on", [1, 2, 3], bad=0, gate=str(gate))
        # A rerun while the first still runs: its members are memo hits of the running jobs.
        second = park.map("park_test_tasks:fail_on", [3, 2, 1, 1], bad=0, gate=str(gate))
        after = park.submit("park_test_tasks:add", 2, 2, when=first.iscompleted & second.iscompleted)
    assert [j.memo_hit for j in second] == [True, True, True, True]
    broker.kill()
    broker.start()
    gate.write_text("open")
    service = broker.service()
    assert service.job(after.id).result(timeout=60) == 4
    assert service.job(second.id).record().group.completed == 4


def test_members_and_counting_atoms_must_name_a_group_that_takes_them(service) -> None:  # type: ignore[no-untyped-def]
    def submit(*specs: jpb.JobSpec) -> list[jpb.SubmitResult]:
        return list(service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=specs), timeout=10).results)

    def call(job_id: str, **fields: object) -> jpb.JobSpec:
        return jpb.JobSpec(id=job_id, call=jpb.PythonCall(target="park_test_tasks:add", args_json="[1, 1]"),
                           no_memo=True, **fields)  # type: ignore[arg-type]

    def counting(job_id: str) -> cpb.Condition:
        return cpb.Condition(postfix=[cpb.ConditionNode(atom=cpb.Atom(site="sns", job_id=job_id,
                                                                      kind=cpb.ATOM_KIND_COUNT, expr="completed>=1"))])

    group, plain = "g" * 26, "p" * 26
    results = submit(jpb.JobSpec(id=group, group=jpb.Group(size=1)), call("m" * 26, member_of=group),
                     call("n" * 26, member_of=group), call(plain), call("q" * 26, member_of=plain),
                     call("r" * 26, when=counting(plain)), call("s" * 26, when=counting(group)))
    codes = [(r.code, r.message) for r in results]
    assert [c for c, _ in codes] == [0, 0, grpc.StatusCode.FAILED_PRECONDITION.value[0], 0,
                                     grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                     grpc.StatusCode.INVALID_ARGUMENT.value[0], 0], codes
    assert f"group {group} already has all of its 1 members" in codes[2][1]
    assert f"member_of names job {plain}, which is not a group" in codes[4][1]
    assert f"counts the members of job {plain}, which is not a group" in codes[5][1]
    assert service.job("s" * 26).result(timeout=30) == 2
    assert service.job(group).wait(timeout=30) == "completed"
    [late] = submit(call("t" * 26, member_of=group))
    assert late.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "has ended" in late.message



def test_a_member_refused_after_its_key_was_foreseen_leaves_the_gated_job_without_a_memo_hit(service) -> None:  # type: ignore[no-untyped-def]
    def submit(*specs: jpb.JobSpec) -> list[jpb.SubmitResult]:
        return list(service.jobs_stub.SubmitMany(jpb.SubmitManyRequest(jobs=specs), timeout=10).results)

    def add(job_id: str, args: str, **fields: object) -> jpb.JobSpec:
        return jpb.JobSpec(id=job_id, call=jpb.PythonCall(target="park_test_tasks:add", args_json=args),
                           **fields)  # type: ignore[arg-type]

    def gated(job_id: str, group: str) -> jpb.JobSpec:
        return add(job_id, "[5, 5]", when=cpb.Condition(postfix=[cpb.ConditionNode(
            atom=cpb.Atom(site="sns", job_id=group, kind=cpb.ATOM_KIND_COMPLETED))]))

    first, second = "g" * 26, "h" * 26
    results = submit(jpb.JobSpec(id=first, group=jpb.Group(size=2)), add("a" * 26, "[1, 1]", member_of=first),
                     add("b" * 26, "[2, 2]", member_of=first), gated("c" * 26, first))
    assert [r.code for r in results] == [0, 0, 0, 0]
    assert service.job("c" * 26).result(timeout=30) == 10
    # The same work again in one batch, but the second member's id is taken (by the job gated above): it is
    # refused when it is decided, after its key was folded into the group's as foreseen.
    results = submit(jpb.JobSpec(id=second, group=jpb.Group(size=2)), add("d" * 26, "[1, 1]", member_of=second),
                     add("c" * 26, "[2, 2]", member_of=second), gated("e" * 26, second))
    assert [r.code for r in results] == [0, 0, grpc.StatusCode.ALREADY_EXISTS.value[0], 0]
    assert results[1].ref.memo_hit, "the first member is the same work as before"
    assert not results[3].ref.memo_hit, "its group lacks a member: it is not the group the first job waited on"
    assert service.job("e" * 26).state == "waiting"
