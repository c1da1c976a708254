"""Asking the user: passphrases for the CLI, yes/no confirmations for the agent.

Both go through `$PARK_ASKPASS` when it is set (like `SSH_ASKPASS`): the
program is run with the prompt as its only argument. For a passphrase its
standard output is the answer; for a confirmation its exit status is (0 =
yes), and `PARK_ASKPASS_PROMPT=confirm` tells it which kind of dialog to show.
Without `$PARK_ASKPASS` the CLI prompts on the terminal, and the agent, which
has no terminal, answers every confirmation with no.

Answers are returned, never logged.
"""
from __future__ import annotations

import asyncio
import getpass
import logging
import os
import subprocess
import sys

__all__ = ["AskpassError", "read_passphrase", "confirm"]

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 120.0


class AskpassError(Exception):
    """No way to ask, or the user cancelled."""


def read_passphrase(prompt: str) -> str:
    """Ask for a passphrase through $PARK_ASKPASS, else on the terminal."""
    program = os.environ.get("PARK_ASKPASS")
    if program:
        result = subprocess.run([program, prompt], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PARK_ASKPASS_PROMPT": "passphrase"}, check=False)
        if result.returncode != 0:
            raise AskpassError(f"{program} exited with status {result.returncode}: cancelled")
        return result.stdout.decode().removesuffix("\n")
    if not sys.stdin.isatty():
        raise AskpassError("no terminal to ask for a passphrase; set PARK_ASKPASS to a program that prints it")
    return getpass.getpass(prompt)


async def confirm(question: str) -> bool:
    """True only if $PARK_ASKPASS runs and exits 0 within CONFIRM_TIMEOUT seconds."""
    program = os.environ.get("PARK_ASKPASS")
    if not program:
        log.warning("a key needs confirmation but PARK_ASKPASS is not set: refusing")
        return False
    try:
        proc = await asyncio.create_subprocess_exec(
            program, question, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env={**os.environ, "PARK_ASKPASS_PROMPT": "confirm"})
    except OSError as e:
        log.warning("cannot run PARK_ASKPASS: %s", e.strerror)
        return False
    try:
        status = await asyncio.wait_for(proc.wait(), CONFIRM_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("confirmation timed out: refusing")
        return False
    return status == 0
