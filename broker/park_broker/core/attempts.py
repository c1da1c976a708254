"""Attempt directories: where each attempt of a job runs, when it is made, and what becomes of it.

Each attempt runs in a directory of its own, `.<job>.attempt-<n>-<run>` beside
the job's final directory, where `<run>` names this broker process: an attempt
that outlived a crash (its start had not been committed, so the re-run has the
same number) never shares a directory with its re-run. It is made when the
attempt is handed to its executor, not while the attempt waits its turn in the
fair queue, for the account the job runs as (execution.accounts). When the
attempt ends:

- the current attempt's directory is moved into place as the job's (`adopt`),
  replacing what an earlier attempt left there; a stale attempt's (one that
  outlived a crash or a cancellation) is removed instead (`discard`), so it can
  never replace a recorded result;
- unless the attempt left nothing (its logs empty, no other file, no process of
  its own still running: `execution.worker.left_nothing`) and the job has no
  earlier directory. Then the job keeps no directory (its record says
  `left_nothing`, and its logs read as empty), and the attempt's directory
  becomes a *spare* in `<files root>/.spare`, which the next attempt of the same
  Unix account is renamed into. A trivial job then costs two renames, where it
  cost creating three files, a chown and a rename; creating a file is the
  slowest of these on a file system with many recent deletions (ext4 searches
  past recently freed inodes).

Spares belong to no job: `clear` removes them when the broker starts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import secrets
import shutil
from pathlib import Path

from park_broker.execution.accounts import Account, Accounts
from park_broker.execution.base import Outcome

MAX_SPARES = 64   # per account: more attempts of one account than this rarely run at once

_Owner = tuple[int, int] | None   # (uid, gid) a spare belongs to; None: the broker's own account


class AttemptDirs:
    def __init__(self, files_root: str, accounts: Accounts):
        self.accounts = accounts
        self._spare_root = os.path.join(files_root, ".spare")
        self._spares: dict[_Owner, list[str]] = {}
        self._names = itertools.count()
        self._run = secrets.token_hex(4)

    def clear(self) -> None:
        """Remove what earlier brokers kept (blocking: run it in a thread, before any attempt starts)."""
        shutil.rmtree(self._spare_root, ignore_errors=True)
        os.makedirs(self._spare_root, 0o700, exist_ok=True)

    def path(self, final: str, job_id: str, attempt: int) -> str:
        """Where attempt `attempt` of the job whose directory is `final` runs."""
        return os.path.join(os.path.dirname(final), f".{job_id}.attempt-{attempt}-{self._run}")

    def make(self, where: str, account: Account | None) -> None:
        """Give an attempt its directory: a spare of its account's, else a new one."""
        spares = self._spares.get(_owner(account))
        if spares:
            try:
                os.rename(spares.pop(), where)
                return
            except OSError:   # the owner's first job here (no tree yet), or a half-run of this attempt is there
                pass
        self.accounts.prepare(Path(where), account)

    def adopt(self, work: str, final: str, outcome: Outcome, account: Account | None) -> Outcome:
        """The current attempt's directory `work` becomes the job's `final` one, or a spare if the attempt left
        nothing; the outcome returned says which (`left_nothing`) and where its files are now."""
        if outcome.left_nothing:
            spares = self._spares.setdefault(_owner(account), [])
            if len(spares) < MAX_SPARES and not os.path.lexists(final):
                spare = os.path.join(self._spare_root, str(next(self._names)))
                try:
                    os.rename(work, spare)
                    spares.append(spare)
                    return outcome
                except OSError:
                    pass
            outcome = dataclasses.replace(outcome, left_nothing=False)
        return _adopt(work, final, outcome)

    @staticmethod
    def discard(work: str) -> None:
        """Remove a stale attempt's directory, off the event loop."""
        asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, work, True)


def _owner(account: Account | None) -> _Owner:
    return None if account is None else (account.uid, account.gid)


def _adopt(work: str, final: str, outcome: Outcome) -> Outcome:
    """Move attempt directory `work` to `final` (replacing an unrecorded earlier one) and point the
    outcome's paths there. Renames are single system calls; removing what was replaced is not, and
    happens off the event loop."""
    try:
        os.rename(work, final)   # the common case: nothing was at `final`
    except FileNotFoundError:    # the attempt never got as far as making its directory
        return outcome
    except OSError:              # an earlier attempt's directory is there (ENOTEMPTY, EEXIST)
        replaced = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced-{secrets.token_hex(4)}")
        os.rename(final, replaced)
        AttemptDirs.discard(replaced)
        os.rename(work, final)
    if not outcome.result_file and not outcome.outputs:
        return outcome

    def moved(path: str) -> str:
        return os.path.join(final, os.path.relpath(path, work)) if path else path
    return dataclasses.replace(outcome, result_file=moved(outcome.result_file),
                               outputs=tuple((n, moved(p), s, h) for n, p, s, h in outcome.outputs))
