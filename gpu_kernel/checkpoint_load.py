"""Loading a verified manifest's variables: every blob checked first, then one pickle at a time.

Called by :func:`gpu_kernel.checkpoint.load_namespace` once the manifest's HMAC is good. First
every blob the manifest names is read once into the memory that will hold it (a tensor's blob
straight into its storage) and hashed on the way; one missing or damaged blob stops the load
before anything is unpickled. Then the working directory, ``sys.path`` and local modules come
back, then imports, then each group of variables with an unpickler of its own: one that fails
is named with its reason and takes nothing else with it (CPython's C unpickler must never be
handed another's memo: https://github.com/python/cpython/issues/111066).
"""

from __future__ import annotations

import importlib
import io
import pickle
import tempfile
import weakref
from pathlib import Path
from typing import Any

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel import checkpoint_modules as cmod
from gpu_kernel import checkpoint_pickle as cp
from gpu_kernel import checkpoint_reduce as reduce


class BlobsUnreadable(Exception):
    """A blob the manifest names is missing or damaged (nothing has been unpickled)."""

    def __init__(self, error: blobs.BlobError, store: blobs.BlobStore) -> None:
        super().__init__(str(error))
        self.error, self.store = error, store


class Loader:
    """One load: the verified bytes of every blob, then the namespace built from them."""

    def __init__(
        self, body: dict[str, Any], store: blobs.BlobStore, device: str | None, key: bytes
    ) -> None:
        self.body, self.store, self.device, self.key = body, store, device, key
        self._mem: list[memoryview] = []  # each blob's verified bytes (by its index)
        self._flat: dict[int, Any] = {}  # blob index -> the CPU tensor holding it (storages)
        self._claimed: set[tuple[int, int, int]] = set()  # handed out once (others get copies)
        self.storages: dict[str, Any] = {}  # storage key -> untyped storage, where it goes
        self.torch_error: BaseException | None = None

    # -- phase 1: read and verify every blob ---------------------------------------------------

    def read_all(self) -> None:
        """Read and check every blob (into the tensors that keep them, for whole-blob storages
        that nothing else uses), then make the storages on their devices."""
        storages = self.body["storages"]
        torch = None
        if storages:
            try:
                import torch
            except ImportError as exc:
                self.torch_error = exc
        from gpu_kernel import checkpoint_torch as ct

        sizes = [int(n) for _d, n in self.body["blobs"]]
        own = {loc[0] for loc, _ in storages.values() if loc == [loc[0], 0, sizes[loc[0]]]}
        own = own - {loc[0] for loc in self._other_locs()} if torch is not None else set()
        try:
            for i, (d, _n) in enumerate(self.body["blobs"]):
                if i in own:
                    self._flat[i], view = ct.empty_buffer(sizes[i])
                else:
                    view = memoryview(bytearray(sizes[i]))
                tag = self.body["tags"].get(d)
                self.store.read_into(blobs.check_digest(d), view, (self.key, tag) if tag else None)
                self._mem.append(view)
        except blobs.BlobError as exc:
            raise BlobsUnreadable(exc, self.store) from None
        if torch is not None:
            restore = ct.map_location(self.device)
            for key, (loc, location) in storages.items():
                self.storages[key] = ct.build_storage(self._tensor_item(loc), location, restore)
            for i in self._flat:  # held by their storages now (or moved to a device)
                self._mem[i] = memoryview(b"")
            self._flat.clear()

    def _other_locs(self) -> list[list[int]]:
        out = []
        for _names, _ends, loc, bufs in self.body["groups"]:
            out += [loc, *bufs]
        return out + [m[3] for m in self.body["modules"] if m[3]]

    def item(self, loc: list[int], copy: bool = False) -> memoryview:
        """The verified bytes at ``loc`` (a view into its blob unless ``copy``)."""
        blob, offset, nbytes = loc
        view = self._mem[blob][offset : offset + nbytes]
        return memoryview(bytearray(view)) if copy else view

    def _claim(self, loc: list[int]) -> bool:
        """True the first time ``loc`` is handed out."""
        first = tuple(loc) not in self._claimed
        self._claimed.add((loc[0], loc[1], loc[2]))
        return first

    def _tensor_item(self, loc: list[int]) -> Any:
        """A CPU uint8 tensor with the bytes at ``loc``: the blob's own the first time."""
        if self._claim(loc) and loc[0] in self._flat:
            return self._flat[loc[0]]
        from gpu_kernel import checkpoint_torch as ct

        flat, view = ct.empty_buffer(loc[2])
        view[:] = self.item(loc)
        return flat

    def _buffer(self, loc: list[int]) -> memoryview:
        return self.item(loc, copy=not self._claim(loc))

    def _storage(self, key: str, dtype: Any) -> Any:
        from gpu_kernel import checkpoint_torch as ct

        return ct.typed(self.storages[key], dtype)

    # -- phase 2: build the namespace ----------------------------------------------------------

    def build(
        self, target: dict[str, Any], modules_dir: Path | None
    ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
        """Fill ``target``; returns (restored names, [(name, reason)] failed, notes)."""
        body = self.body
        failed: list[tuple[str, str]] = []
        notes: list[str] = []
        failed += cmod.restore_paths(body["cwd"], body["sys_path"])
        if body["modules"]:
            where = modules_dir or Path(tempfile.mkdtemp(prefix="checkpoint-modules-"))
            more, missing = cmod.restore_modules(body["modules"], self._module_source, where)
            notes += more
            failed += [(f"(module {name})", reason) for name, reason in missing]
        for name, mod in body["imports"].items():
            try:
                target[name] = importlib.import_module(mod)
            except Exception as exc:
                failed.append((name, f"import {mod} failed: {exc}"))
        restored: list[str] = []
        refs: list[weakref.ref] = []
        ctx = cp.LoadContext(ns=target, storage=self._storage if self.storages else None)
        token = cp.LOAD_CONTEXT.set(ctx)
        wtoken = reduce.LOADED_WEAKREFS.set(refs)
        try:
            for names, _ends, item, bufs in body["groups"]:
                self._load_group(names, item, bufs, target, restored, failed)
        finally:
            reduce.LOADED_WEAKREFS.reset(wtoken)
            cp.LOAD_CONTEXT.reset(token)
        dead = {id(r) for r in refs if r() is None}
        dead_names = [n for n in restored if id(target[n]) in dead]
        for name in dead_names:
            del target[name]
            restored.remove(name)
            failed.append(
                (
                    name,
                    "weak reference to an object that was not saved with it "
                    "(nothing else held it), so it would come back dead",
                )
            )
        inside = len(dead) - len(dead_names)
        if inside:
            notes.append(
                f"{inside} weak reference(s) inside restored variables point to objects "
                "that were not saved with them and are dead now"
            )
        return restored, failed, notes

    def _module_source(self, loc: list[int]) -> bytes:
        return bytes(self.item(loc))

    def _load_group(
        self,
        names: list[str],
        item: list[int],
        bufs: list[list[int]],
        target: dict[str, Any],
        restored: list[str],
        failed: list[tuple[str, str]],
    ) -> None:
        try:
            up = pickle.Unpickler(
                io.BytesIO(self.item(item)), buffers=[self._buffer(d) for d in bufs]
            )
        except Exception as exc:
            failed += [(n, _reason(exc, self)) for n in names]
            return
        for i, name in enumerate(names):
            try:
                target[name] = up.load()
                restored.append(name)
            except (Exception, SystemExit) as exc:  # a __setstate__ calling sys.exit() too
                failed.append((name, _reason(exc, self)))
                failed += [
                    (other, f"shares objects with `{name}`, which could not be restored")
                    for other in names[i + 1 :]
                ]
                return


def _reason(exc: BaseException, loader: Loader) -> str:
    text = f"{type(exc).__name__}: {str(exc)[:160]}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        for name, path, *_ in loader.body["modules"]:
            if name == exc.name or exc.name.startswith(name + "."):
                text += f"; {path} is not on this host"
                break
    return f"could not be restored ({text})"
