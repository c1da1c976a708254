"""A connection to one broker: TLS channel, session tokens, the site's identity, calls.

`Connection` is what a job proxy needs from its service (park.job): one
channel with per-call session tokens, the site's `Info` (and, for operators,
its `Peers`), and `call`, which
turns a gRPC error into `park.ServiceError`. `park.Service` adds the submission
pipeline and the default-service context on top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from park import certificates
from park._proto import jobs_pb2_grpc, packages_pb2_grpc, site_pb2, site_pb2_grpc
from park._proto import packages_pb2 as ppb
from park.auth import SessionTokens, token_source
from park.errors import ConfigError, ServiceError

@dataclass(frozen=True, slots=True)
class PackageInfo:
    name: str
    version: str
    sha256: str
    owner: str = ""      # whose upload it is; "" for one the site has for every user


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class Connection:
    """One broker's channel; see the module docstring."""

    def __init__(self, address: str, cert: str | os.PathLike[str]):
        cert = Path(cert)
        try:
            pem = cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the certificate of {address}: {exc}") from None
        self.address = address
        self.cert = cert
        try:
            self.audience = certificates.audience(pem)   # what our tokens for this site name (park.tokens)
        except certificates.CertificateError as exc:
            raise ConfigError(f"{cert} is not a Park site certificate: {exc}") from None
        # Named by its pinned certificate before it ever answers: errors say which site they are about.
        self.where = f"site {self.audience.partition(':')[0]} at {address}"
        self.tokens = SessionTokens(self.audience, token_source())
        channel_credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=pem), grpc.metadata_call_credentials(self.tokens))
        self._channel = grpc.secure_channel(address, channel_credentials, options=CHANNEL_OPTIONS)
        self.jobs_stub = jobs_pb2_grpc.JobsStub(self._channel)
        self._site_stub = site_pb2_grpc.SiteStub(self._channel)
        self._info: site_pb2.InfoResponse | None = None

    # -- identity of the site ------------------------------------------------------

    @property
    def info(self) -> site_pb2.InfoResponse:
        """What the broker says about itself; fetched once."""
        if self._info is None:
            info = self.call(self._site_stub.Info, site_pb2.InfoRequest(), "connecting", timeout=30)
            self._info = info
        return self._info

    @property
    def site(self) -> str:
        return self.info.site

    def __repr__(self) -> str:
        return f"<park.Service {self.address}>"

    # -- calls -----------------------------------------------------------------------

    def call(self, method, request, doing: str, timeout: float | None = 60):  # type: ignore[no-untyped-def]
        """One unary call with Park's error translation."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self.error(exc, doing) from None

    def error(self, exc: grpc.RpcError, doing: str) -> ServiceError:
        """A failed call to this broker, in words that say which site and what to check."""
        return ServiceError.from_rpc(exc, doing, self.where, str(self.cert))

    def close(self) -> None:
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def peers(self) -> list[site_pb2.PeerLink]:
        """The site's peers and the state of the streams between them (what `park status` shows an
        operator); ServiceError PERMISSION_DENIED unless the caller's token grants `admin`."""
        return list(self.call(self._site_stub.Peers, site_pb2.PeersRequest(), "listing the site's peers").peers)

    def packages(self) -> list[PackageInfo]:
        """What this site has installed, so a script can pin one of those (`requires=[...]`)."""
        reply = self.call(packages_pb2_grpc.PackagesStub(self._channel).List, ppb.ListPackagesRequest(),
                          "listing packages")
        return [PackageInfo(p.name, p.version, p.sha256, p.owner) for p in reply.packages]


def status_name(number: int) -> str:
    """The name of a gRPC status code number (SubmitMany answers per job with numbers)."""
    return next((s.name for s in grpc.StatusCode if s.value[0] == number), "UNKNOWN")
