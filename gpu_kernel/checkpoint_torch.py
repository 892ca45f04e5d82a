"""Torch storages in a checkpoint: their bytes become blobs, pickles refer to them by key.

The checkpoint's picklers (``checkpoint_pickle``) hand every ``TypedStorage``/``UntypedStorage``
they meet to :func:`storage_ref`: the storage's bytes (copied to the CPU if they live on a
device) are hashed and given to the save's item sink, and the pickle holds only
``(load_storage, (key, dtype))``. The key is the bytes' digest (plus ``.N`` for
a second storage with the same bytes), so a tensor whose bytes did not change pickles to the same
bytes and its blob is not written again; storages shared by tensors (views, tied weights) stay
shared, whichever variables hold them. :func:`build_storage` makes the loaded storage from the
verified buffer, on the device chosen by :func:`map_location`. Torch is imported by callers only
when the namespace or the checkpoint has tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gpu_kernel import checkpoint_blobs as blobs


def torch_classes() -> tuple[type, ...]:
    """Torch storage types; empty if torch was never imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    return (torch.storage.TypedStorage, torch.UntypedStorage)


def storage_bytes(untyped: Any) -> memoryview:
    """The bytes of an untyped storage (a CPU copy for a device's), without copying CPU ones."""
    torch = sys.modules["torch"]
    if untyped.device.type != "cpu":
        untyped = untyped.cpu()
    if untyped.nbytes() == 0:
        return memoryview(b"")
    flat = torch.empty(0, dtype=torch.uint8).set_(untyped)
    return memoryview(flat.numpy()).cast("B")


def location_of(untyped: Any) -> str:
    from torch.serialization import location_tag

    return str(location_tag(untyped))


def split(obj: Any) -> tuple[Any, Any]:
    """(untyped storage, dtype or None) of a Typed or Untyped storage."""
    torch = sys.modules["torch"]
    if isinstance(obj, torch.storage.TypedStorage):
        return obj._untyped_storage, obj.dtype
    return obj, None


class StorageKeys:
    """Keys of the storages met by one save, by storage identity (hashed once per save)."""

    def __init__(self, add_item: Callable[[memoryview, str, str], None]) -> None:
        self._add_item = add_item  # (bytes, digest, kind): hands the bytes to the item sink
        self._by_cdata: dict[int, str] = {}
        self._count: dict[str, int] = {}
        self._keep: list[Any] = []  # storages stay alive (their ids unique) during the save
        self.table: dict[str, list[Any]] = {}  # key -> [digest, location, nbytes]

    def key(self, untyped: Any) -> str:
        cdata = untyped._cdata
        found = self._by_cdata.get(cdata)
        if found is not None:
            return found
        data = storage_bytes(untyped)
        digest = blobs.digest(data)
        n = self._count.get(digest, 0)
        self._count[digest] = n + 1
        key = digest if n == 0 else f"{digest}.{n}"
        self._add_item(data, digest, "s")
        self._by_cdata[cdata] = key
        self._keep.append(untyped)
        self.table[key] = [digest, location_of(untyped), len(data)]
        return key


def map_location(device: str | None) -> Callable[[Any, str], Any]:
    """Where a storage saved at ``location`` goes (see ``checkpoint.load_namespace``)."""
    torch = sys.modules["torch"]
    from torch.serialization import default_restore_location

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0

    def restore(storage: Any, location: str) -> Any:
        if location == "cpu":
            target = "cpu"
        elif device is not None:
            target = device
        elif location.startswith("cuda") and cuda:
            index = int(location.partition(":")[2] or 0)
            target = location if index < count else f"cuda:{torch.cuda.current_device()}"
        elif cuda:
            target = f"cuda:{torch.cuda.current_device()}"
        else:
            target = "cpu"
        return default_restore_location(storage, target)

    return restore


def empty_buffer(nbytes: int) -> tuple[Any, memoryview]:
    """A CPU uint8 tensor of ``nbytes`` and a writable view of its memory (a blob reads into it)."""
    torch = sys.modules["torch"]
    flat = torch.empty(nbytes, dtype=torch.uint8)
    return flat, memoryview(flat.numpy()).cast("B")


def build_storage(flat: Any, location: str, restore: Callable[[Any, str], Any]) -> Any:
    """The untyped storage of the verified CPU buffer ``flat``, moved where ``restore`` says."""
    return restore(flat.untyped_storage(), location)


def typed(untyped: Any, dtype: Any) -> Any:
    """What a pickle of a tensor expects back: a TypedStorage of ``dtype`` (as torch.load
    gives), or the untyped storage itself if that is what was saved (``dtype`` None)."""
    if dtype is None:
        return untyped
    torch = sys.modules["torch"]
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def nbytes_of(obj: Any) -> int:
    """Bytes of tensor data held by a tensor, module or optimizer (for the manifest)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, torch.nn.Module):
        return sum(t.untyped_storage().nbytes() for t in obj.state_dict(keep_vars=True).values())
    if isinstance(obj, torch.optim.Optimizer):
        return sum(
            t.untyped_storage().nbytes()
            for s in obj.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
    return 0
