"""Races (`park.race`): which contestant won, who lost, and what the race completes with.

A race job starts when one contestant's `improved(until)` (or completion) atom
is ready. `settle` decides the outcome from the records alone; the state
machine (transitions) cancels the losers and completes the race. A winner that
is still running won with its last reported values; a finished one with its
result.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from park._proto import jobs_pb2 as jpb
from park.conditions import AtomKey
from park.wire import TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class RaceOutcome:
    winner: str
    losers: list[jpb.Job]    # contestants still to cancel
    result_json: str


def settle(race: jpb.Job, ready: tuple[AtomKey, ...], active: Callable[[str], jpb.Job | None],
           stored: Callable[[str], jpb.Job | None]) -> RaceOutcome:
    """The outcome of `race` given the atoms that made it start; `active` finds a contestant's live
    record, `stored` a finished one's."""
    ready_ids = {k.job_id for k in ready}
    winner_id = next(j for j in race.spec.race.contestants if j in ready_ids)
    winner = active(winner_id)
    losers = [loser for j in race.spec.race.contestants if j != winner_id
              if (loser := active(j)) is not None and loser.state not in TERMINAL_STATES]
    if winner is not None and winner.progress:
        values: dict[str, object] = dict(winner.progress)
    else:   # the winner is done: its result is what it won with
        done = winner or stored(winner_id)
        values = result_values(done) if done is not None else {}
    return RaceOutcome(winner_id, losers, json.dumps({"winner": winner_id, "values": values}))


def result_values(job: jpb.Job) -> dict[str, object]:
    """A job's JSON result when it is an object, else nothing."""
    try:
        value = json.loads(job.result_json) if job.result_json else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
