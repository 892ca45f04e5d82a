"""Slots of a ``gpus = "auto"`` host: ask its fencing account's command for ``probe``.

``discover_slots(host)`` runs ``probe`` through the host's forced command (the broker's only way in,
``broker.hosts.fencing``), reads the probe's JSON line and maps it to ``SlotConfig``s: one slot per
GPU (kind from the host's ``kind_map`` by NVML name, else the normalised name such as
"nvidia-a100-sxm4-40gb"), except that a GPU in MIG mode contributes one slot per MIG device instead
(kind from ``kind_map`` by the MIG device's name, else "mig-<profile>" such as "mig-1g.10gb"). The
slot's device is the GPU or MIG UUID (valid in ``CUDA_VISIBLE_DEVICES``, stable across reboots,
unlike indices).
"""

from __future__ import annotations

from broker.config.hosts import HostConfig, SlotConfig
from broker.hosts.fencing import FenceError, run_fence_command
from gpu_kernel.errors import SharedGPUError

PROBE_TIMEOUT = 60.0


class DiscoveryError(SharedGPUError):
    """Probing a ``gpus = "auto"`` host failed; the message names the host, the hint the fix."""


def run_probe(host: HostConfig) -> dict:
    """The probe's reply from ``host``, through its fencing account's forced command
    (``probe``); raises DiscoveryError (the fencing command's hints kept)."""
    try:
        data = run_fence_command(host, ["probe"], timeout=PROBE_TIMEOUT)
    except FenceError as e:
        raise DiscoveryError(
            f'cannot probe the GPUs of host {host.name} (gpus = "auto"): {e.message}',
            e.hint
            or f"install jupyter-shared-gpu[gpu] on {host.name} and name that interpreter in "
            "the fencing account's forced command",
        ) from e
    if not isinstance(data.get("devices"), list):
        raise DiscoveryError(
            f"the probe on host {host.name} answered without a device list",
            "install the same jupyter-shared-gpu version on the host as on the broker",
        )
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


def discover_slots(host: HostConfig) -> tuple[SlotConfig, ...]:
    """Probe ``host`` (its fencing account's ``probe``) and return its slots."""
    return slots_from_probe(host, run_probe(host))
