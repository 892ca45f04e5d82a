"""The broker's config file: TOML in, frozen dataclasses out, every problem reported at once.

``gpu-broker serve`` and ``check-config`` call ``load_config(path)``; tests and reloads may call
``parse_config(text, path)``. Both raise ``ConfigError`` listing each problem with its file, line
and key (docs/configuration.md is the reference). Apart from ``load_config`` reading the file,
everything here is pure.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from broker.classes import ClassSession as ClassSession  # re-exported: config's names
from broker.classes import GroupConfig, check_groups
from broker.durations import format_duration, parse_duration
from broker.errors import ConfigError, ConfigIssue
from broker.toml_check import Checker, LineIndex, dotted, syntax_issue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME = re.compile(r"[A-Za-z0-9._-]+")
SLOT_ID = re.compile(r"[A-Za-z0-9._/-]+")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
DEVICE = re.compile(rf"\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

_TOP_KEYS = ("server", "policy", "hosts", "groups")
_SERVER_KEYS = ("listen", "host", "port", "database")
# [policy] durations and their defaults (seconds); every one must be more than 0.
_DURATIONS = {
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
_POLICY_KEYS = (*_DURATIONS, "max_leases_per_user", "checkpoint_dir")
_HOST_KEYS = ("name", "address", "port", "user", "key_file", "known_hosts", "python", "slots")
_HOST_KEYS += ("drained", "gpus", "kind_map")
_SLOT_KEYS = ("id", "kind", "device", "simulated", "count")


@dataclass(frozen=True)
class SlotConfig:
    """One leasable GPU slot: a whole GPU, a MIG slice, or a simulated one."""

    id: str
    host: str
    kind: str
    device: str
    simulated: bool


@dataclass(frozen=True)
class HostConfig:
    """A GPU host and its slots; ``user``, ``key_file`` and ``known_hosts`` are templates."""

    name: str
    address: str
    port: int = 22
    user: str = "{username}"
    key_file: str | None = None
    known_hosts: str | None = None
    python: str = "python3"
    slots: tuple[SlotConfig, ...] = ()
    drained: bool = False
    auto_gpus: bool = False  # gpus = "auto": slots come from probing (Config.with_slots)
    kind_map: tuple[tuple[str, str], ...] = ()  # GPU or MIG name from the probe -> slot kind

    def kind_for(self, gpu_name: str) -> str:
        """The slot kind of a probed GPU/MIG device named ``gpu_name`` (as NVML names it): from
        ``kind_map``, else the name lower-cased with other characters than letters, digits and
        ". _ -" turned into "-" ("NVIDIA A100-SXM4-40GB" -> "nvidia-a100-sxm4-40gb")."""
        for name, kind in self.kind_map:
            if name == gpu_name:
                return kind
        return re.sub(r"[^a-z0-9._-]+", "-", gpu_name.strip().lower()).strip("-") or "gpu"

    def ssh_user(self, username: str) -> str:
        """The SSH login for the Jupyter user ``username`` ("{username}" filled in)."""
        return self.user.replace("{username}", username)

    def key_path(self, username: str) -> str | None:
        """The key file for ``username``: "{username}" filled in, then "~" expanded."""
        return _expand(self.key_file, username)

    def known_hosts_path(self, username: str) -> str | None:
        """The known_hosts file for ``username``: "{username}" filled in, then "~" expanded."""
        return _expand(self.known_hosts, username)

    @property
    def is_local(self) -> bool:
        """True for ``address = "local"``: kernels start as subprocesses, without SSH."""
        return self.address == "local"


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


@dataclass(frozen=True)
class ServerConfig:
    """Where the broker listens and keeps its state."""

    host: str = "127.0.0.1"
    port: int = 8765
    database: Path = Path("broker.sqlite")


@dataclass(frozen=True)
class Config:
    """The whole config; the broker server and CLI read it, nobody mutates it."""

    path: Path
    server: ServerConfig
    policy: PolicyConfig
    hosts: tuple[HostConfig, ...]
    groups: tuple[GroupConfig, ...] = ()

    @property
    def slots(self) -> tuple[SlotConfig, ...]:
        """Every slot of every host, in file order."""
        return tuple(slot for host in self.hosts for slot in host.slots)

    def host(self, name: str) -> HostConfig:
        """The host called ``name``; KeyError if there is none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def slot(self, slot_id: str) -> SlotConfig:
        """The slot with id ``slot_id``; KeyError if there is none."""
        for slot in self.slots:
            if slot.id == slot_id:
                return slot
        raise KeyError(slot_id)

    def group(self, name: str) -> GroupConfig:
        """The group called ``name``; KeyError if there is none."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def groups_of(self, user: str) -> tuple[GroupConfig, ...]:
        """The groups that list ``user`` as a member (empty: an open user), in file order."""
        return tuple(group for group in self.groups if user in group.members)

    def with_slots(self, host_name: str, slots: Iterable[SlotConfig]) -> Config:
        """A copy with the slots of host ``host_name`` replaced by ``slots`` (the server calls
        it after probing a ``gpus = "auto"`` host). KeyError for an unknown host; ValueError
        for a slot of another host or an id another host already uses."""
        self.host(host_name)
        slots = tuple(slots)
        others = {slot.id for slot in self.slots if slot.host != host_name}
        seen: set[str] = set()
        for slot in slots:
            if slot.host != host_name:
                raise ValueError(f"slot {slot.id!r} belongs to {slot.host!r}, not {host_name!r}")
            if slot.id in others or slot.id in seen:
                raise ValueError(f"duplicate slot id {slot.id!r}")
            seen.add(slot.id)
        hosts = tuple(
            replace(host, slots=slots) if host.name == host_name else host for host in self.hosts
        )
        return replace(self, hosts=hosts)


def load_config(path: str | Path) -> Config:
    """Read and check the config file at ``path``; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        issue = ConfigIssue(str(path), None, "", f"cannot read the config file: {reason}")
        raise ConfigError([issue]) from exc
    return parse_config(text, path)


def parse_config(text: str, path: str | Path = "<string>") -> Config:
    """Check TOML ``text`` (from ``path``, for messages and relative paths) and build a Config."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([syntax_issue(str(path), text, exc)]) from None
    checker = _Checker(str(path), LineIndex(text))
    config = checker.config(data, path)
    if checker.issues:
        order = sorted(checker.issues, key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(order)
    assert config is not None
    return config


def _expand(template: str | None, username: str) -> str | None:
    if template is None:
        return None
    return os.path.expanduser(template.replace("{username}", username))


class _Checker(Checker):
    """Walks the broker's config schema; each method returns None where it found problems."""

    def config(self, data: dict, path: Path) -> Config | None:
        self.known_keys(data, _TOP_KEYS, ())
        server = self.server(self.table(data, "server", ("server",)), path)
        policy = self.policy(self.table(data, "policy", ("policy",)))
        hosts = self.hosts(data)
        kinds: set[str] | None = None
        slot_kinds: list[str] = []
        if hosts is not None and not any(host.auto_gpus for host in hosts):
            slot_kinds = [slot.kind for host in hosts for slot in host.slots]
            kinds = set(slot_kinds)
        elif hosts is None:
            kinds = None  # hosts have problems of their own: do not pile kind errors on them
        groups = check_groups(self, data, kinds, slot_kinds)
        if server is None or policy is None or hosts is None or groups is None:
            return None
        return Config(path=path, server=server, policy=policy, hosts=hosts, groups=groups)

    def server(self, table: dict, config_path: Path) -> ServerConfig | None:
        path = ("server",)
        self.known_keys(table, _SERVER_KEYS, path)
        before = len(self.issues)
        host = self.typed(table, "host", path, str, '"127.0.0.1"') or "127.0.0.1"
        port = self.port(table, "port", path, 8765, allow_zero=True)
        listen = self.typed(table, "listen", path, str, '"127.0.0.1:8765"')
        if listen is not None:
            if "host" in table or "port" in table:
                self.issue((*path, "listen"), "give either listen or host and port, not both")
            host, sep, port_text = listen.rpartition(":")
            host = host.strip("[]")
            if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
                self.issue(
                    (*path, "listen"), f'must be "HOST:PORT" like "127.0.0.1:8765", got {listen!r}'
                )
            else:
                port = int(port_text)
        database = self.typed(table, "database", path, str, '"broker.sqlite"') or "broker.sqlite"
        if database != ":memory:":
            database = config_path.parent / os.path.expanduser(database)
        if len(self.issues) > before:
            return None
        return ServerConfig(host=host, port=port, database=Path(database))

    def port(self, table: dict, key: str, path: tuple, default: int, allow_zero: bool) -> int:
        value = self.typed(table, key, path, int, "22")
        if value is None:
            return default
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            self.issue((*path, key), f"port {value} is out of range: use {low}..65535")
            return default
        return value

    def policy(self, table: dict) -> PolicyConfig | None:
        path = ("policy",)
        self.known_keys(table, _POLICY_KEYS, path)
        values: dict[str, float | None] = {}
        for key, default in _DURATIONS.items():
            values[key] = default
            if key in table:
                try:
                    values[key] = parse_duration(table[key])
                except ValueError as exc:
                    self.issue((*path, key), str(exc))
                    values[key] = None
                    continue
                if values[key] == 0:
                    self.issue((*path, key), 'must be more than 0, like "10s"')
                    values[key] = None
        interval, timeout = values["heartbeat_interval"], values["heartbeat_timeout"]
        if interval is not None and timeout is not None and timeout <= 2 * interval:
            key = "heartbeat_timeout" if "heartbeat_timeout" in table else "heartbeat_interval"
            self.issue(
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
            self.issue(
                (*path, key),
                f"idle_suspend_when_queued ({format_duration(queued)}) must not be more than "
                f"idle_suspend_after ({format_duration(after)}): lower it",
            )
            return None
        most = self.typed(table, "max_leases_per_user", path, int, "4")
        if most is not None and most < 1:
            self.issue((*path, "max_leases_per_user"), f"must be 1 or more, got {most}")
            return None
        checkpoint_dir = self.typed(table, "checkpoint_dir", path, str, '"/shared/checkpoints"')
        if checkpoint_dir is not None and not checkpoint_dir.strip():
            self.issue((*path, "checkpoint_dir"), "must not be empty: leave it out instead")
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

    def hosts(self, data: dict) -> tuple[HostConfig, ...] | None:
        raw = data.get("hosts")
        if raw is None:
            self.issue(("hosts",), "no hosts: add at least one [[hosts]] table with its slots")
            return None
        if not isinstance(raw, list) or not all(isinstance(h, dict) for h in raw):
            self.issue(("hosts",), "must be an array of tables: write each host as [[hosts]]")
            return None
        if not raw:
            self.issue(("hosts",), "no hosts: add at least one [[hosts]] table with its slots")
            return None
        before = len(self.issues)
        names: dict[str, int] = {}
        slot_ids: dict[str, tuple] = {}
        hosts = []
        for i, table in enumerate(raw):
            name = table.get("name")
            if isinstance(name, str) and name in names:
                self.issue(
                    ("hosts", i, "name"),
                    f"duplicate host name {name!r} (also hosts[{names[name]}]): "
                    "give each host its own name",
                )
                # its default slot ids clash too: one issue is enough
                host = self.host(table, ("hosts", i), {})
                continue
            if isinstance(name, str):
                names[name] = i
            host = self.host(table, ("hosts", i), slot_ids)
            if host is not None:
                hosts.append(host)
        return tuple(hosts) if len(self.issues) == before else None

    def host(self, table: dict, path: tuple, slot_ids: dict[str, tuple]) -> HostConfig | None:
        self.known_keys(table, _HOST_KEYS, path)
        before = len(self.issues)
        name = self.typed(table, "name", path, str, '"gpu1"')
        if name is None and "name" not in table:
            self.issue(path, 'missing name: add name = "gpu1" (letters, digits, . _ -)')
        elif name is not None and not NAME.fullmatch(name):
            self.issue((*path, "name"), f"bad host name {name!r}: use letters, digits, . _ - only")
        address = self.typed(table, "address", path, str, '"gpu1.example.org" or "local"')
        if "address" not in table:
            self.issue(path, 'missing address: add address = "HOSTNAME" (or "local", no SSH)')
        elif address is not None and not address.strip():
            self.issue((*path, "address"), 'empty address: give a hostname, an IP or "local"')
        port = self.port(table, "port", path, 22, allow_zero=False)
        user = self.template(table, "user", path, '"{username}" or "labuser"') or "{username}"
        key_file = self.template(table, "key_file", path, '"~/.ssh/id_ed25519"')
        known_hosts = self.template(table, "known_hosts", path, '"~/.ssh/known_hosts"')
        python = self.typed(table, "python", path, str, '"/opt/shared-gpu/bin/python"')
        drained = self.typed(table, "drained", path, bool, "true")
        for key, value in (("user", user), ("python", python)):
            if value is not None and not value.strip():
                self.issue((*path, key), f"{key} must not be empty")
        gpus = table.get("gpus")
        auto = gpus == "auto"
        if gpus is not None and not auto:
            self.issue(
                (*path, "gpus"),
                f'gpus must be "auto" (probe the host), got {gpus!r}: or list [[hosts.slots]]',
            )
        elif auto and "slots" in table:
            self.issue(
                (*path, "gpus"), 'give either gpus = "auto" or [[hosts.slots]] tables, not both'
            )
        kind_map = self.kind_map(table, path)
        if auto or (gpus is not None and "slots" not in table):
            slots: tuple | None = ()
        else:
            slots = self.slots(table, path, name if isinstance(name, str) else "?", slot_ids)
        if len(self.issues) > before or slots is None:
            return None
        local = address == "local"
        if known_hosts is None and not local:
            known_hosts = DEFAULT_KNOWN_HOSTS
        return HostConfig(
            name=name,
            address=address,
            port=port,
            user=user,
            key_file=key_file,
            known_hosts=known_hosts,
            python=python or "python3",
            slots=slots,
            drained=bool(drained),
            auto_gpus=auto,
            kind_map=kind_map,
        )

    def kind_map(self, table: dict, path: tuple) -> tuple[tuple[str, str], ...]:
        raw = self.typed(table, "kind_map", path, dict, '{ "NVIDIA A100-SXM4-40GB" = "a100" }')
        out = []
        for gpu_name, kind in (raw or {}).items():
            if not isinstance(kind, str) or not NAME.fullmatch(kind):
                self.issue(
                    (*path, "kind_map", gpu_name),
                    f"bad kind {kind!r} for {gpu_name!r}: use letters, digits, . _ - only",
                )
            else:
                out.append((gpu_name, kind))
        return tuple(out)

    def slots(self, table: dict, path: tuple, host: str, ids: dict[str, tuple]) -> tuple | None:
        raw = table.get("slots")
        if not raw:
            self.issue(
                path,
                "host without slots: add a [[hosts.slots]] table with kind and device, "
                'or gpus = "auto" to probe the host',
            )
            return None
        if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
            self.issue(
                (*path, "slots"), "must be an array of tables: write each slot as [[hosts.slots]]"
            )
            return None
        before = len(self.issues)
        out: list[SlotConfig] = []
        for j, slot_table in enumerate(raw):
            for slot in self.slot(slot_table, (*path, "slots", j), host):
                where = (*path, "slots", j)
                if slot.id in ids:
                    self.issue(
                        (*where, "id") if "id" in slot_table else where,
                        f"duplicate slot id {slot.id!r} (also {dotted(ids[slot.id])}): "
                        "set a unique id",
                    )
                ids.setdefault(slot.id, where)
                out.append(slot)
        return tuple(out) if len(self.issues) == before else None

    def slot(self, table: dict, path: tuple, host: str) -> list[SlotConfig]:
        self.known_keys(table, _SLOT_KEYS, path)
        before = len(self.issues)
        kind = self.typed(table, "kind", path, str, '"a100"')
        if "kind" not in table:
            self.issue(path, 'missing kind: add kind = "a100" (any name users ask for)')
        elif kind is not None and not NAME.fullmatch(kind):
            self.issue((*path, "kind"), f"bad kind {kind!r}: use letters, digits, . _ - only")
        slot_id = self.typed(table, "id", path, str, '"gpu1-0"')
        if slot_id is not None and not SLOT_ID.fullmatch(slot_id):
            self.issue((*path, "id"), f"bad slot id {slot_id!r}: use letters, digits, . _ / - only")
        simulated = bool(self.typed(table, "simulated", path, bool, "true"))
        count = self.typed(table, "count", path, int, "4")
        device = self.typed(table, "device", path, str, '"0" or "GPU-<uuid>" or "MIG-<uuid>"')
        if "count" in table:
            if not simulated:
                self.issue(
                    (*path, "count"),
                    "count is only for simulated slots: add simulated = true, "
                    "or list each GPU as its own slot",
                )
            elif count is not None and count < 1:
                self.issue((*path, "count"), f"count must be 1 or more, got {count}")
            if "device" in table or "id" in table:
                self.issue(
                    (*path, "count"),
                    "with count, leave out device and id (devices are 0..count-1, ids HOST/0..)",
                )
        elif "device" not in table:
            self.issue(
                path, 'missing device: add device = "0" (an index, "GPU-<uuid>" or "MIG-<uuid>")'
            )
        elif device is not None and not simulated and not DEVICE.fullmatch(device):
            self.issue(
                (*path, "device"),
                f'bad device {device!r}: use a GPU index like "0", "GPU-<uuid>" or '
                '"MIG-<uuid>" (as `nvidia-smi -L` lists them), or set simulated = true',
            )
        elif device is not None and not device.strip():
            self.issue((*path, "device"), "device must not be empty")
        if len(self.issues) > before:
            return []
        if "count" in table:
            return [SlotConfig(f"{host}/{n}", host, kind, str(n), True) for n in range(count)]
        return [SlotConfig(slot_id or f"{host}/{device}", host, kind, device, simulated)]
