"""Benchmark (not a test): checkpoint save/load beside the disk's bandwidth (dd), incremental saves,
and what a resume of a little changed state costs on the same host and on another one.

Usage: .venv/bin/python bench/suspend_resume.py [--dir DIR] [--sizes 10,100,1024]
       [--objects 10000] [--state-mib 1024] [--skip full,incremental,resume]

1. Full: N MiB of float32 tensors plus ``--objects`` small objects (ints, strs, small
   dicts/lists), saved into an empty store (fsync'd) and loaded, beside ``dd`` writing
   (conv=fdatasync) and reading a file of the same size on the same disk. The page cache is
   dropped before each read when this process may write /proc/sys/vm/drop_caches (root);
   otherwise reads are warm, and the table says so. "Fixed": a tiny namespace.
2. Incremental: a ``--state-mib`` state of 100 tensors; a cell changes 1 of them in place (1%);
   the next save's bytes written beside the state's size (goal: <= 5%).
3. Resume: the part of "cell sent -> first output" a checkpoint owns, for a 10 MiB state and
   for the big state with 10 MiB changed: load on the same host; copy (only the missing blobs,
   ``copy_checkpoint`` between two "local" hosts: two ctl processes and a pipe) plus load on
   another host that already holds the unchanged blobs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpu_kernel.checkpoint import load_namespace, runtime_store, save_namespace
from gpu_kernel.ssh import HostTarget, connect
from gpu_kernel.transfer import copy_checkpoint

KEY = os.urandom(32)
MIB = 1 << 20


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd(args: list[str]) -> float:
    """Run dd; return the bytes/s it reports."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    assert m, out
    return int(m.group(1)) / float(m.group(2))


def dd_bandwidth(directory: Path, mib: int) -> tuple[float, float]:
    path = directory / "dd.bin"
    count = ["bs=4M", f"count={max(1, mib // 4)}"] if mib >= 4 else ["bs=1M", f"count={mib}"]
    w = dd(["if=/dev/zero", f"of={path}", *count, "conv=fdatasync"])
    drop_caches()
    r = dd([f"if={path}", "of=/dev/null", "bs=4M"])
    path.unlink()
    return w, r


def namespace(mib: int, objects: int, tensors: int = 16) -> dict[str, Any]:
    ns: dict[str, Any] = {}
    n = mib * MIB // 4 // tensors
    for i in range(tensors):
        ns[f"t{i}"] = torch.rand(n)
    for i in range(objects):
        ns[f"o{i}"] = [i, f"str{i}", {"k": i, "v": [i, i + 1]}, [i, "x", 1.5]][i % 4]
    return ns


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def full(directory: Path, sizes: list[int], objects: int) -> None:
    def measure(ns: dict[str, Any]) -> tuple[float, float, int]:
        ck = directory / "full" / "ck"
        save_s, m = timed(save_namespace, ns, ck, KEY)
        drop_caches()
        load_s, _ = timed(load_namespace, ck, KEY)
        shutil.rmtree(directory / "full")
        return save_s, load_s, m.total_bytes

    fs, fl, _ = measure({"x": 1, "s": "tiny"})
    print(f"fixed overhead (tiny namespace): save {fs * 1000:.1f} ms, load {fl * 1000:.1f} ms\n")
    cols = ("tensors", "+objs", "MiB", "save s", "MiB/s", "dd w", "% dd", "load s", "MiB/s", "dd r")
    print(" ".join(f"{c:>8}" for c in cols) + "     % dd")
    for mib in sizes:
        ns = namespace(mib, objects)
        save_s, load_s, nbytes = measure(ns)
        dd_w, dd_r = (x / MIB for x in dd_bandwidth(directory, max(1, nbytes // MIB)))
        mb = nbytes / MIB
        row = (f"{mib}Mi", objects, f"{mb:.0f}", f"{save_s:.2f}", f"{mb / save_s:.0f}",
               f"{dd_w:.0f}", f"{100 * mb / save_s / dd_w:.0f}%", f"{load_s:.2f}",
               f"{mb / load_s:.0f}", f"{dd_r:.0f}", f"{100 * mb / load_s / dd_r:.0f}%")  # fmt: skip
        print(" ".join(f"{c:>8}" for c in row))
        del ns


def incremental(directory: Path, state_mib: int) -> None:
    ns = namespace(state_mib, 100, tensors=100)
    ck = directory / "inc" / "ck"
    first_s, first = timed(save_namespace, ns, ck, KEY)
    ns["t7"].mul_(0.5)  # a cell changes 1% of the state in place
    ns["step"] = 1
    next_s, nxt = timed(save_namespace, ns, ck, KEY)
    ratio = nxt.written_bytes / first.total_bytes
    print(f"\nincremental: state {first.total_bytes / MIB:.0f} MiB in 100 tensors + 100 objects")
    print(f"  first save: wrote {first.written_bytes / MIB:.0f} MiB in {first_s:.2f} s")
    print(f"  after a cell changed 1 tensor (1%): wrote {nxt.written_bytes / MIB:.1f} MiB "
          f"= {100 * ratio:.2f}% of the state (goal <= 5%) in {next_s:.2f} s")  # fmt: skip
    shutil.rmtree(directory / "inc")


def resume(directory: Path, state_mib: int) -> None:
    os.environ["SHARED_GPU_RUNTIME_ROOT"] = str(directory / "root")
    hosts = [HostTarget(name=n, address="local", python=sys.executable) for n in "AB"]
    root = directory / "root"
    print("\nresume (the checkpoint's part of 'cell sent -> first output'; copy = 2 ctl procs):")
    cols = ("state", "changed", "save s", "load here", "copied MiB", "copy s", "load there")
    print(" ".join(f"{c:>11}" for c in cols))
    for label, mib in (("10 MiB", 10), (f"{state_mib} MiB", state_mib)):
        ns = namespace(mib, 1000, tensors=max(1, mib // 10))
        kid = f"bench-{mib}"
        rdirs = [root / h.name / kid for h in hosts]
        for r in rdirs:
            r.mkdir(parents=True, exist_ok=True)
        store = runtime_store(rdirs[0], "bench")
        with connect(hosts[0]) as a, connect(hosts[1]) as b:
            if mib > 10:  # host B holds the state from an earlier visit: change 10 MiB
                save_namespace(ns, rdirs[0] / "checkpoint", KEY, store=store)
                copy_checkpoint(a, hosts[0], b, hosts[1], kid)
                ns["t0"].add_(1)  # one of its 10 MiB tensors
            save_s, _ = timed(save_namespace, ns, rdirs[0] / "checkpoint", KEY, store=store)
            here_s, _ = timed(load_namespace, rdirs[0] / "checkpoint", KEY)
            copy_s, copied = timed(copy_checkpoint, a, hosts[0], b, hosts[1], kid)
        there_s, _ = timed(load_namespace, rdirs[1] / "checkpoint", KEY)
        changed = "all" if mib <= 10 else "10 MiB"
        row = (label, changed, f"{save_s:.3f}", f"{here_s:.3f}", f"{copied / MIB:.1f}",
               f"{copy_s:.3f}", f"{there_s:.3f}")  # fmt: skip
        print(" ".join(f"{c:>11}" for c in row))
        ns.clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: tmp)")
    ap.add_argument("--sizes", default="10,100,1024", help="MiB of tensors, comma-separated")
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--state-mib", type=int, default=1024, help="incremental and resume state")
    ap.add_argument("--skip", default="", help="parts to skip: full,incremental,resume")
    a = ap.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ckbench-", dir=a.dir))
    cold = drop_caches()
    reads = "cold reads: page cache dropped" if cold else "WARM reads: can't drop the page cache"
    print(f"disk: {directory} ({reads}); torch {torch.__version__}, {os.cpu_count()} CPUs")
    try:
        if "full" not in a.skip:
            full(directory, [int(s) for s in a.sizes.split(",")], a.objects)
        if "incremental" not in a.skip:
            incremental(directory, a.state_mib)
        if "resume" not in a.skip:
            resume(directory, a.state_mib)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
