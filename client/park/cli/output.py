"""What the `park` commands print and how they fail: state colours, times, event lines, exit statuses.

Shared by every command and by `park demo`'s board. `CliError` is a failure a
command reports as `park: message` with its exit status; nothing here talks to
a broker.
"""
from __future__ import annotations

import datetime
import json
import sys
from typing import Any, NoReturn

from google.protobuf import json_format
from rich.console import Console

from park._proto import jobs_pb2 as jpb
from park._proto import site_pb2
from park.errors import ParkError
from park.groups import counts_line
from park.job import JobEvent

STATE_STYLES = {"waiting": "dim", "queued": "cyan", "running": "yellow", "completed": "green",
                "failed": "red", "cancelled": "magenta"}
USAGE, FAILURE = 2, 1


class CliError(ParkError):
    """A failure the command reports as `park: message` with exit status `status`."""

    def __init__(self, message: str, status: int = FAILURE):
        super().__init__(message)
        self.status = status


def die(message: str, status: int = FAILURE) -> NoReturn:
    raise CliError(message, status)


def clock(t: float) -> str:
    """Local wall-clock time of an epoch timestamp, for people."""
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else ""


def when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def iso(t: float) -> str | None:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat() if t else None


def peer_json(peer: site_pb2.PeerLink) -> dict[str, Any]:
    """A peer and its streams as `park status --json` and the dashboard show them (times in epoch seconds)."""
    return {"name": peer.name, "address": peer.address, "state": peer.state, "since": peer.since or None,
            "last_error": peer.last_error or None, "last_seq": peer.last_seq, "atoms_pending": peer.atoms_pending,
            "atoms_received": peer.atoms_received,
            "idle_seconds": None if peer.idle_seconds < 0 else round(peer.idle_seconds, 1),
            "subscribed": peer.subscribed, "subscribed_since": peer.subscribed_since or None,
            "atoms_watched": peer.atoms_watched}


def describe(event: JobEvent) -> str:
    """One line saying what an event means: the work submitted, the result, the error or the cause."""
    d = event.detail
    if event.kind == "submitted":
        spec = d.get("spec", {})
        work = spec.get("call", {}).get("target") or " ".join(spec.get("command", {}).get("argv", []))
        label = spec.get("label", "")
        return f"{label} ({work})" if label and label != work else work
    if event.kind == "reused":
        return f"a memo hit: answered by job {d.get('jobId', '?')}, which ran the same work"
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
    if event.kind == "needs_credentials":
        return f"needs fresh credentials for {d.get('site', '?')}: {d.get('message', '')}; run `park renew`"
    if event.kind == "group_progress":
        counts = json_format.ParseDict(d.get("counts", {}), jpb.GroupCounts(), ignore_unknown_fields=True)
        return f"member {d.get('member', '?')}: {counts_line(counts)}"
    if event.kind == "renewed":
        return f"{d.get('use', '')} credential for {d.get('site', '?')} renewed"
    return ""


def new_console() -> Console:
    # Off a terminal rich would wrap at 80 columns; pipes and files get whole lines.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))
