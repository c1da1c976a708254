"""The job lifecycle, assembled: one object that wires the core's collaborators together.

    submission ─► ledger ◄─ transitions ◄─ scheduler          (decide, then commit)
                    │            ▲
                    ▼            │ started / finished
                 dispatch ──► executor | fetches              (released after the commit)

- `ledger` (core.ledger): the in-memory records of active jobs and the commit
  ordering invariant; every other piece asks it.
- `submissions` (core.submission): admission of a batch, memo hits, aliases.
- `transitions` (core.transitions): the state machine, cascades, races, cancel.
- `dispatch` (core.dispatch): hands committed QUEUED jobs to what runs them.
- `remote` (core.remote): remote atoms asked of peers; local atoms shown to them.
- `progress`, `tokens` (core.progress): `park.report` from running jobs, and their tokens.
- `queries` (core.queries): get, list, watch, why.
- `installs` (packages.installs): wheels uploaded for install jobs.

The gRPC servicers receive the collaborators they serve; nothing here knows
about gRPC status codes.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from park_broker.core.admission import Admission
from park_broker.core.credentials import Credentials
from park_broker.core.dispatch import Dispatcher
from park_broker.core.events import EventHub
from park_broker.core.fairness import NO_LIMITS, Limits
from park_broker.core.ledger import Ledger
from park_broker.core.progress import ProgressReports, ReportTokens
from park_broker.core.queries import Queries
from park_broker.core.recovery import recover
from park_broker.core.remote import Links, RemoteAtoms
from park_broker.core.scheduler import Scheduler
from park_broker.core.store import Store
from park_broker.core.submission import Submissions
from park_broker.core.transitions import Transitions
from park_broker.execution.accounts import Accounts
from park_broker.execution.base import Executor
from park_broker.packages.installs import Installs
from park_broker.packages.store import PackageStore
from park_broker.site import SiteInfo
from park_broker.transfer import download
from park_broker.transfer.fetches import Fetches

if TYPE_CHECKING:
    import grpc


class Lifecycle:
    def __init__(self, site: SiteInfo, store: Store, executor: Executor, hub: EventHub, packages: PackageStore,
                 peers: frozenset[str] = frozenset(), accounts: Accounts = Accounts(False, lambda user: ""),
                 limits: Callable[[str], Limits] = lambda owner: NO_LIMITS):
        self.site = site
        self.store = store
        self.executor = executor
        self.packages = packages
        self.ledger = Ledger(site.name, store)
        self.scheduler = Scheduler()
        # The site's resources are counted for an executor with slots of its own (the local one).
        self.admission = Admission(site.name, site.files_root, packages, peers, site.max_walltime,
                                   site.resources if executor.capacity() is not None else None)
        self.failed = self.ledger.failed
        self.tokens = ReportTokens()
        self.dispatch = Dispatcher(site, self.ledger, executor, packages, self.tokens.issue, accounts, limits)
        self.ledger.release = self.dispatch.release
        self.transitions = Transitions(site.name, self.ledger, self.scheduler, self.admission, self.dispatch.stop)
        self.dispatch.refuse = self.transitions.settle
        self.dispatch.on_finished = self.transitions.on_finished
        self.progress = ProgressReports(self.ledger, self.scheduler, self.admission, self.transitions)
        self.remote = RemoteAtoms(site.name, store, self.ledger, self.admission, self.transitions)
        self.submissions = Submissions(site, store, self.ledger, self.scheduler, self.admission, self.transitions,
                                       self.remote, limits)
        self.queries = Queries(store, self.ledger, hub)
        self.installs = Installs(self.ledger, self.transitions, packages)
        self.credentials = Credentials(self.ledger)
        self.credentials.release = self.dispatch.release
        self.credentials.rewatch = self.remote.rewatch
        self.credentials.waiting_on = self.scheduler.waiting_on
        self.dispatch.may_fetch = self.credentials.fetch_may_start

    def connect_peers(self, links: Links, channel: Callable[[str], grpc.aio.Channel],
                      meter: Callable[[], download.Progress] | None = None) -> None:
        """Federate: remote atoms are asked of `links`, and fetch jobs read through `channel`."""
        self.remote.links = links
        links.on_expired = self.credentials.grant_expired
        self.dispatch.fetcher = Fetches(self.admission.fetch_source, channel, self.transitions.on_started,
                                        self.transitions.on_finished, self.dispatch.hand_over, meter)

    async def start(self) -> None:
        """Start the executor with the state machine's callbacks, then recover from the store."""
        if callable(accept := getattr(self.executor, "accept_reports", None)):   # the local executor
            accept(self.progress.report)
        await asyncio.to_thread(self.dispatch.attempts.clear)
        await self.executor.start(self.transitions.on_started, self.dispatch.finished)
        await recover(self.site.name, self.store, self.ledger, self.scheduler, self.admission, self.transitions,
                      self.remote, self.dispatch.attempts.interrupted)
