"""Attempt directories: where each attempt of a job runs, when it is made, and what becomes of it.

Each attempt runs in a directory of its own in its owner's `.attempts` folder,
`<files root>/<owner>/.attempts/<run>-<n>`, where `<run>` names this broker
process: an attempt that outlived a crash (its start had not been committed, so
the re-run has the same number) never shares a directory with its re-run, and
the folders are emptied when a broker starts (`clear`). A directory is chosen
when the attempt is handed to its executor, not while the attempt waits its turn
in the fair queue, for the account the job runs as (execution.accounts). When
the attempt ends:

- the current attempt's directory is moved into place as the job's (`adopt`),
  replacing what an earlier attempt left there; a stale attempt's (one that
  outlived a crash or a cancellation) is removed instead (`discard`), so it can
  never replace a recorded result;
- unless the attempt left nothing (its logs empty, no other file, no process of
  its own still running: `execution.worker.left_nothing`) and the job has no
  earlier directory (only a retry, or a job an earlier broker handed to an
  executor before it stopped, can have one: those are looked for). Then the
  job keeps no directory (its record says `left_nothing`, and its logs read as
  empty), and the attempt's directory stays where it is as a *spare*, which
  the next attempt of the same owner and Unix account runs in. A trivial job
  then costs no file system change at all, where a new directory costs a mkdir
  and a chown, and its move into place a rename.

The `.attempts` folder is the broker's (mode 0711, like the owner's folder): a
job's account reaches its own attempt's directory in it, and lists nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import glob
import itertools
import os
import secrets
import shutil
from pathlib import Path

from park_broker.execution.accounts import Account, Accounts
from park_broker.execution.base import Outcome

MAX_SPARES = 64   # per owner and account: more attempts of one user than this rarely run at once
FOLDER = ".attempts"

_Key = tuple[str, int, int] | tuple[str, None, None]   # (owner folder, uid, gid) a spare belongs to


class AttemptDirs:
    def __init__(self, files_root: str, accounts: Accounts):
        self.accounts = accounts
        self._files_root = files_root
        self._spares: dict[_Key, list[str]] = {}
        self._folders: set[str] = set()   # `.attempts` folders made (or found) by this broker
        self._interrupted: set[str] = set()   # jobs an earlier broker handed over: a directory of theirs may be there
        self._names = itertools.count()
        self._run = secrets.token_hex(4)

    def clear(self) -> None:
        """Remove what earlier brokers left in the owners' `.attempts` folders (blocking: run it in a thread,
        before any attempt starts)."""
        for folder in glob.glob(os.path.join(glob.escape(self._files_root), "*", FOLDER)):
            shutil.rmtree(folder, ignore_errors=True)

    def make(self, owner: str, account: Account | None) -> str:
        """A directory for an attempt of one of `owner`'s jobs: a spare of that owner's and account's, else a
        new one."""
        folder = os.path.join(self._files_root, owner, FOLDER)
        spares = self._spares.get(_key(folder, account))
        if spares:
            return spares.pop()
        if folder not in self._folders:
            # The owner's folder too, on their first job here: jobs pass through both, and list neither.
            os.makedirs(os.path.dirname(folder), 0o711, exist_ok=True)
            os.makedirs(folder, 0o711, exist_ok=True)
            self._folders.add(folder)
        where = os.path.join(folder, f"{self._run}-{next(self._names)}")
        self.accounts.prepare(Path(where), account)
        return where

    def interrupted(self, job_ids: list[str]) -> None:
        """Jobs that run again after a restart: an attempt of theirs may have been moved into place before the
        broker stopped (recovery, before it hands them over)."""
        self._interrupted.update(job_ids)

    def adopt(self, job_id: str, attempt: int, work: str, final: str, outcome: Outcome, account: Account | None
              ) -> Outcome:
        """The current attempt's directory `work` becomes the job's `final` one, or stays a spare if the attempt
        left nothing; the outcome returned says which (`left_nothing`) and where its files are now."""
        if outcome.left_nothing:
            spares = self._spares.setdefault(_key(os.path.dirname(work), account), [])
            # A file system lookup only where an earlier directory can be (a lookup lets go of the GIL, and the
            # event loop waits for it back behind the store's writer).
            earlier = attempt > 1 or job_id in self._interrupted
            if len(spares) < MAX_SPARES and not (earlier and os.path.lexists(final)):
                self._interrupted.discard(job_id)
                spares.append(work)
                return outcome
            outcome = dataclasses.replace(outcome, left_nothing=False)
        self._interrupted.discard(job_id)
        return _adopt(work, final, outcome)

    @staticmethod
    def discard(work: str) -> None:
        """Remove a stale attempt's directory, off the event loop."""
        asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, work, True)


def _key(folder: str, account: Account | None) -> _Key:
    return (folder, None, None) if account is None else (folder, account.uid, account.gid)


def _adopt(work: str, final: str, outcome: Outcome) -> Outcome:
    """Move attempt directory `work` to `final` (replacing an unrecorded earlier one) and point the
    outcome's paths there. Renames are single system calls; removing what was replaced is not, and
    happens off the event loop."""
    try:
        os.rename(work, final)   # the common case: nothing was at `final`
    except FileNotFoundError:    # the attempt's directory is gone (removed by hand, or by a broker starting)
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
