"""Benchmark (not a test): a local ipykernel reached directly vs through the SessionProxy.

Usage: .venv/bin/python bench/roundtrip_proxy.py [--runs 300] [--mb 20]

Prints execute round trip (send ``pass``, wait for execute_reply and the idle status) median / p99,
and IOPub throughput (a cell writing ``--mb`` MB to stdout in chunks, flushed each time), for both
sides, interleaved in one run, with the proxied/direct ratio. Each side has its own kernel (same
code), so neither side's output also loads the other's path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import zmq
from jupyter_client import BlockingKernelClient, KernelManager

from provisioner.proxy import SessionProxy

DELIM = b"<IDS|MSG>"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def connect(ports: dict[str, int], key: bytes) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(
        {"ip": "127.0.0.1", "transport": "tcp", "key": key, "signature_scheme": "hmac-sha256"}
        | {f"{c}_port": p for c, p in ports.items()}
    )
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return kc


def execute(kc: BlockingKernelClient, code: str) -> None:
    """Run code; wait for its execute_reply, then for its idle status (queued on IOPub)."""
    msg_id = kc.execute(code)
    while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
        pass
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if (
            msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
            and msg["parent_header"].get("msg_id") == msg_id
        ):
            return


def stream(kc: BlockingKernelClient, sub: zmq.Socket, code: str) -> tuple[int, int, float]:
    """Run code; count stream messages and content bytes on a raw SUB until idle; seconds."""
    t0 = time.perf_counter()
    mid = kc.execute(code).encode()
    count = nbytes = 0
    while True:
        frames = sub.recv_multipart(copy=False)
        d = next(i for i, f in enumerate(frames) if f.bytes == DELIM)
        if mid not in frames[d + 3].bytes:
            continue
        header = frames[d + 2].bytes
        if b'"stream"' in header:
            count += 1
            nbytes += len(frames[d + 5])
        elif b'"status"' in header and b"idle" in frames[d + 5].bytes:
            dt = time.perf_counter() - t0
            kc.get_shell_msg(timeout=60)
            return count, nbytes, dt


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=3, help="throughput repetitions per side")
    args = ap.parse_args()

    kms = [KernelManager(kernel_name="python3") for _ in range(2)]
    for km in kms:
        km.start_kernel()
    proxy = SessionProxy()
    try:
        upstream = []
        for km in kms:
            info = km.get_connection_info()
            upstream.append({c: int(info[f"{c}_port"]) for c in CHANNELS})
        proxy.attach(upstream[1])
        ports = {"direct": upstream[0], "proxied": proxy.ports}
        sides = {
            "direct": connect(upstream[0], kms[0].session.key),
            "proxied": connect(proxy.ports, kms[1].session.key),
        }

        rtt: dict[str, list[float]] = {s: [] for s in sides}
        for i in range(args.runs + 20):
            for side, kc in sides.items():
                t0 = time.perf_counter()
                execute(kc, "pass")
                if i >= 20:  # warm-up
                    rtt[side].append((time.perf_counter() - t0) * 1000)

        ctx = zmq.Context.instance()
        subs = {}
        for side, kc in sides.items():
            kc.iopub_channel.stop()  # only the raw SUB below reads this side's output now
            subs[side] = ctx.socket(zmq.SUB)
            subs[side].rcvhwm = 0
            subs[side].setsockopt(zmq.SUBSCRIBE, b"")
            subs[side].connect(f"tcp://127.0.0.1:{ports[side]['iopub']}")
        time.sleep(0.5)
        total = int(args.mb * 1_000_000)
        rows = []
        lost = {s: 0 for s in sides}
        for chunk in (65536, 4096):
            n = total // chunk
            code = (
                f"import sys\n_c = 'x' * {chunk - 1} + '\\n'\n"
                f"for _ in range({n}):\n    sys.stdout.write(_c); sys.stdout.flush()\n"
            )
            rate: dict[str, list[float]] = {s: [] for s in sides}
            for _ in range(args.repeat):
                for side, kc in sides.items():
                    count, nbytes, dt = stream(kc, subs[side], code)
                    lost[side] += n - count
                    rate[side].append(nbytes / dt / 1e6)
            rows.append((f"IOPub MB/s, {n} x {chunk // 1024} KiB (median)", rate))

        print(f"\n{'measure':<38} {'direct':>10} {'proxied':>10} {'ratio':>7}")
        for label, q in (
            (f"execute RTT ms, median (n={args.runs})", 0.5),
            ("execute RTT ms, p99", 0.99),
        ):
            d, p = pct(rtt["direct"], q), pct(rtt["proxied"], q)
            print(f"{label:<38} {d:>10.3f} {p:>10.3f} {p / d:>6.2f}x")
        for label, rate in rows:
            d, p = statistics.median(rate["direct"]), statistics.median(rate["proxied"])
            print(f"{label:<38} {d:>10.1f} {p:>10.1f} {p / d:>6.0%}")
        print(f"stream messages lost (PUB high-water mark): {json.dumps(lost)}")
        for side, kc in sides.items():
            kc.stop_channels()
            subs[side].close(linger=0)
    finally:
        proxy.close()
        for km in kms:
            km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
