"""A Shared GPU kernel that cannot start: one clear error, no traceback, no lease leaked.

With eager attach the start itself fails; with lazy attach (the default) the kernel starts at
once and its first cell fails with the same message, and the next cell tries again.
"""

from __future__ import annotations

import logging

import pytest

from gpu_kernel.errors import HostKeyError, SharedGPUError, SSHAuthError
from tests.pool import Pool
from tests.sshd import keygen


@pytest.fixture(params=["eager", "lazy"])
def attach(request: pytest.FixtureRequest) -> str:
    return request.param


def start_fails(pool: Pool, caplog, name: str = "shared-gpu") -> SharedGPUError:
    """Start the kernel, expect our error; check the Jupyter log and that no slot is held."""
    km = pool.kernel_manager(name)
    with caplog.at_level(logging.INFO), pytest.raises(SharedGPUError) as info:
        km.start_kernel()
    assert not km.has_kernel
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert str(info.value) in logged  # the user-facing log says it, once, as a sentence
    assert "Traceback" not in logged
    assert_no_lease(pool)
    return info.value


def first_cell_fails(pool: Pool, cells: int = 2) -> str:
    """Start the kernel (lazy: it starts), run a cell: it fails with our message; the next
    cell tries again (the kernel is not stuck) and fails the same way."""
    km, kc = pool.start_kernel()
    texts = []
    for _ in range(cells):
        reply = kc.execute_interactive("1 + 1", timeout=60, output_hook=lambda m: None)
        content = reply["content"]
        assert content["status"] == "error" and content["ename"] == "StartFailed"
        assert "Traceback" not in content["evalue"]
        texts.append(content["evalue"])
        assert_no_lease(pool)
    assert km.is_alive()
    kc.stop_channels()
    return texts[-1]


def assert_no_lease(pool: Pool) -> None:
    if pool.proc is not None:
        assert not any(pool.slot_users().values()), "the failed start kept its lease"
        queued = [lease for lease in pool.status()["leases"] if lease["state"] == "queued"]
        assert not queued, "the failed start left a request in the queue"


def fails(
    pool: Pool, caplog, attach: str, cells: int = 2, **spec: str
) -> tuple[str, SharedGPUError | None]:
    """The message a user gets, and the error when the start itself failed (eager)."""
    pool.install_spec(attach=attach, **spec)
    if attach == "eager":
        err = start_fails(pool, caplog)
        return str(err), err
    return first_cell_fails(pool, cells), None


def test_unknown_host_key_is_refused_with_the_keyscan_hint(pool: Pool, caplog, tmp_path, attach):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    text, err = fails(pool, caplog, attach, known_hosts_file=str(empty))
    assert err is None or isinstance(err, HostKeyError)
    assert "ssh-keyscan" in text


def test_ssh_key_refused_names_user_host_and_key(pool: Pool, caplog, tmp_path, attach):
    stranger = tmp_path / "stranger_key"
    keygen(stranger)
    text, err = fails(pool, caplog, attach, ssh_key_file=str(stranger))
    assert err is None or isinstance(err, SSHAuthError)
    assert str(stranger) in text
    assert "BEGIN OPENSSH" not in text


def test_broker_down_says_how_to_start_it(pool: Pool, caplog, attach):
    pool.stop()
    text, _ = fails(pool, caplog, attach, cells=1)  # each waits a few seconds for a restart
    assert pool.url in text
    assert "gpu-broker serve" in text


def test_bad_token_is_refused_and_nothing_is_leased(pool: Pool, caplog, monkeypatch, attach):
    monkeypatch.setenv("SHARED_GPU_TOKEN", "sgpu_not-a-real-token")
    text, _ = fails(pool, caplog, attach)
    assert "token" in text
    assert "gpu-broker token create" in text


def test_bad_kernelspec_config_names_the_key(pool: Pool, caplog):
    spec = pool.kernels_dir / "shared-gpu" / "kernel.json"
    spec.write_text(spec.read_text().replace('"slot_kind"', '"slot_knd"'))
    err = start_fails(pool, caplog)  # checked at start, whatever the attach mode
    assert "slot_knd" in str(err) and "did you mean 'slot_kind'" in str(err)


def test_a_slot_kind_the_pool_lacks_is_refused_at_once(pool: Pool, caplog, attach):
    text, _ = fails(pool, caplog, attach, slot_kind="h100")
    assert "h100" in text and "sim" in text
