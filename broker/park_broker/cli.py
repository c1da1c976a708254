"""`park-broker`: create a site directory and serve it.

    park-broker init DIR --site NAME [--listen HOST:PORT]
    park-broker [--log-level LEVEL] [--log-format text|json] serve DIR [--listen HOST:PORT] [--workers N]
        [--python-path DIR ...] [--local-only] [--metrics-listen HOST:PORT] [--default-unix-user ACCOUNT]
        [--max-delegation SECONDS] [--max-walltime SECONDS]
    park-broker users add DIR USER --key PUBKEY [--allow submit,upload,admin] [--unix-user ACCOUNT]
    park-broker users set DIR USER [--allow ...] [--unix-user ACCOUNT] [--max-running N] [--max-waiting M]
    park-broker users list DIR
    park-broker users remove DIR USER
    park-broker tokens revoke DIR LINK_ID
    park-broker peers list DIR
    park-broker peers remove DIR NAME
    park-broker peers add DIR NAME --address HOST:PORT --cert FILE

Exit status: 0 on a clean stop, 1 when the broker stopped on an error, 2 for
bad usage or an unusable site directory.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from pathlib import Path

from park import tokens
from park_broker.execution.choice import executor_spec
from park_broker.ops import logs
from park_broker.federation.peers import PeerTable, add_peer, remove_peer
from park_broker.server import ServeOptions, serve
from park.wire import parse_size
from park_broker.site import DEFAULT_LISTEN, Resources, SiteError, init_site, load_site, physical_memory
from park_broker.auth.users import ALLOWED, UsersError, add_user, load_users, remove_user, revoke, set_user


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="park-broker", description="Park site broker")
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a site directory: keys, certificate, configuration")
    init.add_argument("directory", type=Path)
    init.add_argument("--site", required=True, help="the site's name, as in park://NAME/...")
    init.add_argument("--listen", default=DEFAULT_LISTEN, help=f"default address to serve on ({DEFAULT_LISTEN})")
    srv = sub.add_parser("serve", help="run the broker for a site directory")
    srv.add_argument("directory", type=Path)
    logs.add_arguments(srv, suppress=True)
    srv.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics on http://HOST:PORT/metrics (a bare PORT: on loopback)")
    srv.add_argument("--listen", help="HOST:PORT to serve on (port 0 picks a free one); default from site.toml")
    srv.add_argument("--peer-listen", help="HOST:PORT for peer brokers (mutual TLS); default: the next port")
    srv.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    srv.add_argument("--python-path", action="append", default=[], metavar="DIR",
                     help="directory added to the workers' import path (repeatable)")
    srv.add_argument("--executor", default="local", type=executor_spec, metavar="local|dask://HOST:PORT",
                     help="where jobs run: local worker processes (default) or a Dask scheduler")
    srv.add_argument("--job-nice", type=int, default=10, choices=range(0, 20), metavar="0..19",
                     help="the nice value local jobs run at (default 10), so the broker stays responsive when jobs "
                          "use every core; 0: the broker's own priority")
    srv.add_argument("--grace", type=float, default=5.0,
                     help="seconds between SIGTERM and SIGKILL for a cancelled job, and for shutdown")
    srv.add_argument("--package-index", metavar="DIR_OR_URL",
                     help="wheelhouse directory or package index for implicit installs of requires=")
    srv.add_argument("--cpus", type=float, metavar="N", help="cpus the site has for jobs (default: this machine's)")
    srv.add_argument("--memory", metavar="SIZE", help="memory the site has for jobs, e.g. 64GiB (default: this "
                                                       "machine's)")
    srv.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs the site has for jobs (default 0)")
    srv.add_argument("--max-walltime", type=float, default=0.0, metavar="SECONDS",
                     help="the longest an attempt may run (jobs asking for more are refused; 0: no limit)")
    srv.add_argument("--max-delegation", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                     help="the longest-lived delegated token (scoped to one job or file) this site accepts "
                          "(default 7 days; clients renew waiting jobs' tokens with `park renew`)")
    srv.add_argument("--default-unix-user", default="", metavar="ACCOUNT",
                     help="the unprivileged account jobs of users without a Unix account run as (a broker "
                          "running as root never runs jobs as root)")
    srv.add_argument("--local-only", action="store_true",
                     help="no tokens: serve on loopback only, every caller is this user (for a laptop)")
    users = sub.add_parser("users", help="who may use the site").add_subparsers(dest="action", required=True)
    add = users.add_parser("add", help="register a user's public key (or another key of theirs)")
    add.add_argument("directory", type=Path)
    add.add_argument("user")
    add.add_argument("--key", required=True, help="the line `park-agent pubkey` prints (ed25519:...)")
    add.add_argument("--allow", default="submit", help=f"comma-separated, from {','.join(ALLOWED)} (default submit)")
    add.add_argument("--unix-user", metavar="ACCOUNT",
                     help="the Unix account the user's jobs run as (default: the account of the same name, if any)")
    chg = users.add_parser("set", help="change what a user may do, or the Unix account their jobs run as")
    chg.add_argument("directory", type=Path)
    chg.add_argument("user")
    chg.add_argument("--allow", help=f"comma-separated, from {','.join(ALLOWED)}")
    chg.add_argument("--unix-user", metavar="ACCOUNT", help="the Unix account their jobs run as ('' for none)")
    chg.add_argument("--max-running", type=int, metavar="N", help="at most N of their jobs run at once (0: no limit)")
    chg.add_argument("--max-waiting", type=int, metavar="M",
                     help="at most M of their jobs wait or queue; more are refused at submission (0: no limit)")
    lst = users.add_parser("list", help="show registered users")
    lst.add_argument("directory", type=Path)
    rm = users.add_parser("remove", help="forget a user (their calls and open streams are refused at once)")
    rm.add_argument("directory", type=Path)
    rm.add_argument("user")
    revoke_cmd = sub.add_parser("tokens", help="token revocation").add_subparsers(dest="action", required=True)
    rev = revoke_cmd.add_parser("revoke", help="refuse every token chain containing a link")
    rev.add_argument("directory", type=Path)
    rev.add_argument("link_id", help="the link's sha256 (64 hex characters)")
    peers = sub.add_parser("peers", help="the sites this one federates with").add_subparsers(dest="action",
                                                                                           required=True)
    padd = peers.add_parser("add", help="pin a peer site's certificate (a running broker takes it up at once)")
    padd.add_argument("directory", type=Path)
    padd.add_argument("name")
    padd.add_argument("--address", required=True, help="HOST:PORT of the peer broker's peer port")
    padd.add_argument("--cert", required=True, type=Path, help="the peer's tls.crt")
    plist = peers.add_parser("list", help="show the pinned peers")
    plist.add_argument("directory", type=Path)
    prm = peers.add_parser("remove", help="forget a peer (a running broker takes it up at once)")
    prm.add_argument("directory", type=Path)
    prm.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "init":
            site = init_site(args.directory, args.site, args.listen)
            print(f"site {site.name} created in {site.directory}\n"
                  f"  start it:    park-broker serve {site.directory}\n"
                  f"  certificate: {site.cert_path}\n"
                  f"  clients:     park services add {site.name} --address {site.listen} --cert {site.cert_path}")
            return 0
        site = load_site(args.directory)
        if args.command == "users" and args.action == "add":
            add_user(site.directory, args.user, args.key, _permissions(args.allow), args.unix_user)
            print(f"user {args.user} may now {args.allow} at site {site.name}")
            return 0
        if args.command == "users" and args.action == "set":
            set_user(site.directory, args.user, None if args.allow is None else _permissions(args.allow),
                     args.unix_user, args.max_running, args.max_waiting)
            print(f"user {args.user} of site {site.name} changed")
            return 0
        if args.command == "users" and args.action == "remove":
            remove_user(site.directory, args.user)
            print(f"user {args.user} may no longer use site {site.name}")
            return 0
        if args.command == "users":
            for name, user in sorted(load_users(site.directory / "users.toml").items()):
                print(f"{name}\tallow={','.join(sorted(user.allow)) or '-'}\tkeys={len(user.keys)}"
                      f"\tunix_user={user.unix_user or '-'}\tmax_running={user.limits.max_running or '-'}"
                      f"\tmax_waiting={user.limits.max_waiting or '-'}")
            return 0
        if args.command == "peers" and args.action == "list":
            for peer in sorted(PeerTable.load(site.directory).peers.values(), key=lambda p: p.name):
                print(f"{peer.name}\t{peer.address}\tidentity={peer.key_id[:16]}")
            return 0
        if args.command == "peers" and args.action == "remove":
            remove_peer(site.directory, args.name)
            print(f"site {site.name} no longer knows peer {args.name} (a running broker drops it within a second)")
            return 0
        if args.command == "peers":
            peer = add_peer(site.directory, args.name, args.address, args.cert)
            print(f"site {site.name} now knows peer {peer.name} at {peer.address} (a running broker uses it within a "
                  "second)")
            return 0
        if args.command == "tokens":
            revoke(site.directory, args.link_id)
            print(f"revoked {args.link_id}; brokers of site {site.name} refuse it within a second")
            return 0
        if args.workers is not None and args.workers < 1:
            raise SiteError("--workers must be at least 1")
        if not (math.isfinite(args.max_walltime) and args.max_walltime >= 0):
            raise SiteError("--max-walltime must be a number of seconds, 0 (no limit) or more")
        if not 0 < args.max_delegation <= tokens.MAX_NARROW_LIFETIME:
            raise SiteError(f"--max-delegation must be between 1 and {tokens.MAX_NARROW_LIFETIME} seconds")
        options = ServeOptions(listen=args.listen, peer_listen=args.peer_listen, workers=args.workers, grace=args.grace,
                               job_nice=args.job_nice, local_only=args.local_only,
                               package_index=args.package_index, executor=args.executor,
                               metrics_listen=args.metrics_listen, default_unix_user=args.default_unix_user,
                               max_delegation=args.max_delegation, max_walltime=args.max_walltime,
                               resources=_resources(args),
                               python_path=[str(Path(p).resolve()) for p in args.python_path])
        return asyncio.run(serve(site, options))
    except (SiteError, UsersError) as exc:
        print(f"park-broker: {exc}", file=sys.stderr)
        return 2


def _resources(args: argparse.Namespace) -> Resources:
    cpus = float(os.cpu_count() or 1) if args.cpus is None else args.cpus
    try:
        memory = physical_memory() if args.memory is None else parse_size(args.memory)
    except ValueError as exc:
        raise SiteError(f"--memory: {exc}") from None
    if not (math.isfinite(cpus) and cpus > 0) or args.gpus < 0:
        raise SiteError("--cpus must be more than 0 and --gpus 0 or more")
    return Resources(cpus, memory, args.gpus)


def _permissions(text: str) -> list[str]:
    return [a for a in text.split(",") if a]


if __name__ == "__main__":
    sys.exit(main())
