"""``provisioner.ui_state``: what the JupyterLab status bar and panel show, from plain facts."""

from __future__ import annotations

import json

import pytest

from broker.client import HostInfo, Lease, SlotInfo
from provisioner.ui_state import (
    STATES,
    CheckpointFacts,
    SessionFacts,
    state_of,
    suspend_in,
    ui_state,
)

NOW = 1_000_000.0
POLICY = {"idle_suspend_after": 900.0, "idle_suspend_when_queued": 60.0, "max_lease": 28800.0}
QUOTA = {"used_hours": 0.5, "limit_hours": 2.0, "resets_at": NOW + 3600}


def lease(state: str = "granted", **kw) -> Lease:
    granted = state == "granted"
    values = {
        "id": "L1",
        "user": "alice",
        "kind": "sim",
        "kernel_id": "k1",
        "state": state,
        "slot": SlotInfo("hostA/0", "hostA", "sim", "0", True) if granted else None,
        "host": HostInfo("hostA", "127.0.0.1") if granted else None,
        "granted_at": NOW - 30 if granted else None,
        "created_at": NOW - 40,
        "policy": POLICY,
        "quota": QUOTA,
        **kw,
    }
    return Lease(**values)


def facts(**kw) -> SessionFacts:
    return SessionFacts(kernel_id="k1", **kw)


def test_a_new_kernel_without_lease_is_unattached_and_shows_nothing_held() -> None:
    state = ui_state(facts(), NOW)
    assert state["state"] == "unattached"
    assert state["host"] is None and state["slot"] is None and state["queue"] is None
    assert state["suspend_in_s"] is None and state["busy"] is False
    json.dumps(state)  # the server extension sends it as is


def test_queued_shows_position_and_length() -> None:
    state = ui_state(facts(lease=lease("queued", position=1, queue_length=3)), NOW)
    assert state["state"] == "queued"
    assert state["queue"] == {"position": 1, "length": 3, "reason": None}
    assert state["kind"] == "sim" and state["host"] is None


def test_running_shows_host_slot_age_idle_and_time_to_suspend() -> None:
    state = ui_state(facts(lease=lease(), kernel_running=True, last_activity=NOW - 10), NOW)
    assert state["state"] == "running"
    assert (state["host"], state["slot"], state["kind"], state["device"]) == (
        "hostA",
        "hostA/0",
        "sim",
        "0",
    )
    assert state["lease_age_s"] == pytest.approx(30)
    assert state["idle_s"] == pytest.approx(10)
    assert state["suspend_in_s"] == pytest.approx(890)
    assert state["quota"] == QUOTA and state["policy"] == POLICY


def test_idle_time_never_counts_from_before_the_grant() -> None:
    # the proxy's last activity predates the lease (it waited in the queue): idle = lease age
    state = ui_state(facts(lease=lease(), kernel_running=True, last_activity=NOW - 500), NOW)
    assert state["idle_s"] == pytest.approx(30)


def test_busy_kernel_has_no_idle_time_and_only_max_lease_limits_it() -> None:
    state = ui_state(
        facts(lease=lease(), kernel_running=True, busy=True, last_activity=NOW - 10), NOW
    )
    assert state["busy"] is True and state["idle_s"] is None
    assert state["suspend_in_s"] == pytest.approx(28800 - 30)


def test_others_waiting_shorten_the_idle_limit() -> None:
    state = ui_state(
        facts(lease=lease(queue_length=2), kernel_running=True, last_activity=NOW - 10), NOW
    )
    assert state["suspend_in_s"] == pytest.approx(50)


def test_suspend_in_rules() -> None:
    assert suspend_in(None, 10, 10, False, 0) is None
    assert suspend_in({"idle_suspend_after": 60}, 100, 100, False, 0) == 0.0
    assert suspend_in({"idle_suspend_after": 60}, None, 5, True, 0) is None
    assert suspend_in({"idle_suspend_when_queued": 30}, 10, 10, False, 1) == 20
    per_cell = {"idle_suspend_when_queued": 30, "release_after_cell": 10}  # issue 12
    assert suspend_in(per_cell, 4, 10, False, 1) == 6  # others wait: 10 s after the cell
    assert suspend_in(per_cell, 4, 10, False, 0) is None  # nobody waits: no per-cell release


def test_suspended_keeps_the_checkpoint_and_the_last_terms() -> None:
    cp = CheckpointFacts("hostA", 2048, NOW - 5)
    state = ui_state(facts(checkpoint=cp, policy=POLICY, quota=QUOTA), NOW)
    assert state["state"] == "suspended"
    assert state["checkpoint"] == {"host": "hostA", "bytes": 2048, "since": NOW - 5}
    assert state["host"] is None and state["suspend_in_s"] is None
    assert state["quota"] == QUOTA  # remembered from the lease it gave back


def test_resume_goes_queued_then_resuming() -> None:
    cp = CheckpointFacts("hostA", 1, NOW)
    assert state_of(facts(checkpoint=cp, lease=lease("queued", position=1))) == "queued"
    assert state_of(facts(checkpoint=cp, resuming=True)) == "resuming"
    assert state_of(facts(checkpoint=cp, lease=lease())) == "resuming"


def test_other_states() -> None:
    assert state_of(facts(lease=lease())) == "starting"
    assert state_of(facts(lease=lease(), kernel_running=True, suspending=True)) == "suspending"
    assert state_of(facts(lease=lease(), kernel_running=True, reconnecting=True)) == "reconnecting"
    assert state_of(facts(failed=True, message="no slot")) == "failed"
    assert state_of(facts(ended=True, lease=lease(), kernel_running=True)) == "ended"
    # a failed resume keeps the saved state: still suspended, with the error as its message
    cp = CheckpointFacts("hostA", 1, NOW)
    state = ui_state(facts(checkpoint=cp, failed=True, message="boom"), NOW)
    assert (state["state"], state["message"]) == ("suspended", "boom")


def test_every_state_is_one_the_contract_names() -> None:
    cp = CheckpointFacts("h", 1, NOW)
    seen = {
        state_of(f)
        for f in (
            facts(),
            facts(lease=lease("queued")),
            facts(lease=lease()),
            facts(lease=lease(), kernel_running=True),
            facts(lease=lease(), kernel_running=True, suspending=True),
            facts(checkpoint=cp),
            facts(checkpoint=cp, resuming=True),
            facts(lease=lease(), kernel_running=True, reconnecting=True),
            facts(failed=True),
            facts(ended=True),
        )
    }
    assert seen == set(STATES)
