"""The Unix accounts jobs run as, and the environment they start with.

A site user runs jobs as the Unix account `users.toml` maps them to
(`park-broker users add DIR NAME --unix-user ACCOUNT`; by default the account
of the same name, when there is one), or as the account the operator names for
users without one (`serve --default-unix-user`). How that is applied depends on
what the broker is:

- running as root with the local executor, it *switches*: each worker process
  is started as its user's account (its groups too), job directories are owned
  by that account, and the site's keys, database and users file stay readable
  by root alone. Root is never a job's account: a mapping to uid 0 is refused,
  and so is a user with neither a mapping nor a default;
- not running as root, it cannot switch: every job runs as the broker's own
  account, so the site serves that one account; a users file that maps anyone
  to another account makes `serve` refuse to start;
- with the Dask executor, jobs run as the Dask workers' account, whatever the
  broker is; mappings are not applied, and `serve` says so.

Whichever applies, a job starts with a clean environment (`job_environment`),
never with the broker's.
"""
from __future__ import annotations

import os
import pwd
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOOKUP_TTL = 30.0   # seconds an account's entry (uid, groups) is reused before it is looked up again

# What a job inherits from the broker's environment; everything else (the operator's credentials,
# PARK_* settings of the broker, proxies) stays with the broker.
INHERITED = ("PATH", "LANG", "LANGUAGE", "TZ")


class AccountError(RuntimeError):
    """A user cannot be given an account to run as; the text says what to do."""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def lookup(name: str) -> Account:
    """The Unix account `name`; AccountError if there is none or it is root's."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise AccountError(f"there is no Unix account {name!r} on this host") from None
    if entry.pw_uid == 0:
        raise AccountError(f"Unix account {name!r} is root's: jobs never run as root; name an unprivileged account")
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid)) - {entry.pw_gid}))   # as initgroups(3) would
    return Account(name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def default_account_name(user: str) -> str:
    """What `users add` maps a user to when not told: the account of the same name, if there is one
    that is not root's; else nothing (then the broker's `--default-unix-user` applies)."""
    try:
        return lookup(user).name
    except AccountError:
        return ""


def job_environment(account: Account | None, python_path: list[str], extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment a worker process starts with."""
    env = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    if account is not None:
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(python_path)
    env.update(extra)
    return env


@dataclass(frozen=True, slots=True)
class Accounts:
    """Who a job runs as at this site; see the module docstring."""

    switching: bool                      # the broker starts workers as its users' accounts
    mapping: Callable[[str], str]        # a site user's mapped account name ("" for none)
    default: str = ""                    # --default-unix-user
    description: str = ""                # what Site.Info and `serve` say about it
    # name -> (monotonic time looked up, account): every job start needs its account, and a lookup reads
    # the passwd and group databases (files, or a directory service). A change to an account reaches new
    # jobs within LOOKUP_TTL, as with nscd.
    _looked_up: dict[str, tuple[float, Account]] = field(default_factory=dict, compare=False, repr=False)

    def of(self, user: str) -> Account | None:
        """The account `user`'s jobs run as; None for the broker's own (when it does not switch)."""
        if not self.switching:
            return None
        name = self.mapping(user) or self.default
        if not name:
            raise AccountError(f"site user {user!r} has no Unix account to run jobs as: the operator maps one with "
                               f"`park-broker users set DIR {user} --unix-user ACCOUNT` (or serves with "
                               "--default-unix-user ACCOUNT)")
        now = time.monotonic()
        cached = self._looked_up.get(name)
        if cached is None or now - cached[0] > LOOKUP_TTL:
            cached = self._looked_up[name] = (now, lookup(name))
        return cached[1]

    def prepare(self, directory: Path, account: Account | None) -> None:
        """Create an attempt's (or a fetch's) directory for `account`, in its owner's tree."""
        try:
            os.mkdir(directory, 0o700)   # the common case: one system call
        except FileNotFoundError:        # the owner's first job here
            directory.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            os.mkdir(directory, 0o700)
        except FileExistsError:          # a half-run of this same attempt (never a symlink's target)
            if directory.is_dir() and not directory.is_symlink():
                shutil.rmtree(directory)
            else:
                directory.unlink()
            os.mkdir(directory, 0o700)
        if account is not None:
            os.chown(directory, account.uid, account.gid)

    def hand_over(self, directory: Path, account: Account | None) -> None:
        """Give what the broker itself wrote (a fetched file) to `account`, once complete."""
        if account is None:
            return
        for root, dirs, files in os.walk(directory):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), account.uid, account.gid, follow_symlinks=False)
        os.chown(directory, account.uid, account.gid)
        os.chmod(directory, 0o700)


def _may(account: Account, path: Path, bit: int) -> bool:
    """Whether `account` has permission `bit` (1 execute/search, 4 read) on `path`, by its mode bits."""
    st = path.stat()
    if st.st_uid == account.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == account.gid or st.st_gid in account.groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def check_runnable(account: Account, interpreter: Path) -> None:
    """AccountError unless `account` can start `interpreter` (the broker's Python, which workers run)."""
    real = interpreter.resolve()
    for directory in reversed(real.parents):
        if not _may(account, directory, 1):
            raise AccountError(f"jobs run as Unix account {account.name!r}, which cannot reach the broker's Python "
                               f"{real}: it may not enter {directory}. Install Park in a Python every job account "
                               f"can run (for example under /opt or /usr/local), or let them pass: chmod o+x {directory}")
    if not (_may(account, real, 1) and _may(account, real, 4)):
        raise AccountError(f"jobs run as Unix account {account.name!r}, which may not run the broker's Python {real}")


def choose(local_executor: bool, mapping: Callable[[str], str], users: list[str], default: str) -> Accounts:
    """The accounts policy `serve` runs with; AccountError if this broker cannot honour the users file."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if not local_executor:
        return Accounts(False, mapping, description="jobs run as the Dask workers' account (Unix account mappings "
                                                    "are not applied with the Dask executor)")
    if os.geteuid() != 0:
        others = sorted({name for u in users if (name := mapping(u)) and name != me})
        if others or (default and default != me):
            raise AccountError(
                f"this broker runs as {me!r}, not root, so it cannot run jobs as other accounts, but the users file "
                f"or --default-unix-user names {', '.join(others or [default])}: run the broker as root, or "
                f"map every user to {me!r} (`park-broker users set DIR USER --unix-user {me}`)")
        return Accounts(False, mapping, description=f"jobs run as the broker's account {me!r} (it does not run as "
                                                    "root, so it serves that one account)")
    names = {default} if default else set()
    for user in users:
        if not mapping(user) and not default:
            raise AccountError(f"site user {user!r} has no Unix account and the broker runs as root, which never "
                               f"runs jobs as itself: `park-broker users set DIR {user} --unix-user ACCOUNT`, or "
                               "serve with --default-unix-user ACCOUNT (an unprivileged account, such as nobody)")
        names.add(mapping(user) or default)
    for name in sorted(names):
        check_runnable(lookup(name), Path(sys.executable))
    return Accounts(True, mapping, default, "jobs run as each user's own Unix account")
