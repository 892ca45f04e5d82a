"""Objects for checkpoint tests that must be importable by name in a fresh interpreter."""

from __future__ import annotations


def explode() -> None:
    raise RuntimeError("this object refuses to come back")


class Bomb:
    """Pickles fine; unpickling it raises (a variable that fails at load)."""

    def __reduce__(self) -> tuple:
        return (explode, ())
