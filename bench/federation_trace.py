"""`park-broker` with timestamps at the federation's hand-offs, for bench/federation.py.

    python bench/federation_trace.py TRACE.json [park-broker arguments...]

Wraps, without changing them, some functions of the running broker and writes
`[[point, job_id, time.time()], ...]` to TRACE.json when the broker exits:

- committed_<kind>: `EventHub.publish`, called once a transaction is durable,
  for each completed / queued / started event in it;
- sent: `publisher._update`, the publisher building the AtomUpdate it yields
  next for a peer (job id = the resolved job at this site);
- received: `PeerLinks._receive`, the subscriber handed an AtomUpdate by gRPC
  (job id = the job at the peer);
- watch: `PeerLinks.watch`, the subscriber asked for a remote atom (a waiting job arrived);
- asked: `Publisher.check` returned, the publisher read that atom from a Subscribe request and
  accepted its token (from then on it is looked up, then watched or answered).

Each point costs one time.time() and a list append (about a microsecond).
"""
from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

from park_broker import cli
from park_broker.core import events
from park_broker.federation import links, publisher

TRACE: list[tuple[str, str, float]] = []


def _install() -> None:
    publish, update, receive = events.EventHub.publish, publisher._update, links.PeerLinks._receive
    watch, check = links.PeerLinks.watch, publisher.Publisher.check

    def traced_publish(self, changes):  # type: ignore[no-untyped-def]
        now = time.time()
        for change in changes:
            kind = change.event.WhichOneof("kind")
            if kind in ("completed", "queued", "started"):
                TRACE.append((f"committed_{kind}", change.event.job_id, now))
        publish(self, changes)

    def traced_update(key, state, seq):  # type: ignore[no-untyped-def]
        TRACE.append(("sent", key.job_id, time.time()))
        return update(key, state, seq)

    def traced_receive(self, link, response):  # type: ignore[no-untyped-def]
        if response.WhichOneof("item") == "update":
            TRACE.append(("received", response.update.atom.job_id, time.time()))
        return receive(self, link, response)

    def traced_watch(self, key, token):  # type: ignore[no-untyped-def]
        TRACE.append(("watch", key.job_id, time.time()))
        return watch(self, key, token)

    def traced_check(self, item, peer):  # type: ignore[no-untyped-def]
        key, subject = check(self, item, peer)
        TRACE.append(("asked", key.job_id, time.time()))
        return key, subject

    links.PeerLinks.watch = traced_watch  # type: ignore[method-assign]
    publisher.Publisher.check = traced_check  # type: ignore[method-assign]
    events.EventHub.publish = traced_publish  # type: ignore[method-assign]
    publisher._update = traced_update
    links.PeerLinks._receive = traced_receive  # type: ignore[method-assign]


def main() -> int:
    out = sys.argv[1]
    _install()
    atexit.register(lambda: Path(out).write_text(json.dumps(TRACE)))
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
