"""The provisioner's settings, read from a kernelspec's ``metadata.kernel_provisioner.config``.

jupyter_client silently drops unknown keys of that stanza, so ``SharedGPUProvisioner.pre_launch``
validates it here and turns every mistake into one error that names the key and the fix.
``provisioner.install`` builds the same stanza from its command-line options.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from typing import Any

from broker.config.durations import parse_duration
from gpu_kernel.errors import SharedGPUError

DEFAULT_TOKEN_ENV = "SHARED_GPU_TOKEN"
DEFAULT_TOKEN_FILE = "~/.config/jupyter-shared-gpu/token"


class SettingsError(SharedGPUError):
    """The kernelspec's provisioner config is wrong."""


def parse_seconds(value: Any, key: str) -> float:
    """A duration longer than zero: seconds, or text such as "90s", "15m", "1h30m" (the broker's
    parser, ``broker.config.durations``, so the kernelspec and the broker config agree)."""
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise SettingsError(
            f"{key}: {value!r} is not a duration",
            'write a number with a unit, such as "90s", "10m" or "1h30m"',
        ) from None
    if seconds <= 0:
        raise SettingsError(f"{key}: must be longer than zero, got {value!r}")
    return seconds


@dataclass(frozen=True)
class ProvisionerSettings:
    """What one "Shared GPU" kernelspec asks for, and how to reach the broker as ourselves."""

    broker_url: str
    slot_kind: str = "any"
    token_env: str = DEFAULT_TOKEN_ENV
    token_file: str = DEFAULT_TOKEN_FILE
    lease_timeout: float = 600.0  # how long to wait in the queue before giving up
    launch_timeout: float = 60.0  # SSH connect + kernel start
    orphan_grace: float = 120.0  # a kernel that hears nothing from us this long saves, exits
    ssh_key_file: str | None = None  # overrides the broker's key_file for this Jupyter server
    known_hosts_file: str | None = None  # overrides the broker's known_hosts
    attach: str = "lazy"  # "lazy": no lease until the first cell; "eager": at start
    link_timeout: float = 10.0  # no word from the host this long: the SSH link is lost
    warm: float = 1800.0  # a warm interpreter waits this long on a host for the next start (0: off)
    warm_preload: tuple[str, ...] = ("torch",)  # what it imports beforehand (when installed)

    @classmethod
    def from_config(
        cls, config: dict[str, Any], spec_name: str = "Shared GPU"
    ) -> ProvisionerSettings:
        """Validate a kernelspec's provisioner config; raise SettingsError naming each problem."""
        known = {f.name for f in fields(cls)}
        problems: list[str] = []
        for key in config:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                problems.append(
                    f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
        values: dict[str, Any] = {}
        url = config.get("broker_url")
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url or ""):
            problems.append(
                f"broker_url must be an http(s) URL such as http://127.0.0.1:8765, got {url!r}"
            )
        else:
            values["broker_url"] = url.rstrip("/")
        for key in ("slot_kind", "token_env", "token_file", "ssh_key_file", "known_hosts_file"):
            if key in config:
                value = config[key]
                if not isinstance(value, str) or not value.strip():
                    problems.append(f"{key} must be a non-empty string, got {value!r}")
                else:
                    values[key] = value
        if "slot_kind" in values and not re.fullmatch(r"[A-Za-z0-9._-]+", values["slot_kind"]):
            problems.append(
                f"slot_kind {values['slot_kind']!r} may hold only letters, digits, '.', '_', '-'"
            )
        if "attach" in config:
            if config["attach"] not in ("lazy", "eager"):
                problems.append(
                    f'attach must be "lazy" (no GPU until the first cell) or "eager", '
                    f"got {config['attach']!r}"
                )
            else:
                values["attach"] = config["attach"]
        if "warm" in config:
            if config["warm"] in (0, "0", "off"):
                values["warm"] = 0.0
            else:
                try:
                    values["warm"] = parse_seconds(config["warm"], "warm")
                except SettingsError as err:
                    problems.append(err.message + ' (or 0 / "off": no warm interpreter)')
        if "warm_preload" in config:
            preload = config["warm_preload"]
            if not isinstance(preload, list) or not all(
                isinstance(m, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", m) for m in preload
            ):
                problems.append(f"warm_preload must be a list of module names, got {preload!r}")
            else:
                values["warm_preload"] = tuple(preload)
        for key in ("lease_timeout", "launch_timeout", "orphan_grace", "link_timeout"):
            if key in config:
                try:
                    values[key] = parse_seconds(config[key], key)
                except SettingsError as err:
                    problems.append(err.message)
        if problems:
            raise SettingsError(
                f"kernelspec {spec_name!r}: bad provisioner config: " + "; ".join(problems),
                "fix the kernelspec with `jupyter shared-gpu install --broker-url URL ...` "
                "(see `jupyter shared-gpu install --help`)",
            )
        return cls(**values)
