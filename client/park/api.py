"""The functions a script calls: submit, map, run, race, fetch_url, the @job decorator, current_job.

Each checks its arguments on the spot, with the same rules the broker applies
(park.wire), so a mistake is reported at the line that made it, then queues
the job with its service and returns a `Job` without waiting for the broker.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from park._proto import jobs_pb2 as jpb
from park.wire import (InvalidInput, check_json, check_name, check_target, condition_from_proto, condition_to_proto,
                       parse_size)
from park.delegation import Credentials, credentials
from park.conditions import Condition
from park.counting import MAX_GROUP
from park.errors import ParkError, ServiceError
from park.expressions import Expression
from park.groups import JobGroup
from park.job import Job, Race
from park.renewal import DEFAULT_WITHIN, renew_at
from park.service import Service, default_service, new_job_id
from park.wheels import distribution_versions

__all__ = ["submit", "map", "run", "race", "fetch_url", "renew", "job", "current_job", "CurrentJob"]

F = TypeVar("F", bound=Callable[..., Any])

def _target_of(fn: Callable[..., Any]) -> str:
    """`module:qualname` of a function the broker can import."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module is None or "<" in qualname:
        raise ValueError(f"{fn!r} is not importable by name; define it at the top level of a module")
    if module == "__main__":
        # A script's functions are importable on the broker under the script's file name.
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if not main_file:
            raise ValueError(f"{fn.__name__} is defined interactively; put it in a module the broker can import")
        module = Path(main_file).stem
    return f"{module}:{qualname}"


@dataclass(frozen=True, slots=True)
class Controls:
    """How to run a job's attempts (none of it is part of the memo key): `retries` more attempts after a
    failed one, the first `retry_delay` seconds later and each further one twice as late; `timeout`
    seconds an attempt may run (None: the site's limit, if it has one); `priority`: higher first among your
    queued jobs at the site (between users the site takes turns); `resources`: {"cpus": 4, "memory": "8GiB",
    "gpus": 1}, what an attempt needs (it waits until the site has them free; over its memory it fails)."""

    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    priority: int = 0
    resources: Mapping[str, Any] | None = None

    def apply(self, spec: jpb.JobSpec) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or not 0 <= self.retries <= 100:
            raise ValueError(f"retries={self.retries!r}: a whole number from 0 to 100")
        if not (isinstance(self.retry_delay, (int, float)) and 0 <= self.retry_delay <= 86400):
            raise ValueError(f"retry_delay={self.retry_delay!r}: seconds, from 0 to 86400")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < 1e9):
            raise ValueError(f"timeout={self.timeout!r}: seconds, more than 0 (or None for the site's limit)")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or abs(self.priority) > 2**31 - 1:
            raise ValueError(f"priority={self.priority!r}: a whole number (higher runs first)")
        spec.retries, spec.retry_delay, spec.timeout = self.retries, float(self.retry_delay), float(self.timeout or 0)
        spec.priority = self.priority
        if not self.resources:
            return   # unset: what the broker reads as none asked for
        unknown = set(self.resources) - {"cpus", "memory", "gpus"}
        if unknown:
            raise ValueError(f"resources: unknown {sorted(unknown)[0]!r}; ask for cpus, memory and gpus")
        asked = dict(self.resources)
        cpus, gpus = asked.get("cpus", 0), asked.get("gpus", 0)
        if not (isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and 0 <= cpus <= 1e6):
            raise ValueError(f"resources: cpus={cpus!r} must be a number of cpus, 0 or more")
        if not (isinstance(gpus, int) and not isinstance(gpus, bool) and 0 <= gpus <= 1024):
            raise ValueError(f"resources: gpus={gpus!r} must be a whole number, 0 or more")
        spec.resources.CopyFrom(jpb.Resources(cpus=float(cpus), memory_bytes=parse_size(asked.get("memory", 0)),
                                              gpus=gpus))


def spec_for(service: Service, when: Condition | None, output: str, label: str | None,
             controls: Controls = Controls()) -> jpb.JobSpec:
    if when is not None and not isinstance(when, Condition):
        raise TypeError(f"when= takes a condition such as job.iscompleted, not {type(when).__name__}")
    spec = jpb.JobSpec(id=new_job_id(), output_name=output, label=label or "")
    controls.apply(spec)
    try:
        check_name(output)
        spec.when.CopyFrom(condition_to_proto(when))
        condition_from_proto(spec.when)   # the broker's limits, checked before sending
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    if when is not None:
        _name_remote_jobs(service, when, spec)
    return spec


def _name_remote_jobs(service: Service, when: Condition, spec: jpb.JobSpec) -> None:
    """Name each job at another site as that site knows it, and attach tokens letting `service` watch them.

    Waits for those jobs' own submissions to be acknowledged: their site must hold them before
    `service` asks about them, and a memo hit there is known by the earlier job's id (which keeps
    this job's memo key the same on a rerun)."""
    remote: dict[str, tuple[Service, set[str]]] = {}
    canonical: dict[tuple[str, str], str] = {}
    for atom in when.depends:
        job = atom.origin
        if not isinstance(job, Job) or job.site == service.site:
            continue
        canonical[(job.site, job.id)] = job.acknowledged().id or job.id
        remote.setdefault(job.site, (job.service, set()))[1].add(canonical[(job.site, job.id)])
    for node in spec.when.postfix:
        if node.HasField("atom"):
            node.atom.job_id = canonical.get((node.atom.site, node.atom.job_id), node.atom.job_id)
    for site, (other, ids) in remote.items():
        # As long as `other` accepts (the job may wait long there); `park renew` replaces it later.
        spec.grants[site] = credentials(other, scopes=[f"jobs.read:/{j}" for j in sorted(ids)],
                                        destination=service).token()


def queue_spec(service: Service, spec: jpb.JobSpec, contestants: list[Job] | None = None) -> Job:
    info = service.info
    if not info.caller:
        raise ServiceError("UNAUTHENTICATED", f"site {info.site} ({service.address}) does not know you: start "
                                              "park-agent and add your key (PARK_AUTH_SOCK), or set PARK_KEY_FILE")
    directory = f"{info.files_root}/{info.caller}/{spec.id}"
    names = dict(url=f"park://{info.site}/files/{info.caller}/{spec.id}/{spec.output_name}",
                 filename=f"{directory}/{spec.output_name}", pending=service.enqueue(spec))
    if contestants is not None:
        return Race(service, spec.id, contestants=contestants, **names)  # type: ignore[arg-type]
    return Job(service, spec.id, **names)  # type: ignore[arg-type]


def submit(target: str | Callable[..., Any], *args: Any, when: Condition | None = None,
           service: Service | None = None, requires: Sequence[str] = (), output: str = "output",
           label: str | None = None, memo: bool = True, retries: int = 0, retry_delay: float = 1.0,
           timeout: float | None = None, priority: int = 0, resources: Mapping[str, Any] | None = None,
           **kwargs: Any) -> Job:
    """Submit a Python call `target(*args, **kwargs)` to run at `service` once `when` holds.

    `target` is "package.module:function" or a function the broker can import.
    Arguments must be JSON-able. With `memo` (the default) an identical earlier
    job — same call, arguments, input files, upstream jobs and package versions —
    is returned instead of running again (`job.memo_hit`). A failed attempt runs
    again up to `retries` times (after `retry_delay` seconds, doubling), and an
    attempt running longer than `timeout` seconds fails as timed out; `priority` orders your queued
    jobs, and `resources` says what an attempt needs (see `Controls`).
    Returns at once; see park.Job.
    """
    service = default_service(service)
    spec = _call_spec(service, target, list(args), kwargs, when, requires, output, label, memo,
                      Controls(retries, retry_delay, timeout, priority, resources))
    return queue_spec(service, spec)


def map(target: str | Callable[..., Any], items: Iterable[Any], *, when: Condition | None = None,
        service: Service | None = None, requires: Sequence[str] = (), output: str = "output",
        label: str | None = None, memo: bool = True, retries: int = 0, retry_delay: float = 1.0,
        timeout: float | None = None, priority: int = 0, resources: Mapping[str, Any] | None = None,
        **kwargs: Any) -> JobGroup:
    """Submit `target(item, **kwargs)` for each of `items`, all gated on `when`, as one group.

    Every option is as for `submit` and applies to each member; memoization is per member, so a rerun
    after one item changed runs one job. The jobs go to the broker in batches like any submission
    (a 100,000-item map costs a handful of round trips). Returns at once a `JobGroup`: its `.jobs` in
    item order, and conditions on them that cost one atom however many there are (`iscompleted`,
    `isfinished`, `any_completed`, `at_least(k)`)."""
    items = list(items)
    if not 1 <= len(items) <= MAX_GROUP:
        raise ValueError(f"map() takes 1 to {MAX_GROUP} items, not {len(items)}")
    service = default_service(service)
    # The spec of the first item is every member's, but for its id and argument: the condition, its
    # tokens and the package versions are worked out once.
    base = _call_spec(service, target, [items[0]], kwargs, when, requires, output, label, memo,
                      Controls(retries, retry_delay, timeout, priority, resources))
    group_spec = spec_for(service, None, "output", f"map of {base.label} over {len(items)}")
    group_spec.group.size = len(items)
    group = queue_spec(service, group_spec)
    base.member_of = group.id
    jobs = []
    for i, item in enumerate(items):
        spec = jpb.JobSpec()
        spec.CopyFrom(base)
        spec.id = new_job_id()
        try:
            spec.call.args_json = check_json(json.dumps([item], allow_nan=False), list, "args")
        except (InvalidInput, TypeError, ValueError) as exc:
            raise TypeError(f"item {i} of the map must be JSON-able (numbers, strings, lists, dicts): {exc}") from None
        jobs.append(queue_spec(service, spec))
    return JobGroup(group, jobs)


def _call_spec(service: Service, target: str | Callable[..., Any], args: list[Any], kwargs: dict[str, Any],
               when: Condition | None, requires: Sequence[str], output: str, label: str | None, memo: bool,
               controls: Controls) -> jpb.JobSpec:
    name = target if isinstance(target, str) else _target_of(target)
    spec = spec_for(service, when, output, label or name, controls)
    try:
        check_target(name)
        spec.call.target = name
        spec.call.args_json = check_json(json.dumps(args, allow_nan=False), list, "args")
        spec.call.kwargs_json = check_json(json.dumps(kwargs, allow_nan=False), dict, "kwargs")
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments of {name} must be JSON-able (numbers, strings, lists, dicts): {exc}") from None
    spec.requires.extend(requires)
    spec.no_memo = not memo
    # The exact versions this callable has here; the broker checks its pins against them.
    spec.versions.update(distribution_versions(name.partition(":")[0]))
    return spec


def run(argv: Sequence[str], *, when: Condition | None = None, service: Service | None = None,
        output: str = "output", label: str | None = None, memo: bool = True, retries: int = 0,
        retry_delay: float = 1.0, timeout: float | None = None, priority: int = 0,
        resources: Mapping[str, Any] | None = None) -> Job:
    """Submit a command line (no shell) to run in the job's directory once `when` holds; a non-zero exit
    is a failed attempt. `retries`, `retry_delay`, `timeout`, `priority` and `resources` as for `submit`."""
    if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("run() takes a list of strings, e.g. ['reduce', '--in', 'x.nxs']")
    service = default_service(service)
    spec = spec_for(service, when, output, label or argv[0], Controls(retries, retry_delay, timeout, priority,
                                                                      resources))
    spec.command.argv.extend(argv)
    spec.no_memo = not memo
    return queue_spec(service, spec)


def fetch_url(url: str, *, auth: Credentials, when: Condition | None = None, service: Service | None = None,
              output: str | None = None, label: str | None = None, retries: int = 0, retry_delay: float = 1.0,
              timeout: float | None = None, priority: int = 0) -> Job:
    """Pull `url` (another site's job output, `park://site/files/owner/job/name`, e.g. `job.url`) to
    `service` (default: the enclosing `with`) once `when` holds; the file lands at the returned
    job's `filename`, checked by size and sha256. `auth` is `park.credentials(service=<the source>)`."""
    service = default_service(service)
    if not isinstance(auth, Credentials):
        raise TypeError("fetch_url needs auth=park.credentials(service=<the site the file is at>): that site "
                        "must be told you let this one read the file")
    if not url.startswith("park://") or "/files/" not in url:
        raise ValueError(f"{url!r} is not a park:// file url; use a job's .url")
    path = "/files".join(url[len("park://"):].split("/files")[1:])
    parts = path.split("/")
    if len(parts) >= 4 and auth.service.site == url[len("park://"):].split("/")[0]:
        # Named as its site knows it: a memo hit there is the earlier job, whose name keeps a rerun's
        # fetch the same work (a memo hit here too).
        parts[2] = auth.service.job(parts[2]).record().id
        path = "/".join(parts)
        url = f"park://{auth.service.site}/files{path}"
    name = output or path.rsplit("/", 1)[-1]
    spec = spec_for(service, when, name, label or f"fetch {url}", Controls(retries, retry_delay, timeout, priority))
    spec.fetch.CopyFrom(jpb.Fetch(url=url, token=auth.token([f"files.read:{path}"])))
    return queue_spec(service, spec)


def renew(service: Service | None = None, *, within: float = DEFAULT_WITHIN) -> list[jpb.Credential]:
    """Replace the delegated tokens (fetch tokens, grants) of your active jobs at `service` (default: the
    enclosing `with`) that expire within `within` seconds with fresh ones from your agent, so a job that
    waits longer than a site lets a token live keeps going; returns what was renewed (`park renew`)."""
    return renew_at(default_service(service), within)


def race(jobs: Sequence[Job], until: str | None = None, *, service: Service | None = None,
         label: str | None = None) -> Race:
    """Race `jobs`: the first whose report satisfies `until` (or, with None, the first to complete)
    wins, the others are cancelled at once, and the race completes with the winner's values.

    If all end without winning, the race is cancelled. Returns at once; `race.winner` and
    `race.result()` wait. The race runs at the jobs' service."""
    jobs = list(jobs)
    if not jobs or not all(isinstance(j, Job) for j in jobs):
        raise TypeError("race() takes a non-empty list of jobs")
    service = service or jobs[0].service
    foreign = [j for j in jobs if j.site != service.site]
    if foreign:
        raise ValueError(f"job {foreign[0].id} is at site {foreign[0].site!r}; "
                         f"a race runs where its jobs are ({service.site!r})")
    if until is not None:
        Expression(until)
    spec = spec_for(service, None, "output", label or f"race of {len(jobs)}")
    spec.race.contestants.extend(j.id for j in jobs)
    spec.race.until = until or ""
    return queue_spec(service, spec, jobs)  # type: ignore[return-value]


def job(fn: F) -> Callable[..., Job]:
    """Decorate a function so that calling it submits it: `prefit(3, when=..., service=...) -> Job`.

    The plain function stays available as `.local`."""
    target = _target_of(fn)

    @functools.wraps(fn)
    def submitter(*args: Any, when: Condition | None = None, service: Service | None = None, **kwargs: Any) -> Job:
        return submit(target, *args, when=when, service=service, **kwargs)

    submitter.local = fn  # type: ignore[attr-defined]
    return submitter


@dataclass(frozen=True, slots=True)
class CurrentJob:
    id: str
    site: str
    directory: str
    filename: str
    url: str


def current_job() -> CurrentJob:
    """Inside a running job: its id, directory and the filename its output goes to."""
    env = os.environ
    if "PARK_JOB_ID" not in env:
        raise ParkError("park.current_job() works only inside a job run by a Park broker")
    return CurrentJob(env["PARK_JOB_ID"], env["PARK_SITE"], env["PARK_JOB_DIR"], env["PARK_JOB_FILENAME"],
                      env["PARK_JOB_URL"])
