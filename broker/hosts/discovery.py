"""Slots of a ``gpus = "auto"`` host: run ``python -m gpu_kernel probe`` on it over SSH.

``discover_slots(host, username)`` connects as the broker's SSH user for that host, reads the
probe's JSON line and maps it to ``SlotConfig``s: one slot per GPU (kind from the host's
``kind_map`` by NVML name, else the normalised name such as "nvidia-a100-sxm4-40gb"), except that
a GPU in MIG mode contributes one slot per MIG device instead (kind from ``kind_map`` by the MIG
device's name, else "mig-<profile>" such as "mig-1g.10gb"). The slot's device is the GPU or MIG
UUID (valid in ``CUDA_VISIBLE_DEVICES``, stable across reboots, unlike indices).
"""

from __future__ import annotations

import json

from broker.config.hosts import HostConfig, SlotConfig
from broker.hosts.fencing import host_target
from gpu_kernel.errors import SharedGPUError
from gpu_kernel.ssh import connect

PROBE_TIMEOUT = 60.0


class DiscoveryError(SharedGPUError):
    """Probing a ``gpus = "auto"`` host failed; the message names the host, the hint the fix."""


def run_probe(host: HostConfig, username: str) -> dict:
    """The probe's reply from ``host``; raises DiscoveryError (SSH errors keep their hints)."""
    target = host_target(host, username)
    argv = [host.python, "-m", "gpu_kernel", "probe"]
    try:
        with connect(target) as conn:
            res = conn.run(argv, timeout=PROBE_TIMEOUT)
    except SharedGPUError as e:
        raise DiscoveryError(
            f'cannot probe the GPUs of host {host.name} (gpus = "auto"): {e.message}', e.hint
        ) from e
    out = res.stdout.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(out[-1])
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            raise ValueError("not a probe reply")
    except (ValueError, IndexError) as e:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise DiscoveryError(
            f"`{' '.join(argv)}` on host {host.name} failed (exit status {res.returncode}): "
            + ("\n".join(err) or "no output"),
            f"install jupyter-shared-gpu[gpu] on {host.name} "
            f"(`{host.python} -m pip install 'jupyter-shared-gpu[gpu]'`) and set the host's "
            "`python` in the config to that interpreter",
        ) from e
    return data


def slots_from_probe(host: HostConfig, data: dict) -> tuple[SlotConfig, ...]:
    """Map a probe reply to slots (pure; see the module docstring)."""
    if not data.get("nvml", True):
        raise DiscoveryError(
            f'host {host.name} has gpus = "auto" but NVML does not answer there '
            "(no NVIDIA driver, or nvidia-ml-py missing)",
            f"install the NVIDIA driver and `{host.python} -m pip install nvidia-ml-py` on "
            f"{host.name}, or list its slots with [[hosts.slots]]",
        )
    explicit = dict(host.kind_map)
    slots: list[SlotConfig] = []
    for gpu in data["devices"]:
        try:
            index, name, uuid = int(gpu["index"]), str(gpu["name"]), str(gpu["uuid"])
            migs = list(gpu.get("mig_devices") or []) if gpu.get("mig_enabled") else []
        except (KeyError, TypeError, ValueError) as e:
            raise DiscoveryError(
                f"host {host.name}: unreadable probe entry {gpu!r}",
                "install the same jupyter-shared-gpu version on the host as on the broker",
            ) from e
        if not migs:
            slots.append(
                SlotConfig(f"{host.name}/{index}", host.name, host.kind_for(name), uuid, False)
            )
            continue
        for mig in migs:
            mig_name = str(mig.get("name", ""))
            profile = mig.get("profile") or mig_name.rsplit(" ", 1)[-1].lower()
            kind = explicit.get(mig_name) or host.kind_for(f"mig-{profile}")
            slot_id = f"{host.name}/{index}.{int(mig['index'])}"
            slots.append(SlotConfig(slot_id, host.name, kind, str(mig["uuid"]), False))
    if not slots:
        raise DiscoveryError(
            f'host {host.name} has gpus = "auto" but the probe found no GPU there',
            "check `nvidia-smi` on the host, or list its slots with [[hosts.slots]]",
        )
    return tuple(slots)


def discover_slots(host: HostConfig, username: str) -> tuple[SlotConfig, ...]:
    """Probe ``host`` over SSH as ``username``'s login and return its slots."""
    return slots_from_probe(host, run_probe(host, username))
