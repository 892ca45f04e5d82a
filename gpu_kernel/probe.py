"""``python -m gpu_kernel probe``: the host's GPUs and MIG devices as one JSON line.

The broker runs it over SSH for hosts with ``gpus = "auto"`` (``broker.hosts.discovery``). The line
is ``{"ok": true, "nvml": bool, "hostname": str, "version": str, "devices": [...]}`` with the
devices of ``gpu_kernel.nvml.list_devices``; ``nvml`` is false where NVML is missing (no driver, no
nvidia-ml-py), so the broker can say why a host shows no GPUs.
"""

from __future__ import annotations

import json
import socket

from gpu_kernel import __version__, nvml


def probe() -> dict:
    """What this host has, as the broker reads it."""
    return {
        "ok": True,
        "nvml": nvml.available(),
        "hostname": socket.gethostname(),
        "version": __version__,
        "devices": nvml.list_devices(),
    }


def main() -> int:
    print(json.dumps(probe(), separators=(",", ":")), flush=True)
    return 0
