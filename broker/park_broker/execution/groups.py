"""Durable records of the process groups the local executor started, so none outlives a restart.

Every local worker leads a process group of its own, and a job's command-line
children are in it. The executor records a group here, written and fsynced,
before it gives the worker a task, and forgets it once the group is gone. A
broker that starts on a site directory first `reap`s every group a predecessor
recorded: normally the worker's watchdog took its group down with the old
broker (`execution.worker`), and this makes sure of it, for a worker that was
stopped, starved or stuck when its broker died. Only then does recovery run the
interrupted jobs again.

A record names a group by its leader's pid, the leader's start time and the
boot it started in (Linux `/proc`), so a pid the kernel has handed out again
since is never signalled. The kernel never reuses a pid that is still some
group's id, so members of a group whose leader is gone are still that group.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from park.config import replace_file

log = logging.getLogger(__name__)
_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class _Member:
    pid: int
    group: int
    started: int      # clock ticks since boot
    zombie: bool


def _read_member(stat: Path) -> _Member | None:
    try:
        text = stat.read_text()
    except OSError:    # gone meanwhile, or not ours to read
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces and parentheses
    return _Member(int(stat.parent.name), int(fields[2]), int(fields[19]), fields[0] == "Z")


def _member(pid: int) -> _Member | None:
    return _read_member(_PROC / str(pid) / "stat")


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _members(group: int) -> list[_Member]:
    found = (_read_member(p / "stat") for p in _PROC.iterdir() if p.name.isdigit())
    return [m for m in found if m is not None and m.group == group and not m.zombie]


class ProcessGroups:
    """The records in `directory` (one file per group, named by its id)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def record(self, leader: int) -> None:
        """Durably note that `leader` leads a process group of this broker's."""
        member = _member(leader)
        started = member.started if member is not None else 0
        self.directory.mkdir(mode=0o700, exist_ok=True)
        replace_file(self.directory / str(leader), f"{_boot_id()} {started}\n")

    def forget(self, leader: int) -> None:
        (self.directory / str(leader)).unlink(missing_ok=True)

    def reap(self, timeout: float = 10.0) -> int:
        """Kill every recorded group that still has members and wait until they are gone; returns how
        many groups were killed. Called before anything runs, by a broker that starts."""
        if not self.directory.is_dir():
            return 0
        boot, killed = _boot_id(), 0
        for path in sorted(self.directory.iterdir()):
            if path.name.isdigit() and self._kill(int(path.name), path.read_text().split(), boot):
                killed += 1
                self._wait(int(path.name), timeout)
            path.unlink(missing_ok=True)
        return killed

    def _kill(self, group: int, record: list[str], boot: str) -> bool:
        if len(record) != 2 or record[0] != boot or not boot:   # another boot: nothing of it still runs
            return False
        leader = _member(group)
        if leader is not None and str(leader.started) != record[1]:   # the pid names another process now
            return False
        if not _members(group):
            return False
        log.warning("killing process group %d, left running by the broker that served this site before", group)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    @staticmethod
    def _wait(group: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _members(group):
            if time.monotonic() > deadline:
                log.error("process group %d survived SIGKILL for %.0f s; its jobs run again regardless", group,
                          timeout)
                return
            time.sleep(0.02)
