"""Roles, drain/undrain, reset, reload, suspend orders, checkpoints, usage and metrics through the
real HTTP API (a broker on a loopback port, SQLite in tmp_path) and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import main
from broker.client import BrokerClient, BrokerRequestError
from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.http.auth import create_token
from broker.store.sqlite import Store
from tests.test_broker_api import _serve, _wait_up, free_port

BASE = """
[server]
host = "127.0.0.1"
port = {port}
database = "broker.sqlite"

[policy]
heartbeat_interval = "10s"
heartbeat_timeout = "60s"
queue_timeout = "10m"
{policy}

[[hosts]]
name = "gpu1"
address = "gpu1.example.org"
fence_user = "gpufence"
fence_key_file = "/etc/gpu-broker/fence_ed25519"
[[hosts.slots]]
kind = "a100"
simulated = true
count = 2

[[hosts]]
name = "gpu2"
address = "local"
python = "{python}"
[[hosts.slots]]
id = "gpu2/mig0"
kind = "mig"
device = "0"
simulated = true
{extra}

[[groups]]
name = "physics"
members = ["ana", "ben"]
teachers = ["prof"]

[[groups]]
name = "chem"
members = ["carl"]
teachers = ["other"]
"""

USERS = {"ana": "user", "ben": "user", "carl": "user", "prof": "teacher", "root": "admin"}


def config_text(port: int = 0, policy: str = "", extra: str = "") -> str:
    return BASE.format(port=port, policy=policy, extra=extra, python=sys.executable)


class Env:
    """A broker in a thread, its config file, and a token (and token file) per user."""

    def __init__(self, tmp: Path, port: int = 0, policy: str = "", extra: str = "") -> None:
        self.tmp = tmp
        self.path = tmp / "broker.toml"
        self.policy = policy
        self.path.write_text(config_text(port, policy, extra))
        store = Store(load_config(self.path).server.database)
        self.tokens = {user: create_token(store, user, role)[0] for user, role in USERS.items()}
        store.close()
        self.files: dict[str, Path] = {}
        for user, token in self.tokens.items():
            f = tmp / f"{user}.token"
            f.write_text(token)
            f.chmod(0o600)
            self.files[user] = f
        self.server: BrokerServer | None = None
        self.clients: list[BrokerClient] = []

    def start(self) -> str:
        self.server = BrokerServer(load_config(self.path), port=0, tick_interval=0.05)
        self.url = self.server.start_in_thread()
        return self.url

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.server is not None:
            self.server.stop_thread()
            self.server = None

    def client(self, who: str) -> BrokerClient:
        client = BrokerClient(self.url, self.tokens[who])
        self.clients.append(client)
        return client

    def cli(self, who: str, *args: str) -> int:
        return main([*args, "--url", self.url, "--token-file", str(self.files[who])])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    e.start()
    yield e
    e.stop()


def status_of(call) -> int:
    try:
        call()
    except BrokerRequestError as err:
        return err.status
    return 200


def test_role_boundaries(env: Env) -> None:
    ana, ben, carl = env.client("ana"), env.client("ben"), env.client("carl")
    prof, root = env.client("prof"), env.client("root")
    lease = ana.request_lease("a100", "k-ana")
    carl_lease = carl.request_lease("a100", "k-carl")
    # a user: not another user's lease, not even a classmate's
    for call in (
        lambda: ben.get_lease(lease.id),
        lambda: ben.release(lease.id),
        lambda: ben.heartbeat(lease.id, False, None),
    ):
        assert status_of(call) == 403
    # a teacher: reads their students' leases, never acts on them; not other classes'
    assert prof.get_lease(lease.id).user == "ana"
    assert status_of(lambda: prof.release(lease.id)) == 403
    assert status_of(lambda: prof.heartbeat(lease.id, False, None)) == 403
    assert status_of(lambda: prof.get_lease(carl_lease.id)) == 403
    seen = prof.status()
    assert {lease["user"] for lease in seen["leases"]} == {"ana"}
    users = {slot["lease"]["user"] for slot in seen["slots"] if slot["lease"]}
    assert users == {"ana", None}  # carl's slot is busy, but whose it is stays hidden
    # admin: everything
    assert {lease["user"] for lease in root.status()["leases"]} == {"ana", "carl"}
    assert root.release(carl_lease.id).state == "released"
    # admin-only operations
    for who in ("ana", "prof"):
        client = env.client(who)
        for call in (lambda c=client: c.drain("gpu1"), lambda c=client: c.reset_slot("gpu1/0")):
            assert status_of(call) == 403
        assert status_of(client.reload) == 403
    assert status_of(ana.metrics) == 403
    assert "gpu_broker_slots" in prof.metrics()
    # usage: own; a teacher's groups; admin all
    assert [row["user"] for row in ana.usage()["users"]] == ["ana"]
    assert status_of(lambda: ana.usage(group="physics")) == 403
    report = prof.usage()
    assert [row["user"] for row in report["users"]] == ["ana"]
    assert [row["group"] for row in report["groups"]] == ["physics"]
    assert status_of(lambda: prof.usage(group="chem")) == 403
    assert status_of(lambda: prof.usage(group="nope")) == 404
    assert {row["user"] for row in root.usage()["users"]} == {"ana", "carl"}
    # checkpoints: own; teacher reads; nobody else acts
    ana.release(lease.id, "suspended", {"host": "gpu1", "path": "/x", "bytes": 5})
    assert [c["kernel_id"] for c in ana.checkpoints()] == ["k-ana"]
    assert ben.checkpoints() == [] and ben.checkpoints("k-ana") == []
    assert [c["user"] for c in prof.checkpoints()] == ["ana"]
    assert status_of(lambda: ben.forget_checkpoint("k-ana")) == 403
    assert status_of(lambda: prof.forget_checkpoint("k-ana")) == 403
    assert ana.forget_checkpoint("k-ana")["kernel_id"] == "k-ana"
    assert status_of(lambda: ana.forget_checkpoint("k-ana")) == 404


def test_teacher_token_from_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(config_text())
    args = ["token", "create", "--config", str(path), "--user", "prof", "--role", "teacher"]
    assert main(args) == 0
    assert "teacher" in capsys.readouterr().err


def test_drain_persists_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path)
    env.start()
    try:
        assert env.cli("root", "drain", "gpu1") == 0
        assert "host gpu1 drained" in capsys.readouterr().out
        queued = env.client("ana").request_lease("a100", "k1")
        assert queued.state == "queued"  # a100 exists only on the drained host
        assert env.cli("ana", "drain", "gpu1") == 1  # a user may not
        assert "role admin" in capsys.readouterr().err
        assert env.cli("root", "drain", "nohost") == 1
        assert "no host 'nohost'" in capsys.readouterr().err
        env.stop()
        env.start()  # a restart keeps the drain
        status = env.client("root").status()
        assert next(h for h in status["hosts"] if h["name"] == "gpu1")["drained"] is True
        assert {s["state"] for s in status["slots"] if s["host"] == "gpu1"} == {"drained"}
        assert env.cli("root", "undrain", "gpu1") == 0
        assert env.client("ana").get_lease(queued.id).state == "granted"
    finally:
        env.stop()


def test_reload_keeps_leases_and_rejects_bad_config(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    ana = env.client("ana")
    lease = ana.request_lease("mig", "k1")
    extra = '[[hosts.slots]]\nid = "gpu2/mig1"\nkind = "mig"\ndevice = "1"\nsimulated = true\n'
    env.path.write_text(config_text(extra=extra))
    assert env.cli("root", "reload") == 0
    assert "3 slots" not in capsys.readouterr().out  # 4 now
    ben = env.client("ben")  # groups allow one slot per member
    second = ben.request_lease("mig", "k2")
    assert (second.state, second.slot.id) == ("granted", "gpu2/mig1")
    assert ana.get_lease(lease.id).state == "granted"
    env.path.write_text(config_text(extra=extra).replace('kind = "mig"', "kind = 3", 1))
    assert env.cli("root", "reload") == 1
    err = capsys.readouterr().err
    assert "rejected, the old one stays" in err and "broker.toml:" in err and "kind" in err
    with pytest.raises(BrokerRequestError) as bad:
        env.client("root").reload()
    assert bad.value.code == "bad_config"
    assert len(env.client("root").status()["slots"]) == 4
    assert ben.get_lease(second.id).state == "granted"


def test_reload_on_sighup(tmp_path: Path) -> None:
    port = free_port()
    env = Env(tmp_path, port=port)
    client = BrokerClient(f"http://127.0.0.1:{port}", env.tokens["root"])
    proc = _serve(env.path)
    try:
        _wait_up(client)
        assert len(client.status()["slots"]) == 3
        extra = '[[hosts.slots]]\nid = "gpu2/mig1"\nkind = "mig"\ndevice = "1"\nsimulated = true\n'
        env.path.write_text(config_text(port, extra=extra))
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(client.status()["slots"]) != 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        env.path.write_text("[server\n")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert len(client.status()["slots"]) == 4
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
        assert "reload rejected, the old config stays" in out and "broker.toml:" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()


def test_suspend_order_checkpoint_usage_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = Env(tmp_path, policy='idle_suspend_after = "1s"\nidle_suspend_when_queued = "1s"')
    env.start()
    try:
        ana, root = env.client("ana"), env.client("root")
        lease = ana.request_lease("a100", "kern-1")
        assert ana.heartbeat(lease.id, False, time.time() - 5).orders == []
        deadline = time.monotonic() + 5
        orders: list = []
        while not orders and time.monotonic() < deadline:
            time.sleep(0.05)
            orders = ana.heartbeat(lease.id, False, time.time() - 5).orders
        assert orders == [{"order": "suspend", "reason": "idle", "forced": False, "grace": 0.0}]
        assert ana.heartbeat(lease.id, False, time.time() - 5).orders == []  # once
        ckpt = {"host": "gpu1", "path": "/ck/kern-1", "bytes": 3 * 2**20, "kernel_id": "kern-1"}
        ended = ana.release(lease.id, "suspended", ckpt)
        assert (ended.state, ended.end_reason) == ("released", "suspended")
        (row,) = ana.checkpoints("kern-1")
        assert (row["host"], row["path"], row["bytes"], row["state"]) == (
            "gpu1",
            "/ck/kern-1",
            3 * 2**20,
            "kept",
        )
        assert env.cli("root", "status") == 0
        out = capsys.readouterr().out
        assert "suspended kernels: 1" in out and "3.0 MiB" in out and "kern-1" in out
        assert "gpu_broker_suspends_total 1" in root.metrics()
        assert "gpu_broker_leases_granted_total 1" in root.metrics()
        assert ana.usage()["users"][0]["suspends"] == 1
        assert env.cli("root", "usage", "--csv") == 0
        csv_out = capsys.readouterr().out.splitlines()
        assert csv_out[0] == "scope,name,groups,gpu_hours,leases,suspends"
        assert csv_out[1].startswith("user,ana,physics,") and csv_out[1].endswith(",1,1")
        assert env.cli("prof", "usage", "--group", "physics") == 0
        assert "physics" in capsys.readouterr().out
    finally:
        env.stop()


def test_bad_checkpoint_bodies(env: Env) -> None:
    ana = env.client("ana")
    lease = ana.request_lease("a100", "k1")
    for body in (
        {"reason": "bored"},
        {"reason": "released", "checkpoint": {"host": "gpu1", "path": "/x", "bytes": 1}},
        {"reason": "suspended", "checkpoint": {"host": "nohost", "path": "/x", "bytes": 1}},
        {"reason": "suspended", "checkpoint": {"host": "gpu1", "path": "/x", "bytes": -1}},
        {"reason": "suspended", "checkpoint": {"host": "gpu1", "path": "/x", "bytes": "1"}},
        {"reason": "suspended", "checkpoint": "here"},
    ):
        with pytest.raises(BrokerRequestError) as err:
            ana._call("DELETE", f"/api/v1/leases/{lease.id}", body)
        assert err.value.status == 400, body
    assert ana.get_lease(lease.id).state == "granted"
    assert ana.checkpoints() == []


def test_checkpoint_expires_on_its_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root_dir = tmp_path / "kernels"
    monkeypatch.setenv("SHARED_GPU_RUNTIME_ROOT", str(root_dir))  # the "local" host's default
    root_dir = root_dir / "gpu2"  # runtime dirs are per host
    (root_dir / "kern-old" / "checkpoint").mkdir(parents=True)
    (root_dir / "kern-old" / "checkpoint" / "manifest.json").write_text("{}")
    record = {"kernel_id": "kern-old", "owner": "ana", "host_name": "gpu2"}  # as launched
    (root_dir / "kern-old" / "launch.json").write_text(json.dumps(record))
    env = Env(tmp_path, policy='checkpoint_max_age = "1s"')
    env.start()
    try:
        ana = env.client("ana")
        lease = ana.request_lease("mig", "kern-old")
        ckpt = {"host": "gpu2", "path": str(root_dir / "kern-old" / "checkpoint"), "bytes": 2}
        ana.release(lease.id, "suspended", ckpt)
        deadline = time.monotonic() + 10
        while ana.checkpoints("kern-old")[0]["state"] != "expired":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (row,) = ana.checkpoints("kern-old")
        assert (
            row["message"] == "your suspended kernel's checkpoint expired after 1s and was deleted"
        )
        assert not (root_dir / "kern-old").exists()
    finally:
        env.stop()
