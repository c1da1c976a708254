"""`park-agent`: start the agent, or talk to the running one (DESIGN §12).

    eval "$(park-agent)"        start in the background, print the environment to eval
    park-agent --foreground     same, but stay attached and log to stderr
    park-agent keygen           create your key (keyring, else encrypted file), load it if an agent runs
    park-agent add [-t S] [-c]  load the stored key, forgotten after S seconds, confirm each use
    park-agent list             keys held; exit 2 when no agent answers, 1 when it holds no keys
    park-agent pubkey           print your public key, for `park-broker users add --key`
    park-agent remove [KEY_ID]  forget one key, or all
    park-agent lock | unlock    lock the agent with a passphrase
    park-agent stop             stop the agent

Exit status: 0 done, 1 refused or failed, 2 no agent reachable.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence

from park.agent_client import AgentClient, AgentError, NoAgentError, default_subject
from park.signer import KeyFileError
from park_agent.agent import Agent
from park_agent.askpass import AskpassError, read_passphrase
from park_agent.keystore import KeyStore, KeyStoreError, default_key_dir
from park_agent.server import AgentServer, make_socket_dir

__all__ = ["main"]

NO_AGENT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="park-agent", description="Park's credential agent.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--foreground", action="store_true", help="do not daemonize; log to stderr")
    parser.add_argument("--debug", action="store_true", help="with --foreground, log every request")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    keygen = sub.add_parser("keygen", help="create your identity key")
    keygen.add_argument("--store", choices=("auto", "keyring", "file"), default="auto")
    keygen.add_argument("--comment", default=f"{default_subject()}@{socket.gethostname()}")
    add = sub.add_parser("add", help="load your key into the agent")
    add.add_argument("-t", dest="lifetime", type=_seconds, default=0, metavar="SECONDS",
                     help="forget it after this long")
    add.add_argument("-c", dest="confirm", action="store_true", help="ask $PARK_ASKPASS before each use")
    sub.add_parser("list", help="list the keys the agent holds")
    sub.add_parser("pubkey", help="print your public key")
    remove = sub.add_parser("remove", help="forget a key (all keys without KEY_ID)")
    remove.add_argument("key_id", nargs="?")
    sub.add_parser("lock", help="lock the agent with a passphrase")
    sub.add_parser("unlock", help="unlock the agent")
    sub.add_parser("stop", help="stop the agent")
    return parser


def _environment(path: str, pid: int) -> str:
    sock = shlex.quote(path)
    return (f"PARK_AUTH_SOCK={sock}; export PARK_AUTH_SOCK;\n"
            f"PARK_AGENT_PID={pid}; export PARK_AGENT_PID;\n"
            f"echo Agent pid {pid};\n")


def _print_environment(server: AgentServer, pid: int) -> None:
    sys.stdout.write(_environment(str(server.path), pid))
    sys.stdout.flush()


def _start(foreground: bool, debug: bool) -> int:
    server = AgentServer(Agent(subject=default_subject()), make_socket_dir())
    if foreground:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # Printed only once the socket listens, so whoever reads it can connect at once.
        asyncio.run(server.run(lambda: _print_environment(server, os.getpid())))
        return 0
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon: its own session, no terminal, tells the parent once it listens
        os.close(read_end)
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        status = 1
        try:
            asyncio.run(server.run(lambda: os.write(write_end, b"ok\n")))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        if ready.readline() != b"ok\n":
            print("park-agent: the agent failed to start", file=sys.stderr)
            return 1
    _print_environment(server, pid)
    return 0


def _new_passphrase(prompt: str) -> str:
    """Ask once through $PARK_ASKPASS, twice on a terminal, where a typo would go unseen."""
    first = read_passphrase(prompt)
    if first and not os.environ.get("PARK_ASKPASS") and read_passphrase("Same passphrase again: ") != first:
        raise AskpassError("the passphrases differ")
    return first


def _seconds(text: str) -> int:
    value = int(text)
    if not 0 < value < 2**32:
        raise argparse.ArgumentTypeError("a positive number of seconds")
    return value


def _keygen(args: argparse.Namespace) -> int:
    store = KeyStore(default_key_dir())
    key, where = store.create(store=args.store, comment=args.comment,
                              passphrase=lambda: _new_passphrase("Passphrase for the new key file: "))
    print(f"Key stored in {where}; public key in {store.public_path}:", file=sys.stderr)
    print(store.public_line())
    try:
        AgentClient.from_env().add(key.private_bytes_raw(), comment=args.comment)
        print("Key added to the running agent.", file=sys.stderr)
    except NoAgentError:
        print("No agent running; load the key later with: park-agent add", file=sys.stderr)
    return 0


def _add(args: argparse.Namespace) -> int:
    client = AgentClient.from_env()
    store = KeyStore(default_key_dir())
    key = store.load(read_passphrase)
    kid = client.add(key.private_bytes_raw(), comment=store.comment(), lifetime=args.lifetime, confirm=args.confirm)
    print(f"Identity added: {kid} ({store.comment()})", file=sys.stderr)
    return 0


def _list() -> int:
    keys, locked = AgentClient.from_env().list()
    if locked:
        print("The agent is locked.", file=sys.stderr)
        return 1
    if not keys:
        print("The agent has no keys.", file=sys.stderr)
        return 1
    now = time.time()
    for k in keys:
        left = f"{max(0, int(k.expires - now))}s" if k.expires else "forever"
        print(f"{k.key_id} {k.comment or '-'} {left}{' confirm' if k.confirm else ''}")
    return 0


def _lock() -> int:
    AgentClient.from_env().lock(_new_passphrase("Lock passphrase: "))
    print("Agent locked.", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "keygen":
        return _keygen(args)
    if command == "add":
        return _add(args)
    if command == "list":
        return _list()
    if command == "pubkey":
        print(KeyStore(default_key_dir()).public_line())
        return 0
    if command == "lock":
        return _lock()
    client = AgentClient.from_env()
    if command == "remove":
        client.remove(args.key_id)
    elif command == "unlock":
        client.unlock(read_passphrase("Unlock passphrase: "))
    elif command == "stop":
        client.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        return _start(args.foreground, args.debug)
    try:
        return _run(args)
    except NoAgentError as e:
        print(f"park-agent: {e}", file=sys.stderr)
        return NO_AGENT
    except (AgentError, KeyStoreError, KeyFileError, AskpassError) as e:
        print(f"park-agent: {e}", file=sys.stderr)
        return 1
