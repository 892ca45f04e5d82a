"""Checking a parsed TOML document and saying where each problem is: the schema-free half.

Pure. ``broker.config.loader`` subclasses ``Checker`` with the broker's schema; ``Checker`` collects
``ConfigIssue``s (type checks, unknown keys with "did you mean", ``{username}`` templates) and puts
a line on each through ``LineIndex``, because ``tomllib`` reports no lines for parsed values.

``LineIndex(text)`` scans the raw text once and answers where a path such as
``("hosts", 1, "slots", 0, "kind")`` was written.

It knows ``[table]`` and ``[[array.of.tables]]`` headers (counting occurrences, so
``hosts[1].slots[0]`` is the first ``[[hosts.slots]]`` after the second ``[[hosts]]``), ``key =``
lines, dotted keys, multi-line strings and arrays. A key inside an inline table or an array of
inline tables is not indexed: the lookup falls back to the line of the enclosing key or header.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from broker.errors import ConfigIssue

Path = tuple[str | int, ...]

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY = rf"(?:{_BARE}|{_QUOTED})(?:\s*\.\s*(?:{_BARE}|{_QUOTED}))*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_KEY})\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(rf"\s*\[\s*({_KEY})\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"\s*({_KEY})\s*=(.*)$")
_KEY_PART = re.compile(rf"{_BARE}|{_QUOTED}")
_STRING = re.compile(r'"""|\'\'\'|' + _QUOTED)


def split_key(dotted: str) -> list[str]:
    """Split a TOML dotted key into its parts, unquoting quoted parts: 'a."b.c"' -> [a, b.c]."""
    parts = []
    for part in _KEY_PART.findall(dotted):
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


class LineIndex:
    """Where each table header and each key of a TOML document is (1-based line numbers)."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        self._arrays: dict[Path, int] = {}  # array-of-tables path -> elements seen so far
        self._scan(text)

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, else of its nearest enclosing key or header, else None."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def _scan(self, text: str) -> None:
        table: Path = ()
        depth = 0  # open brackets of a multi-line value
        in_string: str | None = None  # the delimiter of an open multi-line string
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string or depth:
                in_string, depth = _continue_value(line, in_string, depth)
                continue
            if match := _ARRAY_HEADER.match(line):
                table = self._resolve(split_key(match.group(1)), new_element=True)
                self.lines.setdefault(table, number)
                continue
            if match := _TABLE_HEADER.match(line):
                table = self._resolve(split_key(match.group(1)), new_element=False)
                self.lines.setdefault(table, number)
                continue
            if match := _KEY_LINE.match(line):
                parts = split_key(match.group(1))
                for end in range(1, len(parts) + 1):
                    self.lines.setdefault(table + tuple(parts[:end]), number)
                in_string, depth = _continue_value(match.group(2), None, 0)

    def _resolve(self, parts: list[str], new_element: bool) -> Path:
        """Turn a header's dotted name into a concrete path, with array indexes filled in."""
        path: Path = ()
        for i, part in enumerate(parts):
            path = (*path, part)
            last = i == len(parts) - 1
            if last and new_element:
                count = self._arrays.get(path, 0)
                self._arrays[path] = count + 1
                path = (*path, count)
            elif path in self._arrays:
                path = (*path, self._arrays[path] - 1)
        return path


def _continue_value(text: str, in_string: str | None, depth: int) -> tuple[str | None, int]:
    """Carry the state of a value across a line: an open multi-line string, open brackets."""
    pos = 0
    if in_string:
        end = text.find(in_string)
        if end < 0:
            return in_string, depth
        pos = end + 3
    while pos < len(text):
        char = text[pos]
        if char == "#":
            break
        if text.startswith('"""', pos) or text.startswith("'''", pos):
            delim = text[pos : pos + 3]
            end = text.find(delim, pos + 3)
            if end < 0:
                return delim, depth
            pos = end + 3
            continue
        if char in "\"'":
            match = _STRING.match(text, pos)
            pos = match.end() if match else len(text)
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        pos += 1
    return None, depth


def syntax_issue(file: str, text: str, exc: Exception) -> ConfigIssue:
    """Turn tomllib's "... (at line 3, column 5)" into an issue on line 3."""
    message = str(exc)
    line: int | None = None
    if match := re.search(r"\s*\(at line (\d+), column (\d+)\)", message):
        line = int(match.group(1))
        message = f"{message[: match.start()]} (column {match.group(2)})"
    elif match := re.search(r"\s*\(at end of document\)", message):
        line = max(1, len(text.splitlines()))
        message = f"{message[: match.start()]} (at the end of the file)"
    return ConfigIssue(file, line, "", f"TOML syntax error: {message}; fix the syntax there")


def dotted(path: tuple[str | int, ...]) -> str:
    """("hosts", 1, "slots", 0, "kind") -> "hosts[1].slots[0].kind"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_TYPE_NAMES.update({list: "an array", dict: "a table"})


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class Checker:
    """Collects ConfigIssues while a schema walks a parsed document (see broker.config.loader)."""

    def __init__(self, file: str, index: LineIndex) -> None:
        self.file = file
        self.index = index
        self.issues: list[ConfigIssue] = []

    def issue(self, path: tuple[str | int, ...], message: str) -> None:
        self.issues.append(ConfigIssue(self.file, self.index.line_of(path), dotted(path), message))

    def table(self, data: dict, key: str, path: tuple[str | int, ...]) -> dict:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.issue(path, f"must be a table ([{dotted(path)}]), got {_type_name(value)}")
            return {}
        return value

    def known_keys(self, table: dict, allowed: tuple[str, ...], path: tuple) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            self.issue((*path, key), f"unknown key '{key}': {fix}")

    def typed(self, table: dict, key: str, path: tuple, kind: type, example: str) -> Any:
        """The value of ``key`` if it has type ``kind`` (None if absent or wrong, with an issue)."""
        value = table.get(key)
        if value is None:
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            got = f"{_type_name(value)} {value!r}" if not isinstance(value, dict) else "a table"
            self.issue((*path, key), f"must be {_TYPE_NAMES[kind]} like {example}, got {got}")
            return None
        return value

    def template(self, table: dict, key: str, path: tuple, example: str) -> str | None:
        """A string in which only "{username}" may stand in braces."""
        value = self.typed(table, key, path, str, example)
        if value is not None and set("{}") & set(value.replace("{username}", "")):
            self.issue((*path, key), f"only {{username}} may appear in braces, as in {example}")
            return None
        return value
