"""Hosts and their slots: the ``[[hosts]]`` part of the config. Pure.

``broker.config.loader`` checks ``[[hosts]]`` tables with ``HostsChecker`` (its own checker
subclasses it) and keeps the result in ``Config.hosts``; ``broker.hosts.fencing`` and
``broker.hosts.discovery`` read ``HostConfig`` to reach a host, the scheduler sees each
``SlotConfig`` as a ``SlotState``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from broker.config.toml_check import Checker, dotted
from gpu_kernel.protocol import HOST_NAME_RE, USER_NAME_RE

NAME = re.compile(r"[A-Za-z0-9._-]+")
SLOT_ID = re.compile(r"[A-Za-z0-9._/-]+")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
DEVICE = re.compile(rf"\d+|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

_HOST_KEYS = ("name", "address", "port", "user", "key_file", "known_hosts", "python", "slots")
_HOST_KEYS += ("drained", "gpus", "kind_map", "fence_user", "fence_key_file", "fence_known_hosts")
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
    # The broker's own way in (fencing, probing): an account whose key runs only
    # ``python -m gpu_kernel fence`` (a forced command). Required unless address = "local".
    fence_user: str | None = None
    fence_key_file: str | None = None  # on the broker's machine; "~" is the broker's home
    fence_known_hosts: str | None = None  # None: known_hosts ("{username}" = fence_user)

    def fence_known_hosts_path(self) -> str | None:
        """The known_hosts file the broker checks this host's key against."""
        if self.fence_known_hosts is not None:
            return os.path.expanduser(self.fence_known_hosts)
        return _expand(self.known_hosts, self.fence_user or "")

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


def _expand(template: str | None, username: str) -> str | None:
    if template is None:
        return None
    return os.path.expanduser(template.replace("{username}", username))


class HostsChecker(Checker):
    """Checks ``[[hosts]]`` (and ports); each method returns None where it found problems."""

    def port(self, table: dict, key: str, path: tuple, default: int, allow_zero: bool) -> int:
        value = self.typed(table, key, path, int, "22")
        if value is None:
            return default
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            self.issue((*path, key), f"port {value} is out of range: use {low}..65535")
            return default
        return value

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
        elif name is not None and not HOST_NAME_RE.fullmatch(name):
            self.issue(
                (*path, "name"),
                f"bad host name {name!r}: it names a directory on the host, so use 1 to 64 "
                "letters, digits, . _ - starting with a letter or digit",
            )
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
        fence = self.fence_account(table, path, address)
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
            **fence,
        )

    def fence_account(self, table: dict, path: tuple, address: str | None) -> dict[str, str]:
        """``fence_user``, ``fence_key_file`` (both required for an SSH host: the broker has no
        other way to make sure a kernel is gone) and ``fence_known_hosts``."""
        out = {}
        for key, example in (
            ("fence_user", '"gpufence"'),
            ("fence_key_file", '"/etc/gpu-broker/fence_ed25519"'),
            ("fence_known_hosts", '"/etc/ssh/ssh_known_hosts"'),
        ):
            value = self.typed(table, key, path, str, example)
            if value is not None and not value.strip():
                self.issue((*path, key), f"{key} must not be empty")
            elif value is not None:
                out[key] = value
        user = out.get("fence_user")
        if user is not None and not USER_NAME_RE.fullmatch(user):
            self.issue((*path, "fence_user"), f"bad fence_user {user!r}: give a Unix login name")
        if address is not None and address != "local":
            for key in ("fence_user", "fence_key_file"):
                if key not in table:
                    self.issue(
                        path,
                        f"missing {key}: the broker reaches this host only through a fencing "
                        "account whose key runs `python -m gpu_kernel fence` and nothing else; "
                        'add fence_user = "gpufence" and fence_key_file = "/etc/gpu-broker/'
                        'fence_ed25519" (docs/configuration.md, "Fencing")',
                    )
                    break
        return out

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
