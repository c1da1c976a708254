"""`park demo`: the single-site example against a broker of its own, with a live view.

It creates a site in a temporary directory (`park-broker init`), serves it on
an ephemeral loopback port (`park-broker serve --listen 127.0.0.1:0
--python-path <examples>`), runs `examples/single_site.py` against it as a
subprocess (address and certificate in PARK_DEMO_ADDRESS and PARK_DEMO_CERT),
and shows every job of the broker as its events arrive: a live table on a
terminal, one line per event otherwise (or with `--plain`).

Guarantee: the broker and the example process are stopped before `run_demo`
returns or raises, whether the demo succeeds, fails, is interrupted (Ctrl-C,
SIGTERM) or breaks; the broker gets SIGTERM, then SIGKILL if it has not
stopped within `STOP_GRACE` seconds. Both run in their own sessions, so a
Ctrl-C reaches only the demo, which then tears them down in order. The
temporary directory is removed unless `keep` is set.

Success (0) means the example exited 0 and every job named in the example's
`EXPECTED` table ended in the state given there, as seen from the broker's
own event stream; anything else is 1.
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
from types import FrameType, TracebackType

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

import park
from park import tokens
from park.agent_client import default_subject
from park.signer import write_private_key
from park._proto import jobs_pb2 as jpb
from park.cli import STATE_STYLES, CliError, clock, describe
from park.job import JobEvent
from park.service import Service

__all__ = ["run_demo", "find_examples", "EXAMPLE"]

EXAMPLE = "single_site.py"
SITE = "sns"
START_TIMEOUT = 30.0     # seconds for the broker to write serve.json
STOP_GRACE = 20.0        # seconds between SIGTERM and SIGKILL
RUN_TIMEOUT = 300.0      # seconds the whole example may take
SETTLE = 10.0            # seconds to wait for the last events after the example exits
_STATE_OF = {"submitted": "waiting", "queued": "queued", "started": "running", "completed": "completed",
             "failed": "failed", "cancelled": "cancelled"}


def find_examples() -> Path:
    """The examples directory: ./examples, else the one beside the park package's source checkout."""
    for candidate in (Path.cwd() / "examples", Path(park.__file__).resolve().parents[2] / "examples"):
        if (candidate / EXAMPLE).is_file():
            return candidate
    raise CliError(f"cannot find examples/{EXAMPLE}; run `park demo` from the Park checkout "
                   "(the directory that holds examples/)")


def expected_states(example: Path) -> dict[str, str]:
    """The example's EXPECTED table (job label → final state), read without running the file."""
    for node in ast.parse(example.read_text(), str(example)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXPECTED" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    raise CliError(f"{example} has no EXPECTED table of job labels and final states")


class _Broker:
    """A `park-broker serve` subprocess for a fresh site; stopped on exit from the `with` block."""

    def __init__(self, directory: Path, python_path: Path, workers: int, key: Ed25519PrivateKey):
        self.directory = directory
        self.key = key
        self.python_path = python_path
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def log_path(self) -> Path:
        return self.directory.parent / "broker.log"

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "park_broker.cli", *args]

    def __enter__(self) -> _Broker:
        init = subprocess.run(self._command("init", str(self.directory), "--site", SITE),
                              capture_output=True, text=True)
        if init.returncode != 0:
            raise CliError(f"park-broker init failed: {init.stderr.strip() or init.stdout.strip()}")
        users = subprocess.run(self._command("users", "add", str(self.directory), default_subject(), "--key",
                                             tokens.format_public_key(self.key.public_key())),
                               capture_output=True, text=True)
        if users.returncode != 0:
            raise CliError(f"park-broker users add failed: {users.stderr.strip()}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command("serve", str(self.directory), "--listen", "127.0.0.1:0", "--workers",
                              str(self.workers), "--python-path", str(self.python_path)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving(self) -> None:
        assert self.proc is not None
        serve_file = self.directory / "serve.json"
        deadline = time.monotonic() + START_TIMEOUT
        while not serve_file.exists():
            if self.proc.poll() is not None:
                raise CliError(f"the demo broker exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise CliError(f"the demo broker did not start within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.address = json.loads(serve_file.read_text())["address"]

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, STOP_GRACE)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, sig: int, grace: float) -> None:
    """Signal `proc` if it still runs, then kill it if it has not exited within `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop the broker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(slots=True)
class _Row:
    job_id: str
    label: str = ""
    state: str = "waiting"
    detail: str = ""


class _Board:
    """The demo's jobs as last seen in the broker's event stream."""

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.started = time.monotonic()

    def apply(self, event: JobEvent) -> _Row:
        row = self.rows.setdefault(event.job_id, _Row(event.job_id))
        if event.kind == "submitted":
            row.label = event.detail.get("spec", {}).get("label", "") or event.job_id
        row.state = _STATE_OF.get(event.kind, row.state)
        row.detail = describe(event)
        for other in self.rows.values():     # "sns/<id>.completed" reads better as "calibrate.completed"
            row.detail = row.detail.replace(f"{SITE}/{other.job_id}", other.label or other.job_id)
        return row

    def settled(self) -> bool:
        return all(r.state in ("completed", "failed", "cancelled") for r in self.rows.values())

    def final_states(self) -> dict[str, str]:
        return {r.label: r.state for r in self.rows.values()}

    def render(self, address: str) -> Table:
        table = Table(title=f"park demo · site {SITE} at {address} · {time.monotonic() - self.started:.1f} s",
                      title_justify="left")
        for column in ("job", "id", "state", "detail"):
            table.add_column(column, no_wrap=column != "detail")
        for r in self.rows.values():
            table.add_row(Text(r.label), Text(r.job_id[:8]), Text(r.state, style=STATE_STYLES.get(r.state, "")),
                          Text(r.detail[:90]))
        return table


def _watch_all(service: Service, out: queue.Queue[tuple[str, object]]) -> grpc.Call:
    """Follow every job of the broker from the start, posting ("event", JobEvent) to `out`."""
    stream = service.jobs_stub.Watch(jpb.WatchRequest(job_id="", from_seq=0))

    def pump() -> None:
        try:
            for item in stream:
                if item.HasField("event"):
                    out.put(("event", JobEvent.from_proto(item.event)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                out.put(("error", f"watching the demo broker: {exc.details()}"))

    threading.Thread(target=pump, name="park-demo-watch", daemon=True).start()
    return stream


def _run_example(examples: Path, broker: _Broker, out: queue.Queue[tuple[str, object]]) -> subprocess.Popen[str]:
    """Start the example; its output lines and then its exit status are posted to `out`."""
    env = {**os.environ, "PARK_DEMO_ADDRESS": broker.address, "PARK_DEMO_CERT": str(broker.cert),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(examples / EXAMPLE)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(("line", line.rstrip("\n")))
        out.put(("exit", proc.wait()))

    threading.Thread(target=pump, name="park-demo-example", daemon=True).start()
    return proc


class _View:
    """Shows the board: a live table, or (plain) one line per event."""

    def __init__(self, console: Console, board: _Board, address: str, plain: bool):
        self.console, self.board, self.address, self.plain = console, board, address, plain
        self.lines: list[str] = []
        self.live = None if plain else Live(self._renderable(), console=console, refresh_per_second=8)

    def _renderable(self) -> Group:
        return Group(self.board.render(self.address), *(Text(line, style="dim") for line in self.lines[-3:]))

    def __enter__(self) -> _View:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:      # the final table stays on screen; the output is printed in full after it
            self.live.update(self.board.render(self.address))
            self.live.__exit__(None, None, None)

    def event(self, event: JobEvent, row: _Row) -> None:
        if self.live is None:
            self.console.print(Text.assemble(f"{clock(event.time)}  {row.label:<16} ",
                                             (f"{row.state:<10}", STATE_STYLES.get(row.state, "")),
                                             f" {row.detail}"))
        else:
            self.live.update(self._renderable())

    def line(self, text: str) -> None:
        if self.live is None:
            self.console.print(Text(f"  | {text}"))
        else:
            self.lines.append(text)
            self.live.update(self._renderable())

    def tick(self) -> None:
        if self.live is not None:
            self.live.update(self._renderable())


def _follow(view: _View, board: _Board, out: queue.Queue[tuple[str, object]]) -> int:
    """Consume events and example output until the example has exited and the board has settled.

    Returns the example's exit status; a failure to watch or a timeout raises CliError."""
    deadline = time.monotonic() + RUN_TIMEOUT
    status: int | None = None
    while status is None or not board.settled():
        if time.monotonic() > deadline:
            raise CliError(f"the demo did not finish within {RUN_TIMEOUT:.0f} s")
        try:
            kind, value = out.get(timeout=0.25)
        except queue.Empty:
            view.tick()
            continue
        if kind == "event":
            assert isinstance(value, JobEvent)
            view.event(value, board.apply(value))
        elif kind == "line":
            view.line(str(value))
        elif kind == "exit":
            status = int(value)  # type: ignore[call-overload]
            deadline = min(deadline, time.monotonic() + SETTLE)
        else:
            raise CliError(str(value))
    return status


def _verdict(console: Console, expected: dict[str, str], seen: dict[str, str], status: int,
             plain: bool, lines: list[str]) -> int:
    if not plain:
        for line in lines:           # the example's own summary, kept out of the live table
            console.print(Text(line))
    wrong = {label: seen.get(label, "never seen") for label, state in expected.items() if seen.get(label) != state}
    for label, state in wrong.items():
        console.print(Text(f"park demo: {label} ended {state}, expected {expected[label]}", style="red"))
    if status != 0:
        console.print(Text(f"park demo: the example exited with status {status}", style="red"))
    if wrong or status != 0:
        return 1
    console.print(Text(f"park demo: all {len(expected)} jobs ended as expected", style="green"))
    return 0


def run_demo(*, keep: bool, workers: int, plain: bool, console: Console) -> int:
    """Run the demo; 0 when every job ended as expected, 1 otherwise (see the module docstring)."""
    examples = find_examples()
    expected = expected_states(examples / EXAMPLE)
    plain = plain or not console.is_terminal
    root = Path(tempfile.mkdtemp(prefix="park-demo-"))
    out: queue.Queue[tuple[str, object]] = queue.Queue()
    example: subprocess.Popen[str] | None = None
    # The demo's own user key, in a key file (the source robots use), so that it needs no agent.
    key = Ed25519PrivateKey.generate()
    write_private_key(root / "demo-user.key", key, None)
    os.environ.pop("PARK_AUTH_SOCK", None)
    os.environ["PARK_KEY_FILE"] = str(root / "demo-user.key")
    try:
        with _sigterm_interrupts(), _Broker(root / SITE, examples, workers, key) as broker:
            console.print(Text(f"park demo: broker for site {SITE} on {broker.address}, state in {root}"))
            with contextlib.closing(Service(broker.address, broker.cert)) as service:
                stream = _watch_all(service, out)
                board = _Board()
                try:
                    example = _run_example(examples, broker, out)
                    with _View(console, board, broker.address, plain) as view:
                        status = _follow(view, board, out)
                finally:
                    stream.cancel()
                    _stop(example, signal.SIGTERM, 5.0)
            return _verdict(console, expected, board.final_states(), status, plain, view.lines)
    except CliError:
        if (root / "broker.log").exists():
            console.print(Text(f"park demo: the broker's log is {root / 'broker.log'}", style="dim"))
            keep = True
        raise
    finally:
        if keep:
            console.print(Text(f"park demo: kept {root}"))
        else:
            shutil.rmtree(root, ignore_errors=True)
