"""`park`: the command line for people and for scripts.

    park services add NAME --address HOST:PORT --cert FILE
    park services remove NAME
    park status [--json]
    park jobs [--service NAME] [--state STATE ...] [--json]
    park watch JOB [--service NAME] [--json]
    park cancel JOB [--service NAME] [--reason TEXT] [--json]
    park get JOB [NAME] [-o DEST] [--service NAME]
    park logs JOB [--stderr] [--follow] [--service NAME]
    park renew [--service NAME] [--within SECONDS]
    park graph JOB [--service NAME] [--format dot|mermaid|svg|png] [--depth N] [--output FILE]
    park ui [--listen 127.0.0.1:PORT] [--no-browser]
    park demo [--again] [--keep] [--workers N] [--plain] [--ui] [--no-browser]

JOB is a job id or a reference `park://SITE/jobs/ID`; the service that holds
it is found among the configured ones (`--service NAME` says which).

Tables are for people; `--json` prints one JSON document on stdout instead.
Errors go to stderr as `park: message`. Exit status: 0 on success, 1 on a
failure (an unreachable broker, an unknown job, a job that cannot be
cancelled, a watched job that failed or was cancelled), 2 for bad usage, 130
when interrupted.

This module owns the command line: parsing, output and exit statuses. It holds
no broker logic; everything it does goes through `park.Service` and `park.Job`.
Formatting lives in park.cli.output, finding jobs in park.cli.targets, `park graph`
in park.cli.graph, `park ui` in park.cli.ui and `park demo` in park.cli.demo.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from park._proto import jobs_pb2 as jpb
from park.wire import STATE_NAMES, TERMINAL_STATES
from park.agent_client import default_subject
from park.config import add_service, remove_service
from park.errors import ParkError
from park.cli.graph import add_graph_command
from park.cli.output import (FAILURE, STATE_STYLES, USAGE, CliError, clock, new_console, describe, die, iso,
                             print_json, when)
from park.cli.targets import configured_services, open_job, probe, reference
from park.groups import counts_line
from park.job import JobEvent
from park.renewal import DEFAULT_WITHIN, renew_at
from park.service import Service

__all__ = ["main"]
_STATE_NUMBERS = {name: number for number, name in STATE_NAMES.items()}
FOLLOW_EVERY = 0.5   # seconds between looks at a followed job's log


# -- commands -------------------------------------------------------------------------

def cmd_services_add(args: argparse.Namespace) -> int:
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        die(f"--address {args.address!r} must be HOST:PORT", USAGE)
    path = add_service(args.name, args.address, Path(args.cert))
    print(f"service {args.name} ({args.address}) saved in {path}; check it with `park status`")
    return 0


def cmd_services_remove(args: argparse.Namespace) -> int:
    path = remove_service(args.name)
    print(f"service {args.name} removed from {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    entries = configured_services()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        rows = list(pool.map(probe, entries))
    down = [r["name"] for r in rows if r["status"] != "ok"]
    subject = default_subject()
    chosen = "from $PARK_USER" if os.environ.get("PARK_USER") else "your login name; set PARK_USER to change it"
    if args.json:
        print_json({"services": rows, "user": subject})
    else:
        table = Table("service", "address", "status", "site", "version", "caller")
        for r in rows:
            table.add_row(Text(r["name"]), Text(r["address"]),
                          Text(r["status"], style="green" if r["status"] == "ok" else "red"),
                          Text(r["site"] or ""), Text(r["version"] or ""), Text(r["caller"] or ""))
        new_console().print(table)
        print(f"your tokens name you {subject!r} ({chosen})")
        for r in rows:
            if r["isolation"]:
                print(f"{r['name']}: {r['isolation']}")
            if r["max_delegation_seconds"]:
                print(f"{r['name']}: accepts delegated tokens of up to {r['max_delegation_seconds']} s "
                      "(`park renew` keeps longer waits going)")
        for r in rows:
            _print_peers(r)
    for r in rows:
        if r["status"] != "ok":
            print(f"park: service {r['name']}: {r['error']}", file=sys.stderr)
    return FAILURE if down else 0


def _print_peers(row: dict[str, Any]) -> None:
    """An operator's view of one site's peers: each stream, both ways."""
    peers = row.get("peers")
    if isinstance(peers, str):
        print(f"park: service {row['name']}: {peers}", file=sys.stderr)
        return
    if peers is None:
        return
    if not peers:
        print(f"{row['name']}: site {row['site']} has no peers")
        return
    table = Table("peer", "address", "our stream", "since", "atoms pending/received", "its stream",
                  title=f"peers of site {row['site']}", title_justify="left")
    for p in peers:
        ours = p["state"] + (f": {p['last_error']}" if p["last_error"] else "")
        theirs = f"subscribed since {clock(p['subscribed_since'])}, watching {p['atoms_watched']} atoms" \
            if p["subscribed"] else "not subscribed"
        table.add_row(Text(p["name"]), Text(p["address"]),
                      Text(ours, style="green" if p["state"] == "connected" else "red" if p["state"] == "down" else ""),
                      Text(clock(p["since"] or 0)), Text(f"{p['atoms_pending']}/{p['atoms_received']}"), Text(theirs))
    new_console().print(table)


def _job_row(service_name: str, job: jpb.Job) -> dict[str, Any]:
    return {"service": service_name, "site": job.site, "id": job.id,
            "label": job.spec.label or job.spec.call.target or " ".join(job.spec.command.argv),
            "state": STATE_NAMES.get(job.state, "unknown"), "submitted": iso(job.submitted_at),
            "finished": iso(job.finished_at), "url": job.url, "attention": job.attention or None,
            "attempts": job.attempts, "retries": job.spec.retries, "priority": job.spec.priority,
            "group": json_format.MessageToDict(job.group) if job.spec.HasField("group") else None,
            "member_of": job.spec.member_of or None}


def cmd_why(args: argparse.Namespace) -> int:
    """`park jobs --why JOB`: was the job reused, and if not, what differs from the last run."""
    with open_job(args.why, args.service) as job:
        report = job.memo_report()
        record = job.record()
        other = job.service.job(report.nearest_id or report.job_id).record() \
            if (report.nearest_id or report.hit) else None
    if args.json:
        print_json({"hit": report.hit, "job": report.job_id, "nearest": report.nearest_id or None,
                     "differences": list(report.differences)})
        return 0

    def named(job: jpb.Job) -> str:
        return f"{job.site}/{job.id} ({_job_row('', job)['label']})"
    if report.hit:   # the record is the job it reused
        print(f"{record.site}/{job.id} reused {named(other) if other else report.job_id} (a memo hit)")
        return 0
    print(f"{named(record)} ran anew" + (f"; compared with {named(other)}:" if other else ":"))
    for difference in report.differences:
        print(f"  {difference}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.why:
        return cmd_why(args)
    states = [_STATE_NUMBERS[s] for s in args.state or ()]
    found: list[tuple[str, jpb.Job]] = []
    status = 0
    for entry in configured_services(args.service):
        try:
            with contextlib.closing(Service(entry.address, entry.cert)) as service:
                found += [(entry.name, job) for job in service.list_jobs(states=states)]
        except ParkError as exc:
            print(f"park: service {entry.name}: {exc}", file=sys.stderr)
            status = FAILURE
    found.sort(key=lambda pair: pair[1].submitted_at)
    if args.json:
        print_json({"jobs": [_job_row(name, job) for name, job in found]})
        return status
    table = Table("site", "id", "label", "state", "attempts", "submitted", "finished")
    for name, job in found:
        row = _job_row(name, job)
        tries = f"{job.attempts}/{job.spec.retries + 1}" if job.spec.retries else str(job.attempts or "")
        state = f"{row['state']} ({counts_line(job.group)})" if row["group"] is not None else row["state"]
        table.add_row(Text(row["site"]), Text(row["id"]), Text(row["label"]),
                      Text(state, style=STATE_STYLES.get(row["state"], "")), Text(tries),
                      when(job.submitted_at), when(job.finished_at))
    new_console().print(table if found else "no jobs")
    for name, job in found:
        if job.attention:   # waiting for its owner to act: say so under the table, in full
            print(f"{job.site}/{job.id} {job.attention}")
    return status


def _event_json(event: JobEvent) -> dict[str, Any]:
    return {"seq": event.seq, "time": iso(event.time), "kind": event.kind, "summary": describe(event),
            "detail": event.detail}


def cmd_watch(args: argparse.Namespace) -> int:
    events: list[JobEvent] = []
    with open_job(args.job, args.service) as job:
        console = new_console()
        if not args.json:
            console.print(Text(f"watching {reference(job)}", style="bold"))
        for event in job.events():
            events.append(event)
            if not args.json:
                console.print(Text.assemble(f"{clock(event.time)}  #{event.seq:<6} ",
                                            (f"{event.kind:<10}", STATE_STYLES.get(event.kind, "")),
                                            f" {describe(event)}"))
                if event.kind == "failed" and event.detail.get("traceback"):
                    console.print(Text(event.detail["traceback"].rstrip(), style="dim"))
        final = events[-1].kind if events else "unknown"
        root = job.root_cause() if final == "cancelled" else None
        if root is not None and not args.json:
            console.print(Text(f"root cause: {root}", style="bold red"))
            if root.traceback:
                console.print(Text(root.traceback.rstrip(), style="dim"))
        if args.json:
            print_json({"job": job.id, "reference": reference(job), "url": job.url, "state": final,
                         "events": [_event_json(e) for e in events],
                         "root_cause": None if root is None else {
                             "site": root.site, "job": root.job_id, "label": root.label, "state": root.state,
                             "error": root.error, "traceback": root.traceback}})
    return 0 if final == "completed" else FAILURE


def cmd_get(args: argparse.Namespace) -> int:
    with open_job(args.job, args.service) as job, Progress(TextColumn("{task.description}"), BarColumn(),
                                                           DownloadColumn(), TransferSpeedColumn(),
                                                           console=new_console(), transient=True) as bar:
        task = bar.add_task(f"{args.name or 'outputs'} of {job.id}", total=None)
        path = job.download(args.output, args.name, progress=lambda done, size: bar.update(task, completed=done,
                                                                                           total=size))
    print(path)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer   # the log's bytes as written: a character split between two reads stays whole
    with open_job(args.job, args.service) as job:
        shown, attempt = 0, -1   # what was printed of which attempt's log: each look reads only what is new
        while True:
            record = job.record()
            if record.attempts != attempt:
                if shown:
                    print(f"park: job {job.id} runs again (attempt {record.attempts}); its new {stream} follows",
                          file=sys.stderr)
                shown, attempt = 0, record.attempts
            data = job.log_from(stream, shown)
            if job.record().attempts != attempt:   # the next attempt began meanwhile: what was read may be its
                continue
            out.write(data)
            out.flush()
            shown += len(data)
            if not args.follow or record.state in TERMINAL_STATES:
                return 0
            time.sleep(FOLLOW_EVERY)


def cmd_cancel(args: argparse.Namespace) -> int:
    with open_job(args.job, args.service) as job:
        before = job.state
        state = before if before in ("completed", "failed", "cancelled") else job.cancel(args.reason)
        if args.json:
            print_json({"job": job.id, "reference": reference(job), "before": before, "state": state})
        elif state == "cancelled":
            print(f"{reference(job)} " + ("was already cancelled" if before == state else f"cancelled (was {before})"))
    if state != "cancelled":
        die(f"job {job.id} had already {state}; it was not cancelled")
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    """Renew, at every configured service (or one), the delegated tokens of your jobs that expire soon."""
    failed = False
    for entry in configured_services(args.service):
        try:
            with contextlib.closing(Service(entry.address, entry.cert)) as service:
                renewed = renew_at(service, args.within)
        except ParkError as exc:
            print(f"park: {entry.name}: {exc}", file=sys.stderr)
            failed = True
            continue
        for credential in renewed:
            print(f"{entry.name}: renewed the {credential.use} token of job {credential.job_id} (for "
                  f"{credential.site})")
        if not renewed:
            print(f"{entry.name}: nothing to renew")
    return FAILURE if failed else 0


def cmd_ui(args: argparse.Namespace) -> int:
    """`park ui`: serve the dashboard over every configured service until interrupted."""
    import webbrowser

    from park.cli.ui.server import Dashboard, parse_listen   # the web framework only when asked for

    try:
        parse_listen(args.listen)
    except ValueError as exc:
        die(str(exc), USAGE)
    dashboard = Dashboard.open(configured_services(), args.listen)
    print(f"park ui: the dashboard is at {dashboard.url}", flush=True)
    print("park ui: that URL holds this run's secret; do not share it. Ctrl-C stops the dashboard.", flush=True)
    if not args.no_browser:
        webbrowser.open(dashboard.url)
    try:
        dashboard.serve()
    except KeyboardInterrupt:   # Ctrl-C is how a dashboard is meant to end
        pass
    print("park ui: stopped", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from park.cli.demo.run import run_demo   # rich's live view and subprocess handling only when asked for

    if args.workers < 1:
        die("--workers must be at least 1", USAGE)
    return run_demo(keep=args.keep, workers=args.workers, plain=args.plain, again=args.again, console=new_console(),
                    ui=args.ui, browser=not args.no_browser)


# -- parsing --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="park", description="Park: durable, condition-gated jobs across sites.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    services = sub.add_parser("services", help="manage the client configuration")
    services_sub = services.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = services_sub.add_parser("add", help="add or replace a named service")
    add.add_argument("name")
    add.add_argument("--address", required=True, help="the broker's HOST:PORT")
    add.add_argument("--cert", required=True, help="the broker's certificate (its tls.crt)")
    add.set_defaults(run=cmd_services_add)
    remove = services_sub.add_parser("remove", help="forget a named service")
    remove.add_argument("name")
    remove.set_defaults(run=cmd_services_remove)

    status = sub.add_parser("status", help="is every configured service reachable?")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(run=cmd_status)

    jobs = sub.add_parser("jobs", help="list your jobs")
    jobs.add_argument("--service", help="only this service (default: every configured one)")
    jobs.add_argument("--state", action="append", choices=list(_STATE_NUMBERS), help="only jobs in STATE (repeatable)")
    jobs.add_argument("--json", action="store_true", help="print one JSON document")
    jobs.add_argument("--why", metavar="JOB", help="say why JOB was or was not reused (memoization)")
    jobs.set_defaults(run=cmd_jobs)

    for name, run, text in (("watch", cmd_watch, "print a job's events as they happen, until it ends "
                                             "(exit 1 unless it completed)"),
                            ("cancel", cmd_cancel, "cancel a job that has not finished")):
        command = sub.add_parser(name, help=text)
        command.add_argument("job", metavar="JOB", help="a job id or park://SITE/jobs/ID")
        command.add_argument("--service", help="the service holding the job")
        command.add_argument("--json", action="store_true", help="print one JSON document (watch: at the end)")
        command.set_defaults(run=run)
        if name == "cancel":
            command.add_argument("--reason", default="", help="recorded in the job's cancellation cause")

    get = sub.add_parser("get", help="download a job's outputs (all, or NAME), verified, resuming")
    get.add_argument("job", metavar="JOB", help="a job id or park://SITE/jobs/ID")
    get.add_argument("name", nargs="?", metavar="NAME", help="just this output")
    get.add_argument("-o", "--output", metavar="DEST", help="the directory to put them in (default ./JOB_ID)")
    get.add_argument("--service", help="the service holding the job")
    get.set_defaults(run=cmd_get)

    logs = sub.add_parser("logs", help="print what a job wrote to its standard output (or error)")
    logs.add_argument("job", metavar="JOB", help="a job id or park://SITE/jobs/ID")
    logs.add_argument("--stderr", action="store_true", help="its standard error instead")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--service", help="the service holding the job")
    logs.set_defaults(run=cmd_logs)

    renew = sub.add_parser("renew", help="renew the delegated tokens your waiting jobs hold (for cron)")
    renew.add_argument("--service", help="only this service (default: every configured one)")
    renew.add_argument("--within", type=float, default=DEFAULT_WITHIN, metavar="SECONDS",
                       help=f"tokens that expire within SECONDS (default {DEFAULT_WITHIN:.0f}), or already have")
    renew.set_defaults(run=cmd_renew)

    add_graph_command(sub)      # park.cli.graph

    ui = sub.add_parser("ui", help="a live web dashboard of your jobs at every configured service")
    ui.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="a loopback address to serve on (default 127.0.0.1:0, any free port)")
    ui.add_argument("--no-browser", action="store_true", help="print the URL only; do not open a browser")
    ui.set_defaults(run=cmd_ui)

    demo = sub.add_parser("demo", help="run the seed workflow on two temporary brokers and an agent")
    demo.add_argument("--again", action="store_true", help="run the workflow a second time: memo hits")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (state and logs)")
    demo.add_argument("--workers", type=int, default=4, help="worker processes of each demo broker (default 4)")
    demo.add_argument("--plain", action="store_true", help="plain lines instead of a live table (default off a tty)")
    demo.add_argument("--ui", action="store_true", help="also serve the web dashboard (`park ui`) over the demo's sites")
    demo.add_argument("--no-browser", action="store_true", help="with --ui: print its URL, do not open a browser")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `park` command; returns the exit status (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
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

