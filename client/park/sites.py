"""Job records at any site: the site a job is at, and the site of each job its condition names.

`RecordsBySite` answers `record(site, job_id)` with one client connection per
site: the one the caller already has for its home site, and, for any other
site, a configured service (`park services add`) that turns out to be that
site, the one named like the site first; each is opened once and closed with
`close()`. Causes (park.causes) and the condition graph (`park graph`) follow
jobs across sites with it.
"""
from __future__ import annotations

from park._proto import jobs_pb2 as jpb
from park.config import ServiceEntry
from park.connection import Connection
from park.errors import ParkError


class RecordsBySite:
    """Job records by site: the JOB's own service, and a configured service for each other site, opened once."""

    def __init__(self, home: Connection, home_site: str, entries: list[ServiceEntry]):
        self._services: dict[str, Connection | None] = {home_site: home}
        self._entries = entries
        self._entry_sites: dict[str, str | None] = {}
        self._opened: list[Connection] = []

    def _service(self, site: str) -> Connection | None:
        if site not in self._services:
            self._services[site] = None
            for entry in sorted(self._entries, key=lambda e: e.name != site):   # one named like the site first
                if entry.name not in self._entry_sites and self._probe(entry) == site:
                    break
        return self._services[site]

    def _probe(self, entry: ServiceEntry) -> str | None:
        """Connect to `entry` once and remember which site it is; None when it cannot be reached."""
        try:
            service = Connection(entry.address, entry.cert)
        except ParkError:
            self._entry_sites[entry.name] = None
            return None
        try:
            site: str | None = service.site
        except ParkError:
            site = None
        self._entry_sites[entry.name] = site
        if site is None or self._services.get(site) is not None:
            service.close()
        else:
            self._opened.append(service)
            self._services[site] = service
        return site

    def record(self, site: str, job_id: str) -> tuple[jpb.Job | None, str]:
        service = self._service(site)
        if service is None:
            return None, f"no configured service for site {site}"
        try:
            return service.call(service.jobs_stub.Get, jpb.GetRequest(job_id=job_id), f"reading job {job_id}",
                                timeout=30), ""
        except ParkError as exc:
            return None, str(exc).split("\n")[0][:120]

    def close(self) -> None:
        for service in self._opened:
            service.close()
