"""Assemble and run a broker: store, executor, job lifecycle, gRPC server.

`serve` returns when the broker is asked to stop (SIGTERM, SIGINT) or when the
store refuses a commit; in both cases it stops accepting calls, gives running
calls a grace period, stops the workers and closes the store. Running jobs are
not waited for: recovery re-runs them on the next start.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1.health import aio as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from park._proto import jobs_pb2 as jpb
from park._proto import federation_pb2_grpc, files_pb2_grpc, jobs_pb2_grpc, packages_pb2_grpc, site_pb2, site_pb2_grpc
from park.wire import ORDERED_BATCHES
from park_broker.transfer.tuning import tune_allocator
from park_broker.core.events import EventHub
from park_broker.core.lifecycle import Lifecycle
from park_broker.ops.metrics import Metrics
from park_broker.ops.reflection import broker_services, enable_reflection
from park_broker.core.fairness import NO_LIMITS
from park_broker.execution.accounts import AccountError, Accounts
from park_broker.execution.accounts import choose as accounts_for
from park_broker.execution.choice import executor_kind, make_executor
from park_broker.auth.policy import Gate, PolicyInterceptor, local_identity
from park_broker.packages.store import PackageStore
from park_broker.federation.links import PeerLinks
from park_broker.federation.publisher import Publisher
from park_broker.federation.peers import PeerTable
from park_broker.federation.peers import follow as follow_peers
from park_broker.servicers.federation import FederationServicer
from park_broker.servicers.files import FilesServicer
from park_broker.servicers.jobs import JobsServicer
from park_broker.servicers.packages import PackagesServicer
from park_broker.servicers.site import SiteServicer
from park_broker.site import Resources, SiteConfig, SiteError, SiteInfo, lock_site, protect_state
from park_broker.core.store import Store
from park_broker.auth.users import Authority

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 * 1024 * 1024
# Both sides of every channel use these, so idle Watch and federation streams
# survive middleboxes and neither side is told too_many_pings.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(kw_only=True)
class ServeOptions:
    listen: str | None = None
    peer_listen: str | None = None   # mutual-TLS port for peer brokers; default: the next port
    workers: int | None = None
    python_path: list[str] = field(default_factory=list)
    grace: float = 5.0
    job_nice: int = 10           # the nice value of local jobs (execution.local)
    local_only: bool = False     # no tokens: loopback only, every caller is the broker's user
    package_index: str | None = None   # a wheelhouse directory or index URL for implicit installs
    metrics_listen: str | None = None  # HOST:PORT (a bare PORT: loopback) for Prometheus' GET /metrics
    executor: str = "local"      # "local" or "dask://HOST:PORT" (park_broker.execution.choice)
    default_unix_user: str = ""  # the account of users without one (execution.accounts)
    max_delegation: int = 7 * 24 * 3600   # seconds: the longest delegated token accepted (tokens.narrow ones)
    max_walltime: float = 0.0    # seconds an attempt may run at most; 0: no limit
    resources: Resources | None = None   # what the site has for jobs; None: what the machine has


def make_gate(site: SiteConfig, options: ServeOptions, peers: PeerTable) -> Gate:
    if options.local_only:
        check_loopback(options.listen or site.listen)
        if peers.peers:
            raise SiteError("a --local-only broker has no users to delegate tokens, so it cannot have peers")
        return Gate(None, local_identity())
    authority = Authority(site.name, site.directory, site.audience, options.max_delegation)
    if not authority.has_users():
        raise SiteError(f"site {site.name} has no users, so nobody could call it; add one with "
                        f"`park-broker users add {site.directory} NAME --key \"$(park-agent pubkey)\" --allow submit`, "
                        "or serve your own user on loopback with --local-only")
    return Gate(authority, peers=peers)


def choose_accounts(site: SiteConfig, options: ServeOptions, gate: Gate) -> Accounts:
    """Who jobs run as (execution.accounts); SiteError if this broker cannot honour its users file."""
    if gate.authority is not None:
        mapping, users = gate.authority.unix_user, gate.authority.names()
    else:
        assert gate.local is not None
        mapping, users = (lambda user: ""), [gate.local.user]
    try:
        return accounts_for(executor_kind(options.executor) == "local", mapping, users, options.default_unix_user)
    except AccountError as exc:
        raise SiteError(f"site {site.name} cannot serve: {exc}") from None


def check_loopback(listen: str) -> None:
    """Without authentication a broker must not be reachable from other hosts."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SiteError(f"refusing to listen on {listen}: with --local-only (no authentication) a broker listens "
                    "on loopback only (127.0.0.1, ::1 or localhost)")


async def serve(site: SiteConfig, options: ServeOptions, stop: asyncio.Event | None = None) -> int:
    """Serve the site until asked to stop; SiteError if it cannot (another broker serves it, a port is taken)."""
    lock = lock_site(site.directory)
    try:
        return await _serve(site, options, stop)
    finally:
        os.close(lock)


async def _serve(site: SiteConfig, options: ServeOptions, stop: asyncio.Event | None) -> int:
    listen = options.listen or site.listen
    peers = PeerTable.load(site.directory)
    gate = make_gate(site, options, peers)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tune_allocator()   # ~1 MiB transfer buffers would otherwise fault in page by page
    hub = EventHub()
    store = Store(site.db_path, on_commit=hub.publish)
    store.open()
    accounts = choose_accounts(site, options, gate)
    protect_state(site, shared=accounts.switching)
    log.info("site %s: %s", site.name, accounts.description)
    executor = make_executor(options.executor, state=site.directory, workers=options.workers, python_path=options.python_path,
                             grace=options.grace, nice=options.job_nice, warm=not accounts.switching)
    info = SiteInfo(site.name, site.files_root, cert_path=str(site.cert_path), max_walltime=options.max_walltime)
    if options.resources is not None:
        info.resources = options.resources
    packages = PackageStore(site.directory / "packages", options.package_index)
    core = Lifecycle(info, store, executor, hub, packages, frozenset(peers.peers), accounts,
                     gate.authority.limits if gate.authority is not None else (lambda owner: NO_LIMITS))
    tls_key, certificate = site.tls_key(), site.certificate()
    links: PeerLinks | None = None
    if gate.authority is not None:   # a site with users may federate; peers come and go while it runs
        links = PeerLinks(peers.peers, tls_key, certificate,
                          [("grpc.max_receive_message_length", MAX_MESSAGE), *KEEPALIVE], core.remote.on_resolved)
    hub.head = await store.head_seq()
    metrics = Metrics(store=store, hub=hub, federation=links, site=site.name)
    if links is not None:
        core.connect_peers(links, links.channel, metrics.transfer_meter)
    if options.metrics_listen:
        await metrics.start(options.metrics_listen)

    server = grpc.aio.server(
        interceptors=[PolicyInterceptor(gate)],
        # No SO_REUSEPORT: a second broker on a port in use must fail, not share the port's callers.
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.so_reuseport", 0), *KEEPALIVE])
    jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(core), server)
    packages_pb2_grpc.add_PackagesServicer_to_server(
        PackagesServicer(core.installs, packages, site.directory / "packages" / ".uploads", packages.limits.max_wheel_bytes), server)
    identity = site.identity_key().public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)
    site_info = site_pb2.InfoResponse(
        site=site.name, files_root=str(site.files_root), identity_public_key=identity,
        certificate_pem=site.certificate().decode(), executor=executor_kind(options.executor), isolation=accounts.description,
        max_delegation_seconds=options.max_delegation, resources=jpb.Resources(
            cpus=info.resources.cpus, memory_bytes=info.resources.memory, gpus=info.resources.gpus),
        capabilities=["jobs", "watch", "report", "race", "tokens", "memo", "packages", "federation", "files",
                      ORDERED_BATCHES])
    publisher = None if gate.authority is None else \
        Publisher(site.name, gate.authority, hub, core.remote.atom_states, core.remote.resolved_by)
    site_pb2_grpc.add_SiteServicer_to_server(SiteServicer(site_info, links, publisher), server)
    files_pb2_grpc.add_FilesServicer_to_server(FilesServicer(site.files_root, store, core.dispatch.running_dir), server)
    if publisher is not None:
        federation_pb2_grpc.add_FederationServicer_to_server(FederationServicer(publisher), server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server, broker_services(federation=gate.authority is not None))
    # Clients authenticate with tokens and need no certificate. Peers use a port of their own where a
    # pinned client certificate is required (gRPC cannot ask for an optional one), as etcd separates them.
    port = _bind(server, listen, grpc.ssl_server_credentials([(tls_key, certificate)]), "clients")
    # Bound before recovery, so re-run jobs know where to report; served only after it.
    host = listen.rpartition(":")[0]
    address = info.address = f"{host}:{port}"
    peer_address = ""
    if links is not None:
        peer_listen = options.peer_listen or f"{host}:{port + 1 if options.listen != f'{host}:0' else 0}"
        peer_port = _bind(server, peer_listen, peers.server_credentials(tls_key, certificate), "peers")
        peer_address = f"{peer_listen.rpartition(':')[0]}:{peer_port}"
    await core.start()
    await server.start()
    for service in ("", "park.v1.Jobs", "park.v1.Site", "park.v1.Packages", "park.v1.Federation",
                    "park.v1.Files"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    _write_serve_file(site.directory, address, peer_address)
    log.info("site %s serving clients on %s, peers on %s", site.name, address, peer_address or "-")
    print(f"park-broker: site {site.name} serving on {address}" +
          (f", peers on {peer_address}" if peer_address else ""), flush=True)

    failed = asyncio.create_task(core.failed.wait())
    stopping = asyncio.create_task(stop.wait())
    background = [failed, stopping]
    if links is not None:
        def peers_changed(table: PeerTable = peers, federation: PeerLinks = links) -> None:
            federation.update(table.peers)
            core.admission.peers = frozenset(table.peers)

        reread = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, reread.set)
        background.append(asyncio.create_task(follow_peers(site.directory, peers, peers_changed, reread)))
    await asyncio.wait([failed, stopping], return_when=asyncio.FIRST_COMPLETED)
    for task in background:
        task.cancel()
    why = "the store refused a commit" if core.failed.is_set() else "asked to stop"
    log.info("site %s stopping (%s): calls get %.1f s to finish; running jobs run again at the next start",
             site.name, why, options.grace)
    await health.enter_graceful_shutdown()
    await server.stop(grace=options.grace)
    await metrics.close()
    if links is not None:
        await links.close()
    await executor.close()
    store.close()
    (site.directory / "serve.json").unlink(missing_ok=True)
    log.info("site %s stopped", site.name)
    return 1 if core.failed.is_set() else 0


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, what: str) -> int:
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise SiteError(f"cannot listen for {what} on {address}: address already in use (another broker "
                        "or program holds it), or not an address of this host; choose another with --listen "
                        "or --peer-listen")
    return port


def _write_serve_file(directory: Path, address: str, peer_address: str) -> None:
    """Tell local tools (and tests that listen on port 0) where the broker is."""
    tmp = directory / "serve.json.tmp"
    tmp.write_text(json.dumps({"address": address, "peer_address": peer_address, "pid": os.getpid()}))
    tmp.replace(directory / "serve.json")
