"""What a submission must satisfy before it becomes a job, and what its memo key is.

`Admission` checks a JobSpec on its own (shape, names, limits, expressions),
builds the condition a job waits on (a race waits on its contestants), finds the
packages a job `requires` (installing them from the site's index if it has one),
and computes memo keys (memo.py) from the job's inputs. It never touches the
job store or the scheduler; the JobManager gives it what it needs to know about
other jobs through callables.
"""
from __future__ import annotations

import asyncio
import functools
import math
import operator
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from park._proto import conditions_pb2 as cpb
from park._proto import jobs_pb2 as jpb
from park.wire import (InvalidInput, check_job_id, check_name, check_site, check_target, condition_from_proto,
                        parse_json)
from park.conditions import Atom, AtomKey, Condition
from park.counting import MAX_GROUP
from park.expressions import Expression, ExpressionError
from park_broker.core import memo
from park_broker.errors import BrokerError, Code, fail
from park_broker.site import Resources
from park_broker.packages.store import PackageError, PackageStore, installed_versions, parse_pins, parse_wheel_name
from park_broker.execution.worker import RESERVED_NAMES

MAX_ARGV = 4096
MAX_CONTESTANTS = 64
DEFAULT_OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class Checked:
    """What `Admission.validate` learnt of a spec, read once for the rest of its admission."""

    cond: Condition | None
    args: list[Any]            # a call's positional arguments, a command's argv; else empty
    kwargs: dict[str, Any]     # a call's keyword arguments; else empty
    strings: list[str]         # every string in them: the files and job outputs they may name


class Admission:
    def __init__(self, site: str, files_root: Path, packages: PackageStore, peers: frozenset[str] = frozenset(),
                 max_walltime: float = 0.0, resources: Resources | None = None):
        self.site = site
        self.peers = peers
        self.max_walltime = max_walltime   # seconds; 0: the site sets no limit
        self.resources = resources         # what the site has for jobs; None: not counted (Dask)
        self.files_root = files_root
        self.packages = packages
        self.digests = memo.FileDigests()
        self._expressions: dict[str, Expression] = {}

    # -- shape -------------------------------------------------------------------

    def validate(self, spec: jpb.JobSpec) -> Checked:
        """The job's condition and arguments; raises BrokerError saying what to fix."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        try:
            check_job_id(spec.id)
            which = spec.WhichOneof("work")
            if which == "call":
                check_target(spec.call.target)
                args = parse_json(spec.call.args_json, list, "args")
                kwargs = parse_json(spec.call.kwargs_json, dict, "kwargs")
            elif which == "command":
                args = list(spec.command.argv)
                if not args or not args[0]:
                    raise InvalidInput("a command needs at least a program name")
                if len(args) > MAX_ARGV or any("\0" in a for a in args):
                    raise InvalidInput(f"a command has at most {MAX_ARGV} arguments and no NUL characters")
            elif which == "race":
                _check_race(spec)
            elif which == "install":
                _check_install(spec)
            elif which == "fetch":
                self.fetch_source(spec)
            elif which == "group":
                _check_group(spec)
            else:
                raise InvalidInput("a job needs a Python call, a command line, a race, an install, a fetch or "
                                   "a group")
            if spec.member_of:
                check_job_id(spec.member_of, "member_of (a group's id)")
            name = spec.output_name or DEFAULT_OUTPUT
            check_name(name)
            if name in RESERVED_NAMES:
                raise InvalidInput(f"output name {name!r} is reserved for the job's logs and result")
            cond = self.condition_of(spec)
            for atom in cond.depends if cond is not None else ():
                if atom.key.kind == "improved":
                    self.expression(atom.key.expr)
            _check_controls(spec)
        except (InvalidInput, ExpressionError) as exc:
            raise BrokerError(Code.INVALID_ARGUMENT, f"job {spec.id[:40]!r}: {exc}") from None
        asks = spec.resources
        has = self.resources
        if has is not None and (asks.cpus > has.cpus or asks.memory_bytes > has.memory or asks.gpus > has.gpus):
            fail(Code.FAILED_PRECONDITION, f"job {spec.id}: asks for {asks.cpus or 1:g} cpus, "
                                           f"{asks.memory_bytes / 2**30:.1f} GiB of memory and {asks.gpus} gpus; "
                                           f"site {self.site!r} has {has.describe()} for jobs")
        if self.max_walltime and spec.timeout > self.max_walltime:
            fail(Code.FAILED_PRECONDITION, f"job {spec.id}: asks for a time limit of {spec.timeout:g} s; site "
                                           f"{self.site!r} lets an attempt run {self.max_walltime:g} s at most")
        for site in {a.key.site for a in cond.depends} - {self.site} if cond is not None else ():
            if site not in self.peers:
                fail(Code.FAILED_PRECONDITION, f"job {spec.id}: condition names a job at site {site!r}, which is "
                                               f"not a peer of {self.site!r}; its operator adds it with "
                                               f"`park-broker peers add`")
            if site not in spec.grants:
                fail(Code.FAILED_PRECONDITION, f"job {spec.id}: no delegated token lets {self.site!r} watch jobs "
                                               f"at {site!r}; submit with park (it attaches one from your agent)")
        return Checked(cond, args, kwargs, memo.strings(args) + memo.strings(kwargs))

    def fetch_source(self, spec: jpb.JobSpec) -> tuple[str, str]:
        """(site, path) a fetch reads; InvalidInput unless the url names a peer's job output."""
        url = spec.fetch.url
        if not url.startswith("park://") or "/files/" not in url:
            raise InvalidInput(f"fetch url {url[:100]!r} must be park://<site>/files/<owner>/<job>/<name>")
        site, _, path = url[len("park://"):].partition("/files")
        check_site(site)
        if site not in self.peers:
            raise InvalidInput(f"fetch source {site!r} is not a peer of {self.site!r}; its operator adds it with "
                               "`park-broker peers add`")
        parts = path.split("/")
        if len(parts) < 4 or any(not p or p in (".", "..") or "%" in p or "\0" in p for p in parts[1:]):
            raise InvalidInput(f"fetch url path {path[:100]!r} must be /<owner>/<job>/<name>, with no '.', '..' or '%'")
        if not spec.fetch.token:
            raise InvalidInput("a fetch needs a delegated token: fetch_url(url, auth=park.credentials(service=...))")
        return site, path

    def condition_of(self, spec: jpb.JobSpec) -> Condition | None:
        """The condition a job waits on; a race waits on any contestant's success."""
        if spec.WhichOneof("work") != "race":
            return condition_from_proto(spec.when)
        kind, expr = ("improved", spec.race.until) if spec.race.until else ("completed", "")
        atoms = [Atom(AtomKey(self.site, j, kind, expr)) for j in spec.race.contestants]
        return functools.reduce(operator.or_, atoms)

    def expression(self, source: str) -> Expression:
        expr = self._expressions.get(source)
        if expr is None:
            expr = self._expressions[source] = Expression(source)
        return expr

    # -- references to other jobs ------------------------------------------------------

    def output_reference(self, text: str) -> tuple[str, str] | None:
        """(job id, name) when `text` names a job's output at this site by url or path."""
        if text.startswith(f"park://{self.site}/files/"):
            parts = text[len(f"park://{self.site}/files/"):].split("/")
        elif os.path.isabs(text) and "\0" not in text:
            try:
                parts = list(Path(os.path.normpath(text)).relative_to(self.files_root).parts)
            except ValueError:
                return None
        else:
            return None
        if len(parts) < 3:
            return None
        try:
            return check_job_id(parts[1]), "/".join(parts[2:])
        except InvalidInput:
            return None

    def referenced(self, checked: Checked) -> set[str]:
        """Ids of the jobs whose outputs a spec's arguments name."""
        return {ref[0] for s in checked.strings if (ref := self.output_reference(s)) is not None}

    # -- packages and memo keys -------------------------------------------------------

    async def packages_for(self, owner: str, spec: jpb.JobSpec, installing: set[tuple[str, str, str]]
                           ) -> tuple[list[Path], dict[str, str]]:
        """The install directories of the pins a job requires (fetched from the index if needed), and
        the pins an install job of this site is still waiting to receive: those are checked at start."""
        if not spec.requires:
            return [], {}
        try:
            pins = parse_pins(list(spec.requires))
            coming = {name: version for name, version in pins
                      if (owner, name, version) in installing or ("", name, version) in installing}
            rest = [f"{name}=={version}" for name, version in pins if name not in coming]
            return await asyncio.to_thread(self.packages.ensure, rest, owner), coming
        except PackageError as exc:
            raise BrokerError(exc.code, f"job {spec.id}: {exc.message}") from None

    @staticmethod
    def installs(owner: str, spec: jpb.JobSpec) -> tuple[str, str, str] | None:
        """The pin an install job of `owner` provides, and to whom ("" for every user)."""
        if spec.WhichOneof("work") != "install":
            return None
        try:
            return ("" if spec.install.site_wide else owner, *parse_wheel_name(spec.install.filename))
        except PackageError:
            return None

    async def file_digests(self, specs: Iterable[Checked]) -> dict[str, str]:
        """Content digests of the plain files the specs' arguments name (read in a thread)."""
        paths = {s for checked in specs for s in checked.strings
                 if os.path.isabs(s) and self.output_reference(s) is None}
        if not paths:
            return {}
        found = await asyncio.to_thread(lambda: {p: self.digests.digest(p) for p in paths})
        return {p: d for p, d in found.items() if d is not None}

    def memo_inputs(self, owner: str, spec: jpb.JobSpec, checked: Checked, dirs: list[Path], coming: dict[str, str],
                    digests: dict[str, str], key_of_job: Callable[[str], str | None]) -> dict[str, Any] | None:
        """The document a job's memo key hashes; None when the job is never memoized."""
        which = spec.WhichOneof("work")
        if spec.no_memo or which in ("race", "group"):
            return None
        packages = dict(spec.versions)
        for name, version in {**installed_versions(dirs), **coming}.items():
            if packages.get(name, version) != version:
                fail(Code.FAILED_PRECONDITION, f"job {spec.id}: you run {name} {packages[name]} but the site "
                                               f"would run {version}; pin requires=['{name}=={packages[name]}']")
            packages[name] = version

        def resolve(text: str) -> Any:
            ref = self.output_reference(text)
            if ref is not None:
                upstream = key_of_job(ref[0])
                return {"output": upstream or f"unmemoized job {ref[0]}", "name": ref[1]}
            return {"file": digests[text]} if text in digests else None

        if which == "call":
            work: Any = spec.call.target
            # Without strings there is nothing to resolve (most calls of a large workflow: numbers).
            args = memo.substitute(checked.args, resolve) if checked.strings else checked.args
            kwargs = memo.substitute(checked.kwargs, resolve) if checked.strings else checked.kwargs
        elif which == "command":
            work, args, kwargs = memo.substitute(checked.args, resolve), [], {}
        elif which == "fetch":   # a job's output never changes once it exists: the url names the content
            work, args, kwargs = spec.fetch.url, [], {}
        else:   # the same wheel published site-wide is another install than the uploader's own
            work, args, kwargs = spec.install.sha256 + (":site-wide" if spec.install.site_wide else ""), [], {}
        # The condition is part of the work: the same call gated differently is other work. Its
        # atoms count by their jobs' keys, so a rerun whose upstream jobs are memo hits still matches.
        when = [cpb.Op.Name(n.op) if n.WhichOneof("node") == "op" else
                [key_of_job(n.atom.job_id) or n.atom.job_id, n.atom.kind, n.atom.expr] for n in spec.when.postfix]
        return {"v": memo.VERSION, "owner": owner, "kind": which, "work": work, "args": args, "kwargs": kwargs,
                "output": spec.output_name or DEFAULT_OUTPUT, "packages": packages, "when": when}


def _check_race(spec: jpb.JobSpec) -> None:
    race = spec.race
    if not 1 <= len(race.contestants) <= MAX_CONTESTANTS:
        raise InvalidInput(f"a race needs 1 to {MAX_CONTESTANTS} contestants")
    if len(set(race.contestants)) != len(race.contestants):
        raise InvalidInput("a race names the same contestant twice")
    for job_id in race.contestants:
        check_job_id(job_id, "contestant")
    if spec.when.postfix:
        raise InvalidInput("a race has no when=; it starts judging at once")


def _check_group(spec: jpb.JobSpec) -> None:
    if not 1 <= spec.group.size <= MAX_GROUP:
        raise InvalidInput(f"a group has 1 to {MAX_GROUP} members, not {spec.group.size}")
    if spec.when.postfix or spec.member_of or spec.requires:
        raise InvalidInput("a group has no when=, member_of or requires=; its members do")


def _check_install(spec: jpb.JobSpec) -> None:
    install = spec.install
    if len(install.sha256) != 64 or any(c not in "0123456789abcdef" for c in install.sha256):
        raise InvalidInput("an install needs the wheel's sha256 (64 lowercase hex characters)")
    check_name(install.filename, "wheel file name")
    try:
        name, version = parse_wheel_name(install.filename)
    except PackageError as exc:
        raise InvalidInput(exc.message) from None
    if (name, version) != parse_wheel_name(f"{install.name}-{install.version}-py3-none-any.whl"):
        raise InvalidInput(f"{install.filename!r} is not a wheel of {install.name} {install.version}")
    if spec.when.postfix:
        raise InvalidInput("an install has no when=; it completes when its upload is installed")


MAX_RETRIES = 100
MAX_DELAY = 24 * 3600.0


def _check_controls(spec: jpb.JobSpec) -> None:
    """Retries, their delay and the time limit must be numbers a scheduler can keep."""
    if spec.retries > MAX_RETRIES:
        raise InvalidInput(f"retries={spec.retries}: at most {MAX_RETRIES}")
    if not (math.isfinite(spec.retry_delay) and 0 <= spec.retry_delay <= MAX_DELAY):
        raise InvalidInput(f"retry_delay must be between 0 and {MAX_DELAY:g} seconds")
    if not (math.isfinite(spec.timeout) and spec.timeout >= 0):
        raise InvalidInput("timeout must be a number of seconds, 0 or more")
    r = spec.resources
    if not (math.isfinite(r.cpus) and 0 <= r.cpus <= 1e6) or r.memory_bytes < 0 or r.gpus < 0:
        raise InvalidInput("resources: cpus, memory and gpus must be numbers of 0 or more")
    if spec.WhichOneof("work") in ("race", "install", "group") and (spec.retries or spec.timeout):
        raise InvalidInput("races, installs and groups take no retries or time limit (their contestants, uploads "
                           "and members do)")
