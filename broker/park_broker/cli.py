"""`park-broker`: create a site directory and serve it.

    park-broker init DIR --site NAME [--listen HOST:PORT]
    park-broker serve DIR [--listen HOST:PORT] [--workers N] [--python-path DIR ...]

Exit status: 0 on a clean stop, 1 when the broker stopped on an error, 2 for
bad usage or an unusable site directory.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from park_broker.server import ServeOptions, serve
from park_broker.site import DEFAULT_LISTEN, SiteError, init_site, load_site


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="park-broker", description="Park site broker")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a site directory: keys, certificate, configuration")
    init.add_argument("directory", type=Path)
    init.add_argument("--site", required=True, help="the site's name, as in park://NAME/...")
    init.add_argument("--listen", default=DEFAULT_LISTEN, help=f"default address to serve on ({DEFAULT_LISTEN})")
    srv = sub.add_parser("serve", help="run the broker for a site directory")
    srv.add_argument("directory", type=Path)
    srv.add_argument("--listen", help="HOST:PORT to serve on (port 0 picks a free one); default from site.toml")
    srv.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    srv.add_argument("--python-path", action="append", default=[], metavar="DIR",
                     help="directory added to the workers' import path (repeatable)")
    srv.add_argument("--executor", default="local", choices=["local"], help="where jobs run")
    srv.add_argument("--grace", type=float, default=5.0,
                     help="seconds between SIGTERM and SIGKILL for a cancelled job, and for shutdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "init":
            site = init_site(args.directory, args.site, args.listen)
            print(f"site {site.name} created in {site.directory}\n"
                  f"  start it:    park-broker serve {site.directory}\n"
                  f"  certificate: {site.cert_path}\n"
                  f"  clients:     park services add {site.name} --address {site.listen} --cert {site.cert_path}")
            return 0
        if args.workers is not None and args.workers < 1:
            raise SiteError("--workers must be at least 1")
        site = load_site(args.directory)
        options = ServeOptions(listen=args.listen, workers=args.workers, grace=args.grace,
                               python_path=[str(Path(p).resolve()) for p in args.python_path])
        return asyncio.run(serve(site, options))
    except SiteError as exc:
        print(f"park-broker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
