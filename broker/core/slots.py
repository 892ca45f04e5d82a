"""The scheduler's pool of slots: who holds each, which are drained or being fenced. Pure.

Only ``broker.core.scheduler.Scheduler`` changes a ``SlotPool``; the service reads ``SlotState``s
and ``Fence``s through the scheduler (``slots()``, ``slot_state()``, ``fences()``). A slot is
*grantable* when it is free, not drained, not fenced and still in the config. A free-slot index
per kind keeps a grant at O(free slots), not O(pool).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

FenceState = Literal["fencing", "unreachable"]


@dataclass(frozen=True)
class SlotState:
    """One slot as the scheduler sees it: what kind it is, whether it may be granted, who has it.
    ``retired``: gone from the config, kept while a lease or a fence still needs it."""

    id: str
    host: str
    kind: str
    drained: bool = False
    lease_id: str | None = None
    retired: bool = False


@dataclass(frozen=True)
class Fence:
    """A slot whose last kernel must be killed before it is granted again."""

    slot_id: str
    lease_id: str
    host: str
    kernel_id: str
    state: FenceState = "fencing"
    sent_at: float = float("-inf")  # when FenceNeeded was last issued


class SlotPool:
    """Slots, fences, drained hosts and the free index (see the module's docstring)."""

    def __init__(self, slots: Iterable[SlotState]) -> None:
        self._slots: dict[str, SlotState] = {}
        for slot in slots:
            if slot.id in self._slots:
                raise ValueError(f"duplicate slot id {slot.id!r}")
            self._slots[slot.id] = replace(slot, lease_id=None, retired=False)
        self._fences: dict[str, Fence] = {}
        self._drained_hosts: frozenset[str] = frozenset()
        self._rebuild()

    # -- queries ---------------------------------------------------------------------------

    def all(self) -> list[SlotState]:
        return [self._slots[slot_id] for slot_id in self._ids]

    def get(self, slot_id: str) -> SlotState | None:
        return self._slots.get(slot_id)

    def kinds(self) -> list[str]:
        # kinds and retirement change only through _rebuild, which refreshes the cache
        return list(self._kinds)

    def state(self, slot_id: str) -> str:
        slot = self._slots[slot_id]
        if slot.lease_id is not None:
            return "busy"
        fence = self._fences.get(slot_id)
        if fence is not None:
            return fence.state
        return "drained" if slot.drained else "free"

    def grantable(self, slot: SlotState) -> bool:
        return (
            slot.lease_id is None
            and not slot.drained
            and not slot.retired
            and slot.id not in self._fences
        )

    def fences(self) -> list[Fence]:
        return list(self._fences.values())

    def fence_of(self, slot_id: str) -> Fence | None:
        return self._fences.get(slot_id)

    def free(self) -> list[SlotState]:
        indexes = sorted(index for free in self._free.values() for index in free)
        return [self._slots[self._ids[index]] for index in indexes]

    def any_free(self) -> bool:
        return any(self._free.values())

    def free_counts(self) -> dict[str, int]:
        return {kind: len(free) for kind, free in self._free.items() if free}

    def free_kinds(self) -> list[str]:
        return [kind for kind, free in self._free.items() if free]

    def first_free(self, kind: str) -> int | None:
        free = self._free.get(kind)
        return min(free) if free else None

    def first_free_on(self, kind: str, host: str) -> int | None:
        """The first grantable slot of ``kind`` on ``host`` (a resumed kernel's checkpoint)."""
        free = self._free.get(kind, ())
        on_host = [i for i in free if self._slots[self._ids[i]].host == host]
        return min(on_host) if on_host else None

    def rank(self, kind: str, host: str | None) -> tuple[bool, int] | None:
        """The first grantable slot of ``kind`` as (not on ``host``, pool index), lowest
        first: one on ``host`` (a resumed kernel's checkpoint is there) goes before the rest."""
        if host is not None:
            index = self.first_free_on(kind, host)
            if index is not None:
                return (False, index)
        index = self.first_free(kind)
        return None if index is None else (True, index)

    def id_at(self, index: int) -> str:
        return self._ids[index]

    # -- changes ---------------------------------------------------------------------------

    def occupy(self, slot_id: str, lease_id: str) -> None:
        self._slots[slot_id] = replace(self._slots[slot_id], lease_id=lease_id)
        self._refresh(slot_id)

    def vacate(self, slot_id: str, fence_for: object | None, now: float) -> None:
        """The lease on ``slot_id`` ended; ``fence_for`` (the Lease) when it must be fenced."""
        slot = replace(self._slots[slot_id], lease_id=None)
        self._slots[slot_id] = slot
        if fence_for is not None:
            lease_id = getattr(fence_for, "id")  # noqa: B009 - a Lease, without importing it
            kernel_id = getattr(fence_for, "kernel_id")  # noqa: B009
            self._fences[slot_id] = Fence(slot_id, lease_id, slot.host, kernel_id, sent_at=now)
        self._settle(slot_id)

    def fence_retries(self, now: float, retry: float) -> list[Fence]:
        """The unreachable slots last asked ``retry`` seconds ago (to ask again, now)."""
        out = []
        for slot_id, fence in list(self._fences.items()):
            if fence.state == "unreachable" and now - fence.sent_at >= retry:
                self._fences[slot_id] = replace(fence, sent_at=now)
                out.append(self._fences[slot_id])
        return out

    def fenced(self, slot_id: str, ok: bool, now: float) -> None:
        fence = self._fences.get(slot_id)
        if fence is None:
            return
        if ok:
            del self._fences[slot_id]
            self._settle(slot_id)
        else:
            self._fences[slot_id] = replace(fence, state="unreachable", sent_at=now)

    def reset(self, slot_id: str) -> None:
        if self._fences.pop(slot_id, None) is not None:
            self._settle(slot_id)

    def restore_fence(self, fence: Fence) -> None:
        slot = self._slots.get(fence.slot_id)
        if slot is not None and slot.lease_id is None:
            self._fences[fence.slot_id] = replace(
                fence, host=slot.host, state="unreachable", sent_at=float("-inf")
            )
            self._refresh(fence.slot_id)

    def set_drain(self, host: str, drained: bool) -> None:
        if drained:
            self._drained_hosts = self._drained_hosts | {host}
        else:
            self._drained_hosts = self._drained_hosts - {host}
        for slot in list(self._slots.values()):
            if slot.host == host:
                self._slots[slot.id] = replace(slot, drained=drained)
                self._refresh(slot.id)

    def reconfigure(self, slots: Iterable[SlotState]) -> None:
        """Replace the pool; slots still leased or fenced stay (retired when gone)."""
        new: dict[str, SlotState] = {}
        for slot in slots:
            if slot.id in new:
                raise ValueError(f"duplicate slot id {slot.id!r}")
            old = self._slots.get(slot.id)
            new[slot.id] = replace(
                slot,
                lease_id=old.lease_id if old else None,
                retired=False,
                drained=slot.drained or slot.host in self._drained_hosts,
            )
        for slot_id, old in self._slots.items():
            if slot_id not in new and (old.lease_id is not None or slot_id in self._fences):
                new[slot_id] = replace(old, retired=True)
        self._slots = new
        self._rebuild()

    # -- internals -------------------------------------------------------------------------

    def _settle(self, slot_id: str) -> None:
        """A retired slot nobody needs any more leaves the pool; others update the index."""
        slot = self._slots[slot_id]
        if slot.retired and slot.lease_id is None and slot_id not in self._fences:
            del self._slots[slot_id]
            self._rebuild()
        else:
            self._refresh(slot_id)

    def _refresh(self, slot_id: str) -> None:
        slot = self._slots[slot_id]
        index = self._order[slot_id]
        if self.grantable(slot):
            self._free.setdefault(slot.kind, set()).add(index)
        else:
            self._free.get(slot.kind, set()).discard(index)

    def _rebuild(self) -> None:
        live = [s for s in self._slots if not self._slots[s].retired]
        self._ids = tuple(live + [s for s in self._slots if self._slots[s].retired])
        self._order = {slot_id: index for index, slot_id in enumerate(self._ids)}
        self._kinds = _kinds_of(self._slots)
        self._free = {}
        for slot_id in self._ids:
            self._refresh(slot_id)


def _kinds_of(slots: dict[str, SlotState]) -> tuple[str, ...]:
    """The sorted kinds of the slots that are not retired."""
    return tuple(sorted({slot.kind for slot in slots.values() if not slot.retired}))
