"""gpu_kernel.checkpoint: real files in tmp_path, real torch on the CPU."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel import checkpoint_io
from gpu_kernel.checkpoint import (
    CheckpointError,
    Manifest,
    blob_store,
    load_namespace,
    save_namespace,
)
from gpu_kernel.protocol import SUSPENDED_EXIT_CODE

KEY = b"0123456789abcdef0123456789abcdef"

NOTEBOOK = """
import math
import numpy as np
from collections import OrderedDict
counter = 0
SCALE = 10
def bump(k=1):
    global counter
    counter += k
    return counter
def scaled(x):
    return x * SCALE
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm(self):
        return math.hypot(self.x, self.y) * SCALE
class Point3(Point):
    def __init__(self, x, y, z):
        super().__init__(x, y)
        self.z = z
square = lambda v: v * v
p = Point(3, 4)
p3 = Point3(1, 2, 3)
shapes = [p, p3, square]
od = OrderedDict(a=1)
"""


def notebook(code: str = NOTEBOOK) -> dict[str, Any]:
    """A namespace as a notebook makes it: code run with __name__ == "__main__"."""
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(code, "<cell>", "exec"), ns)
    return ns


def roundtrip(ns: dict, tmp_path: Path, **kw: Any) -> tuple[dict, Manifest, Manifest]:
    saved = save_namespace(ns, tmp_path / "ck", KEY, **kw)
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    return out, saved, loaded


def test_plain_values_numpy_pandas(tmp_path: Path) -> None:
    shared = [1, 2, 3]
    ns = {
        "i": 42,
        "f": 1.5,
        "c": 2j,
        "s": "héllo",
        "b": b"\x00\x01",
        "n": None,
        "lst": [1, "a", [2.0]],
        "d": {"k": (1, 2), "nested": {"x": {1, 2}}},
        "shared": shared,
        "holder": {"s": shared},
        "arr": np.arange(12, dtype=np.float32).reshape(3, 4),
        "big": np.random.rand(300_000),
        "df": pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}),
    }
    out, saved, loaded = roundtrip(dict(ns), tmp_path)
    for k in ("i", "f", "c", "s", "b", "n", "lst", "d", "shared"):
        assert out[k] == ns[k]
    np.testing.assert_array_equal(out["arr"], ns["arr"])
    np.testing.assert_array_equal(out["big"], ns["big"])
    pd.testing.assert_frame_equal(out["df"], ns["df"])
    assert out["holder"]["s"] is out["shared"]  # aliasing between variables survives
    out["arr"][0, 0] = 7  # writable
    assert {v.name for v in loaded.variables} == set(ns) and not loaded.dropped
    assert saved.total_bytes > ns["big"].nbytes


def test_notebook_functions_classes_lambdas(tmp_path: Path) -> None:
    ns = notebook()
    ns["bump"]()
    out, _, loaded = roundtrip(ns, tmp_path)
    assert not loaded.dropped
    assert out["counter"] == 1
    assert out["bump"]() == 2 and out["counter"] == 2  # writes the restored namespace's global
    assert out["bump"].__globals__ is out
    out["SCALE"] = 100  # sees later changes to restored globals
    assert out["scaled"](2) == 200
    assert out["square"](7) == 49
    assert isinstance(out["p"], out["Point"]) and type(out["p"]) is out["Point"]
    assert isinstance(out["p3"], out["Point"]) and type(out["p3"]) is out["Point3"]
    assert out["p"].norm() == 500.0 and out["p3"].z == 3
    assert out["shapes"][0] is out["p"] and out["shapes"][2] is out["square"]
    assert out["od"] == {"a": 1}


def test_restores_into_given_namespace(tmp_path: Path) -> None:
    save_namespace(notebook(), tmp_path / "ck", KEY)
    user_ns: dict[str, Any] = {"__name__": "__main__", "preexisting": 1}
    out, _ = load_namespace(tmp_path / "ck", KEY, namespace=user_ns)
    assert out is user_ns and user_ns["preexisting"] == 1
    user_ns["SCALE"] = 3
    assert user_ns["scaled"](2) == 6 and user_ns["scaled"].__globals__ is user_ns


def test_imports_restored_and_failed_import_dropped(tmp_path: Path) -> None:
    import types

    fake = types.ModuleType("ck_fake_module_xyz")
    sys.modules["ck_fake_module_xyz"] = fake
    ns = notebook() | {"fake": fake}
    saved = save_namespace(ns, tmp_path / "ck", KEY)
    assert saved.imports == {"math": "math", "np": "numpy", "fake": "ck_fake_module_xyz"}
    del sys.modules["ck_fake_module_xyz"]
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    assert out["np"] is np and out["math"].pi > 3
    assert "fake" not in out
    assert any(
        d.name == "fake" and "import ck_fake_module_xyz failed" in d.reason for d in loaded.dropped
    )


def test_torch_tensors_module_optimizer_views(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    base = torch.arange(20.0)
    ns = {
        "model": model,
        "opt": opt,
        "base": base,
        "view": base[5:10],
        "ints": torch.tensor([1, 2, 3], dtype=torch.int64),
        "w": torch.randn(3, requires_grad=True),
        "in_dict": {"t": base, "m": model},
        "in_list": [base[:2]],
    }
    out, _, loaded = roundtrip(ns, tmp_path)
    assert not loaded.dropped
    for name in ("base", "view", "ints", "w"):
        assert torch.equal(out[name], ns[name]) and out[name].dtype == ns[name].dtype
    assert out["w"].requires_grad
    params = list(out["model"].parameters())
    assert out["opt"].param_groups[0]["params"][0] is params[0]
    assert all(p in out["opt"].state for p in params)
    assert out["opt"].state[params[0]]["exp_avg"].shape == params[0].shape
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    out["base"][6] = -1  # the view still shares the base's storage
    assert (
        out["view"][1] == -1
        and out["in_list"][0].untyped_storage().data_ptr()
        == out["base"].untyped_storage().data_ptr()
    )
    assert out["in_dict"]["t"] is out["base"] and out["in_dict"]["m"] is out["model"]
    # a training step on the restored pair updates the restored module
    before = params[0].detach().clone()
    out["model"](torch.randn(5, 4)).sum().backward()
    out["opt"].step()
    assert not torch.equal(before, params[0])
    assert out["view"].device.type == "cpu"


def test_notebook_module_class(tmp_path: Path) -> None:
    ns = notebook(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
        "        self.act = lambda x: x * 2\n"
        "    def forward(self, x):\n"
        "        return self.act(self.fc(x))\n"
        "net = Net()\n"
    )
    out, _, loaded = roundtrip(ns, tmp_path)
    assert not loaded.dropped
    assert type(out["net"]) is out["Net"]
    x = torch.ones(1, 2)
    assert torch.equal(out["net"](x), ns["net"](x))


def test_unpicklable_dropped_with_reasons(tmp_path: Path) -> None:
    f = open(tmp_path / "data.txt", "w")  # noqa: SIM115
    sock = socket.socket()
    ns = notebook() | {
        "f": f,
        "g": (i for i in range(3)),
        "s": sock,
        "t": threading.Thread(target=print),
        "nested": {"ok": 1, "bad": threading.Thread(target=print)},
        "tensor_with_gen": torch.nn.Linear(1, 1),
        "keep": [1, 2],
    }
    ns["tensor_with_gen"].gen = (i for i in range(2))
    try:
        out, saved, loaded = roundtrip(ns, tmp_path)
    finally:
        f.close()
        sock.close()
    reasons = dict(line.split(": ", 1) for line in loaded.dropped_lines())
    assert reasons["`f`"] == "open file (io.TextIOWrapper) cannot be saved"
    assert reasons["`g`"] == "generator cannot be saved"
    assert reasons["`s`"] == "socket cannot be saved"
    assert reasons["`t`"] == "thread (threading.Thread) cannot be saved"
    assert reasons["`nested`"] == "holds a thread (threading.Thread), which cannot be saved"
    assert reasons["`tensor_with_gen`"] == "holds a generator, which cannot be saved"
    assert set(reasons) == {f"`{n}`" for n in ("f", "g", "s", "t", "nested", "tensor_with_gen")}
    assert out["keep"] == [1, 2] and out["bump"]() == 1
    assert "3 not saved" not in saved.summary() and "6 not saved" in saved.summary()


def test_hidden_and_ipython_names_skipped(tmp_path: Path) -> None:
    ns = {
        "In": [""],
        "Out": {},
        "_": 1,
        "__": 2,
        "_i": "",
        "_i3": "x",
        "_3": 9,
        "_oh": {},
        "exit": object(),
        "get_ipython": lambda: None,
        "__builtins__": __builtins__,
        "secret_helper": 5,
        "_private": 7,
        "x": 1,
    }
    out, saved, _ = roundtrip(ns, tmp_path, hidden={"secret_helper"})
    assert set(out) == {"_private", "x"}
    assert {v.name for v in saved.variables} == {"_private", "x"}


def test_cwd_and_execution_count(tmp_path: Path) -> None:
    here = os.getcwd()
    work = tmp_path / "work"
    work.mkdir()
    try:
        save_namespace({"x": 1}, tmp_path / "ck", KEY, execution_count=17, cwd=str(work))
        _, loaded = load_namespace(tmp_path / "ck", KEY)
        assert os.getcwd() == str(work) and loaded.execution_count == 17
        save_namespace({"x": 1}, tmp_path / "ck2", KEY, cwd=str(tmp_path / "gone"))
        os.chdir(here)
        _, loaded = load_namespace(tmp_path / "ck2", KEY)
        assert os.getcwd() == here
        assert any("gone does not exist here" in line for line in loaded.dropped_lines())
    finally:
        os.chdir(here)
    assert SUSPENDED_EXIT_CODE == 75


def test_permissions(tmp_path: Path) -> None:
    os.umask(old := os.umask(0o022))
    save_namespace(
        notebook() | {"t": torch.ones(3), "big": torch.ones(1 << 20)}, tmp_path / "ck", KEY
    )
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["manifest.json"]
    store = tmp_path / ".blobs"
    files = [p for p in [tmp_path / "ck", store, *store.rglob("*")] if not p.is_dir()]
    assert len(files) >= 3  # manifest, a pack and the big tensor's own blob (and the lock)
    for p in [tmp_path / "ck", *(tmp_path / "ck").iterdir(), store, *store.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    assert sorted(p.name for p in tmp_path.iterdir()) == [".blobs", "ck"]  # no temp dir left
    assert old == os.umask(old)


class Evil:
    """Unpickling this creates a marker file: proof that a pickle ran."""

    marker = ""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def blob_files(root: Path) -> list[Path]:
    """The blob files of the store under ``root`` (``root/.blobs`` by default)."""
    return sorted(p for p in (root / ".blobs").rglob("*") if len(p.name) == 64 and p.is_file())


def _plant(directory: Path, key: bytes, payload: bytes) -> None:
    """Store ``payload`` as a blob, make the first variable's pickle point at it and sign the
    manifest with ``key`` (what a holder of that key could do)."""
    doc = json.loads((directory / "manifest.json").read_bytes())
    body = doc["manifest"]
    d = blobs.digest(payload)
    path = blob_store(directory, body["store"]).path(d)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(payload)
    body["blobs"].append([d, len(payload)])
    body["groups"][0][2:] = [[len(body["blobs"]) - 1, 0, len(payload)], []]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc["hmac"] = checkpoint_io.manifest_mac(key, canonical)
    (directory / "manifest.json").write_text(json.dumps(doc))


def test_tampered_pickle_never_runs(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save_namespace({"x": [1, 2, 3]}, ck, KEY)
    marker = tmp_path / "pwned"
    Evil.marker = str(marker)
    evil = pickle.dumps(Evil())
    [pack] = blob_files(tmp_path)
    good = pack.read_bytes()
    pack.write_bytes(evil)  # the blob's bytes replaced in place
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        load_namespace(ck, KEY)
    pack.write_bytes(good)
    _plant(ck, b"another kernel's key", evil)  # signed, but with a foreign key
    with pytest.raises(CheckpointError, match="belongs to another kernel"):
        load_namespace(ck, KEY)
    assert not marker.exists()
    _plant(ck, KEY, evil)  # control: with the right key the same pickle does run
    load_namespace(ck, KEY)
    assert marker.exists()


def test_flipped_byte_and_foreign_key_and_edited_manifest(tmp_path: Path) -> None:
    ns = notebook() | {"t": torch.ones(1 << 19)}
    save_namespace(ns, tmp_path / "ck", KEY)
    files = blob_files(tmp_path)
    assert len(files) >= 2  # packs, and the 2 MiB tensor's own blob
    here = os.getcwd()
    for path in files:
        good = path.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        target: dict[str, Any] = {}
        with pytest.raises(CheckpointError) as err:
            load_namespace(tmp_path / "ck", KEY, namespace=target)
        assert "integrity" in str(err.value) and "hint:" in str(err.value)
        assert target == {} and os.getcwd() == here  # nothing loaded
        path.write_bytes(good)
    assert load_namespace(tmp_path / "ck", KEY)[0]["t"].sum() == 1 << 19  # intact again
    with pytest.raises(CheckpointError, match="belongs to another kernel"):
        load_namespace(tmp_path / "ck", b"x" * 32)
    doc = json.loads((tmp_path / "ck" / "manifest.json").read_bytes())
    doc["manifest"]["execution_count"] = 99
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="integrity"):
        load_namespace(tmp_path / "ck", KEY)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_namespace(tmp_path / "missing", KEY)


def test_crash_mid_save_leaves_nothing_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "ck"
    save_namespace({"x": "old"}, ck, KEY)

    def crash(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint_io, "write_small", crash)  # dies before the manifest
    with pytest.raises(RuntimeError):
        save_namespace({"x": "new", "t": torch.ones(3)}, ck, KEY)
    with pytest.raises(RuntimeError):
        save_namespace({"y": 1}, tmp_path / "fresh", KEY)
    monkeypatch.undo()
    assert load_namespace(ck, KEY)[0] == {"x": "old"}  # the older checkpoint is intact
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".blobs", "ck"]
    # a directory without a (valid) manifest, like a crashed writer's, never loads
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "objects.pkl").write_bytes(pickle.dumps(1))
    with pytest.raises(CheckpointError):
        load_namespace(tmp_path / "half", KEY)


def test_ten_thousand_small_objects_round_trip(tmp_path: Path) -> None:
    # how fast: bench/suspend_resume.py (--objects); a timed assertion here fails on a busy machine
    ns: dict[str, Any] = {}
    for i in range(10_000):
        ns[f"v{i}"] = [i, f"s{i}", {"k": i, "l": [i, i + 1]}, (i, 1.5)][i % 4]
    save_namespace(ns, tmp_path / "ck", KEY)
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    assert out == ns and len(loaded.variables) == 10_000


def test_one_bad_object_among_many(tmp_path: Path) -> None:
    ns: dict[str, Any] = {}
    for i in range(1000):
        ns[f"v{i}"] = {"i": i}
        if i == 10:
            ns["alias"] = ns["v10"]  # pickled before the failing v500
    ns["v500"] = {"i": 500, "gen": (x for x in "ab")}
    ns["late"] = ns["v10"]
    out, _, loaded = roundtrip(ns, tmp_path)
    assert [d.name for d in loaded.dropped] == ["v500"]
    assert out["alias"] is out["v10"] and out["v999"] == {"i": 999}
    assert out["late"] == out["v10"]  # equal; identity is kept only up to a failed variable


def test_works_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch fails\n"
        "from gpu_kernel.checkpoint import save_namespace, load_namespace\n"
        f"d = {str(tmp_path / 'ck')!r}\n"
        "save_namespace({'x': [1, 2], 'f': lambda: 3}, d, b'k')\n"
        "ns, m = load_namespace(d, b'k')\n"
        "assert ns['x'] == [1, 2] and ns['f']() == 3 and not m.dropped\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_torch_checkpoint_without_torch_drops_tensors(tmp_path: Path) -> None:
    save_namespace({"t": torch.ones(2), "x": 1}, tmp_path / "ck", KEY)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from gpu_kernel.checkpoint import load_namespace\n"
        f"ns, m = load_namespace({str(tmp_path / 'ck')!r}, {KEY!r})\n"
        "assert ns == {'x': 1}, ns\n"
        "assert [d.name for d in m.dropped] == ['t'], m.dropped\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 0, res.stderr


def test_device_cpu_explicit(tmp_path: Path) -> None:
    save_namespace({"t": torch.ones(2)}, tmp_path / "ck", KEY)
    out, _ = load_namespace(tmp_path / "ck", KEY, device="cpu")
    assert out["t"].device.type == "cpu"


@pytest.mark.gpu
def test_cuda_tensors_come_back_on_the_new_slots_device(tmp_path):
    """On a GPU host: tensors saved on CUDA restore onto CUDA, equal and still sharing storage."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    base = torch.arange(12.0, device="cuda")
    ns = {"base": base, "view": base[2:6], "cpu": torch.ones(2)}
    save_namespace(ns, tmp_path / "ck", b"k" * 32)
    restored, _ = load_namespace(tmp_path / "ck", b"k" * 32)
    assert restored["base"].is_cuda and restored["view"].is_cuda
    assert not restored["cpu"].is_cuda
    assert torch.equal(restored["base"].cpu(), torch.arange(12.0))
    restored["base"][3] = -1.0
    assert restored["view"][1].item() == -1.0  # still a view of base
