"""``[policy]`` of the broker config: durations and limits checked into a ``PolicyConfig``,
and the scheduler's ``Policy`` made of it. Pure.

``broker.config.loader`` calls ``check_policy`` on the ``[policy]`` table; ``BrokerService``
turns ``Config.policy`` and ``Config.groups`` into the scheduler's ``Policy`` with
``scheduler_policy``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.config.durations import format_duration, parse_duration
from broker.config.toml_check import Checker
from broker.core.groups import GroupConfig
from broker.core.policy import Policy

# [policy] durations and their defaults (seconds); every one must be more than 0.
DURATIONS = {
    "heartbeat_interval": 10.0,
    "heartbeat_timeout": 60.0,
    "queue_timeout": 600.0,
    "idle_suspend_after": 900.0,
    "idle_suspend_when_queued": 30.0,
    "max_lease": 43200.0,
    "usage_half_life": 86400.0,
    "checkpoint_max_age": 604800.0,
    "fence_retry": 30.0,
}
POLICY_KEYS = (*DURATIONS, "max_leases_per_user", "checkpoint_dir")


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: durations in seconds (docs/configuration.md says what each one does)."""

    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 60.0
    queue_timeout: float = 600.0
    idle_suspend_after: float = 900.0
    idle_suspend_when_queued: float = 30.0
    max_lease: float = 43200.0
    usage_half_life: float = 86400.0
    checkpoint_max_age: float = 604800.0
    fence_retry: float = 30.0
    max_leases_per_user: int = 4
    checkpoint_dir: str | None = None  # shared by all hosts: checkpoints need no copy


def scheduler_policy(config: PolicyConfig, groups: Iterable[GroupConfig] = ()) -> Policy:
    """The scheduler's policy from ``Config.policy`` and ``Config.groups``."""
    return Policy(
        heartbeat_timeout=config.heartbeat_timeout,
        queue_timeout=config.queue_timeout,
        max_leases_per_user=config.max_leases_per_user,
        idle_suspend_after=config.idle_suspend_after,
        idle_suspend_when_queued=config.idle_suspend_when_queued,
        max_lease=config.max_lease,
        usage_half_life=config.usage_half_life,
        fence_retry=config.fence_retry,
        groups=tuple(groups),
    )


def check_policy(checker: Checker, table: dict) -> PolicyConfig | None:
    """Check the ``[policy]`` table; None when it has problems (each one is an issue)."""
    path = ("policy",)
    checker.known_keys(table, POLICY_KEYS, path)
    values: dict[str, float | None] = {}
    for key, default in DURATIONS.items():
        values[key] = default
        if key in table:
            try:
                values[key] = parse_duration(table[key])
            except ValueError as exc:
                checker.issue((*path, key), str(exc))
                values[key] = None
                continue
            if values[key] == 0:
                checker.issue((*path, key), 'must be more than 0, like "10s"')
                values[key] = None
    interval, timeout = values["heartbeat_interval"], values["heartbeat_timeout"]
    if interval is not None and timeout is not None and timeout <= 2 * interval:
        key = "heartbeat_timeout" if "heartbeat_timeout" in table else "heartbeat_interval"
        checker.issue(
            (*path, key),
            f"heartbeat_timeout ({format_duration(timeout)}) must be more than twice "
            f"heartbeat_interval ({format_duration(interval)}): raise heartbeat_timeout "
            f"above {format_duration(2 * interval)}",
        )
        return None
    after, queued = values["idle_suspend_after"], values["idle_suspend_when_queued"]
    if after is not None and queued is not None and queued > after:
        key = (
            "idle_suspend_when_queued"
            if "idle_suspend_when_queued" in table
            else ("idle_suspend_after")
        )
        checker.issue(
            (*path, key),
            f"idle_suspend_when_queued ({format_duration(queued)}) must not be more than "
            f"idle_suspend_after ({format_duration(after)}): lower it",
        )
        return None
    most = checker.typed(table, "max_leases_per_user", path, int, "4")
    if most is not None and most < 1:
        checker.issue((*path, "max_leases_per_user"), f"must be 1 or more, got {most}")
        return None
    checkpoint_dir = checker.typed(table, "checkpoint_dir", path, str, '"/shared/checkpoints"')
    if checkpoint_dir is not None and not checkpoint_dir.strip():
        checker.issue((*path, "checkpoint_dir"), "must not be empty: leave it out instead")
        return None
    if None in values.values() or ("max_leases_per_user" in table and most is None):
        return None
    if "checkpoint_dir" in table and checkpoint_dir is None:
        return None
    return PolicyConfig(
        **values,  # type: ignore[arg-type]
        max_leases_per_user=most if most is not None else 4,
        checkpoint_dir=checkpoint_dir,
    )
