"""Counting atoms: the conditions of a group of jobs (`park.map`'s `JobGroup`), judged from its counts.

A group's condition is one atom over its members' counts (DESIGN §2, Groups),
not a tree with a leaf per member, so a member's change costs O(1) wherever
the condition is judged. Its expression is `completed>=K` (at least K members
completed) or `finished>=K` (at least K members ended, however). Three-valued,
like every atom:

    completed>=K   READY once K members completed; CANCELLED as soon as the
                   members that can still complete are too few to reach K
    finished>=K    READY once K members ended; CANCELLED only if the group ends
                   short of K (it was cancelled before all of its members joined)

Pure: both the broker (with the group's live record) and the client use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from park._proto import jobs_pb2 as jpb
from park.conditions import State

__all__ = ["Count", "MAX_GROUP", "count_state"]

MAX_GROUP = 1_000_000          # members of one group
_FORM = re.compile(r"(completed|finished)>=([1-9][0-9]{0,6})")


@dataclass(frozen=True, slots=True)
class Count:
    """A parsed counting expression: at least `k` members `what` ("completed" or "finished")."""

    what: str
    k: int

    @classmethod
    def parse(cls, expr: str) -> Count:
        match = _FORM.fullmatch(expr)
        if match is None or int(match[2]) > MAX_GROUP:
            raise ValueError(f"counting expression {expr[:40]!r} is not 'completed>=K' or 'finished>=K' "
                             f"with K from 1 to {MAX_GROUP}")
        return cls(match[1], int(match[2]))

    def __str__(self) -> str:
        return f"{self.what}>={self.k}"


def count_state(expr: str, counts: jpb.GroupCounts, ended: bool = False) -> State:
    """The state of counting atom `expr` given a group's `counts`; `ended`: the group itself is terminal,
    so no member will join or change any more."""
    count = Count.parse(expr)
    finished = counts.completed + counts.failed + counts.cancelled
    if count.what == "completed":
        if counts.completed >= count.k:
            return State.READY
        # Members not yet joined may still complete, unless the group has ended.
        still = 0 if ended else counts.size - finished
        return State.CANCELLED if counts.completed + still < count.k else State.PENDING
    if finished >= count.k:
        return State.READY
    return State.CANCELLED if ended or counts.size < count.k else State.PENDING
