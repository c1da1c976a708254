"""Keys at rest: files only their owner can read, no keyring that silently stores nothing."""
from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from park.signer import KeyFileError, LocalSigner, read_private_key, write_private_key
from agent_harness import askpass, cli_env, run_cli

pytestmark = pytest.mark.timeout(30)

NULL_KEYRING = "keyring.backends.null.Keyring"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "robot.pem"
    write_private_key(path, Ed25519PrivateKey.generate(), None)
    return path


def test_key_file_readable_by_group_refused(key_file):
    key_file.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"accessible by group or others \(mode 0640\); run: chmod 600"):
        read_private_key(key_file, None)


def test_key_file_readable_by_world_refused(key_file, monkeypatch):
    key_file.chmod(0o604)
    monkeypatch.setenv("PARK_KEY_FILE", str(key_file))
    with pytest.raises(KeyFileError, match=r"accessible by group or others \(mode 0604\)"):
        LocalSigner.from_env()


def test_key_file_owned_by_someone_else_refused(key_file):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    os.chown(key_file, 65534, 65534)
    with pytest.raises(KeyFileError, match="is owned by uid 65534, not by you"):
        read_private_key(key_file, None)


def test_agent_add_refuses_key_file_with_group_bits(tmp_path, agent_process):
    agent = agent_process(PARK_ASKPASS=askpass(tmp_path, "pass", "echo correct-horse"))
    assert run_cli("keygen", "--store", "file", env=agent.env).returncode == 0
    agent.client.remove()
    (tmp_path / "keys" / "id_ed25519").chmod(0o660)
    result = run_cli("add", env=agent.env)
    assert result.returncode == 1
    assert "accessible by group or others (mode 0660)" in result.stderr
    assert agent.client.list() == ((), False)


def test_keygen_file_is_0600_in_a_0700_directory(tmp_path):
    env = cli_env(tmp_path, PARK_ASKPASS=askpass(tmp_path, "pass", "echo correct-horse"))
    assert run_cli("keygen", "--store", "file", env=env).returncode == 0
    assert stat.S_IMODE((tmp_path / "keys" / "id_ed25519").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_keygen_refuses_empty_passphrase_for_a_file(tmp_path):
    env = cli_env(tmp_path, PARK_ASKPASS=askpass(tmp_path, "empty", "echo"))
    result = run_cli("keygen", "--store", "file", env=env)
    assert result.returncode == 1
    assert "an empty passphrase would leave the key file unprotected" in result.stderr
    assert not (tmp_path / "keys" / "id_ed25519").exists()


def test_null_keyring_backend_refused(tmp_path):
    env = cli_env(tmp_path, PYTHON_KEYRING_BACKEND=NULL_KEYRING)
    result = run_cli("keygen", "--store", "keyring", env=env)
    assert result.returncode == 1
    assert f"keyring backend {NULL_KEYRING} stores nothing; use --store file" in result.stderr
    assert not (tmp_path / "keys" / "id_ed25519.pub").exists()


def test_null_keyring_backend_falls_back_to_encrypted_file(tmp_path):
    env = cli_env(tmp_path, PYTHON_KEYRING_BACKEND=NULL_KEYRING,
                  PARK_ASKPASS=askpass(tmp_path, "pass", "echo correct-horse"))
    result = run_cli("keygen", env=env)
    assert result.returncode == 0, result.stderr
    assert f"Key stored in encrypted file {tmp_path}/keys/id_ed25519 (keyring backend {NULL_KEYRING} stores nothing)" \
        in result.stderr
    pem = (tmp_path / "keys" / "id_ed25519").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(KeyFileError, match="is encrypted: a passphrase is needed"):
        read_private_key(tmp_path / "keys" / "id_ed25519", None)
