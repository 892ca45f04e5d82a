"""A resume as the user sees it: from a cell's send to its first output, for a suspended kernel
that comes back on the host that saved it and on another one (its checkpoint copied there).

    .venv/bin/python bench/resume_cell.py [--repeats 5] [--mib 4]

Two real sshd hosts on loopback (one "sim" slot each), a real broker, one Shared GPU kernel
holding ``--mib`` MiB of torch tensors and a few Python objects, suspended with ``%gpu suspend``
between resumes. "Another host": the admin drains the host that saved the state first, so the
broker grants the other one. Not a test: read the figures beside each other (the goal in
issue 12 is <= 1 s for <= 10 MiB of changed state, either way).
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

from broker.client import BrokerClient
from tests.pool import loopback_pool, shut_down
from tests.sshd import end_warm_interpreters


def run(kc, code: str, mark: str = "@out", timeout: float = 120) -> tuple[float, str]:
    """Seconds from the send to the cell's own first output (the line that starts with
    ``mark``: a resume prints its progress in the cell before it), and all the output."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    first, out = None, ""
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
            if first is None and f"\n{mark}" in f"\n{out}":
                first = time.perf_counter() - t0
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return (first if first is not None else float("nan")), out


def suspend(km, kc) -> str:
    """``%gpu suspend``; the host the state was saved on once the session says suspended."""
    run(kc, "%gpu suspend")
    session = km.provisioner.session
    deadline = time.monotonic() + 60
    while session.saved is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.saved is not None, "the kernel did not suspend"
    return session.saved.host.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mib", type=int, default=4, help="MiB of tensors the kernel holds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        hosts, pool = loopback_pool(base, ["hostA", "hostB"])
        os.environ["SHARED_GPU_RUNTIME_ROOT"] = str(base / "kernels")
        times: dict[str, list[float]] = {"same host": [], "another host": []}
        try:
            pool.start()
            pool.install_spec(warm_preload="torch")
            os.environ["SHARED_GPU_TOKEN"] = pool.user_token
            admin = BrokerClient(pool.url, pool.admin_token)
            km, kc = pool.start_kernel()
            n = args.mib * (1 << 18)
            run(kc, f"import torch\nx = torch.randn({n})\nnotes = {{'k': list(range(1000))}}")
            run(kc, "print('warm-up')")
            for i in range(args.repeats):
                for where in times:
                    saved_on = suspend(km, kc)
                    if where == "another host":
                        admin.drain(saved_on)
                    cell = f"x.add_(1); notes['k'].append({i}); print('@out', len(notes['k']))"
                    seconds, out = run(kc, cell)
                    if where == "another host":
                        admin.drain(saved_on, drained=False)
                    now_on = km.provisioner.session.lease.host.name
                    assert (now_on == saved_on) == (where == "same host"), (where, saved_on, now_on)
                    assert "@out 10" in out, out  # the state came back
                    times[where].append(seconds)
            kc.stop_channels()
            shut_down(km)
            admin.close()
        finally:
            pool.stop()
            for host in hosts:
                host.stop()
            end_warm_interpreters(base)
    print(f"\nresume of a kernel holding {args.mib} MiB: cell sent -> first output (s)")
    print(f"{'where':14} {'median':>7} {'min':>7} {'max':>7}   (n={args.repeats}; goal <= 1 s)")
    for where, values in times.items():
        print(
            f"{where:14} {statistics.median(values):7.3f} {min(values):7.3f} {max(values):7.3f}"
        )


if __name__ == "__main__":
    main()
