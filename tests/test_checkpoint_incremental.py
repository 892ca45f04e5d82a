"""Incremental checkpoints (issue 12): a save writes only the blobs its store lacks.

Real files, real torch on the CPU. ``written_bytes`` is what a save wrote to the blob store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel.checkpoint import (
    CheckpointError,
    load_namespace,
    runtime_store,
    save_namespace,
)
from tests.test_checkpoint import KEY, blob_files, notebook

MIB = 1 << 20


def state() -> dict[str, Any]:
    """8 MiB of tensors, a 2 MiB numpy array, a model and its optimizer, small objects."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    ns = notebook("class Item:\n    def __init__(self, v): self.v = v\n")
    ns |= {
        "weights": [torch.randn(MIB // 4) for _ in range(8)],
        "arr": np.arange(MIB // 4, dtype=np.float64),
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "box": {"items": [ns["Item"](i) for i in range(3)], "name": "box"},
        "n": 1,
    }
    return ns


def save(ns: dict, path: Path, **kw: Any) -> Any:
    return save_namespace(ns, path, KEY, **kw)


def test_unchanged_tensors_and_objects_are_not_written_again(tmp_path: Path) -> None:
    ns = state()
    first = save(ns, tmp_path / "ck")
    assert first.written_bytes == first.total_bytes > 10 * MIB
    again = save(ns, tmp_path / "ck")
    assert again.written_bytes == 0 and again.total_bytes == first.total_bytes
    ns["n"] = 2  # one small variable: one small pack, not the tensors
    small = save(ns, tmp_path / "ck")
    assert 0 < small.written_bytes < 512 << 10
    out, _ = load_namespace(tmp_path / "ck", KEY)
    assert out["n"] == 2 and torch.equal(out["weights"][3], ns["weights"][3])

    # A kernel restored from its checkpoint saves nothing new if nothing changed.
    restored: dict[str, Any] = {"__name__": "__main__"}
    load_namespace(tmp_path / "ck", KEY, namespace=restored)
    after_resume = save(restored, tmp_path / "ck")
    assert after_resume.written_bytes < 64 << 10, after_resume.written_bytes


@pytest.mark.parametrize(
    "change",
    [
        "weights[2].add_(1)",  # in place: autograd's version counter moves
        "weights[2].data.mul_(2)",  # through .data: the version counter does not move
        "weights[2].numpy()[7] = -1",  # through numpy: nor here
        "weights[2][5:9] = 3",  # a slice
        "model.weight.data[0, 0] += 1",  # a parameter, as a hand-written SGD step does
    ],
)
def test_an_in_place_change_is_caught(tmp_path: Path, change: str) -> None:
    ns = state()
    save(ns, tmp_path / "ck")
    exec(change, ns)
    saved = save(ns, tmp_path / "ck")
    changed = ns["model"].weight if "model" in change else ns["weights"][2]
    assert changed.untyped_storage().nbytes() <= saved.written_bytes < 2 * MIB
    out, _ = load_namespace(tmp_path / "ck", KEY)
    assert torch.equal(out["weights"][2], ns["weights"][2])
    assert torch.equal(out["model"].weight, ns["model"].weight)
    assert out["opt"].param_groups[0]["params"][0] is out["model"].weight


def test_a_mutated_object_inside_a_container_is_caught(tmp_path: Path) -> None:
    ns = state()
    save(ns, tmp_path / "ck")
    ns["box"]["items"][1].v = "changed"
    ns["arr"][123] = -5.0  # a numpy array's buffer, saved out of band
    saved = save(ns, tmp_path / "ck")
    assert 2 * MIB <= saved.written_bytes < 3 * MIB  # the array's blob and a pack, no tensor
    out, _ = load_namespace(tmp_path / "ck", KEY)
    assert out["box"]["items"][1].v == "changed" and out["arr"][123] == -5.0
    assert type(out["box"]["items"][0]) is out["Item"]
    out["arr"][0] = 9  # restored arrays are writable


def test_same_bytes_in_two_variables_stay_two_objects(tmp_path: Path) -> None:
    ns = {"a": torch.zeros(MIB), "b": torch.zeros(MIB), "c": np.zeros(MIB), "d": np.zeros(MIB)}
    saved = save(ns, tmp_path / "ck")
    assert saved.total_bytes < 13 * MIB  # 4 + 8 MiB: one blob for each kind's zeros, not 24
    out, _ = load_namespace(tmp_path / "ck", KEY)
    out["a"][0] = 1
    out["c"][0] = 1
    assert out["b"][0] == 0 and out["d"][0] == 0  # but not one memory


def test_blobs_are_shared_by_a_users_kernels_never_across_users(tmp_path: Path) -> None:
    host = tmp_path / "kernels" / "hostA"
    data = {"big": torch.randn(MIB)}
    rdirs = {k: host / k for k in ("alice-1", "alice-2", "bob-1")}
    for rdir in rdirs.values():
        rdir.mkdir(parents=True)
    stores = {k: runtime_store(rdirs[k], k.split("-")[0]) for k in rdirs}
    alice1 = save(data, rdirs["alice-1"] / "checkpoint", store=stores["alice-1"])
    alice2 = save(data, rdirs["alice-2"] / "checkpoint", store=stores["alice-2"])
    bob = save(data, rdirs["bob-1"] / "checkpoint", store=stores["bob-1"])
    assert alice1.written_bytes >= 4 * MIB and alice2.written_bytes == 0
    assert bob.written_bytes == alice1.written_bytes  # bob's own copy, in bob's own store
    assert stores["alice-1"] == stores["alice-2"] != stores["bob-1"]
    assert stores["bob-1"].parent == host / ".blobs" == stores["alice-1"].parent
    for blob in blob_files(host):  # alice's blobs going away leaves bob's checkpoint whole
        if blob.is_relative_to(stores["alice-1"]):
            blob.unlink()
    assert torch.equal(load_namespace(rdirs["bob-1"] / "checkpoint", KEY)[0]["big"], data["big"])
    with pytest.raises(CheckpointError, match="is incomplete"):
        load_namespace(rdirs["alice-2"] / "checkpoint", KEY)


def test_a_missing_blob_fails_the_load_clearly_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    ns = state()
    save(ns, tmp_path / "ck")
    manifest = (tmp_path / "ck" / "manifest.json").read_bytes()
    victim = max(blob_files(tmp_path), key=lambda p: p.stat().st_size)
    kept = victim.read_bytes()
    victim.unlink()
    target: dict[str, Any] = {}
    with pytest.raises(CheckpointError) as err:
        load_namespace(tmp_path / "ck", KEY, namespace=target)
    text = str(err.value)
    assert "is incomplete" in text and "is missing" in text and victim.name[:16] in text
    assert "nothing was loaded and the checkpoint is kept" in text and target == {}
    assert (tmp_path / "ck" / "manifest.json").read_bytes() == manifest
    victim.write_bytes(kept)  # the blob comes back (e.g. a copy again): the checkpoint loads
    assert load_namespace(tmp_path / "ck", KEY)[0]["n"] == 1


def test_a_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = state()
    save(ns, tmp_path / "ck")
    ns["n"] = 99
    ns["weights"][0].add_(1)

    def disk_full(self: blobs.BlobStore, d: str, chunks: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs.BlobStore, "put", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        save(ns, tmp_path / "ck")
    monkeypatch.undo()
    out, _ = load_namespace(tmp_path / "ck", KEY)
    assert out["n"] == 1 and not torch.equal(out["weights"][0], ns["weights"][0])


def test_unreferenced_blobs_are_swept_by_age(tmp_path: Path) -> None:
    ns = {"t": torch.randn(MIB)}
    first = save(ns, tmp_path / "ck")
    ns["t"] = torch.randn(MIB)
    save(ns, tmp_path / "ck")  # the first tensor's blob is no longer named by any manifest
    store = blobs.BlobStore(tmp_path / ".blobs", tmp_path, ("*/manifest.json",))
    files = {p.name: p for p in blob_files(tmp_path)}
    assert len(files) >= 2 and first.total_bytes
    now = time.time()
    assert store.sweep(now=now) == []  # young: kept for a while (a kernel may come back)
    old = now - blobs.BLOB_TTL - 60
    for p in files.values():
        os.utime(p, (old, old))
    gone = store.sweep(now=now)
    assert gone and all(not files[name].exists() for name in gone)
    assert load_namespace(tmp_path / "ck", KEY)[0]["t"].equal(ns["t"])  # named ones stay
    with store.writing():  # a save in progress: no sweep meanwhile
        assert store.sweep(now=now + 10 * blobs.BLOB_TTL) == []


def test_the_unreferenced_blobs_are_capped(tmp_path: Path) -> None:
    for i in range(3):
        save({"t": torch.full((MIB,), float(i))}, tmp_path / f"k{i}")
    store = blobs.BlobStore(tmp_path / ".blobs", tmp_path, ("*/manifest.json",))
    import shutil

    shutil.rmtree(tmp_path / "k0")
    shutil.rmtree(tmp_path / "k1")  # two kernels gone: 8 MiB of blobs nobody names
    gone = store.sweep(cap=5 * MIB)
    assert len(gone) >= 1
    assert load_namespace(tmp_path / "k2", KEY)[0]["t"][0] == 2.0


# NIST CAVP gcmEncryptExtIV256.rsp: PTlen=0, so the tag is the GMAC of the AAD (Keylen=256,
# IVlen=96, Taglen=128; the AADlen=0, 128 and 160 groups, Count 0-1).
NIST_GMAC = [
    (
        "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
        "516c33929df5a3284ff463d7",
        "",
        "bdc1ac884d332457a1d2664f168c76f0",
    ),
    (
        "78dc4e0aaf52d935c3c01eea57428f00ca1fd475f5da86a49c8dd73d68c8e223",
        "d79cf22d504cc793c3fb6c8a",
        "b96baa8c1c75a671bfb2d08d06be5f36",
        "3e5d486aa2e30b22e040b85723a06e76",
    ),
    (
        "4457ff33683cca6ca493878bdc00373893a9763412eef8cddb54f91318e0da88",
        "699d1f29d7b8c55300bb1fd2",
        "6749daeea367d0e9809e2dc2f309e6e3",
        "d60c74d2517fde4a74e0cd4709ed43a9",
    ),
    (
        "886cff5f3e6b8d0e1ad0a38fcdb26de97e8acbe79f6bed66959a598fa5047d65",
        "3a8efa1cd74bbab5448f9945",
        "519fee519d25c7a304d6c6aa1897ee1eb8c59655",
        "f6d47505ec96c98a42dc3ae719877b87",
    ),
]


@pytest.mark.parametrize(("key", "iv", "aad", "tag"), NIST_GMAC)
def test_gmac_matches_the_nist_vectors(key: str, iv: str, aad: str, tag: str) -> None:
    data = bytes.fromhex(aad)
    whole = blobs.Gmac(bytes.fromhex(key), bytes.fromhex(iv))
    whole.update(data)
    assert whole.hexdigest() == tag
    pieces = blobs.Gmac(bytes.fromhex(key), bytes.fromhex(iv))  # fed in pieces, as blobs are
    for i in range(0, len(data), 7):
        pieces.update(data[i : i + 7])
    assert pieces.hexdigest() == tag


def test_big_blobs_are_checked_with_the_kernels_gmac(tmp_path: Path) -> None:
    t = torch.randn(MIB)
    save({"t": t}, tmp_path / "ck")
    doc = __import__("json").loads((tmp_path / "ck" / "manifest.json").read_bytes())
    [(digest, (nonce, tag))] = doc["manifest"]["tags"].items()
    data = blobs.BlobStore(tmp_path / ".blobs", tmp_path, ()).path(digest).read_bytes()
    mac = blobs.Gmac(blobs.blob_key(KEY, digest, bytes.fromhex(nonce)), bytes.fromhex(nonce))
    mac.update(data)
    assert mac.hexdigest() == tag and data == t.numpy().tobytes()
    other = blobs.Gmac(
        blobs.blob_key(b"x" * 32, digest, bytes.fromhex(nonce)), bytes.fromhex(nonce)
    )
    other.update(data)
    assert other.hexdigest() != tag  # another kernel's key gives another tag
