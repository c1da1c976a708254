"""The job lifecycle's side of federation: remote atoms asked for and resolved, local atoms shown to peers.

`watch` asks the peer links (federation.links) for the remote atoms a newly
waiting job needs; `on_resolved` is their callback when a peer reports one.
`atom_states` and `resolved_by` answer the publisher (federation.publisher) about a local atom,
from the store only: a peer must see only what is committed, since what it
sees must not roll back if this broker crashes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from park._proto import jobs_pb2 as jpb
from park.conditions import AtomKey, Condition, State
from park.counting import count_state
from park.wire import STATE_NAMES, TERMINAL_STATES
from park_broker.core.admission import Admission
from park_broker.core.ledger import Batch, Ledger
from park_broker.core.scheduler import job_atom_states
from park_broker.core.store import Change, Store
from park_broker.core.transitions import Transitions

log = logging.getLogger(__name__)


class Links(Protocol):
    """What the lifecycle needs of the subscriber side of federation."""

    on_expired: Callable[[AtomKey, str], None]   # a peer refused an atom because its grant expired

    def watch(self, key: AtomKey, token: str) -> None: ...


class RemoteAtoms:
    def __init__(self, site: str, store: Store, ledger: Ledger, admission: Admission, transitions: Transitions):
        self.site = site
        self.admission = admission
        self.store = store
        self.ledger = ledger
        self.transitions = transitions
        self.links: Links | None = None   # set by the server when the site has peers

    def watch(self, spec: jpb.JobSpec, cond: Condition | None) -> None:
        """Ask the peers for the remote atoms a newly waiting job needs."""
        if cond is None or self.links is None:
            return
        for atom in cond.depends:
            if atom.key.site != self.site:
                self.links.watch(atom.key, spec.grants[atom.key.site])

    def rewatch(self, spec: jpb.JobSpec, site: str) -> None:
        """Ask `site` again for a waiting job's atoms there, with the grant it now holds (renewed)."""
        cond = self.admission.condition_of(spec)
        if cond is None or self.links is None:
            return
        for atom in cond.depends:
            if atom.key.site == site:
                self.links.watch(atom.key, spec.grants[site])

    def on_resolved(self, resolved: dict[AtomKey, State], reason: str) -> None:
        """A peer reported remote atoms that one of its changes resolved (or refused to report: `reason`)."""
        if reason:
            log.warning("%s", reason)
        batch = Batch()
        self.transitions.resolve_all(resolved, batch)
        self.ledger.commit_soon(batch)

    async def atom_states(self, keys: list[AtomKey]) -> dict[AtomKey, tuple[State, int, str]]:
        """(state, sequence number it resolved at or 0, owner) of local atoms, for peers; absent: no such job.

        A resolved atom's number is its job's last event's, at or after the event that resolved it:
        late for an `improved(...)` atom resolved by an earlier report, never early."""
        jobs = await self.store.get_many({k.job_id for k in keys})
        reports = await self.store.reports({k.job_id for k in keys if k.kind == "improved" and k.job_id in jobs})
        found: dict[AtomKey, tuple[State, int, str]] = {}
        for key in keys:
            job = jobs.get(key.job_id)
            if job is None:
                continue
            if key.kind == "improved":
                state = self.transitions.improved_state(job, key, reports.get(job.id, []))
            elif key.kind == "count":
                state = count_state(key.expr, job.group, ended=job.state in TERMINAL_STATES)
            else:
                state = job_atom_states(STATE_NAMES[job.state])[key.kind]
            found[key] = (state, job.last_seq if state is not State.PENDING else 0, job.owner)
        return found

    def resolved_by(self, key: AtomKey, change: Change) -> State:
        """The state committed `change` (of `key`'s job) gives atom `key`: PENDING if it does not resolve it.

        Judged from the change alone, so a peer's updates follow the order of this site's events."""
        event = change.event
        if key.kind == "improved":
            if event.HasField("improved"):
                return State.READY if self.admission.expression(key.expr).evaluate(dict(event.improved.values)) \
                    else State.PENDING
            if change.job.state in TERMINAL_STATES and change.record:
                # Every report was judged as it came: only the final result can still satisfy it.
                return self.transitions.improved_state(change.job, key, [dict(change.job.progress)])
            return State.PENDING
        if key.kind == "count":   # the group's record, as the change left it, holds the counts
            return count_state(key.expr, change.job.group, ended=change.job.state in TERMINAL_STATES) \
                if change.record else State.PENDING
        if change.record and change.job.state in TERMINAL_STATES:
            return job_atom_states(STATE_NAMES[change.job.state])[key.kind]
        return State.PENDING
