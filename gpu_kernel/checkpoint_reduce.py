"""Reductions a checkpoint adds to pickle: locks, weak references and Enums defined in cells.

:func:`reduce_special` is called by the checkpoint's picklers (``checkpoint_pickle``) for every
object; it returns a ``(loader, args)`` pair for the kinds below, else None. The loaders are
module-level functions, so a pickle names them and the restoring kernel calls them.

- Locks (``threading.Lock``/``RLock``) come back as new locks, a held ``Lock`` held (as dill
  does); an ``RLock`` comes back free, since the thread that held it is gone. Events,
  conditions, semaphores and ``queue.Queue`` then pickle as the plain objects they are.
- ``weakref.ref``/``WeakMethod`` pickle their referent, so within one variable (or variables
  that share objects, which are saved together) the referent is the same object again;
  :data:`LOADED_WEAKREFS` records each one made, so the loader can report those that came back
  dead (nothing else held their object). ``WeakSet``/``WeakValueDictionary``/
  ``WeakKeyDictionary`` pickle their live items. A weakref already dead when saved comes back
  dead.
- ``property``/``classmethod``/``staticmethod`` objects (an Enum's methods) pickle their
  functions.
- An ``Enum`` class defined in the notebook is rebuilt by value (members, methods, bases) with
  its metaclass, where dill would save it by name and fail to load it.
"""

from __future__ import annotations

import _thread
import contextvars
import enum
import threading
import types
import weakref
from typing import Any

_LOCK = type(_thread.allocate_lock())
_RLOCK = type(threading.RLock())
# weakrefs made by the current load: (weakref, what it was saved from)
LOADED_WEAKREFS: contextvars.ContextVar[list[weakref.ref] | None] = contextvars.ContextVar(
    "checkpoint_weakrefs", default=None
)
IDENTITY_TYPES = (_LOCK, _RLOCK, weakref.ref)  # shared by two variables: saved together
_DESCRIPTORS = (types.FunctionType, classmethod, staticmethod, property)


def reduce_special(obj: Any) -> tuple[Any, tuple] | None:
    """``(loader, args)`` for a lock or weak reference, else None (Enums: :func:`reduce_enum`)."""
    t = type(obj)
    if t is _LOCK:
        return new_lock, (obj.locked(),)
    if t is _RLOCK:
        return new_rlock, ()
    if t is weakref.ref:
        referent = obj()
        if referent is None:
            return dead_weakref, ()
        return weakref_to, (referent, obj.__callback__)
    if t is weakref.WeakMethod:
        method = obj()
        return (weakmethod_to, (method,)) if method is not None else (dead_weakref, ())
    if t is weakref.WeakSet:
        return weakref.WeakSet, (list(obj),)
    if t in (weakref.WeakValueDictionary, weakref.WeakKeyDictionary):
        return t, (dict(obj.items()),)
    if t is property:
        return property, (obj.fget, obj.fset, obj.fdel, obj.__doc__)
    if t in (classmethod, staticmethod):
        return t, (obj.__func__,)
    return None


def is_cell_enum(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, enum.Enum) and bool(obj._member_names_)


def reduce_enum(cls: type[enum.Enum], key: Any) -> tuple[Any, tuple]:
    """``(make_enum, args)`` rebuilding ``cls`` from its members, own methods and bases."""
    prefix = cls.__qualname__ + "."
    extras = []
    for name, value in cls.__dict__.items():
        if name == "__doc__" and isinstance(value, str):
            extras.append((name, value))
            continue
        if not isinstance(value, _DESCRIPTORS):
            continue
        func = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
        if getattr(func, "__qualname__", "").startswith(prefix):
            extras.append((name, value))
    members = [(name, member._value_) for name, member in cls._member_map_.items()]
    return make_enum, (
        key,
        type(cls),
        cls.__name__,
        cls.__qualname__,
        cls.__module__,
        cls.__bases__,
        extras,
        members,
    )


# -- loaders (named in pickles) ------------------------------------------------------------


def new_lock(locked: bool) -> Any:
    lock = _thread.allocate_lock()
    if locked:
        lock.acquire()
    return lock


def new_rlock() -> Any:
    return threading.RLock()


def _register(ref: weakref.ref) -> weakref.ref:
    made = LOADED_WEAKREFS.get()
    if made is not None:
        made.append(ref)
    return ref


def weakref_to(referent: Any, callback: Any = None) -> weakref.ref:
    return _register(weakref.ref(referent, callback))


def weakmethod_to(method: Any) -> weakref.ref:
    return _register(weakref.WeakMethod(method))


class _Gone:
    """The referent of a weakref that was dead when saved (it dies at once again)."""


def dead_weakref() -> weakref.ref:
    return weakref.ref(_Gone())


def make_enum(
    key: Any,
    meta: type,
    name: str,
    qualname: str,
    module: str,
    bases: tuple[type, ...],
    extras: list[tuple[str, Any]],
    members: list[tuple[str, Any]],
) -> type:
    from gpu_kernel.checkpoint_pickle import LOAD_CONTEXT

    body = meta.__prepare__(name, bases)  # type: ignore[attr-defined]
    body["__module__"], body["__qualname__"] = module, qualname
    for attr, value in extras:
        body[attr] = value
    for member, value in members:
        body[member] = value
    cls = meta(name, bases, body)
    LOAD_CONTEXT.get().defs[key] = cls
    return cls
