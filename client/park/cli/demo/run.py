"""`park demo`: the seed's whole workflow on two federated sites of its own, with a live view.

In a temporary directory it starts a credential agent and two brokers, `sns`
and `cluster`, peered and knowing the agent's key (park.cli.demo.sites), then runs
`examples/demo_workflow.py` against them as a subprocess: a reduction at sns,
a fetch to cluster with a delegated token, the model package's upload, a
simulation, a race of three fits and a final fit. Meanwhile it shows every job
of both sites as each broker's event stream reports it, and the transfer's
progress (park.cli.demo.board): a live table on a terminal, one line per event
otherwise (or with `--plain`). It ends by printing what ran where; with
`again` it runs the workflow a second time against the same brokers and shows
that everything but the race (and what waits on it) is a memo hit.

With `ui` it also serves the web dashboard (park.cli.ui) over both sites, prints
its URL beside the board (and in the board's title) and opens a browser unless
`browser` is false; without, it says how to get one.

The demo process and the workflow use the agent (PARK_AUTH_SOCK), never a key
file: PARK_KEY_FILE is unset for both.

Guarantee: the workflow, the brokers and the agent are stopped before
`run_demo` returns or raises, whether the demo succeeds, fails, is interrupted
(Ctrl-C, SIGTERM) or breaks (see park.cli.demo.sites). The temporary directory is
removed, unless `keep` is set or the demo failed (it then says where it is).

Success (0) means: the workflow exited 0 in every run; every job named in its
`EXPECTED` table ended in the state given there, as the workflow saw it and as
the broker's own stream showed it; one fit of `CONTESTANTS` won the race and
the others lost it; and on a second run every job of `MEMOIZED` was a memo hit.
Anything else is 1.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

import park
from park.cli.output import STATE_STYLES, CliError
from park.cli.demo.board import Board, Transfer, View, compact, watch_all
from park.cli.demo.sites import Sites, demo_sites, interruptible, stop_process
from park.config import ServiceEntry
from park.job import JobEvent
from park.service import Service

__all__ = ["EXAMPLE", "Expectations", "expectations", "find_examples", "run_demo"]

EXAMPLE = "demo_workflow.py"
RUN_TIMEOUT = 300.0      # seconds one run of the workflow may take
SETTLE = 10.0            # seconds to wait for the last events after the workflow exits
RAW_BYTES = 48 << 20     # the reduced file the cluster fetches


@dataclass(frozen=True, slots=True)
class Expectations:
    states: dict[str, str]          # job label -> final state
    contestants: tuple[str, ...]    # the race's fits: one wins (completed), the others are cancelled
    memoized: tuple[str, ...]       # labels that must be memo hits on a second run


def find_examples() -> Path:
    """The examples directory: ./examples, else the one beside the park package's source checkout."""
    for candidate in (Path.cwd() / "examples", Path(park.__file__).resolve().parents[2] / "examples"):
        if (candidate / EXAMPLE).is_file():
            return candidate
    raise CliError(f"cannot find examples/{EXAMPLE}; run `park demo` from the Park checkout "
                   "(the directory that holds examples/)")


def expectations(example: Path) -> Expectations:
    """The workflow's EXPECTED, CONTESTANTS and MEMOIZED tables, read without running the file."""
    found: dict[str, Any] = {}
    for node in ast.parse(example.read_text(), str(example)).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if getattr(target, "id", None) in ("EXPECTED", "CONTESTANTS", "MEMOIZED"):
                    found[target.id] = ast.literal_eval(node.value)
    missing = {"EXPECTED", "CONTESTANTS", "MEMOIZED"} - set(found)
    if missing:
        raise CliError(f"{example} lacks the table(s) {', '.join(sorted(missing))}")
    return Expectations(dict(found["EXPECTED"]), tuple(found["CONTESTANTS"]), tuple(found["MEMOIZED"]))


@contextlib.contextmanager
def _agent_environment(socket: str) -> Iterator[None]:
    """While inside, this process (and what it starts) gets tokens from the demo's agent only."""
    names = ("PARK_AUTH_SOCK", "PARK_KEY_FILE", "PARK_KEY_PASSPHRASE")
    saved = {k: os.environ.pop(k, None) for k in names}
    os.environ["PARK_AUTH_SOCK"] = socket
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _start_workflow(examples: Path, sites: Sites, summary: Path,
                    out: queue.Queue[tuple[str, Any]]) -> subprocess.Popen[str]:
    """Start the workflow; its output lines and then its exit status are posted to `out`."""
    tmp = summary.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    command = [sys.executable, str(examples / EXAMPLE), "--summary", str(summary), "--raw-bytes", str(RAW_BYTES)]
    for broker in sites.brokers:
        command += [f"--{broker.site}-address", broker.address, f"--{broker.site}-cert", str(broker.cert)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(("line", line.rstrip("\n")))
        out.put(("exit", proc.wait()))

    threading.Thread(target=pump, name="park-demo-workflow", daemon=True).start()
    return proc


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _follow(view: View, board: Board, out: queue.Queue[tuple[str, Any]]) -> int:
    """Consume events and workflow output until the workflow has exited and the board has settled.

    Returns the workflow's exit status; a failure to watch or a timeout raises CliError."""
    deadline = time.monotonic() + RUN_TIMEOUT
    status: int | None = None
    while status is None or not board.settled():
        if time.monotonic() > deadline:
            raise CliError(f"the demo workflow did not finish within {RUN_TIMEOUT:.0f} s")
        try:
            kind, value = out.get(timeout=0.12)
        except queue.Empty:
            view.tick()
            continue
        if kind == "event":
            site, event = value
            assert isinstance(event, JobEvent)
            row = board.apply(site, event)
            if event.kind == "reused":
                view.reused(board.rows[(site, row.reuses)])
            else:
                view.event(event, row)
        elif kind == "line":
            view.line(str(value))
        elif kind == "exit":
            status = int(value)
            deadline = min(deadline, time.monotonic() + SETTLE)
        else:
            raise CliError(str(value))
        view.tick()
    view.tick()
    return status


def _check(run: int, status: int, document: dict[str, Any] | None, board: Board, expect: Expectations) -> list[str]:
    """What went wrong in one run (nothing: every job ended as expected)."""
    problems = [f"the workflow exited with status {status}"] if status != 0 else []
    if document is None or document.get("phase") != "done":
        return [*problems, "the workflow wrote no summary of its jobs"]
    jobs = {j["label"]: j for j in document["jobs"]}
    problems += [f"{label} ended {jobs.get(label, {}).get('state', 'unseen')}, expected {state}"
                 for label, state in expect.states.items() if jobs.get(label, {}).get("state") != state]
    winner = document.get("winner")
    for label in expect.contestants:
        job = jobs.get(label, {})
        wanted = "completed" if label == winner else "cancelled"
        if job.get("state") != wanted or (wanted == "cancelled" and "lost the race" not in job.get("detail", "")):
            problems.append(f"{label} ended {job.get('state', 'unseen')} ({job.get('detail', '')}), expected "
                            f"{'to win the race' if label == winner else 'to lose the race'}")
    for job in jobs.values():
        seen = board.state_of(job["site"], job["id"])
        if seen != job["state"]:
            problems.append(f"{job['label']}: the {job['site']} broker's stream says {seen or 'nothing'}, "
                            f"the workflow saw {job['state']}")
    if run > 1:
        problems += [f"{label} was not a memo hit on run {run}" for label in expect.memoized
                     if not jobs.get(label, {}).get("memo_hit")]
    return problems


def _readable(detail: str) -> str:
    """A result as the workflow wrote it (JSON) on one line; a cause or an error as it is."""
    try:
        return compact(json.loads(detail))
    except json.JSONDecodeError:
        return detail


def _what_ran_where(console: Console, run: int, document: dict[str, Any], plain: bool) -> None:
    table = Table(title=f"run {run}: what ran where", title_justify="left", box=None if plain else box.SIMPLE)
    for column in ("job", "site", "state", "memo hit", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for job in document["jobs"]:
        hit = f"yes (job {job['id'][:10]}…)" if job["memo_hit"] else "no"
        table.add_row(Text(job["label"]), Text(job["site"]),
                      Text(job["state"], style=STATE_STYLES.get(job["state"], "")),
                      Text(hit, style="green" if job["memo_hit"] else ""), Text(_readable(job["detail"])))
    console.print(table)


def _explain(console: Console, run: int, document: dict[str, Any], expect: Expectations) -> None:
    jobs, winner = document["jobs"], document.get("winner")
    if winner is None:
        console.print(Text(f"park demo: run {run}: no fit won the race", style="red"))
        return
    losers = [c for c in expect.contestants if c != winner]
    console.print(Text(f"park demo: run {run}: the race was won by {winner}; {' and '.join(losers)} were cancelled "
                       "at once (lost the race)"))
    if run == 1:
        return
    hits = [j["label"] for j in jobs if j["memo_hit"]]
    anew = [j["label"] for j in jobs if not j["memo_hit"]]
    console.print(Text(f"park demo: run {run}: {len(hits)} of {len(jobs)} jobs were memo hits ({', '.join(hits)}): "
                       "nothing upstream of the race was redone, and no bytes were transferred again", style="green"))
    console.print(Text(f"park demo: run {run}: ran anew: {', '.join(anew)}. The race is never memoized (who wins "
                       "depends on timing); its fits are submitted with memo=False so that every run races afresh; "
                       "and the final fit waits on this run's race, so it is new work too"))


@dataclass(slots=True)
class _Demo:
    """One `park demo`: its directory, sites, expectations and the board both runs share."""

    root: Path
    examples: Path
    sites: Sites
    expect: Expectations
    console: Console
    plain: bool
    runs: int
    board: Board
    out: queue.Queue[tuple[str, Any]]
    dashboard: str = ""      # the web dashboard's URL, with --ui

    def run_once(self, run: int) -> list[str]:
        """Run the workflow once with the live view; what went wrong (nothing: all as expected)."""
        console, sites = self.console, self.sites
        summary = self.root / f"run-{run}.json"
        self.board.run = run
        title = f"park demo · run {run} of {self.runs}"   # the sites' addresses were printed above it
        if self.dashboard:
            title += f" · dashboard {self.dashboard}"
        console.print(Text(f"park demo: run {run} of {self.runs}: examples/{EXAMPLE}", style="bold"))
        workflow: subprocess.Popen[str] | None = None
        started = time.monotonic()
        try:
            workflow = _start_workflow(self.examples, sites, summary, self.out)
            with View(console, self.board, Transfer(sites.cluster.files), title, self.plain) as view:
                status = _follow(view, self.board, self.out)
        finally:
            stop_process(workflow, signal.SIGTERM, 5.0)
        if not self.plain:
            for line in view.lines:           # the workflow's own output, kept out of the live table
                console.print(Text(f"  | {line}", style="dim"))
        document = _read_summary(summary)
        if document is not None and document.get("phase") == "done":
            _what_ran_where(console, run, document, self.plain)
            _explain(console, run, document, self.expect)
        if (fetch := view.transfer.row) is not None:
            ended = "" if fetch.state == "completed" else f" ({fetch.state})"
            console.print(Text(f"park demo: run {run}: transfer {fetch.label}: {view.transfer.describe()}{ended}"))
        console.print(Text(f"park demo: run {run} took {time.monotonic() - started:.1f} s"))
        return _check(run, status, document, self.board, self.expect)


@contextlib.contextmanager
def _dashboard(sites: Sites, console: Console, ui: bool, browser: bool) -> Iterator[str]:
    """With `ui`, the web dashboard over the demo's sites while inside (its URL); else a hint and ""."""
    if not ui:
        console.print(Text("park demo: to watch it in a browser as well, run `park demo --ui`"))
        yield ""
        return
    import webbrowser

    from park.cli.ui.server import Dashboard   # the web framework only when asked for

    dashboard = Dashboard.open([ServiceEntry(b.site, b.address, b.cert) for b in sites.brokers])
    thread = dashboard.start()
    console.print(Text(f"park demo: the dashboard is at {dashboard.url}", style="bold"))
    if browser:
        webbrowser.open(dashboard.url)
    try:
        yield dashboard.url
    finally:
        dashboard.stop()
        thread.join(10)


def run_demo(*, keep: bool, workers: int, plain: bool, again: bool, console: Console, ui: bool = False,
             browser: bool = True) -> int:
    """Run the demo; 0 when every job ended as expected, 1 otherwise (see the module docstring)."""
    examples = find_examples()
    expect = expectations(examples / EXAMPLE)
    root = Path(tempfile.mkdtemp(prefix="park-demo-"))
    root.chmod(0o711)   # the sites' job directories are in here, for the accounts their jobs run as
    runs = 2 if again else 1
    problems: list[str] = []
    failed = False
    try:
        with interruptible(), demo_sites(root, examples, workers) as sites:
            pids = sites.pids()
            console.print(Text(f"park demo: agent pid {pids['agent']}; brokers sns pid {pids['sns']} on "
                               f"{sites.sns.address}, cluster pid {pids['cluster']} on {sites.cluster.address}; "
                               f"state in {root}"))
            demo = _Demo(root, examples, sites, expect, console, plain or not console.is_terminal, runs, Board(),
                         queue.Queue())
            with _agent_environment(sites.agent.socket), contextlib.ExitStack() as streams:
                demo.dashboard = streams.enter_context(_dashboard(sites, console, ui, browser))
                for broker in sites.brokers:
                    service = streams.enter_context(contextlib.closing(Service(broker.address, broker.cert)))
                    stream: grpc.Call = watch_all(service, broker.site, demo.out)
                    streams.callback(stream.cancel)
                for run in range(1, runs + 1):
                    problems += [f"run {run}: {problem}" for problem in demo.run_once(run)]
    except CliError:
        failed = True
        raise
    finally:
        for problem in problems:
            console.print(Text(f"park demo: {problem}", style="red"))
        if keep or failed or problems:
            logs = " (logs: agent.log, sns.log, cluster.log)" if failed or problems else ""
            console.print(Text(f"park demo: kept {root}{logs}"))
        else:
            shutil.rmtree(root, ignore_errors=True)
    if problems:
        return 1
    console.print(Text(f"park demo: all jobs ended as expected in {runs} run{'s' * (runs > 1)}", style="green"))
    return 0
