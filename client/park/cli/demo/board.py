"""What `park demo` shows while the workflow runs: the jobs of both sites and the transfer.

`Board` holds every job of the demo's user at both brokers as last seen in each
broker's all-jobs Watch stream (`watch_all`), keyed by (site, job id): its
label, state, last progress values (`improved` events) and a one-line detail.
A memo hit writes no event, so rows a later run reused are marked by the demo
from the workflow's summary (`mark_reused`).

`Transfer` follows the fetch job's progress by polling the size of its part
file under the cluster's files directory (`files/<owner>/.<job>.attempt-fetch/
.<name>.part`; the broker writes no progress events for a fetch), against the
size the reduction's `completed` event announced.

`View` draws both: a live rich table with a progress bar on a terminal, or one
plain line per event (progress lines at most once a second per job). Nothing
here talks to a broker except `watch_all`, and nothing decides success.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from park._proto import jobs_pb2 as jpb
from park.cli.output import STATE_STYLES, clock, describe
from park.job import JobEvent
from park.wire import JOB_ID_LENGTH
from park.service import Service

__all__ = ["Board", "Row", "Transfer", "View", "compact", "watch_all"]

_STATE_OF = {"submitted": "waiting", "queued": "queued", "started": "running", "completed": "completed",
             "failed": "failed", "cancelled": "cancelled"}
_TERMINAL = ("completed", "failed", "cancelled")
MIB = 1 << 20


@dataclass(slots=True)
class Row:
    site: str
    job_id: str
    run: int
    label: str = ""
    work: str = ""          # call, command, fetch, install or race
    state: str = "waiting"
    progress: str = ""
    values: dict[str, float] = field(default_factory=dict)   # the latest progress report
    attempt: int = 0
    submitted: float = 0.0
    detail: str = ""
    owner: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    output_size: int = -1
    reused_in: set[int] = field(default_factory=set)


def _values(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def compact(value: Any) -> str:
    """A job's result on one line: dicts as key=value, floats to four digits, whole numbers with thousands
    separators, digests shortened."""
    if isinstance(value, dict):
        return " ".join(f"{k}={compact(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, str):
        return value[:12] + "…" if len(value) > 16 and " " not in value else value
    return json.dumps(value)


class Board:
    """The jobs of both sites as last seen in their event streams."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self._by_id: dict[str, list[Row]] = {}     # the same rows by job id (at any site)
        self.run = 1

    def apply(self, site: str, event: JobEvent) -> Row:
        row = self._row(site, event.job_id, self.run)
        d = event.detail
        if event.kind == "submitted":
            row.spec, row.owner = d.get("spec", {}), d.get("owner", "")
            row.work = next((w for w in ("call", "command", "fetch", "install", "race") if w in row.spec), "")
            row.label = row.spec.get("label") or event.job_id
            row.detail = self._submitted(row)
            row.submitted = event.time
        elif event.kind == "improved":
            row.values = d.get("values", {})
            row.progress = _values(row.values)
        else:
            row.detail = self._finished(row, event) if event.terminal else describe(event)
        if event.kind == "started":
            row.attempt = int(d.get("attempt", 1))
        if event.kind == "completed":
            row.output_size = max((int(o.get("size", 0)) for o in d.get("outputs", [])), default=-1)
        row.state = _STATE_OF.get(event.kind, row.state)
        return row

    def _submitted(self, row: Row) -> str:
        spec = row.spec
        if row.work == "fetch":
            return f"from {spec['fetch'].get('url', '')}"
        if row.work == "install":
            return f"wheel {spec['install'].get('filename', '')}"
        if row.work == "race":
            names = ", ".join(self.name(row.site, j) for j in spec["race"].get("contestants", []))
            return f"{names} until {spec['race'].get('until', 'one completes')}"
        if row.work == "call":
            call = spec["call"]
            args = [Path(a).name if isinstance(a, str) and "/" in a else json.dumps(a)   # paths by their names
                    for a in json.loads(call.get("argsJson") or "[]")]
            return f"{call.get('target', '')}({', '.join(args)[:60]})"
        return describe(JobEvent(0, row.job_id, 0.0, "submitted", {"spec": spec}))

    def _finished(self, row: Row, event: JobEvent) -> str:
        if event.kind == "completed" and "resultFile" not in event.detail:
            result = json.loads(event.detail.get("resultJson") or "null")
            if row.work == "race":
                return f"won by {self.name(row.site, result.get('winner', ''))}: {_values(result.get('values', {}))}"
            if result is None:      # a fetch: what arrived
                return ", ".join(f"{o.get('name', '')} {int(o.get('size', 0)) / MIB:.1f} MiB"
                                 for o in event.detail.get("outputs", []))
            return f"result {compact(result)}"
        text = describe(event)
        # "sns/<id>.completed" reads better as a label. Only the ids the text names are looked up: with
        # 10,000 rows (park ui), trying every row for every event made a cascade quadratic.
        for job_id in set(re.findall(r"\b[a-z2-7]{%d}\b" % JOB_ID_LENGTH, text)):
            for other in self._by_id.get(job_id, ()):
                text = text.replace(f"race {job_id}", "the race").replace(f"{other.site}/{job_id}", other.label)
                text = text.replace(job_id, other.label)
        return text

    def name(self, site: str, job_id: str) -> str:
        row = self.rows.get((site, job_id))
        return row.label if row is not None and row.label else job_id

    def _row(self, site: str, job_id: str, run: int) -> Row:
        row = self.rows.get((site, job_id))
        if row is None:
            row = self.rows[(site, job_id)] = Row(site, job_id, run)
            self._by_id.setdefault(job_id, []).append(row)
        return row

    def mark_reused(self, site: str, job_id: str, run: int) -> Row:
        """Note that `run` reused the job (a memo hit); a job not seen yet gets a row of its own."""
        row = self._row(site, job_id, run)
        row.reused_in.add(run)
        return row

    def shown(self) -> list[Row]:
        """The rows of the current run: jobs it submitted anew and the earlier jobs it reused."""
        return [r for r in self.rows.values() if r.run == self.run or self.run in r.reused_in]

    def state_of(self, site: str, job_id: str) -> str | None:
        row = self.rows.get((site, job_id))
        return None if row is None else row.state

    def settled(self) -> bool:
        return all(r.state in _TERMINAL for r in self.rows.values())


class Transfer:
    """The fetch job of the current run, followed by the size of its part file."""

    def __init__(self, files: Path) -> None:
        self.files = files
        self.row: Row | None = None
        self.done = 0
        self.total = -1
        self.started: float | None = None
        self.finished: float | None = None

    def poll(self, board: Board) -> None:
        if self.row is None:
            self.row = next((r for r in board.shown() if r.work == "fetch" and r.run == board.run), None)
            if self.row is None:
                return
        row = self.row
        if self.total < 0:          # park://sns/files/<owner>/<job>/<name>: the reduction's announced size
            source = row.spec["fetch"].get("url", "").split("/")
            upstream = board.rows.get((source[2], source[5])) if len(source) > 6 else None
            self.total = upstream.output_size if upstream is not None else -1
        if row.state == "completed":
            self.done = self.total = max(self.total, row.output_size)
            self.finished = self.finished or time.monotonic()
        elif row.state == "running":
            name = row.spec.get("outputName", "output")
            part = self.files / row.owner / f".{row.job_id}.attempt-fetch" / f".{name}.part"
            try:
                self.done = max(self.done, part.stat().st_size)
            except FileNotFoundError:
                pass
        if self.started is None and (self.done > 0 or row.state in ("running", "completed")):
            self.started = time.monotonic()

    def describe(self) -> str:
        total = f"{self.total / MIB:.1f} MiB" if self.total >= 0 else "? MiB"
        text = f"{self.done / MIB:.1f} of {total}"
        if self.finished is not None and self.started is not None:
            seconds = max(self.finished - self.started, 1e-3)
            text += f" in {seconds:.1f} s ({self.total / MIB / seconds:.0f} MiB/s, polled)"
        return text

    def render(self) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        label = self.row.label if self.row else "transfer"
        state = self.row.state if self.row else "waiting"
        grid.add_row(Text(f"{label} sns → cluster", style="bold"),
                     ProgressBar(total=max(self.total, 1), completed=self.done if self.total > 0 else 0, width=40),
                     Text(self.describe()), Text(state, style=STATE_STYLES.get(state, "")))
        return grid


def watch_all(service: Service, site: str, out: queue.Queue[tuple[str, Any]]) -> grpc.Call:
    """Follow every job of the caller at `service` from the start, posting ("event", site, JobEvent) to `out`."""
    stream = service.jobs_stub.Watch(jpb.WatchRequest(job_id="", from_seq=0))

    def pump() -> None:
        try:
            for item in stream:
                for event in item.events:
                    out.put(("event", (site, JobEvent.from_proto(event))))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                out.put(("error", f"watching the {site} broker: {exc.details()}"))

    threading.Thread(target=pump, name=f"park-demo-watch-{site}", daemon=True).start()
    return stream


class View:
    """Shows the board and the transfer: a live table, or (plain) one line per event."""

    def __init__(self, console: Console, board: Board, transfer: Transfer, title: str, plain: bool):
        self.console, self.board, self.transfer, self.title = console, board, transfer, title
        self.lines: list[str] = []
        self.started = time.monotonic()
        self._printed: dict[tuple[str, str], float] = {}
        self._transfer_said = ""
        # Transient: once the run ends, its summary (demo.run) takes the board's place, so it shows once.
        self.live = None if plain else Live(self._renderable(), console=console, refresh_per_second=8,
                                            transient=True)

    def _table(self) -> Table:
        table = Table(title=f"{self.title} · {time.monotonic() - self.started:.1f} s", title_justify="left")
        for column in ("site", "job", "state", "progress", "detail"):
            table.add_column(column, no_wrap=column != "detail")
        for r in self.board.shown():
            state = "memo hit" if self.board.run in r.reused_in else r.state
            table.add_row(Text(r.site), Text(r.label), Text(state, style=STATE_STYLES.get(r.state, "")),
                          Text(r.progress), Text(r.detail[:90]))
        return table

    def _renderable(self) -> Group:
        parts: list[RenderableType] = [self._table()]
        if self.transfer.row is not None:
            parts.append(self.transfer.render())
        return Group(*parts, *(Text(line, style="dim") for line in self.lines[-6:]))

    def __enter__(self) -> Self:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def event(self, event: JobEvent, row: Row) -> None:
        if self.live is not None:
            return
        if event.kind == "improved":
            if time.monotonic() - self._printed.get((row.site, row.job_id), 0.0) < 1.0:
                return
            self._printed[(row.site, row.job_id)] = time.monotonic()
        text = row.progress if event.kind == "improved" else row.detail
        self.console.print(Text.assemble(f"{clock(event.time)}  {row.site:<8} {row.label:<20} ",
                                         (f"{event.kind if event.kind == 'improved' else row.state:<10}",
                                          STATE_STYLES.get(row.state, "")), f" {text}"))

    def reused(self, row: Row, label: str) -> None:
        if self.live is None:
            self.console.print(Text.assemble(f"{clock(time.time())}  {row.site:<8} {row.label or label:<20} ",
                                             ("memo hit  ", "green"), f" reused job {row.job_id} ({row.state})"))

    def line(self, text: str) -> None:
        if self.live is None:
            self.console.print(Text(f"  | {text}"))
        else:
            self.lines.append(text)

    def tick(self) -> None:
        self.transfer.poll(self.board)
        if self.live is not None:
            self.live.update(self._renderable())
            return
        t = self.transfer
        if t.row is None or t.total <= 0 or self._transfer_said == "done":
            return
        quarter = str(min(3, 4 * t.done // t.total)) if t.finished is None else "done"
        if quarter != self._transfer_said:        # plain: a line at each quarter, and one at the end
            self.console.print(Text(f"{clock(time.time())}  transfer {t.row.label}: {t.describe()}"))
            self._transfer_said = quarter
