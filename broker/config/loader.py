"""The broker's config file: TOML in, frozen dataclasses out, every problem reported at once.

``gpu-broker serve`` and ``check-config`` call ``load_config(path)``; tests and reloads may call
``parse_config(text, path)``. Both raise ``ConfigError`` listing each problem with its file, line
and key (docs/configuration.md is the reference). Apart from ``load_config`` reading the file,
everything here is pure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from broker.config.groups import check_groups
from broker.config.hosts import HostConfig, HostsChecker, SlotConfig
from broker.config.identity import NO_IDENTITY, IdentityConfig, check_identity
from broker.config.policy import PolicyConfig, check_policy, release_problems
from broker.config.toml_check import LineIndex, syntax_issue
from broker.core.groups import ClassSession as ClassSession  # re-exported: config's names
from broker.core.groups import GroupConfig
from broker.errors import ConfigError, ConfigIssue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOP_KEYS = ("server", "policy", "hosts", "groups", "identity")
_SERVER_KEYS = ("listen", "host", "port", "database")


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
    identity: IdentityConfig = NO_IDENTITY

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

    def with_hub_members(self, hub_members: Mapping[str, frozenset[str]]) -> Config:
        """A copy whose groups have their ``hub_group``'s users added to ``members`` and their
        ``teacher_hub_group``'s users to ``teachers`` (``hub_members``: hub group -> users, as
        ``BrokerService.set_hub_members`` got them); itself when no group names a hub group."""
        if not any(g.hub_group or g.teacher_hub_group for g in self.groups):
            return self
        groups = tuple(
            replace(
                group,
                members=group.members | hub_members.get(group.hub_group or "", frozenset()),
                teachers=group.teachers
                | hub_members.get(group.teacher_hub_group or "", frozenset()),
            )
            for group in self.groups
        )
        return replace(self, groups=groups)

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


class _Checker(HostsChecker):
    """Walks the broker's config schema (hosts: ``HostsChecker``, policy: ``check_policy``,
    groups: ``check_groups``); each method returns None where it found problems."""

    def config(self, data: dict, path: Path) -> Config | None:
        self.known_keys(data, _TOP_KEYS, ())
        server = self.server(self.table(data, "server", ("server",)), path)
        policy = check_policy(self, self.table(data, "policy", ("policy",)))
        hosts = self.hosts(data)
        kinds: set[str] | None = None
        slot_kinds: list[str] = []
        if hosts is not None and not any(host.auto_gpus for host in hosts):
            slot_kinds = [slot.kind for host in hosts for slot in host.slots]
            kinds = set(slot_kinds)
        elif hosts is None:
            kinds = None  # hosts have problems of their own: do not pile kind errors on them
        identity = check_identity(self, data, path)
        has_hub = identity is None or identity.jupyterhub is not None  # None: already reported
        groups = check_groups(self, data, kinds, slot_kinds, has_hub)
        if policy is not None and groups is not None:
            values = asdict(policy)
            for i, group in enumerate(groups):
                if group.release_after_cell is not None:
                    for why in release_problems(group.release_after_cell, values):
                        self.issue(("groups", i, "release_after_cell"), why)
        if self.issues or server is None or policy is None or hosts is None or groups is None:
            return None
        if identity is None:
            return None
        return Config(
            path=path, server=server, policy=policy, hosts=hosts, groups=groups, identity=identity
        )

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
