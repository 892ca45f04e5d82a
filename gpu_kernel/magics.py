"""``%gpu``: where this kernel runs and when it will be suspended; ``%gpu suspend`` frees the GPU.

Registered by ``GPUKernel.start``. Lease, policy, queue and quota come from the proxy's last
``shared_gpu_info`` (shown as "unknown" until one arrives); GPU figures from NVML.
``shared_gpu_info`` fields read here (all optional): ``lease.id``, ``lease.granted_at`` (unix s),
``policy.idle_suspend_after`` / ``policy.idle_suspend_when_queued`` / ``policy.release_after_cell``
(s; the last one null or absent when per-cell binding is off), ``queue.length`` /
``queue.waiting_for_kind`` (int), ``quota.used_hours`` / ``quota.limit_hours`` /
``quota.resets_at`` (unix s) or ``quota.message`` (str).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_magic, magics_class

from gpu_kernel import nvml

if TYPE_CHECKING:
    from gpu_kernel.kernelapp import GPUKernel

USAGE = "usage: %gpu            status of this kernel's GPU slot\n"
USAGE += "       %gpu suspend    checkpoint after this cell and give the GPU back\n"
USAGE += "       %gpu resume     resume a suspended kernel without running code"


def duration(seconds: float) -> str:
    """``"1h 02m"``, ``"5m 03s"``, ``"12s"``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (``"3.0 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def status_lines(
    host: str,
    slot: str,
    device: str,
    started_at: float,
    last_activity: float,
    info: dict[str, Any],
    gpu: dict | None,
    now: float,
) -> list[str]:
    """What ``%gpu`` prints (pure, for tests)."""
    lease = info.get("lease") if isinstance(info.get("lease"), dict) else {}
    policy = info.get("policy") if isinstance(info.get("policy"), dict) else {}
    queue = info.get("queue") if isinstance(info.get("queue"), dict) else None
    quota = info.get("quota") if isinstance(info.get("quota"), dict) else None
    lines = [f"Shared GPU: slot {slot or 'unknown'} on host {host or 'unknown'}"]
    lines.append(f"  device:     {device or 'unknown'}")
    granted = _num(lease, "granted_at")
    since = f"lease {lease['id']}, " if lease.get("id") else ""
    if granted is not None:
        lines.append(f"  lease age:  {duration(now - granted)} ({since}granted on this slot)")
    else:
        lines.append(f"  lease age:  unknown (kernel up {duration(now - started_at)})")
    idle = now - last_activity
    lines.append(f"  idle:       {duration(idle)}")
    after = _num(policy, "idle_suspend_after")
    when_queued = _num(policy, "idle_suspend_when_queued")
    waiting = (queue and (_num(queue, "waiting_for_kind") or _num(queue, "length"))) or 0
    per_cell = _num(policy, "release_after_cell")  # per-cell binding; None: off
    binding_now = bool(waiting) and per_cell is not None
    limit = when_queued if waiting and when_queued is not None else after
    if binding_now:
        limit = per_cell if limit is None else min(per_cell, limit)
    if limit is None:
        lines.append("  suspend:    unknown (no policy from the broker yet)")
    else:
        rule = f"after {duration(after if after is not None else limit)} idle"
        if when_queued is not None and after is not None and when_queued < after:
            rule += f" ({duration(when_queued)} while others wait"
            rule += ", as now)" if waiting and not binding_now else ")"
        left = f"{duration(limit - idle)} left"
        left += " (per-cell binding, as now)" if binding_now else ""
        lines.append(f"  suspend:    {rule}; {left}")
    if per_cell is not None:
        lines.append(
            f"  binding:    per cell: while others wait, the GPU goes back {duration(per_cell)} "
            "after each cell and the next cell resumes the kernel"
        )
    if queue is None:
        lines.append("  queue:      unknown")
    else:
        n = int(_num(queue, "length") or 0)
        kind = _num(queue, "waiting_for_kind")
        extra = f", {int(kind)} for this slot's kind" if kind is not None else ""
        lines.append(f"  queue:      {n} waiting{extra}")
    lines.append(f"  quota:      {_quota(quota, now)}")
    lines.append(f"  GPU:        {_gpu(gpu)}")
    return lines


def _quota(quota: dict | None, now: float) -> str:
    if quota is None:
        return "unknown"
    if isinstance(quota.get("message"), str):
        return quota["message"]
    used, limit = _num(quota, "used_hours"), _num(quota, "limit_hours")
    if used is None:
        return "unknown"
    text = f"{used:.2f} GPU-hours used" + (
        f" of {limit:g} today" if limit is not None else " (no limit)"
    )
    resets = _num(quota, "resets_at")
    if resets is not None:
        text += f"; resets in {duration(resets - now)}"
    return text


def _gpu(gpu: dict | None) -> str:
    if gpu is None:
        return "no NVML figures (simulated slot, or no NVIDIA driver here)"
    text = f"{gpu.get('name', '?')}, memory {size(gpu['memory_used'])} of "
    text += f"{size(gpu['memory_total'])} used"
    if gpu.get("process_memory") is not None:
        text += f" ({size(gpu['process_memory'])} by this kernel)"
    util = gpu.get("utilization")
    text += f", utilization {util}%" if util is not None else ", utilization n/a (MIG)"
    return text


@magics_class
class GPUMagics(Magics):
    """``%gpu [suspend|resume]``."""

    def __init__(self, shell: Any, kernel: GPUKernel) -> None:
        super().__init__(shell)
        self.kernel = kernel

    @line_magic
    def gpu(self, line: str) -> None:
        """Show this kernel's GPU slot; ``%gpu suspend`` frees it after this cell."""
        arg = line.strip()
        act = self.kernel.activity
        if arg in ("", "status", "info"):
            with act.lock:
                fields = (act.host, act.slot, act.device, act.started_at, act.last_activity)
                info = dict(act.info)
            gpu = nvml.device_usage()
            print("\n".join(status_lines(*fields, info, gpu, time.time())))
        elif arg == "suspend":
            self.kernel.suspend_after_cell()
            print("Suspending when this cell finishes ...")
        elif arg == "resume":
            print(f"already running on {act.host or 'unknown'}/{act.slot or 'unknown'}")
        else:
            print(USAGE)
