"""Pickling a namespace into items: one pickle per variable, or per group sharing objects.

Called by :func:`gpu_kernel.checkpoint.save_namespace`. Pass 1 pickles each variable alone
(fresh memo) and notes the mutable objects each one reached; variables that reached a common
object (a list held by two names, a model and its optimizer) are pickled again together, so
identity between them survives while every other variable stays a pickle of its own. Items
(pickles, numpy buffers, tensor storages, module sources) go to an :class:`ItemSink`: big ones
become blobs of their own at once (in threads), small ones are packed into blobs at the end,
the packs cut where an item's digest says so, so one changed item rewrites one pack only.
A blob already in the store is not written again.
"""

from __future__ import annotations

import collections
import enum
import sys
import types
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gpu_kernel import checkpoint_blobs as blobs
from gpu_kernel import checkpoint_pickle as cp
from gpu_kernel import checkpoint_reduce as reduce
from gpu_kernel.checkpoint_torch import StorageKeys, torch_classes

BIG_ITEM = 1 << 20  # items this big get a blob of their own
PACK_MAX = 4 << 20  # a pack is closed once it holds this much, or once it holds PACK_MIN...
PACK_MIN = 256 << 10
PACK_CUT = 16  # ...after an item whose digest is 0 modulo this (content-defined cuts)


_DEF_TYPES = (type, types.FunctionType)


class ItemSink:
    """Items of one save, by digest; writes blobs to ``store`` (inside ``store.writing()``).

    Each big item's blob also gets a GMAC ``tag`` under the kernel's session ``key`` (the
    loader's fast check); ``known`` holds the tags of this kernel's last save or load, so an
    unchanged blob is not read again for it."""

    def __init__(
        self, store: blobs.BlobStore, key: bytes, known: dict[str, list[str]] | None = None
    ) -> None:
        self.store, self.key, self.known = store, key, known or {}
        self.tags: dict[str, list[str]] = {}
        self.where: dict[str, list[Any]] = {}  # item digest -> [blob digest, offset, nbytes]
        self.blobs: dict[str, int] = {}
        self._small: dict[str, memoryview] = {}
        self._writes: list[Future[int]] = []
        self.written = 0

    def add(self, data: bytes | memoryview, digest: str | None = None, kind: str = "p") -> str:
        view = memoryview(data).cast("B")
        d = digest or blobs.digest(view)
        if d in self.where or d in self._small:
            return d
        if len(view) >= BIG_ITEM:
            self.where[d] = [d, 0, len(view)]
            self.blobs[d] = len(view)
            self._writes.append(blobs.pool().submit(self._big, d, view))
        else:
            self._small[d] = view
        return d

    def _big(self, d: str, view: memoryview) -> int:
        written = self.store.put(d, [view])
        known = self.known.get(d)
        self.tags[d] = known if known is not None else blobs.gmac_tag(self.key, d, view)
        return written

    def finish(self, used: Iterable[str]) -> None:
        """Pack the small items in ``used``, wait for every write, fsync the store's folders."""
        pack: list[tuple[str, memoryview]] = []
        size = 0
        for d in used:
            view = self._small.pop(d, None)
            if view is None:
                continue
            pack.append((d, view))
            size += len(view)
            if size >= PACK_MAX or (size >= PACK_MIN and int(d[:8], 16) % PACK_CUT == 0):
                self._close(pack)
                pack, size = [], 0
        self._close(pack)
        for write in self._writes:
            self.written += write.result()
        self.store.sync()

    def locations(self, used: Iterable[str]) -> tuple[list[list[Any]], dict[str, list[int]]]:
        """The manifest's ``[[blob digest, nbytes]]`` and each used item's ``[blob index,
        offset, nbytes]`` in it."""
        index: dict[str, int] = {}
        loc: dict[str, list[int]] = {}
        for d in used:
            blob, offset, nbytes = self.where[d]
            loc[d] = [index.setdefault(blob, len(index)), offset, nbytes]
        return [[b, self.blobs[b]] for b in index], loc

    def _close(self, pack: list[tuple[str, memoryview]]) -> None:
        if not pack:
            return
        data = b"".join(view for _, view in pack)
        pd = blobs.digest(data)
        offset = 0
        for d, view in pack:
            self.where[d] = [pd, offset, len(view)]
            offset += len(view)
        self.blobs[pd] = len(data)
        self.written += self.store.put(pd, [data])


@dataclass
class Pickled:
    """What a save produced: groups of variables, in load order, and the failures."""

    groups: list[list[Any]] = field(default_factory=list)  # [names, ends, item, buffer items]
    saved: list[tuple[str, str, int, str]] = field(default_factory=list)  # name, type, bytes, kind
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, reason
    storages: dict[str, list[Any]] = field(default_factory=dict)
    modules: set[str] = field(default_factory=set)


class _Collect:
    """The file a pickler writes into: frames gathered until the variable is done."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def _identity_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(types whose objects' identity matters, types never grouped on)."""
    mutable: list[type] = [list, dict, set, bytearray, collections.deque, *reduce.IDENTITY_TYPES]
    for module, name in (("numpy", "ndarray"), ("torch", "Tensor")):
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type):
            mutable.append(found)
    never = (
        type,
        types.ModuleType,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
        enum.Enum,
        cp._DillBlob,
        *torch_classes(),
    )
    return tuple(mutable), never


class NamespacePickler:
    """Pickles the chosen variables of one namespace (see the module's docstring)."""

    def __init__(self, ns: dict[str, Any], sink: ItemSink) -> None:
        self.ns, self.sink = ns, sink
        types_ = torch_classes()
        self.storages = (
            StorageKeys(lambda data, d, kind: sink.add(data, d, kind)) if types_ else None
        )
        self._mutable, self._never = _identity_types()

    def run(self, variables: list[tuple[str, Any]]) -> Pickled:
        """Pickle ``variables`` (definitions first: later pickles refer to them)."""
        first = self._pass([[item] for item in variables], track=True)
        owner: dict[int, int] = {}
        parent = list(range(len(variables)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        index = {name: i for i, (name, _) in enumerate(variables)}
        for name, reached in first.reached.items():
            i = index[name]
            for obj in reached:
                j = owner.setdefault(id(obj), i)
                if find(j) != find(i):
                    parent[find(i)] = find(j)
        first.reached.clear()  # the objects kept alive for this can go now
        if all(find(i) == i for i in range(len(variables))):
            return first.result
        merged: dict[int, list[tuple[str, Any]]] = {}
        for i, item in enumerate(variables):
            merged.setdefault(find(i), []).append(item)
        return self._pass(list(merged.values()), track=False).result

    def _pass(self, groups: list[list[tuple[str, Any]]], track: bool) -> _Pass:
        state = cp.SaveState(self.ns, self.storages, torch_classes())
        run = _Pass(self, state, track)
        with cp.main_as(self.ns):
            for group in groups:
                if not run.group(group) and len(group) > 1:
                    for item in group:  # saved apart, they lose only their shared identity
                        run.group([item])
        run.result.storages = dict(self.storages.table) if self.storages else {}
        run.result.modules = state.modules
        return run

    def reachable(self, memo: dict[int, tuple[int, Any]]) -> list[Any]:
        """The objects of a pickle's memo whose identity another variable could share."""
        out = []
        for _, obj in memo.values():
            if obj is self.ns or isinstance(obj, self._never):
                continue
            if isinstance(obj, self._mutable) or _has_identity(obj):
                out.append(obj)
        return out


def _has_identity(obj: Any) -> bool:
    t = type(obj)
    if not hasattr(obj, "__dict__"):
        return False
    h = getattr(t, "__hash__", None)
    return h is None or h is object.__hash__


class _Pass:
    """One pass over groups of variables with one C pickler (its memo cleared per group)."""

    def __init__(self, owner: NamespacePickler, state: cp.SaveState, track: bool) -> None:
        self.owner, self.state, self.track = owner, state, track
        self.out = _Collect()
        self.buffers: list[Any] = []
        self.pickler = cp.StreamPickler(self.out, state, buffer_callback=self._buffer)
        self.result = Pickled()
        self.reached: dict[str, list[Any]] = {}  # name -> objects kept alive for grouping

    def _buffer(self, buf: Any) -> bool:
        self.buffers.append(buf)
        return False  # out of band: it becomes an item of its own

    def _dump(self, group: list[tuple[str, Any]], wrap: Callable[[Any], Any] | None) -> list[int]:
        """Pickle the group's variables one after the other (one memo); their end offsets."""
        p, parts = self.pickler, self.out.parts
        self.buffers.clear()
        parts.clear()
        p.clear_memo()
        ends = []
        for _name, value in group:
            p.root = value
            p.dump(value if wrap is None else wrap(value))
            ends.append(sum(map(len, parts)))
        return ends

    def group(self, group: list[tuple[str, Any]]) -> bool:
        """Pickle one group; a single variable falls back to dill; False if a group failed."""
        st, p = self.state, self.pickler
        log_len = len(st.log)
        storages = self.owner.storages
        n_storages = len(storages.table) if storages is not None else 0
        try:
            ends = self._dump(group, None)
        except Exception as exc:
            st.rollback(log_len)
            if len(group) > 1:
                return False
            error: BaseException | None = exc
            if not isinstance(exc, cp.Unsaveable):
                try:
                    ends, error = self._dump(group, cp.dill_blob), None
                except Exception as again:
                    st.rollback(log_len)
                    error = again
            if error is not None:
                name, value = group[0]
                reason = cp.reason_from_exception(error)
                self.result.dropped.append((name, cp.type_name(value), reason))
                return True
        if self.track:
            self.reached[group[0][0]] = self.owner.reachable(p.memo.copy())
        p.clear_memo()
        sink = self.owner.sink
        item = sink.add(self.out.take())
        bufs, extra = [], 0
        if self.buffers:
            bufs = [sink.add(b.raw(), kind="b") for b in self.buffers]
            extra = sum(b.raw().nbytes for b in self.buffers)
            self.buffers.clear()
        if storages is not None and len(storages.table) > n_storages:
            extra += sum(int(n) for _, _, n in list(storages.table.values())[n_storages:])
        start = 0
        for (name, value), end in zip(group, ends, strict=True):
            kind = "defs" if isinstance(value, _DEF_TYPES) else "objects"
            self.result.saved.append((name, cp.type_name(value), end - start + extra, kind))
            start, extra = end, 0
        self.result.groups.append([[n for n, _ in group], ends, item, bufs])
        return True
