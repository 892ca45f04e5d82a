"""Per-cell binding (issue 12): while others wait, a kernel idle ``release_after_cell`` after its
cell gives its GPU back; a running cell is never cut; the next cell resumes the kernel. The rule
(plain scheduler calls, no clock), the config that turns it on (and refuses what cannot work),
the lease's policy JSON over real HTTP, and the ``%gpu`` lines. The kernels' side, end to end,
is in ``tests/test_class_rehearsal.py``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.config.loader import load_config, parse_config
from broker.core.groups import GroupConfig
from broker.core.scheduler import (
    Granted,
    Heartbeat,
    Policy,
    Queued,
    Release,
    Released,
    RequestLease,
    Scheduler,
    SlotState,
    SuspendIdle,
    Tick,
)
from broker.daemon import BrokerServer
from broker.errors import ConfigError
from broker.http.auth import create_token
from broker.store.sqlite import Store
from gpu_kernel.magics import status_lines

PER_CELL = Policy(heartbeat_timeout=1e9, release_after_cell=10.0)


def req(lease_id: str, user: str, now: float = 0.0) -> RequestLease:
    return RequestLease(lease_id, user, "a", f"k-{user}", now)


def two_slots_and_a_queue(policy: Policy = PER_CELL) -> Scheduler:
    """ann and bob hold the two slots since t=0 (their cells ran until t=100); cy waits."""
    s = Scheduler([SlotState("s0", "h1", "a"), SlotState("s1", "h2", "a")], policy)
    assert s.handle(req("1", "ann")) == [Granted("1", "s0")]
    assert s.handle(req("2", "bob")) == [Granted("2", "s1")]
    for lease_id in ("1", "2"):
        s.handle(Heartbeat(lease_id, 100.0, busy=False, last_activity=100.0))
    assert s.handle(req("3", "cy", now=100.0)) == [Queued("3", 1)]
    return s


def test_while_others_wait_an_idle_kernel_goes_after_its_cell_and_a_busy_one_stays() -> None:
    s = two_slots_and_a_queue()
    s.handle(Heartbeat("1", 105.0, busy=True, last_activity=105.0))  # ann runs a long cell
    assert s.handle(Tick(109.0)) == []  # bob idle 9 s: not yet
    assert s.handle(Tick(110.0)) == [SuspendIdle("2", "after_cell")]
    # bob's kernel saved itself: cy gets his slot; bob's next cell asks again and waits
    assert s.handle(Release("2", 111.0, "suspended")) == [
        Released("2", "s1", "suspended"),
        Granted("3", "s1"),
    ]
    assert s.handle(req("4", "bob", now=112.0)) == [Queued("4", 1)]
    for now in range(113, 1000, 20):  # ann's cell runs on: never released for idleness
        s.handle(Heartbeat("1", float(now), busy=True, last_activity=float(now)))
        s.handle(Heartbeat("3", float(now), busy=True, last_activity=float(now)))
        assert s.handle(Tick(float(now))) == []
    # ann's cell ends; 10 s later her kernel goes, and bob's resume takes her slot: any slot
    s.handle(Heartbeat("1", 1002.0, busy=False, last_activity=1002.0))
    assert s.handle(Tick(1011.0)) == []
    assert s.handle(Tick(1012.0)) == [SuspendIdle("1", "after_cell")]
    assert s.handle(Release("1", 1013.0, "suspended"))[-1] == Granted("4", "s0")


def test_a_kernel_woken_for_a_cell_is_not_released_before_that_cell_ran() -> None:
    """The grant comes before the resume (seconds of launch and restore): per-cell binding counts
    from the end of a cell run on this lease, so the cell that woke the kernel runs first."""
    s = Scheduler([SlotState("s0", "h1", "a")], PER_CELL)
    s.handle(req("1", "ann"))
    s.handle(Heartbeat("1", 50.0, busy=False, last_activity=50.0))
    s.handle(req("2", "bob", now=60.0))
    assert s.handle(Tick(61.0)) == [SuspendIdle("1", "after_cell")]
    # ann's kernel saved; bob's cell (asked at 60) gets the slot at 70 and wakes his kernel
    assert s.handle(Release("1", 70.0, "suspended"))[-1] == Granted("2", "s0")
    s.handle(req("3", "ann", now=71.0))  # ann's next cell waits
    s.handle(Heartbeat("2", 75.0, busy=False, last_activity=60.0))  # still waking
    assert s.handle(Tick(85.0)) == []  # 15 s after the grant: bob's cell has not run yet
    s.handle(Heartbeat("2", 86.0, busy=True, last_activity=86.0))  # it runs
    s.handle(Heartbeat("2", 90.0, busy=False, last_activity=89.0))  # and ends at 89
    assert s.handle(Tick(98.0)) == []
    assert s.handle(Tick(99.0)) == [SuspendIdle("2", "after_cell")]


def test_without_a_queue_or_with_the_policy_off_the_kernel_keeps_its_gpu() -> None:
    s = Scheduler([SlotState("s0", "h1", "a")], PER_CELL)
    s.handle(req("1", "ann"))
    s.handle(Heartbeat("1", 100.0, busy=False, last_activity=100.0))
    assert s.handle(Tick(200.0)) == []  # nobody waits: no pressure, no release
    off = two_slots_and_a_queue(Policy(heartbeat_timeout=1e9))  # the default: off
    assert off.handle(Tick(120.0)) == []
    assert off.handle(Tick(130.0)) == [
        SuspendIdle("1", "idle_while_queued"),
        SuspendIdle("2", "idle_while_queued"),
    ]


def test_a_group_sets_its_own_binding_and_others_keep_the_pool_policy() -> None:
    group = GroupConfig("ml101", members=frozenset({"ann"}), release_after_cell=20.0)
    policy = Policy(heartbeat_timeout=1e9, groups=(group,))  # pool: off; the class: 20 s
    s = two_slots_and_a_queue(policy)
    assert s.lease("1").group == "ml101"
    assert s.handle(Tick(119.0)) == []
    assert s.handle(Tick(120.0)) == [SuspendIdle("1", "after_cell")]
    assert s.handle(Tick(129.0)) == []  # bob, outside the class: the pool's 30 s
    assert s.handle(Tick(130.0)) == [SuspendIdle("2", "idle_while_queued")]


# --- the config -----------------------------------------------------------------------------

CONFIG = """\
[server]
listen = "127.0.0.1:{port}"
database = "broker.sqlite"

[policy]
heartbeat_interval = "{interval}"
heartbeat_timeout = "30s"
{policy}

[[hosts]]
name = "gpu1"
address = "local"
  [[hosts.slots]]
  kind = "a"
  simulated = true
  count = 2

[[groups]]
name = "ml101"
members = ["ann"]
{group}
"""


def config_text(policy: str = "", group: str = "", interval: str = "10s", port: int = 0) -> str:
    return CONFIG.format(policy=policy, group=group, interval=interval, port=port)


def test_the_config_turns_it_on_for_the_pool_or_a_group() -> None:
    config = parse_config(config_text())
    assert config.policy.release_after_cell is None  # off by default
    config = parse_config(config_text('release_after_cell = "10s"', 'release_after_cell = "15s"'))
    assert config.policy.release_after_cell == 10.0
    assert config.group("ml101").release_after_cell == 15.0


@pytest.mark.parametrize(
    "policy, group, interval, key, words",
    [
        ('release_after_cell = "0s"', "", "10s", "policy.release_after_cell", "more than 0"),
        ('release_after_cell = "soon"', "", "10s", "policy.release_after_cell", '"90s"'),
        (
            'release_after_cell = "30s"',
            "",
            "10s",
            "policy.release_after_cell",
            "must be shorter than idle_suspend_when_queued (30s)",
        ),
        (
            'release_after_cell = "5s"',
            "",
            "10s",
            "policy.release_after_cell",
            "lower heartbeat_interval to 5s or less",
        ),
        (
            "",
            'release_after_cell = "1m"',
            "10s",
            "groups[0].release_after_cell",
            "would never act",
        ),
        (
            "",
            'release_after_cell = "2s"',
            "5s",
            "groups[0].release_after_cell",
            "shorter than heartbeat_interval (5s)",
        ),
    ],
)
def test_check_config_refuses_a_binding_that_cannot_work(
    policy: str, group: str, interval: str, key: str, words: str
) -> None:
    text = config_text(policy, group, interval)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "class.toml")
    [issue] = info.value.issues
    assert issue.key == key and words in issue.message, issue
    line = (policy or group).split(" = ")[0]
    assert issue.line == text.splitlines().index(policy or group) + 1, line


# --- the lease's policy JSON and the order, over HTTP -------------------------------------------


def test_the_lease_says_the_binding_in_force_and_the_order_says_after_cell(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        config_text('release_after_cell = "1s"', 'release_after_cell = "2s"', interval="1s")
    )
    store = Store(load_config(path).server.database)
    tokens = {user: create_token(store, user)[0] for user in ("ann", "bob", "cy")}
    store.close()
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    url = server.start_in_thread()
    clients = {user: BrokerClient(url, token) for user, token in tokens.items()}
    try:
        ann, bob, cy = (clients[u] for u in ("ann", "bob", "cy"))
        a = ann.request_lease("a", "ka")
        b = bob.request_lease("a", "kb")
        assert a.policy["release_after_cell"] == 2.0  # the class's own
        assert b.policy["release_after_cell"] == 1.0  # the pool's
        c = cy.request_lease("a", "kc")
        assert c.state == "queued"
        start = time.time()
        orders: dict[str, list] = {"ann": [], "bob": []}
        while time.time() - start < 5 and not orders["bob"]:
            orders["ann"] += ann.heartbeat(a.id, True, time.time()).orders  # a cell runs
            orders["bob"] += bob.heartbeat(b.id, False, start).orders
            time.sleep(0.1)
        assert [o["reason"] for o in orders["bob"]] == ["after_cell"]
        assert not orders["bob"][0]["forced"] and orders["ann"] == []
    finally:
        for client in clients.values():
            client.close()
        server.stop_thread()


# --- %gpu -----------------------------------------------------------------------------------


def test_gpu_magic_shows_the_binding_and_the_time_left_under_it() -> None:
    policy = {"idle_suspend_after": 900, "idle_suspend_when_queued": 30, "release_after_cell": 10}
    info = {"queue": {"length": 2}, "policy": policy}
    text = "\n".join(status_lines("h", "h/0", "0", 0.0, 100.0, info, None, 104.0))
    assert "6s left (per-cell binding, as now)" in text
    assert "binding:    per cell: while others wait, the GPU goes back 10s after each cell" in text
    info = {"queue": {"length": 0}, "policy": policy}
    text = "\n".join(status_lines("h", "h/0", "0", 0.0, 100.0, info, None, 104.0))
    assert "(30s while others wait); 14m 56s left" in text and "binding:    per cell" in text
    off = {"queue": {"length": 2}, "policy": {**policy, "release_after_cell": None}}
    text = "\n".join(status_lines("h", "h/0", "0", 0.0, 100.0, off, None, 104.0))
    assert "binding:" not in text and "(30s while others wait, as now); 26s left" in text
