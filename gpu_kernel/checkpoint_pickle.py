"""Picklers of a checkpoint: C pickle for speed, dill for what the notebook defined.

Each variable (or each group of variables that share objects) is one pickle of its own: a
fresh memo, so one that fails to load fails alone. Objects that C pickle can't do by reference
(``__main__`` functions and classes, lambdas, local functions) become a dill payload that
refers to the namespace and to other definitions by persistent ids; Enums defined in cells,
locks and weak references are reduced by :mod:`gpu_kernel.checkpoint_reduce`; torch storages
become references to blobs (:mod:`gpu_kernel.checkpoint_torch`); numpy buffers go out of band
(pickle protocol 5), so both land in blobs of their own. The loaders named in these pickles
resolve references through :data:`LOAD_CONTEXT`. Torch is never imported here.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import io
import pickle
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dill

from gpu_kernel import checkpoint_reduce as reduce
from gpu_kernel.checkpoint_torch import StorageKeys, split

PROTOCOL = 5


class Unsaveable(Exception):
    """A variable holds something that must not be pickled (open file, thread, socket...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def type_name(obj: Any) -> str:
    """``module.Qualname`` of ``obj``'s type (no module for builtins)."""
    t = type(obj)
    mod = getattr(t, "__module__", "") or ""
    mod = mod.removeprefix("_") if mod in ("_io", "_thread", "_socket") else mod
    return t.__qualname__ if mod in ("builtins", "") else f"{mod}.{t.__qualname__}"


def _banned() -> tuple[tuple[type, str], ...]:
    import mmap
    import socket
    import subprocess
    import threading

    return (
        (io.IOBase, "open file"),
        (socket.socket, "socket"),
        (threading.Thread, "thread"),
        (types.GeneratorType, "generator"),
        (types.CoroutineType, "coroutine"),
        (types.AsyncGeneratorType, "async generator"),
        (types.FrameType, "stack frame"),
        (types.TracebackType, "traceback"),
        (subprocess.Popen, "running subprocess"),
        (mmap.mmap, "memory map"),
    )


_BANNED = _banned()
_BANNED_TYPES = tuple(t for t, _ in _BANNED)
_HARMLESS_IO = (io.BytesIO, io.StringIO)


def unsaveable_label(obj: Any) -> str | None:
    """ "open file (io.TextIOWrapper)", "generator"... if ``obj`` must not be saved, else None."""
    if not isinstance(obj, _BANNED_TYPES) or isinstance(obj, _HARMLESS_IO):
        return None
    for types_, label in _BANNED:
        if isinstance(obj, types_):
            plain = label in ("generator", "coroutine", "async generator", "socket")
            return label if plain else f"{label} ({type_name(obj)})"
    return None  # pragma: no cover


def check_saveable(obj: Any, root: Any) -> None:
    """Raise :class:`Unsaveable` with a user-facing reason if ``obj`` must not be saved."""
    label = unsaveable_label(obj)
    if label is not None:
        raise Unsaveable(
            f"{label} cannot be saved" if obj is root else f"holds a {label}, which cannot be saved"
        )


def reason_from_exception(exc: BaseException) -> str:
    """A short reason a user understands, from a pickling error."""
    if isinstance(exc, Unsaveable):
        return exc.reason
    text = str(exc)
    m = re.search(r"cannot pickle '([\w.]+)' object", text)
    if m:
        return f"holds a {m.group(1)} object, which cannot be saved"
    if isinstance(exc, RecursionError):
        return "too deeply nested to save"
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"cannot be saved ({type(exc).__name__}: {text})"


# ---------------------------------------------------------------------------------- loading side


@dataclass
class LoadContext:
    """What persistent references resolve to while a checkpoint loads."""

    ns: dict[str, Any]
    defs: dict[Any, Any] = field(default_factory=dict)
    storage: Callable[[str, Any], Any] | None = None  # (key, dtype) -> storage


LOAD_CONTEXT: contextvars.ContextVar[LoadContext] = contextvars.ContextVar("checkpoint_load")


def _resolve(pid: Any) -> Any:
    ctx = LOAD_CONTEXT.get()
    if pid == "ns":
        return ctx.ns
    kind, key, *rest = pid
    if kind == "def":
        if key not in ctx.defs:
            raise KeyError(f"the definition it uses ({key}) was not restored")
        return ctx.defs[key]
    if kind == "storage":
        return load_storage(key, *rest)
    raise pickle.UnpicklingError(f"unknown reference {pid!r}")


def _ref(pid: Any) -> Any:
    """Loader of a reference emitted by a C pickle (pickled by name as ``_ref``)."""
    return _resolve(pid)


def load_storage(key: str, dtype: Any) -> Any:
    """Loader of a torch storage: the verified blob's storage, on its new device."""
    ctx = LOAD_CONTEXT.get()
    if ctx.storage is None:
        raise ModuleNotFoundError("torch is not installed here, so tensors can't be restored")
    return ctx.storage(key, dtype)


class DillUnpickler(dill.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return _resolve(pid)


def _load_def(key: Any, payload: bytes) -> Any:
    """Loader of a dill payload (its references to earlier definitions are loaded already)."""
    obj = DillUnpickler(io.BytesIO(payload)).load()
    LOAD_CONTEXT.get().defs[key] = obj
    return obj


# ----------------------------------------------------------------------------------- saving side


def _needs_dill(obj: Any) -> bool:
    """True for functions/classes that pickle can't find by name (notebook, lambda, local)."""
    if isinstance(obj, types.FunctionType | type):
        mod = getattr(obj, "__module__", None)
        qual = getattr(obj, "__qualname__", "")
        if mod in ("__main__", None) or "<" in qual:
            return True
        found: Any = sys.modules.get(mod)
        for part in qual.split("."):
            found = getattr(found, part, None)
        return found is not obj
    return isinstance(obj, types.CodeType | types.CellType)


@dataclass
class SaveState:
    """Shared by the pickles of one save: definitions emitted, storages met, modules used."""

    ns: dict[str, Any]
    storages: StorageKeys | None  # None: torch was never imported
    storage_types: tuple[type, ...] = ()
    def_keys: dict[int, Any] = field(default_factory=dict)  # id(obj) -> key
    done: set[Any] = field(default_factory=set)  # keys whose payload is emitted
    keep: list[Any] = field(default_factory=list)  # keeps ids stable
    log: list[int] = field(default_factory=list)  # ids in order of assignment (for rollback)
    modules: set[str] = field(default_factory=set)  # modules of things pickled by name
    next_idx: int = 0

    def assign(self, obj: Any) -> Any:
        key = self.def_keys.get(id(obj))
        if key is None:
            name = getattr(obj, "__name__", None)
            named = isinstance(name, str) and self.ns.get(name) is obj
            key = name if named else self.fresh_key()
            self.def_keys[id(obj)] = key
            self.keep.append(obj)
            self.log.append(id(obj))
        return key

    def fresh_key(self) -> str:
        self.next_idx += 1
        return f"#{self.next_idx - 1}"

    def rollback(self, log_len: int) -> None:
        for oid in self.log[log_len:]:
            self.done.discard(self.def_keys.pop(oid))
        del self.log[log_len:]

    def emitted(self, obj: Any) -> Any:
        key = self.def_keys.get(id(obj))
        return key if key is not None and key in self.done else None

    def storage_ref(self, obj: Any) -> tuple[str, Any]:
        assert self.storages is not None
        untyped, dtype = split(obj)
        return self.storages.key(untyped), dtype


class _DillPickler(dill.Pickler):
    """Pickles one definition (or one object) by value; references go out as persistent ids."""

    def __init__(self, file: Any, state: SaveState, root: Any) -> None:
        super().__init__(file, protocol=PROTOCOL, recurse=False, byref=False)
        self._state, self._root = state, root

    def persistent_id(self, obj: Any) -> Any:
        st = self._state
        if obj is st.ns:
            return "ns"
        if obj is self._root or isinstance(obj, int | str | float | bytes | tuple | dict | list):
            return None
        check_saveable(obj, None)
        if st.storage_types and isinstance(obj, st.storage_types):
            return ("storage", *st.storage_ref(obj))
        if isinstance(obj, types.FunctionType | type):
            key = st.emitted(obj)  # a definition emitted earlier: refer to it
            if key is not None:
                return ("def", key)
        return None


class StreamPickler(pickle.Pickler):
    """The C pickler of a checkpoint, with its references, reductions and checks."""

    def __init__(self, file: Any, state: SaveState, buffer_callback: Any = None) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._state = state
        self.root: Any = None

    def reducer_override(self, obj: Any) -> Any:
        st = self._state
        if obj is st.ns:
            return _ref, ("ns",)
        if isinstance(obj, _BANNED_TYPES):
            check_saveable(obj, self.root)
        special = reduce.reduce_special(obj)
        if special is not None:
            return special
        if st.storage_types and isinstance(obj, st.storage_types):
            return load_storage, st.storage_ref(obj)
        if isinstance(obj, types.ModuleType):
            name = getattr(obj, "__name__", None)
            if name and sys.modules.get(name) is obj:
                st.modules.add(name)
                return importlib.import_module, (name,)
            return NotImplemented
        if isinstance(obj, _DillBlob):
            return _load_def, (st.fresh_key(), self._dill_payload(obj.obj))
        if not _needs_dill(obj):
            if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
                st.modules.add(getattr(obj, "__module__", None) or "builtins")
            return NotImplemented
        key = st.emitted(obj)
        if key is not None:
            return _ref, (("def", key),)
        key = st.assign(obj)
        if reduce.is_cell_enum(obj):
            result = reduce.reduce_enum(obj, key)
        else:
            result = _load_def, (key, self._dill_payload(obj))
        st.done.add(key)
        return result

    def _dill_payload(self, obj: Any) -> bytes:
        buf = io.BytesIO()
        with main_as(self._state.ns):
            _DillPickler(buf, self._state, obj).dump(obj)
        return buf.getvalue()


@dataclass
class _DillBlob:
    """Marks a whole variable to be pickled by dill (C pickle failed on it)."""

    obj: Any


def dill_blob(obj: Any) -> _DillBlob:
    return _DillBlob(obj)


class _MainModule:
    """Stands in for ``sys.modules['__main__']``: dill then sees ``ns`` as the functions' module."""

    def __init__(self, ns: dict[str, Any]) -> None:
        self.__dict__ = ns


@contextlib.contextmanager
def main_as(ns: dict[str, Any]) -> Iterator[None]:
    """Make ``__main__``'s dict be ``ns`` while pickling (a no-op in a kernel: it already is)."""
    main = sys.modules.get("__main__")
    if getattr(main, "__dict__", None) is ns:
        yield
        return
    sys.modules["__main__"] = _MainModule(ns)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.modules["__main__"] = main  # type: ignore[assignment]
