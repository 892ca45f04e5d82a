"""A stand-in for the ``pynvml`` module (nvidia-ml-py): the subset ``gpu_kernel.nvml`` calls.

Devices come from a JSON file named by ``SHARED_GPU_FAKE_NVML`` (read at ``nvmlInit``), or from
``configure(data)`` in-process. ``gpu_kernel.nvml`` imports this module when that variable is set,
so kernels in subprocesses and probes over SSH use the same code path as with a real driver::

    {"driver": true,
     "devices": [{"name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-...", "memory_total": N,
                  "memory_used": N, "utilization": 37,
                  "processes": [{"pid": "self", "used": N}],       # "self": the calling process
                  "mig": [{"profile": "1g.10gb", "uuid": "MIG-...", "memory_total": N, ...}]}]}

A device with a ``mig`` list has MIG mode enabled; its MIG devices have no utilisation (as NVML).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "SHARED_GPU_FAKE_NVML"
NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNINITIALIZED = 1
NVML_DEVICE_MIG_ENABLE = 1
GiB = 1 << 30


class NVMLError(Exception):
    """As pynvml's: ``value`` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {3: "Not Supported", 6: "Not Found", 9: "Driver Not Loaded"}.get(
            self.value, f"NVML error {self.value}"
        )


@dataclass
class _Handle:
    spec: dict
    parent: _Handle | None = None

    @property
    def is_mig(self) -> bool:
        return self.parent is not None


@dataclass
class Memory:
    total: int
    used: int
    free: int


@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class Process:
    pid: int
    usedGpuMemory: int | None  # pynvml's field name


_data: dict[str, Any] | None = None
_configured: dict[str, Any] | None = None


def configure(data: dict | None) -> None:
    """Use ``data`` (the JSON layout above) instead of the file; None goes back to the file."""
    global _configured, _data
    _configured, _data = data, None


def write_config(path: Path, devices: list[dict], driver: bool = True) -> dict[str, str]:
    """Write the JSON file; returns the environment that makes ``gpu_kernel.nvml`` use it."""
    path.write_text(json.dumps({"driver": driver, "devices": devices}))
    return {ENV: str(path)}


def a100(uuid: str = "GPU-11111111-2222-3333-4444-555555555555", **kw: Any) -> dict:
    """A whole A100 40GB with sensible figures (``kw`` overrides)."""
    spec = {
        "name": "NVIDIA A100-SXM4-40GB",
        "uuid": uuid,
        "memory_total": 40 * GiB,
        "memory_used": 3 * GiB,
        "utilization": 37,
        "processes": [{"pid": "self", "used": 2 * GiB}],
    }
    spec.update(kw)
    return spec


def _devices() -> list[dict]:
    if _data is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _data.get("devices", [])


def nvmlInit() -> None:
    global _data
    if _configured is not None:
        data = _configured
    else:
        path = os.environ.get(ENV)
        if not path:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        data = json.loads(Path(path).read_text())
        with open(f"{path}.inits", "a") as log:  # who touched the "GPU" (tests read it)
            log.write(f"{os.getpid()}\n")
    if not data.get("driver", True):
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    _data = data


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_devices())


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    devices = _devices()
    if not 0 <= index < len(devices):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Handle(devices[index])


def nvmlDeviceGetHandleByUUID(uuid: bytes | str) -> _Handle:
    want = uuid.decode() if isinstance(uuid, bytes) else uuid
    for dev in _devices():
        if dev["uuid"] == want:
            return _Handle(dev)
        for mig in dev.get("mig", []):
            if mig["uuid"] == want:
                return _Handle(mig, _Handle(dev))
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetName(handle: _Handle) -> str:
    if handle.parent is not None:
        return f"{handle.parent.spec['name']} MIG {handle.spec['profile']}"
    return handle.spec["name"]


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return handle.spec["uuid"]


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> Memory:
    total = int(handle.spec.get("memory_total", 10 * GiB))
    used = int(handle.spec.get("memory_used", 0))
    return Memory(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> Utilization:
    if handle.is_mig or "utilization" not in handle.spec:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return Utilization(gpu=int(handle.spec["utilization"]), memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[Process]:
    procs = []
    for p in handle.spec.get("processes", []):
        pid = os.getpid() if p["pid"] == "self" else int(p["pid"])
        procs.append(Process(pid=pid, usedGpuMemory=p.get("used")))
    return procs


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    if handle.is_mig or "mig" not in handle.spec:
        if handle.spec.get("mig_capable"):
            return [0, 0]
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return [NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE]


def nvmlDeviceGetMaxMigDeviceCount(handle: _Handle) -> int:
    return 7 if "mig" in handle.spec else 0


def nvmlDeviceGetMigDeviceHandleByIndex(handle: _Handle, index: int) -> _Handle:
    migs = handle.spec.get("mig", [])
    if not 0 <= index < len(migs):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Handle(migs[index], handle)


def nvmlDeviceIsMigDeviceHandle(handle: _Handle) -> int:
    return int(handle.is_mig)
