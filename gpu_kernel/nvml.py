"""NVML figures for this kernel's device and process, and the device list for ``gpu_kernel probe``.

The only module that imports ``pynvml`` (from the ``nvidia-ml-py`` package). Without NVML (no
module, no driver, no GPU) every function answers ``None`` or ``[]``; nothing here raises.

Tests inject a stand-in: a ``pynvml`` already in ``sys.modules`` is used as it is, and
``SHARED_GPU_FAKE_NVML=<devices.json>`` makes this module use ``tests.fake_nvml`` (which reads
that file), so kernels started in subprocesses and over SSH run the same code path.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

FAKE_ENV = "SHARED_GPU_FAKE_NVML"
FAKE_MODULE = "tests.fake_nvml"
_MIG_PROFILE = re.compile(r"\bMIG\s+(\d+g\.\d+gb)\b", re.IGNORECASE)

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _load() -> ModuleType | None:
    """The initialised pynvml module, or None where NVML cannot be used (cached)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module: ModuleType | None = None
        try:
            if os.environ.get(FAKE_ENV) and "pynvml" not in sys.modules:
                module = importlib.import_module(FAKE_MODULE)
            else:
                module = importlib.import_module("pynvml")
            module.nvmlInit()
        except Exception as e:  # ImportError, NVMLError (no driver, no library), anything odd
            log.debug("NVML unavailable: %s", e)
            module = None
        _state["module"] = module
        return module


def reset() -> None:
    """Forget the loaded module (tests switch fakes)."""
    with _lock:
        _state.clear()


def available() -> bool:
    """Whether NVML answers on this machine."""
    return _load() is not None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _visible_device() -> str:
    """The first ``CUDA_VISIBLE_DEVICES`` entry (the kernel's device); "0" when unset."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return "0"
    return raw.split(",")[0].strip()


def _handle(nv: ModuleType, device: str) -> Any:
    if device.isdigit():
        return nv.nvmlDeviceGetHandleByIndex(int(device))
    if device.startswith(("GPU-", "MIG-")):
        return nv.nvmlDeviceGetHandleByUUID(device.encode())
    raise ValueError(f"not an NVML device: {device!r}")


def _is_mig(nv: ModuleType, handle: Any) -> bool:
    try:
        return bool(int(nv.nvmlDeviceIsMigDeviceHandle(handle)))
    except Exception:
        return False


def _process_memory(nv: ModuleType, handle: Any, pids: set[int]) -> int | None:
    try:
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    total = 0
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        if getattr(p, "pid", None) in pids and isinstance(used, int) and used >= 0:
            total += used
    return total


def _own_pids() -> set[int]:
    """This process and its children (NVML reports host PIDs; in a PID namespace none match)."""
    pids = {os.getpid()}
    try:
        import psutil

        pids.update(c.pid for c in psutil.Process().children(recursive=True))
    except Exception:
        pass
    return pids


def device_usage(device: str | None = None, pids: Iterable[int] | None = None) -> dict | None:
    """Figures for ``device`` (default: the kernel's own) and ``pids`` (default: this process).

    ``{"device", "name", "mig", "memory_used", "memory_total", "utilization", "process_memory"}``
    in bytes and percent; ``utilization`` is None on MIG devices (NVML does not support it there).
    None without NVML or when the device is not one NVML knows.
    """
    nv = _load()
    if nv is None:
        return None
    device = _visible_device() if device is None else device
    try:
        handle = _handle(nv, device)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        name = _text(nv.nvmlDeviceGetName(handle))
    except Exception as e:
        log.debug("NVML has no device %r: %s", device, e)
        return None
    mig = _is_mig(nv, handle)
    utilization: int | None = None
    if not mig:
        try:
            utilization = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            utilization = None
    return {
        "device": device,
        "name": name,
        "mig": mig,
        "memory_used": int(mem.used),
        "memory_total": int(mem.total),
        "utilization": utilization,
        "process_memory": _process_memory(nv, handle, set(pids) if pids else _own_pids()),
    }


def mig_profile(name: str) -> str | None:
    """``"1g.10gb"`` from a MIG device name such as ``"NVIDIA A100-SXM4-80GB MIG 1g.10gb"``."""
    m = _MIG_PROFILE.search(name)
    return m.group(1).lower() if m else None


def _mig_devices(nv: ModuleType, handle: Any) -> list[dict]:
    found = []
    try:
        count = int(nv.nvmlDeviceGetMaxMigDeviceCount(handle))
    except Exception:
        return found
    for j in range(count):
        try:
            mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            name = _text(nv.nvmlDeviceGetName(mh))
            found.append(
                {
                    "index": j,
                    "name": name,
                    "profile": mig_profile(name),
                    "uuid": _text(nv.nvmlDeviceGetUUID(mh)),
                    "memory_total": int(nv.nvmlDeviceGetMemoryInfo(mh).total),
                }
            )
        except Exception:  # NotFound: no MIG device at that index
            continue
    return found


def list_devices() -> list[dict]:
    """Every GPU NVML sees, in NVML order; ``[]`` without NVML.

    Each: ``{"index", "name", "uuid", "memory_total", "mig_enabled", "mig_devices": [{"index",
    "name", "profile", "uuid", "memory_total"}]}``.
    """
    nv = _load()
    if nv is None:
        return []
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception:
        return []
    devices = []
    for i in range(count):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            entry = {
                "index": i,
                "name": _text(nv.nvmlDeviceGetName(h)),
                "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                "memory_total": int(nv.nvmlDeviceGetMemoryInfo(h).total),
            }
        except Exception as e:
            log.warning("NVML: skipping GPU %d: %s", i, e)
            continue
        try:
            enabled = int(nv.nvmlDeviceGetMigMode(h)[0]) == 1
        except Exception:  # not MIG-capable
            enabled = False
        entry["mig_enabled"] = enabled
        entry["mig_devices"] = _mig_devices(nv, h) if enabled else []
        devices.append(entry)
    return devices
