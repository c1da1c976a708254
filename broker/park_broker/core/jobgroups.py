"""Which active jobs are members of which groups (`park.map`), so that a member's end is counted in O(1).

A group job (JobSpec.group) runs nothing: its members join it as they are
submitted (JobSpec.member_of, or a memo hit of a job submitted for another
group), and its record's `GroupCounts` count them as they end. This module is
the membership index the counting needs, kept for active members only; the
counts themselves live in the group's record (core.ledger), so they are written
with the member's change that moved them and survive a crash with it. The state
machine (core.transitions) does the counting; recovery (core.recovery) rebuilds
this index from the records and the store's memberships of memo hits.
"""
from __future__ import annotations

from park._proto import jobs_pb2 as jpb
from park.wire import TERMINAL_STATES
from park_broker.core.memo import fold, group_key
from park_broker.errors import Code, fail


class Groups:
    """The active members of each active group, and the groups of each active member."""

    def __init__(self) -> None:
        # A job counts once for each time it joined: a map over [x, x] has one job (the second item is a
        # memo hit of the first) that counts twice.
        self._of: dict[str, list[str]] = {}        # active member -> the groups it counts for
        self._members: dict[str, set[str]] = {}    # active group -> its active members

    def join(self, member_id: str, group_id: str) -> None:
        self._of.setdefault(member_id, []).append(group_id)
        self._members.setdefault(group_id, set()).add(member_id)

    def leave(self, member_id: str) -> list[str]:
        """A member ended: the groups it counted for (it is forgotten)."""
        groups = self._of.pop(member_id, [])
        for group_id in groups:
            members = self._members.get(group_id)
            if members is not None:
                members.discard(member_id)
        return groups

    def members(self, group_id: str) -> set[str]:
        """The group's members that have not ended."""
        return set(self._members.get(group_id, ()))

    def drop(self, group_id: str) -> None:
        """The group ended: its members count for it no more."""
        for member_id in self._members.pop(group_id, ()):
            groups = [g for g in self._of.get(member_id, ()) if g != group_id]
            if groups:
                self._of[member_id] = groups
            else:
                self._of.pop(member_id, None)


def check_joinable(group: jpb.Job | None, owner: str, member_id: str, site: str) -> jpb.Job:
    """The group a new member names, if it may join; else BrokerError saying why."""
    if group is None or group.owner != owner:
        fail(Code.NOT_FOUND, f"job {member_id}: site {site!r} has no group {'?' if group is None else group.id} "
                             "of yours; submit the group first (park.map does)")
    if group.spec.WhichOneof("work") != "group":
        fail(Code.INVALID_ARGUMENT, f"job {member_id}: member_of names job {group.id}, which is not a group")
    if group.state in TERMINAL_STATES:
        fail(Code.FAILED_PRECONDITION, f"job {member_id}: group {group.id} has ended; submit the map again")
    if group.group.joined >= group.group.size:
        fail(Code.FAILED_PRECONDITION, f"job {member_id}: group {group.id} already has all of its "
                                       f"{group.group.size} members")
    return group


def count_member(group: jpb.Job, member: jpb.Job) -> None:
    """Count a member's end (`member` terminal) in its group's record."""
    counts = group.group
    if member.state == jpb.JOB_STATE_COMPLETED:
        counts.completed += 1
        return
    if member.state == jpb.JOB_STATE_FAILED:
        counts.failed += 1
    else:
        counts.cancelled += 1
    if not counts.first_unfinished:
        counts.first_unfinished = member.id


def note_joined(group: jpb.Job, member_key: str) -> None:
    """A member (whose memo key is `member_key`) joined: count it and fold its key in. The last one to join
    gives the group its memo key: a job gated on it is then a memo hit on a rerun whose members are."""
    counts = group.group
    counts.joined += 1
    counts.members_key = fold(counts.members_key, member_key)
    if counts.joined == counts.size:
        group.memo_key = group_key(group.owner, counts.size, counts.members_key)
