"""Which configured service holds a job: the client configuration, job references, probes.

`open_job` finds the job a bare id or a `park://SITE/jobs/ID` reference names,
asking the configured services (the one named like the site first).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from park._proto import jobs_pb2 as jpb
from park.cli.output import USAGE, die, peer_json
from park.config import ServiceEntry, config_path, load_services
from park.errors import ParkError, ServiceError
from park.job import Job
from park.service import Service
from park.wire import InvalidInput, check_job_id

_REF = re.compile(r"park://(?P<site>[^/]+)/jobs/(?P<id>[^/]+)/?")



def configured_services(name: str | None = None) -> list[ServiceEntry]:
    """The configured services, or just `name`: exit 2 for an unknown name, 1 when none are configured."""
    services = load_services()
    if name is not None:
        if name not in services:
            die(f"no service named {name!r} in {config_path()} (known: {', '.join(sorted(services)) or 'none'})",
                 USAGE)
        return [services[name]]
    if not services:
        die(f"no services configured in {config_path()}; add one with "
             "`park services add NAME --address HOST:PORT --cert FILE`")
    return sorted(services.values(), key=lambda e: e.name)


def parse_job(ref: str) -> tuple[str | None, str]:
    """(site or None, job id) of a bare id or a park://SITE/jobs/ID reference."""
    match = _REF.fullmatch(ref)
    site, job_id = (match["site"], match["id"]) if match else (None, ref)
    try:
        check_job_id(job_id)
    except InvalidInput as exc:
        die(f"{exc}; give an id or a reference park://SITE/jobs/ID")
    return site, job_id


@contextlib.contextmanager
def open_job(ref: str, name: str | None) -> Iterator[Job]:
    """The job that `ref` names, at the service that holds it; the connection closes afterwards."""
    site, job_id = parse_job(ref)
    entries = configured_services(name)
    if site is None and name is None and len(entries) > 1:
        with _holder_of(job_id, entries) as service:
            yield service.job(job_id)
        return
    # A service named like the site is the likely holder: ask it first.
    entries.sort(key=lambda e: e.name != site)
    unreachable = []
    for entry in entries:
        with contextlib.closing(Service(entry.address, entry.cert)) as service:
            if site is not None:
                try:
                    actual = service.site
                except ParkError as exc:
                    if name is not None:
                        raise
                    unreachable.append(f"{entry.name}: {exc}")
                    continue
                if actual != site:
                    if name is not None:
                        die(f"service {name!r} is site {actual!r}, but the reference names site {site!r}")
                    continue
            yield service.job(job_id)
            return
    detail = f" (unreachable: {'; '.join(unreachable)})" if unreachable else ""
    die(f"no configured service is site {site!r}{detail}; add it with `park services add {site} "
         "--address HOST:PORT --cert FILE`")


def reference(job: Job) -> str:
    return f"park://{job.site}/jobs/{job.id}"


def probe(entry: ServiceEntry) -> dict[str, Any]:
    """What `park status` says of one service: `status` is "ok", "no credentials" (it answers, but does not
    know you), "refused" (it refused your token, for the reason in `error`), "tls" (its certificate is not
    the pinned one, or the address is a peer port) or "unreachable"; `reachable`: it answered at all. An
    operator (a token granting `admin`) also gets `peers`: the site's peers and their streams
    (cli.output.peer_json), or why they could not be read."""
    row: dict[str, Any] = {"name": entry.name, "address": entry.address, "reachable": False, "status": "unreachable",
                           "site": None, "version": None, "caller": None, "isolation": None,
                           "max_delegation_seconds": None, "error": None}
    try:
        with contextlib.closing(Service(entry.address, entry.cert)) as service:
            info = service.info
            if "admin" in info.permissions:      # an operator is shown the site's peers too
                row["peers"] = _peers(service)
    except ServiceError as exc:
        if exc.code == "UNAUTHENTICATED":
            row.update(reachable=True, status="refused", error=f"it refused your credentials: {exc.message}")
        elif exc.code == "UNAVAILABLE" and "the TLS handshake" in exc.message:
            row.update(status="tls", error=exc.message)
        else:
            row["error"] = exc.message
    except ParkError as exc:
        row["error"] = str(exc)
    else:
        row.update(reachable=True, status="ok" if info.caller else "no credentials", site=info.site,
                   version=info.version, caller=info.caller, isolation=info.isolation,
                   max_delegation_seconds=info.max_delegation_seconds or None)
        if not info.caller:
            row["error"] = "it does not know you: start park-agent and add your key, or set PARK_KEY_FILE"
    return row


def _peers(service: Service) -> list[dict[str, Any]] | str:
    """An operator's view of the site's peers, or why it could not be read."""
    try:
        return [peer_json(p) for p in service.peers()]
    except ParkError as exc:
        return str(exc)


@contextlib.contextmanager
def _holder_of(job_id: str, entries: list[ServiceEntry]) -> Iterator[Service]:
    """The one configured service that holds `job_id`, asked all at once (an id is 128 random bits: at
    most one site has it); the others are closed."""
    def ask(entry: ServiceEntry) -> tuple[ServiceEntry, Service | None, str]:
        service = Service(entry.address, entry.cert)
        try:
            service.call(service.jobs_stub.Get, jpb.GetRequest(job_id=job_id), f"looking for job {job_id}",
                         timeout=15)
            return entry, service, ""
        except ServiceError as exc:
            service.close()
            return entry, None, "" if exc.code == "NOT_FOUND" else f"{entry.name}: {exc}"
        except ParkError as exc:
            service.close()
            return entry, None, f"{entry.name}: {exc}"
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        answers = list(pool.map(ask, entries))
    found = [service for _, service, _ in answers if service is not None]
    if not found:
        trouble = "; ".join(why for _, _, why in answers if why)
        die(f"no configured service has job {job_id}" + (f" (could not ask {trouble})" if trouble else ""))
    try:
        yield found[0]
    finally:
        for service in found:
            service.close()
