"""Picklers of a checkpoint: C pickle for speed, dill for what the notebook defined, torch apart.

Streams (see ``docs/internals.md``, Checkpoint format): ``defs.pkl`` (the notebook's functions and
classes), ``torch.pt`` (one ``torch.save`` of every torch object), ``objects.pkl`` (the rest). Each
stream is one :class:`pickle.Pickler` dumping variables one by one with a shared memo, so aliasing
survives and one failing variable is rolled back alone. Objects that C pickle can't do by
reference (``__main__`` functions, classes, lambdas, local functions) become a dill payload that
refers to the namespace, to other definitions and to torch objects through persistent ids, which
the loader resolves from :data:`LOAD_CONTEXT`. Torch is never imported here.
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
    import _thread
    import mmap
    import socket
    import subprocess
    import threading

    lock_types = (type(_thread.allocate_lock()), type(threading.RLock()))
    return (
        (io.IOBase, "open file"),
        (socket.socket, "socket"),
        (threading.Thread, "thread"),
        (lock_types, "lock"),
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
            tname = type_name(obj)
            plain = label in ("lock", "generator", "coroutine", "async generator", "socket")
            return label if plain else f"{label} ({tname})"
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
    defs: dict[int, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)


LOAD_CONTEXT: contextvars.ContextVar[LoadContext] = contextvars.ContextVar("checkpoint_load")


def _resolve(pid: Any) -> Any:
    ctx = LOAD_CONTEXT.get()
    if pid == "ns":
        return ctx.ns
    kind, key = pid
    if kind == "def":
        return ctx.defs[key]
    if kind == "torch":
        if key not in ctx.torch:
            raise KeyError(f"the torch object it refers to ({key}) was not restored")
        return ctx.torch[key]
    raise pickle.UnpicklingError(f"unknown reference {pid!r}")


def _ref(pid: Any) -> Any:
    """Loader of a reference emitted by a C stream (pickled by name as ``_ref``)."""
    return _resolve(pid)


class DillUnpickler(dill.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return _resolve(pid)


def _load_def(idx: int, payload: bytes) -> Any:
    """Loader of a dill payload (its references to earlier definitions are loaded already)."""
    obj = DillUnpickler(io.BytesIO(payload)).load()
    LOAD_CONTEXT.get().defs[idx] = obj
    return obj


# ----------------------------------------------------------------------------------- saving side


def torch_classes() -> tuple[type, ...]:
    """Torch types saved through torch.save; empty if torch was never imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    return (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)


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
    """Shared by the streams of one save: the namespace, definitions emitted, torch objects met."""

    ns: dict[str, Any]
    torch_types: tuple[type, ...]
    def_idx: dict[int, int] = field(default_factory=dict)  # id(obj) -> index
    def_stream: dict[int, str] = field(default_factory=dict)  # index -> stream that loads it
    done: set[int] = field(default_factory=set)  # indexes whose payload is emitted
    keep: list[Any] = field(default_factory=list)  # keeps ids stable
    log: list[int] = field(default_factory=list)  # ids in order of assignment (for rollback)
    torch_objs: dict[str, Any] = field(default_factory=dict)
    torch_keys: dict[int, str] = field(default_factory=dict)
    next_idx: int = 0

    def assign(self, obj: Any, stream: str) -> int:
        idx = self.def_idx.get(id(obj))
        if idx is None:
            idx = self.def_idx[id(obj)] = self.next_idx
            self.next_idx += 1
            self.def_stream[idx] = stream
            self.keep.append(obj)
            self.log.append(id(obj))
        return idx

    def fresh_idx(self) -> int:
        self.next_idx += 1
        return self.next_idx - 1

    def rollback(self, log_len: int) -> None:
        for oid in self.log[log_len:]:
            idx = self.def_idx.pop(oid)
            self.done.discard(idx)
        del self.log[log_len:]

    def torch_key(self, obj: Any) -> str:
        key = self.torch_keys.get(id(obj))
        if key is None:
            key = self.torch_keys[id(obj)] = f"#{len(self.torch_keys)}"
            self.torch_objs[key] = obj
        return key


class _DillPickler(dill.Pickler):
    """Pickles one definition (or one object) by value; references go out as persistent ids."""

    def __init__(self, file: Any, state: SaveState, mode: str, root: Any) -> None:
        super().__init__(file, protocol=PROTOCOL, recurse=False, byref=False)
        self._state, self._mode, self._root = state, mode, root

    def persistent_id(self, obj: Any) -> Any:
        st = self._state
        if obj is st.ns:
            return "ns"
        if obj is self._root or isinstance(obj, int | str | float | bytes | tuple | dict | list):
            return None
        check_saveable(obj, None)
        if st.torch_types and isinstance(obj, st.torch_types):
            return ("torch", st.torch_key(obj)) if self._mode == "objects" else None
        if isinstance(obj, types.FunctionType | type):
            # a definition emitted earlier in this stream or an earlier one: refer to it
            idx = st.def_idx.get(id(obj))
            if (
                idx is not None
                and idx in st.done
                and (self._mode != "torch" or st.def_stream[idx] == "defs")
            ):
                return ("def", idx)
        return None


class StreamPickler(pickle.Pickler):
    """The C pickler of a stream, with the checkpoint's references and checks."""

    def __init__(self, file: Any, state: SaveState, mode: str, protocol: int = PROTOCOL) -> None:
        super().__init__(file, protocol=protocol)
        self._state, self._mode = state, mode
        self.root: Any = None

    def reducer_override(self, obj: Any) -> Any:
        st = self._state
        if obj is st.ns:
            return _ref, ("ns",)
        if isinstance(obj, _BANNED_TYPES):
            check_saveable(obj, self.root)
        if st.torch_types and self._mode == "objects" and isinstance(obj, st.torch_types):
            return _ref, (("torch", st.torch_key(obj)),)
        if isinstance(obj, types.ModuleType):
            name = getattr(obj, "__name__", None)
            if name and sys.modules.get(name) is obj:
                return importlib.import_module, (name,)
            return NotImplemented
        if isinstance(obj, _DillBlob):
            return _load_def, (self._state.fresh_idx(), self._dill_payload(obj.obj))
        if not _needs_dill(obj):
            return NotImplemented
        idx = st.def_idx.get(id(obj))
        if (
            idx is not None
            and idx in st.done
            and (self._mode != "torch" or st.def_stream[idx] == "defs")
        ):
            return _ref, (("def", idx),)
        idx = st.fresh_idx() if self._mode == "torch" else st.assign(obj, self._mode)
        payload = self._dill_payload(obj)
        st.done.add(idx)
        return _load_def, (idx, payload)

    def _dill_payload(self, obj: Any) -> bytes:
        buf = io.BytesIO()
        with main_as(self._state.ns):
            _DillPickler(buf, self._state, self._mode, obj).dump(obj)
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


def torch_pickle_module(state: SaveState) -> types.ModuleType:
    """A pickle "module" for torch.save/torch.load that knows the checkpoint's references."""

    class TorchPickler(StreamPickler):
        def __init__(self, file: Any, protocol: int = 2) -> None:
            super().__init__(file, state, "torch", protocol=max(protocol, 4))

    mod = types.ModuleType("gpu_kernel_checkpoint_pickle")
    mod.Pickler = TorchPickler  # type: ignore[attr-defined]
    mod.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.dump = pickle.dump  # type: ignore[attr-defined]
    return mod


def torch_load_module() -> types.ModuleType:
    mod = types.ModuleType("gpu_kernel_checkpoint_pickle")
    mod.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    return mod


def torch_nbytes(obj: Any) -> int:
    """Approximate bytes of tensor data held by a tensor, module or optimizer."""
    torch = sys.modules["torch"]
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


def map_location(device: str | None) -> Callable[[Any, str], Any]:
    """torch.load's map_location: see :func:`gpu_kernel.checkpoint.load_namespace`."""
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
