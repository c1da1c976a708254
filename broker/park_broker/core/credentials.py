"""The delegated tokens active jobs wait with, and their renewal (`park renew`).

A fetch job holds a token for the site it reads from (`JobSpec.fetch.token`);
a job whose condition names another site's jobs holds a grant for that site
(`JobSpec.grants`). Both expire: the site they are for caps their lifetime
(`serve --max-delegation`), and a job can wait longer than that in a queue.
`held` lists a user's, by their claims and never their bytes; `renew` puts a
fresh token of the same audience, scopes and confirm key in place, durably and
with a `Renewed` event, and the job goes on: a fetch that was held back starts,
a remote condition is asked for again with the new grant.

A job is never failed or cancelled because a credential expired: it waits,
with `attention` saying what it needs and a `NeedsCredentials` event, until
its owner renews it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from park import tokens
from park._proto import jobs_pb2 as jpb
from park.conditions import AtomKey
from park.wire import TERMINAL_STATES
from park_broker.core.ledger import Batch, Ledger
from park_broker.errors import Code, fail

FETCH, GRANT = "fetch", "grant"
START_MARGIN = 1.0   # seconds: a fetch whose token expires sooner than this is not started with it


def _held(spec: jpb.JobSpec) -> list[tuple[str, str, str]]:
    """(use, site, token) of every delegated token `spec` holds."""
    found = [(GRANT, site, token) for site, token in sorted(spec.grants.items())]
    if spec.WhichOneof("work") == "fetch":
        found.append((FETCH, spec.fetch.url.removeprefix("park://").partition("/")[0], spec.fetch.token))
    return found


class Credentials:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        # Set by the lifecycle: start a held-back fetch again, and ask a peer for a job's remote atoms anew.
        self.release: Callable[[list[str]], None] = lambda job_ids: None
        self.rewatch: Callable[[jpb.JobSpec, str], None] = lambda spec, site: None
        # The waiting jobs that need an atom (the scheduler's index: set by the lifecycle).
        self.waiting_on: Callable[[AtomKey], set[str]] = lambda key: set()

    def held(self, owner: str, within: float) -> list[jpb.Credential]:
        """The credentials `owner`'s active jobs hold that expire within `within` seconds (0: all)."""
        horizon = time.time() + within if within > 0 else float("inf")
        found = []
        for job in self.ledger.carrying_tokens(owner):
            if job.state in TERMINAL_STATES:
                continue
            for use, site, token in _held(job.spec):
                try:
                    claims = tokens.claims_of(token)
                except tokens.TokenError:
                    continue
                if claims.expires <= horizon:
                    found.append(jpb.Credential(job_id=job.id, use=use, site=site, audience=claims.audience,
                                                scopes=list(claims.scopes), confirm=claims.confirm,
                                                expires=claims.expires,
                                                lifetime_seconds=claims.expires - claims.not_before - tokens.BACKDATE))
        return found

    async def renew(self, owner: str, request: jpb.RenewRequest) -> jpb.Job:
        """Replace a credential of an active job of `owner`'s with `request.token`; returns a copy of its record."""
        job = self.ledger.record(request.job_id)
        if job is None or job.owner != owner or job.state in TERMINAL_STATES:
            fail(Code.NOT_FOUND, f"you have no active job {request.job_id[:40]} here")
        old = next((t for use, site, t in _held(job.spec) if (use, site) == (request.use, request.site)), None)
        if old is None:
            fail(Code.NOT_FOUND, f"job {job.id} holds no {request.use[:20]} credential for site {request.site[:70]}")
        new = _check_like(old, request.token, owner)
        if request.use == FETCH:
            job.spec.fetch.token = request.token
        else:
            job.spec.grants[request.site] = request.token
        job.attention = ""
        batch = Batch([self.ledger.change(job, jpb.Event(renewed=jpb.Renewed(
            site=request.site, use=request.use, expires=new.expires)))])
        await self.ledger.commit(batch)
        if request.use == FETCH and job.state == jpb.JOB_STATE_QUEUED:
            self.release([job.id])
        elif request.use == GRANT and job.state == jpb.JOB_STATE_WAITING:
            self.rewatch(job.spec, request.site)
        return jpb.Job.FromString(job.SerializeToString())   # a copy: the answer is blanked, the record not

    def needs(self, job_id: str, site: str, why: str) -> None:
        """Say, once, that active job `job_id` waits for its owner to renew its credential for `site`."""
        seen = self.ledger.peek(job_id)
        if seen is None or seen.attention.startswith(f"needs fresh credentials for {site} "):
            return
        job = self.ledger.record(job_id)   # only now: a waiting job's record is kept serialized until it changes
        assert job is not None, job_id
        job.attention = f"needs fresh credentials for {site} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: " \
                        "run `park renew`"
        self.ledger.commit_soon(Batch([self.ledger.change(job, jpb.Event(
            needs_credentials=jpb.NeedsCredentials(site=site, message=why)))]))

    def fetch_may_start(self, job: jpb.Job) -> bool:
        """Whether a queued fetch's token is good for long enough to start; if not, the job says so."""
        try:
            expires = tokens.claims_of(job.spec.fetch.token).expires
        except tokens.TokenError:
            return True   # the source site will say what is wrong with it
        if expires - time.time() >= START_MARGIN:
            return True
        [(_, site, _)] = [h for h in _held(job.spec) if h[0] == FETCH]
        self.needs(job.id, site, "the fetch's token expired before the fetch could start")
        return False

    def grant_expired(self, key: AtomKey, why: str) -> None:
        """A peer refused remote atom `key` because the grant it was asked with expired."""
        for job_id in sorted(self.waiting_on(key)):   # a job waits on a remote atom with a grant for its site
            self.needs(job_id, key.site, why)


def _check_like(old: str, new: str, owner: str) -> jpb.Claims:
    """The new token's claims, if it can stand in for `old`: the same audience, scopes and confirm key,
    speaking for `owner`, a later expiry, and a well-formed chain; INVALID_ARGUMENT otherwise. Its
    root signature is the site it is for to judge, which holds the owner's keys."""
    was = tokens.claims_of(old)
    try:
        token = tokens.decode(new)
        root = token.links[0] if token.links else None
        verified = tokens.verify(token, audience=was.audience, presenter_key_id=was.confirm or None,
                                 trusted_root_keys=lambda subject: [root.signer_key] if root is not None else [])
    except tokens.TokenError as exc:
        fail(Code.INVALID_ARGUMENT, f"the new token is not a valid delegated token for {was.audience}: {exc.message}")
    now = tokens.claims_of(token)
    if verified.subject != owner:
        fail(Code.PERMISSION_DENIED, f"the new token speaks for {verified.subject!r}, not for you ({owner!r})")
    if (list(now.scopes), now.confirm) != (list(was.scopes), was.confirm):
        fail(Code.INVALID_ARGUMENT, "the new token must have the same scopes and confirm key as the one it replaces")
    if now.expires <= was.expires:
        fail(Code.INVALID_ARGUMENT, "the new token must expire later than the one it replaces")
    return now
