"""Renewing the delegated tokens your active jobs hold (`park.renew`, `park renew`).

A site caps how long a delegated token may live (`Site.Info.max_delegation_seconds`);
a fetch or a remote condition can wait longer than that. The broker holding
such a job lists its credentials by their claims (`Jobs.Credentials`), never
their bytes; this asks your agent (or `PARK_KEY_FILE`) for like tokens, the
same audience, scopes, confirm key and lifetime, and hands them over
(`Jobs.Renew`). A job whose token already expired waits, saying so, until then.
`park.renew` is the script's way; `renew_at` does the work for one broker.
Every `with service:` renews, in the background, what expires within
`AUTO_WITHIN`; run `park renew` from cron for jobs that wait for days.
"""
from __future__ import annotations

import logging

from park._proto import jobs_pb2 as jpb
from park.connection import Connection
from park.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_WITHIN = 24 * 3600   # what `park renew` replaces: tokens that expire within a day
AUTO_WITHIN = 600            # what every session replaces on its own


def renew_at(service: Connection, within: float = DEFAULT_WITHIN) -> list[jpb.Credential]:
    """Replace the delegated tokens of your active jobs at `service` that expire within `within` seconds
    (or already have) with fresh ones; returns those it replaced."""
    source = service.tokens.source
    if source is None:
        raise ConfigError("renewing credentials needs your keys: start park-agent (PARK_AUTH_SOCK) or set "
                          "PARK_KEY_FILE")
    held = service.call(service.jobs_stub.Credentials, jpb.CredentialsRequest(within_seconds=int(within)),
                        "listing the credentials your jobs hold")
    renewed = []
    for credential in held.credentials:
        issued = source.delegate(credential.audience, scopes=list(credential.scopes), confirm=credential.confirm,
                                 lifetime=int(credential.lifetime_seconds))
        service.call(service.jobs_stub.Renew, jpb.RenewRequest(job_id=credential.job_id, use=credential.use,
                                                               site=credential.site, token=issued.token),
                     f"renewing the {credential.use} credential of job {credential.job_id}")
        renewed.append(credential)
    return renewed


def renew_quietly(service: Connection) -> None:
    """What a session does on its own: renew what is about to expire, and never fail the script for it."""
    try:
        if service.tokens.source is not None:
            renew_at(service, AUTO_WITHIN)
    except Exception as exc:  # noqa: BLE001 - an old broker, a closed channel: `park renew` says more
        log.debug("automatic renewal at %s skipped: %s", service, exc)
