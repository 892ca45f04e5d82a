"""A Shared GPU kernel that cannot start: one clear error, no traceback, no lease leaked."""

from __future__ import annotations

import logging

import pytest

from gpu_kernel.errors import HostKeyError, SharedGPUError, SSHAuthError
from tests.pool import Pool
from tests.sshd import keygen


def start_fails(pool: Pool, caplog, name: str = "shared-gpu") -> SharedGPUError:
    """Start the kernel, expect our error; check the Jupyter log and that no slot is held."""
    km = pool.kernel_manager(name)
    with caplog.at_level(logging.INFO), pytest.raises(SharedGPUError) as info:
        km.start_kernel()
    assert not km.has_kernel
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert str(info.value) in logged  # the user-facing log says it, once, as a sentence
    assert "Traceback" not in logged
    if pool.proc is not None:
        assert not any(pool.slot_users().values()), "the failed start kept its lease"
    return info.value


def test_unknown_host_key_is_refused_with_the_keyscan_hint(pool: Pool, caplog, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pool.install_spec(known_hosts_file=str(empty))
    err = start_fails(pool, caplog)
    assert isinstance(err, HostKeyError)
    assert "ssh-keyscan" in str(err)


def test_ssh_key_refused_names_user_host_and_key(pool: Pool, caplog, tmp_path):
    stranger = tmp_path / "stranger_key"
    keygen(stranger)
    pool.install_spec(ssh_key_file=str(stranger))
    err = start_fails(pool, caplog)
    assert isinstance(err, SSHAuthError)
    assert str(stranger) in str(err)
    assert "BEGIN OPENSSH" not in str(err)


def test_broker_down_says_how_to_start_it(pool: Pool, caplog):
    pool.stop()
    err = start_fails(pool, caplog)
    assert pool.url in str(err)
    assert "gpu-broker serve" in str(err)


def test_bad_token_is_refused_and_nothing_is_leased(pool: Pool, caplog, monkeypatch):
    monkeypatch.setenv("SHARED_GPU_TOKEN", "sgpu_not-a-real-token")
    err = start_fails(pool, caplog)
    assert "token" in str(err)
    assert "gpu-broker token create" in str(err)


def test_bad_kernelspec_config_names_the_key(pool: Pool, caplog):
    spec = pool.kernels_dir / "shared-gpu" / "kernel.json"
    spec.write_text(spec.read_text().replace('"slot_kind"', '"slot_knd"'))
    err = start_fails(pool, caplog)
    assert "slot_knd" in str(err) and "did you mean 'slot_kind'" in str(err)


def test_a_slot_kind_the_pool_lacks_is_refused_at_once(pool: Pool, caplog):
    pool.install_spec(slot_kind="h100")
    err = start_fails(pool, caplog)
    assert "h100" in str(err) and "sim" in str(err)
