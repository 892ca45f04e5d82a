"""``gpu-broker``: check-config, tokens, status, and user mistakes without tracebacks."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import main
from broker.config.loader import load_config
from broker.daemon import BrokerServer
from tests.test_broker_api import free_port, write_config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: OK, 2 hosts, 3 slots"


def test_check_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = "x"\n\n[policy]\nheartbeat_timeout = "soon"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith(f"{path}:2: server.port:") for line in lines), lines
    assert any(line.startswith(f"{path}:5: policy.heartbeat_timeout:") for line in lines)
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write_config(tmp_path))
    assert main(["token", "create", "--config", path, "--user", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("sgpu_") and len(token) > 40
    out_file = tmp_path / "tok" / "token"
    args = ["token", "create", "--config", path, "--user", "root", "--role", "admin"]
    assert main([*args, "--output", str(out_file)]) == 0
    assert "sgpu_" not in capsys.readouterr().out.replace(out_file.read_text()[:9], "")
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert main(["token", "list", "--config", path]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "admin" in listing and token not in listing
    assert main(["token", "revoke", "--config", path, token[:9]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["token", "list", "--config", path]) == 0
    alice_row = next(line for line in capsys.readouterr().out.splitlines() if "alice" in line)
    assert alice_row.rstrip().endswith("yes")
    assert main(["token", "revoke", "--config", path, "nothing-like-it"]) == 1
    assert "no token matches" in capsys.readouterr().err
    raw = (tmp_path / "broker.sqlite").read_bytes()
    assert token.encode() not in raw  # only hashes on disk


def test_status_table(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path)
    main(["token", "create", "--config", str(path), "--user", "alice"])
    token = capsys.readouterr().out.strip()
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    url = server.start_in_thread()
    try:
        from broker.client import BrokerClient

        with BrokerClient(url, token) as client:
            client.request_lease("mig", "k1")
            client.request_lease("mig", "k2")
        monkeypatch.setenv("SHARED_GPU_TOKEN", token)
        assert main(["status", "--url", url]) == 0
        out = capsys.readouterr().out
        header, *rows = out.splitlines()
        assert header.split()[:7] == ["HOST", "SLOT", "KIND", "USER", "STATE", "IDLE", "FOR"]
        assert any("gpu2/mig0" in row and "busy" in row and "alice" in row for row in rows)
        assert any("gpu1/0" in row and "free" in row for row in rows)
        assert "queue: 1 waiting" in out
        assert main(["status", "--json", "--url", url]) == 0
        assert '"slots"' in capsys.readouterr().out
        monkeypatch.setenv("SHARED_GPU_TOKEN", "sgpu_wrong")
        assert main(["status", "--url", url]) == 1
        err = capsys.readouterr().err
        assert "rejected the token from $SHARED_GPU_TOKEN" in err and "token create" in err
    finally:
        server.stop_thread()


def test_status_broker_down(tmp_path: Path) -> None:
    path = write_config(tmp_path, port=free_port())
    result = run_cli("status", "--config", str(path), env={"SHARED_GPU_TOKEN": "sgpu_x"})
    assert result.returncode == 1
    assert "cannot reach the broker at http://127.0.0.1:" in result.stderr
    assert "connection refused" in result.stderr and "gpu-broker serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_file_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.client import read_token
    from broker.errors import BrokerError

    monkeypatch.delenv("SHARED_GPU_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("sgpu_abc\n")
    token_file.chmod(0o644)
    with pytest.raises(BrokerError, match="readable by other users") as err:
        read_token(token_file=token_file)
    assert f"chmod 600 {token_file}" in str(err.value)
    token_file.chmod(0o600)
    assert read_token(token_file=token_file) == ("sgpu_abc", str(token_file))
    monkeypatch.setenv("SHARED_GPU_TOKEN", "sgpu_env")
    assert read_token(token_file=token_file) == ("sgpu_env", "$SHARED_GPU_TOKEN")
    monkeypatch.delenv("SHARED_GPU_TOKEN")
    with pytest.raises(BrokerError, match="no broker token"):
        read_token(token_file=tmp_path / "missing")


def test_token_output_refuses_an_existing_file_or_a_symlink(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "token-link"
    link.symlink_to(target)
    for output in (link, target):
        result = run_cli(
            "token", "create", "--config", path, "--user", "alice", "--output", str(output)
        )
        assert result.returncode == 1 and "exists" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert target.read_text() == "precious\n"
    result = run_cli("token", "list", "--config", path)
    assert "alice" not in result.stdout  # refused before any token was made
    result = run_cli("token", "create", "--config", path, "--user", "alice", "--output", "-")
    assert result.returncode == 0 and result.stdout.strip().startswith("sgpu_")


@pytest.fixture
def unix_user() -> Iterator[str]:
    """A real Unix user with a home (root only: CI runs as root)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    user = "sgttok"
    subprocess.run(["userdel", "-r", "-f", user], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    try:
        yield user
    finally:
        subprocess.run(["userdel", "-r", "-f", user], capture_output=True)


def test_readme_token_workflow_as_root(tmp_path: Path, unix_user: str) -> None:
    """`gpu-broker token create --user alice --output ~alice/.config/jupyter-shared-gpu/token`,
    run as root, leaves a file alice owns and can use, in folders she owns, and nothing that a
    symlink she planted could redirect."""
    path = str(write_config(tmp_path))
    home = Path(os.path.expanduser(f"~{unix_user}"))
    output = home / ".config" / "jupyter-shared-gpu" / "token"
    result = run_cli(
        "token", "create", "--config", path, "--user", unix_user, "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    uid = home.stat().st_uid
    for item in (output, output.parent, output.parent.parent):
        assert item.stat().st_uid == uid, item
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert stat.S_IMODE(output.parent.stat().st_mode) == 0o700
    read = subprocess.run(
        ["su", "-s", "/bin/sh", unix_user, "-c", f"cat {output}"], capture_output=True, text=True
    )
    assert read.stdout.strip().startswith("sgpu_")
    # alice points a new path at root's files: the write happens as alice, and fails
    planted = home / "evil"
    planted.symlink_to("/root")
    os.lchown(planted, uid, uid)
    result = run_cli(
        "token", "create", "--config", path, "--user", unix_user, "--output", str(planted / "x")
    )
    assert result.returncode == 1 and "Permission denied" in result.stderr, result.stderr
    assert not Path("/root/x").exists()
    result = run_cli(
        "token",
        "create",
        "--config",
        path,
        "--user",
        "nobody-here",
        "--output",
        str(tmp_path / "t"),
    )
    assert result.returncode == 1 and "no Unix user 'nobody-here'" in result.stderr


def test_output_cut_short_by_a_pipe_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpu-broker status | head -1`: no traceback when the reader stops early."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    config = write_config(tmp_path, free_port())
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["check-config", str(config)]) == 0
