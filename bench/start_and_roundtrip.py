"""Start latency and execute round trip: the Shared GPU kernel (lease + SSH + tunnel + proxy) beside
a local python3 kernel, measured in the same run.

    .venv/bin/python bench/start_and_roundtrip.py [--starts 5] [--round-trips 500]

Starts a real broker and one real sshd on loopback (as the tests do; needs openssh-server), then
prints a table with both sides and their ratio. Not a test: timings on shared machines drift, so
read the ratios. The Shared GPU kernel is measured three ways: with eager attach (the start takes
the lease and launches, as a local start does), warm (the host keeps a warm interpreter: every
start but the first forks from it) and cold (``--warm 0``); and with lazy attach (the default:
the start takes nothing, and the first cell pays for the lease and the launch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jupyter_client.manager import KernelManager

from tests.pool import loopback_pool, shut_down


def time_start(make_km) -> tuple[float, KernelManager, object]:
    """Seconds from start_kernel() to the first kernel_info_reply."""
    km = make_km()
    t0 = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return time.perf_counter() - t0, km, kc


def time_first_cell(make_km) -> tuple[float, float, KernelManager, object]:
    """Seconds from start_kernel() to ready, and from the first cell's send to its output."""
    km = make_km()
    t0 = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    msg_id = kc.execute("print('first')")
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    first = time.perf_counter() - t1
    kc.get_shell_msg(timeout=60)
    return ready, first, km, kc


def round_trips(kc, n: int) -> list[float]:
    """Milliseconds for execute_request('pass') -> execute_reply, n times (after a warm-up)."""
    for _ in range(20):
        kc.execute("pass", silent=True)
        kc.get_shell_msg(timeout=10)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        kc.execute("pass", silent=True)
        kc.get_shell_msg(timeout=10)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(label: str, make_km, starts: int, n: int, pause: float) -> dict[str, float]:
    start_times, ready_times, first_cells = [], [], []
    for _ in range(starts):  # each start waits for the last one's clean-up (a one-slot pool)
        time.sleep(pause)
        seconds, km, kc = time_start(make_km)
        start_times.append(seconds)
        kc.stop_channels()
        shut_down(km)
        time.sleep(pause)
        ready, first, km, kc = time_first_cell(make_km)
        ready_times.append(ready)
        first_cells.append(first)
        kc.stop_channels()
        shut_down(km)
    rtt = [float("nan")]
    if n:
        seconds, km, kc = time_start(make_km)
        rtt = round_trips(kc, n)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(f"  {label}: done", file=sys.stderr)
    return {
        "start_s": statistics.median(start_times),
        "ready_s": statistics.median(ready_times),
        "first_cell_s": statistics.median(first_cells),
        "rtt_median_ms": statistics.median(rtt),
        "rtt_p99_ms": p(rtt, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds between a kernel's shutdown and the next start, both sides (a user "
        "opening the next notebook); 0: back to back, as a restart",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        hosts, pool = loopback_pool(base, ["gpuhost"])
        os.environ["SHARED_GPU_RUNTIME_ROOT"] = str(base / "kernels")
        try:
            pool.start()
            pool.install_spec(name="shared-gpu-eager", attach="eager")
            pool.install_spec(name="shared-gpu-cold", attach="eager", warm="0")
            pool.install_spec(name="shared-gpu")  # lazy: the default
            os.environ["SHARED_GPU_TOKEN"] = pool.user_token
            # alternate sides so drift on a shared machine hits both
            local = measure(
                "local python3",
                lambda: KernelManager(kernel_name="python3"),
                args.starts,
                args.round_trips,
                args.pause,
            )
            eager = measure(
                "Shared GPU (eager)",
                lambda: pool.kernel_manager("shared-gpu-eager"),
                args.starts,
                args.round_trips,
                args.pause,
            )
            cold = measure(
                "Shared GPU (eager, no warm interpreter)",
                lambda: pool.kernel_manager("shared-gpu-cold"),
                args.starts,
                0,
                args.pause,
            )
            lazy = measure("Shared GPU (lazy)", pool.kernel_manager, args.starts, 0, args.pause)
        finally:
            pool.stop()
            for host in hosts:
                host.stop()

    rows = [
        ("start to first kernel_info_reply, warm (s)", "start_s", eager, 0.8),
        ("start to first kernel_info_reply, cold (s)", "start_s", cold, 1.5),
        ("execute round trip, median (ms)", "rtt_median_ms", eager, 1.3),
        ("execute round trip, p99 (ms)", "rtt_p99_ms", eager, 2.0),
        ("lazy: start to ready (s, median)", "ready_s", lazy, None),
        ("lazy: first cell to its output (s, median)", "first_cell_s", lazy, None),
    ]
    print(f"\n{'measure':46} {'local':>9} {'Shared GPU':>11} {'ratio':>7} {'goal':>7}")
    for label, key, shared, goal in rows:
        ratio = shared[key] / local[key]
        wanted = f"{goal:6.1f}x" if goal else "      -"
        print(f"{label:46} {local[key]:9.3f} {shared[key]:11.3f} {ratio:6.2f}x {wanted}")
    print(
        f"\n({args.starts} starts, {args.pause:g} s apart, {args.round_trips} round trips each; "
        "Shared GPU = broker lease "
        "+ paramiko SSH to a loopback sshd + one tunnel + session proxy)"
    )


if __name__ == "__main__":
    main()
