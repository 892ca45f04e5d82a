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
    "fence_save_grace": 60.0,
    "suspend_retry": 300.0,
    "busy_grace": 60.0,
}
COUNTS = {"max_leases_per_user": 4, "max_queued_per_user": 3}  # [policy] integers, each >= 1
OPTIONAL = ("release_after_cell",)  # [policy] durations with no default: absent means off
POLICY_KEYS = (*DURATIONS, *COUNTS, *OPTIONAL, "checkpoint_dir", "members_only")
MAX_FENCE_SAVE_GRACE = 600.0  # the fencing command refuses to wait longer for a save


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
    fence_save_grace: float = 60.0  # a fenced kernel's time to save itself before it is killed
    suspend_retry: float = 300.0  # an unanswered suspend order is given again after this
    busy_grace: float = 60.0  # a "quota"/"max_lease" order: time for a running cell to end
    max_leases_per_user: int = 4
    max_queued_per_user: int = 3
    checkpoint_dir: str | None = None  # shared by all hosts: checkpoints need no copy
    members_only: bool = False  # True: users in no group are refused (a hub's other users)
    release_after_cell: float | None = None  # per-cell binding while others wait; None: off


def scheduler_policy(config: PolicyConfig, groups: Iterable[GroupConfig] = ()) -> Policy:
    """The scheduler's policy from ``Config.policy`` and ``Config.groups``."""
    return Policy(
        heartbeat_timeout=config.heartbeat_timeout,
        queue_timeout=config.queue_timeout,
        max_leases_per_user=config.max_leases_per_user,
        max_queued_per_user=config.max_queued_per_user,
        idle_suspend_after=config.idle_suspend_after,
        idle_suspend_when_queued=config.idle_suspend_when_queued,
        max_lease=config.max_lease,
        usage_half_life=config.usage_half_life,
        fence_retry=config.fence_retry,
        suspend_retry=config.suspend_retry,
        busy_grace=config.busy_grace,
        members_only=config.members_only,
        release_after_cell=config.release_after_cell,
        groups=tuple(groups),
    )


def check_policy(checker: Checker, table: dict) -> PolicyConfig | None:
    """Check the ``[policy]`` table; None when it has problems (each one is an issue). Besides
    each value on its own, it refuses the combinations that cannot work (``_combinations``)."""
    path = ("policy",)
    checker.known_keys(table, POLICY_KEYS, path)
    before = len(checker.issues)
    values: dict[str, float] = {}
    for key, default in DURATIONS.items():
        values[key] = default
        if key in table:
            try:
                values[key] = parse_duration(table[key])
            except ValueError as exc:
                checker.issue((*path, key), str(exc))
                continue
            if values[key] == 0:
                checker.issue((*path, key), 'must be more than 0, like "10s"')
    release = optional_duration(checker, table, "release_after_cell", path)
    counts: dict[str, int] = {}
    for key, default in COUNTS.items():
        value = checker.typed(table, key, path, int, str(default))
        counts[key] = default if value is None else value
        if value is not None and value < 1:
            checker.issue((*path, key), f"must be 1 or more, got {value}")
    checkpoint_dir = checker.typed(table, "checkpoint_dir", path, str, '"/shared/checkpoints"')
    if checkpoint_dir is not None and not checkpoint_dir.strip():
        checker.issue((*path, "checkpoint_dir"), "must not be empty: leave it out instead")
    members_only = checker.typed(table, "members_only", path, bool, "true")
    if len(checker.issues) > before:
        return None
    problems = _combinations(values)
    if release is not None:
        problems += [(("release_after_cell",), why) for why in release_problems(release, values)]
    for keys, message in problems:
        key = next((k for k in keys if k in table), keys[0])
        checker.issue((*path, key), message)
    if len(checker.issues) > before:
        return None
    return PolicyConfig(
        **values,  # type: ignore[arg-type]
        **counts,
        checkpoint_dir=checkpoint_dir,
        members_only=bool(members_only),
        release_after_cell=release,
    )


def optional_duration(checker: Checker, table: dict, key: str, path: tuple) -> float | None:
    """A duration that may be left out (None); 0 or a bad one is an issue (and None)."""
    if key not in table:
        return None
    try:
        seconds = parse_duration(table[key])
    except ValueError as exc:
        checker.issue((*path, key), str(exc))
        return None
    if seconds == 0:
        checker.issue((*path, key), 'must be more than 0, like "10s"; leave it out to turn it off')
        return None
    return seconds


def release_problems(release: float, policy: dict[str, float]) -> list[str]:
    """Why ``release_after_cell`` (seconds, from ``[policy]`` or a group) cannot work with the
    ``[policy]`` durations ``policy``; empty when it can. ``broker.config.loader`` asks it for
    each group's value too."""
    d = format_duration
    out = []
    queued = policy["idle_suspend_when_queued"]
    if release >= queued:
        out.append(
            f"release_after_cell ({d(release)}) must be shorter than idle_suspend_when_queued "
            f"({d(queued)}): a kernel idle that long while others wait is suspended anyway, so "
            f"per-cell binding would never act; lower it below {d(queued)}"
        )
    interval = policy["heartbeat_interval"]
    if release < interval:
        out.append(
            f"release_after_cell ({d(release)}) is shorter than heartbeat_interval "
            f"({d(interval)}): the broker hears that a cell ended only with a heartbeat, and its "
            "order reaches the kernel with the next one, so a kernel would keep its GPU for up "
            f"to twice heartbeat_interval after each cell anyway; lower heartbeat_interval to "
            f"{d(release)} or less, or raise release_after_cell"
        )
    return out


def _combinations(v: dict[str, float]) -> list[tuple[tuple[str, ...], str]]:
    """(keys, why) for each combination of ``[policy]`` durations that cannot work; the issue goes
    on the first of ``keys`` the file sets."""
    d = format_duration
    out = []
    if v["heartbeat_timeout"] <= 2 * v["heartbeat_interval"]:
        out.append(
            (
                ("heartbeat_timeout", "heartbeat_interval"),
                f"heartbeat_timeout ({d(v['heartbeat_timeout'])}) must be more than twice "
                f"heartbeat_interval ({d(v['heartbeat_interval'])}): raise heartbeat_timeout "
                f"above {d(2 * v['heartbeat_interval'])}",
            )
        )
    if v["idle_suspend_when_queued"] > v["idle_suspend_after"]:
        out.append(
            (
                ("idle_suspend_when_queued", "idle_suspend_after"),
                f"idle_suspend_when_queued ({d(v['idle_suspend_when_queued'])}) must not be more "
                f"than idle_suspend_after ({d(v['idle_suspend_after'])}): lower it",
            )
        )
    if v["fence_save_grace"] > MAX_FENCE_SAVE_GRACE:
        out.append(
            (
                ("fence_save_grace",),
                f"fence_save_grace ({d(v['fence_save_grace'])}) is over "
                f"{d(MAX_FENCE_SAVE_GRACE)}: the fencing command on the hosts waits at most that "
                "long for a kernel to save itself; lower it",
            )
        )
    if v["suspend_retry"] < v["heartbeat_interval"]:
        out.append(
            (
                ("suspend_retry", "heartbeat_interval"),
                f"suspend_retry ({d(v['suspend_retry'])}) is shorter than heartbeat_interval "
                f"({d(v['heartbeat_interval'])}): an order reaches the kernel with the next "
                "heartbeat reply, so it would be given again before it arrived; raise it",
            )
        )
    if v["busy_grace"] >= v["max_lease"]:
        out.append(
            (
                ("busy_grace", "max_lease"),
                f"busy_grace ({d(v['busy_grace'])}) must be shorter than max_lease "
                f"({d(v['max_lease'])}): a lease ordered off at max_lease would run more than "
                "twice as long; lower busy_grace",
            )
        )
    return out
