"""A throwaway `sshd` on a loopback port, and `scp` through it: the peer bench/transfer.py measures against.

`LoopbackSshd` makes a host key, a user key, an authorized_keys file and an
sshd config in a directory of its own, starts `/usr/sbin/sshd -D -f CONFIG` on
a free port of 127.0.0.1, and stops it on exit. Nothing outside that directory
is read or changed, except that sshd, when started as root, insists on its
privilege-separation directory `/run/sshd`, which the package's service unit
would create; it is created (empty, mode 0755) if missing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def missing() -> str | None:
    """Why no sshd can be started here, or None."""
    if not SSHD.exists():
        return f"{SSHD} is not installed (Debian: apt-get install openssh-server)"
    if shutil.which("scp") is None or shutil.which("ssh-keygen") is None:
        return "scp or ssh-keygen is not installed (Debian: apt-get install openssh-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackSshd:
    directory: Path
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __enter__(self) -> LoopbackSshd:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        shutil.copy(d / "user.pub", d / "authorized_keys")
        self.port = _free_port()
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            f"PidFile {d / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                                         stderr=open(d / "sshd.log", "wb"))
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def scp(self, src: Path, dst: Path) -> None:
        """Copy src to dst through this sshd, with scp's defaults (SFTP protocol, default cipher)."""
        subprocess.run(["scp", "-q", "-i", str(self.directory / "user"), "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-P", str(self.port),
                        str(src), f"127.0.0.1:{dst}"], check=True)
