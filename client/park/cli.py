"""`park`: the command line for people and for scripts.

    park services add NAME --address HOST:PORT --cert FILE
    park status [--json]
    park jobs [--service NAME] [--state STATE ...] [--json]
    park watch JOB [--service NAME] [--json] [--exit-status]
    park cancel JOB [--service NAME] [--reason TEXT] [--json]
    park graph JOB [--service NAME] [--format dot|mermaid|svg|png] [--depth N] [--output FILE]
    park demo [--again] [--keep] [--workers N] [--plain]

JOB is a job id, with `--service NAME` or when only one service is configured,
or a reference `park://SITE/jobs/ID`, whose site is looked up among the
configured services (the one named like the site first).

Tables are for people; `--json` prints one JSON document on stdout instead.
Errors go to stderr as `park: message`. Exit status: 0 on success, 1 on a
failure (an unreachable broker, an unknown job, a job that cannot be
cancelled), 2 for bad usage, 130 when interrupted.

This module owns the command line: parsing, output and exit statuses. It holds
no broker logic; everything it does goes through `park.Service` and `park.Job`.
`park demo` lives in park.demo and borrows the event formatting from here.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from park._proto import jobs_pb2 as jpb
from park._wire import STATE_NAMES, InvalidInput, check_job_id
from park.config import ServiceEntry, add_service, config_path, load_services
from park.errors import ParkError
from park.graph import add_graph_command
from park.job import Job, JobEvent
from park.service import Service

__all__ = ["main", "CliError", "describe", "STATE_STYLES", "clock"]

STATE_STYLES = {"waiting": "dim", "queued": "cyan", "running": "yellow", "completed": "green",
                "failed": "red", "cancelled": "magenta"}
_STATE_NUMBERS = {name: number for number, name in STATE_NAMES.items()}
_REF = re.compile(r"park://(?P<site>[^/]+)/jobs/(?P<id>[^/]+)/?")
USAGE, FAILURE = 2, 1


class CliError(ParkError):
    """A failure the command reports as `park: message` with exit status `status`."""

    def __init__(self, message: str, status: int = FAILURE):
        super().__init__(message)
        self.status = status


def _die(message: str, status: int = FAILURE) -> NoReturn:
    raise CliError(message, status)


# -- formatting shared with park.demo -------------------------------------------------

def clock(t: float) -> str:
    """Local wall-clock time of an epoch timestamp, for people."""
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else ""


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _iso(t: float) -> str | None:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat() if t else None


def describe(event: JobEvent) -> str:
    """One line saying what an event means: the work submitted, the result, the error or the cause."""
    d = event.detail
    if event.kind == "submitted":
        spec = d.get("spec", {})
        work = spec.get("call", {}).get("target") or " ".join(spec.get("command", {}).get("argv", []))
        label = spec.get("label", "")
        return f"{label} ({work})" if label and label != work else work
    if event.kind == "queued":
        return d.get("reason", "")
    if event.kind == "started":
        return f"attempt {d.get('attempt', 1)}"
    if event.kind == "completed":
        if "resultFile" in d:
            return f"result in {d['resultFile'].get('path', '')}"
        return f"result {d.get('resultJson', 'null')}"
    if event.kind == "failed":
        return d.get("error", "")
    if event.kind == "cancelled":
        return d.get("cause", {}).get("message", "no cause recorded")
    if event.kind == "improved":
        return ", ".join(f"{k}={v:g}" for k, v in d.get("values", {}).items())
    return ""


def _console() -> Console:
    # Off a terminal rich would wrap at 80 columns; pipes and files get whole lines.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


# -- finding services and jobs --------------------------------------------------------

def _entries(name: str | None = None) -> list[ServiceEntry]:
    """The configured services, or just `name`: exit 2 for an unknown name, 1 when none are configured."""
    services = load_services()
    if name is not None:
        if name not in services:
            _die(f"no service named {name!r} in {config_path()} (known: {', '.join(sorted(services)) or 'none'})",
                 USAGE)
        return [services[name]]
    if not services:
        _die(f"no services configured in {config_path()}; add one with "
             "`park services add NAME --address HOST:PORT --cert FILE`")
    return sorted(services.values(), key=lambda e: e.name)


def _parse_job(ref: str) -> tuple[str | None, str]:
    """(site or None, job id) of a bare id or a park://SITE/jobs/ID reference."""
    match = _REF.fullmatch(ref)
    site, job_id = (match["site"], match["id"]) if match else (None, ref)
    try:
        check_job_id(job_id)
    except InvalidInput as exc:
        _die(f"{exc}; give an id or a reference park://SITE/jobs/ID")
    return site, job_id


@contextlib.contextmanager
def _open_job(ref: str, name: str | None) -> Iterator[Job]:
    """The job that `ref` names, at the service that holds it; the connection closes afterwards."""
    site, job_id = _parse_job(ref)
    entries = _entries(name)
    if site is None and name is None and len(entries) > 1:
        _die(f"several services are configured ({', '.join(e.name for e in entries)}); "
             "pass --service NAME or a reference park://SITE/jobs/ID", USAGE)
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
                        _die(f"service {name!r} is site {actual!r}, but the reference names site {site!r}")
                    continue
            yield service.job(job_id)
            return
    detail = f" (unreachable: {'; '.join(unreachable)})" if unreachable else ""
    _die(f"no configured service is site {site!r}{detail}; add it with `park services add {site} "
         "--address HOST:PORT --cert FILE`")


def _reference(job: Job) -> str:
    return f"park://{job.site}/jobs/{job.id}"


# -- commands -------------------------------------------------------------------------

def cmd_services_add(args: argparse.Namespace) -> int:
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        _die(f"--address {args.address!r} must be HOST:PORT", USAGE)
    path = add_service(args.name, args.address, Path(args.cert))
    print(f"service {args.name} ({args.address}) saved in {path}; check it with `park status`")
    return 0


def _probe(entry: ServiceEntry) -> dict[str, Any]:
    row: dict[str, Any] = {"name": entry.name, "address": entry.address, "reachable": False, "site": None,
                           "version": None, "caller": None, "error": None}
    try:
        with contextlib.closing(Service(entry.address, entry.cert)) as service:
            info = service.info
    except ParkError as exc:
        row["error"] = str(exc)
    else:
        row.update(reachable=True, site=info.site, version=info.version, caller=info.caller)
    return row


def cmd_status(args: argparse.Namespace) -> int:
    entries = _entries()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        rows = list(pool.map(_probe, entries))
    down = [r["name"] for r in rows if not r["reachable"]]
    if args.json:
        _print_json({"services": rows})
    else:
        table = Table("service", "address", "reachable", "site", "version", "caller")
        for r in rows:
            table.add_row(Text(r["name"]), Text(r["address"]),
                          Text("yes", style="green") if r["reachable"] else Text("no", style="red"),
                          Text(r["site"] or ""), Text(r["version"] or ""), Text(r["caller"] or ""))
        _console().print(table)
    for r in rows:
        if not r["reachable"]:
            print(f"park: service {r['name']} is unreachable: {r['error']}", file=sys.stderr)
    return FAILURE if down else 0


def _job_row(service_name: str, job: jpb.Job) -> dict[str, Any]:
    return {"service": service_name, "site": job.site, "id": job.id,
            "label": job.spec.label or job.spec.call.target or " ".join(job.spec.command.argv),
            "state": STATE_NAMES.get(job.state, "unknown"), "submitted": _iso(job.submitted_at),
            "finished": _iso(job.finished_at), "url": job.url}


def cmd_why(args: argparse.Namespace) -> int:
    """`park jobs --why JOB`: was the job reused, and if not, what differs from the last run."""
    with _open_job(args.why, args.service) as job:
        report = job.memo_report()
    if args.json:
        _print_json({"hit": report.hit, "job": report.job_id, "nearest": report.nearest_id or None,
                     "differences": list(report.differences)})
        return 0
    if report.hit:
        print(f"{args.why} reused job {report.job_id} (a memo hit)")
        return 0
    print(f"{args.why} ran anew" + (f"; compared with job {report.nearest_id}:" if report.nearest_id else ":"))
    for difference in report.differences:
        print(f"  {difference}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.why:
        return cmd_why(args)
    states = [_STATE_NUMBERS[s] for s in args.state or ()]
    found: list[tuple[str, jpb.Job]] = []
    status = 0
    for entry in _entries(args.service):
        try:
            with contextlib.closing(Service(entry.address, entry.cert)) as service:
                found += [(entry.name, job) for job in service.list_jobs(states=states)]
        except ParkError as exc:
            print(f"park: service {entry.name}: {exc}", file=sys.stderr)
            status = FAILURE
    found.sort(key=lambda pair: pair[1].submitted_at)
    if args.json:
        _print_json({"jobs": [_job_row(name, job) for name, job in found]})
        return status
    table = Table("site", "id", "label", "state", "submitted", "finished")
    for name, job in found:
        row = _job_row(name, job)
        table.add_row(Text(row["site"]), Text(row["id"]), Text(row["label"]),
                      Text(row["state"], style=STATE_STYLES.get(row["state"], "")),
                      _when(job.submitted_at), _when(job.finished_at))
    _console().print(table if found else "no jobs")
    return status


def _event_json(event: JobEvent) -> dict[str, Any]:
    return {"seq": event.seq, "time": _iso(event.time), "kind": event.kind, "summary": describe(event),
            "detail": event.detail}


def cmd_watch(args: argparse.Namespace) -> int:
    events: list[JobEvent] = []
    with _open_job(args.job, args.service) as job:
        console = _console()
        if not args.json:
            console.print(Text(f"watching {_reference(job)}", style="bold"))
        for event in job.events():
            events.append(event)
            if not args.json:
                console.print(Text.assemble(f"{clock(event.time)}  #{event.seq:<6} ",
                                            (f"{event.kind:<10}", STATE_STYLES.get(event.kind, "")),
                                            f" {describe(event)}"))
        final = events[-1].kind if events else "unknown"
        if args.json:
            _print_json({"job": job.id, "reference": _reference(job), "url": job.url, "state": final,
                         "events": [_event_json(e) for e in events]})
    return FAILURE if args.exit_status and final != "completed" else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _open_job(args.job, args.service) as job:
        before = job.state
        state = before if before in ("completed", "failed", "cancelled") else job.cancel(args.reason)
        if args.json:
            _print_json({"job": job.id, "reference": _reference(job), "before": before, "state": state})
        elif state == "cancelled":
            print(f"{_reference(job)} " + ("was already cancelled" if before == state else f"cancelled (was {before})"))
    if state != "cancelled":
        _die(f"job {job.id} had already {state}; it was not cancelled")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from park.demo import run_demo   # rich's live view and subprocess handling only when asked for

    if args.workers < 1:
        _die("--workers must be at least 1", USAGE)
    return run_demo(keep=args.keep, workers=args.workers, plain=args.plain, again=args.again, console=_console())


# -- parsing --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="park", description="Park: durable, condition-gated jobs across sites.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    services = sub.add_parser("services", help="manage the client configuration")
    services_sub = services.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = services_sub.add_parser("add", help="add or replace a named service")
    add.add_argument("name")
    add.add_argument("--address", required=True, help="the broker's HOST:PORT")
    add.add_argument("--cert", required=True, help="the broker's certificate (its tls.crt)")
    add.set_defaults(run=cmd_services_add)

    status = sub.add_parser("status", help="is every configured service reachable?")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(run=cmd_status)

    jobs = sub.add_parser("jobs", help="list your jobs")
    jobs.add_argument("--service", help="only this service (default: every configured one)")
    jobs.add_argument("--state", action="append", choices=list(_STATE_NUMBERS), help="only jobs in STATE (repeatable)")
    jobs.add_argument("--json", action="store_true", help="print one JSON document")
    jobs.add_argument("--why", metavar="JOB", help="say why JOB was or was not reused (memoization)")
    jobs.set_defaults(run=cmd_jobs)

    for name, run, text in (("watch", cmd_watch, "print a job's events as they happen, until it ends"),
                            ("cancel", cmd_cancel, "cancel a job that has not finished")):
        command = sub.add_parser(name, help=text)
        command.add_argument("job", metavar="JOB", help="a job id or park://SITE/jobs/ID")
        command.add_argument("--service", help="the service holding the job")
        command.add_argument("--json", action="store_true", help="print one JSON document (watch: at the end)")
        command.set_defaults(run=run)
        if name == "watch":
            command.add_argument("--exit-status", action="store_true",
                                 help="exit 1 unless the job completed (default: 0 once it ends)")
        else:
            command.add_argument("--reason", default="", help="recorded in the job's cancellation cause")

    add_graph_command(sub)      # park.graph

    demo = sub.add_parser("demo", help="run the seed workflow on two temporary brokers and an agent")
    demo.add_argument("--again", action="store_true", help="run the workflow a second time: memo hits")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (state and logs)")
    demo.add_argument("--workers", type=int, default=4, help="worker processes of each demo broker (default 4)")
    demo.add_argument("--plain", action="store_true", help="plain lines instead of a live table (default off a tty)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `park` command; returns the exit status (the console script exits with it)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:          # argparse has printed the usage error, or --help
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        return args.run(args)
    except CliError as exc:
        print(f"park: {exc}", file=sys.stderr)
        return exc.status
    except (ParkError, TimeoutError) as exc:
        print(f"park: {exc}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        print("park: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
