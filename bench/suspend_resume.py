"""Benchmark (not a test): checkpoint save/load beside the disk's own bandwidth (dd), in one run.

Usage: .venv/bin/python bench/suspend_resume.py [--dir DIR] [--sizes 10,100,1024] [--objects 10000]

For each size: N MiB of float32 tensors plus ``--objects`` small objects (ints, strs, small
dicts/lists). Save (fsync'd) and load times, beside ``dd`` writing (conv=fdatasync) and reading a
file of the same size on the same disk. The page cache is dropped before each read when this
process may write /proc/sys/vm/drop_caches (root); otherwise reads are warm, and the table says so.
"Fixed" is the time for a tiny namespace, the overhead that does not scale with size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpu_kernel import checkpoint as ckmod
from gpu_kernel.checkpoint import load_namespace, save_namespace

KEY = os.urandom(32)


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
    w = dd(
        [
            "if=/dev/urandom" if False else "if=/dev/zero",
            f"of={path}",
            "bs=4M",
            f"count={max(1, mib // 4)}",
            "conv=fdatasync",
        ]
        if mib >= 4
        else ["if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"]
    )
    drop_caches()
    r = dd([f"if={path}", "of=/dev/null", "bs=4M"])
    path.unlink()
    return w, r


def namespace(mib: int, objects: int) -> dict[str, Any]:
    ns: dict[str, Any] = {}
    per = 16  # tensors
    n = mib * (1 << 20) // 4 // per
    for i in range(per):
        ns[f"t{i}"] = torch.rand(n)
    for i in range(objects):
        ns[f"o{i}"] = [i, f"str{i}", {"k": i, "v": [i, i + 1]}, [i, "x", 1.5]][i % 4]
    return ns


def measure(ns: dict[str, Any], directory: Path) -> tuple[float, float, int]:
    ck = directory / "ck"
    t0 = time.perf_counter()
    m = save_namespace(ns, ck, KEY)
    t1 = time.perf_counter()
    drop_caches()
    t2 = time.perf_counter()
    load_namespace(ck, KEY)
    t3 = time.perf_counter()
    shutil.rmtree(ck)
    return t1 - t0, t3 - t2, m.total_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: tmp)")
    ap.add_argument("--sizes", default="10,100,1024", help="MiB of tensors, comma-separated")
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--no-mmap", action="store_true", help="load torch files via one read")
    a = ap.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ckbench-", dir=a.dir))
    cold = drop_caches()
    reads = "cold reads: page cache dropped" if cold else "WARM reads: can't drop the page cache"
    ckmod.TORCH_LOAD_MMAP = not a.no_mmap
    print(f"disk: {directory} ({reads}); torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"torch files loaded with {'mmap' if ckmod.TORCH_LOAD_MMAP else 'one read into memory'}")
    fs, fl, _ = measure({"x": 1, "s": "tiny"}, directory)
    print(f"fixed overhead (tiny namespace): save {fs * 1000:.1f} ms, load {fl * 1000:.1f} ms\n")
    cols = ("tensors", "+objs", "MiB", "save s", "MiB/s", "dd w", "% dd", "load s", "MiB/s", "dd r")
    print(" ".join(f"{c:>8}" for c in cols) + "     % dd")
    try:
        for mib in (int(s) for s in a.sizes.split(",")):
            ns = namespace(mib, a.objects)
            save_s, load_s, nbytes = measure(ns, directory)
            dd_w, dd_r = (x / 2**20 for x in dd_bandwidth(directory, max(1, nbytes >> 20)))
            mb = nbytes / 2**20
            row = (
                f"{mib}Mi",
                a.objects,
                f"{mb:.0f}",
                f"{save_s:.2f}",
                f"{mb / save_s:.0f}",
                f"{dd_w:.0f}",
                f"{100 * mb / save_s / dd_w:.0f}%",
                f"{load_s:.2f}",
                f"{mb / load_s:.0f}",
                f"{dd_r:.0f}",
                f"{100 * mb / load_s / dd_r:.0f}%",
            )
            print(" ".join(f"{c:>8}" for c in row))
            del ns
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
